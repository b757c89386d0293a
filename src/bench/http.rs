//! `bench http`: requests per second and latency of the HTTP front under load, for
//! `/healthz` (the floor: no key, no database), an authenticated `GET /v1/jobs/{id}` (a key
//! lookup, cached, and a ledger read) and a call search, each with the rate limiter and gzip
//! and, on a second server in the same run, without the limiter (and, for the search, with a
//! client that does not accept gzip). Each is driven for a fixed time by a
//! built-in load generator: `connections` concurrent keep-alive clients sending requests back
//! to back. The server is the project's own router on a loopback port of this process, so the
//! generator and the server share the machine's cores, as `wrk` on the same host would.
//! What it creates (an API key, a call, a queued job) is removed at the end.

use super::{ratio, round1, summary_us};
use crate::{App, config::Settings, db, http::auth, model::CallInput};
use anyhow::Context;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What to run.
#[derive(Clone, Debug)]
pub struct HttpBench {
    /// Seconds each scenario is driven.
    pub secs: f64,
    /// Concurrent clients.
    pub connections: usize,
}

/// Runs the benchmark.
pub async fn run(mut settings: Settings, bench: HttpBench) -> anyhow::Result<Value> {
    // The load comes from one key: limits that never bind keep the rate limiter on the path
    // (one EVALSHA per request) without refusing it.
    let limits = &mut settings.http_rate_limits;
    limits.get_per_min = u32::MAX;
    limits.post_per_min = u32::MAX;
    limits.search_per_min = u32::MAX;
    let mut unlimited = settings.clone();
    unlimited.http_rate_limits.enabled = false;
    let limited = Server::start(settings).await?;
    let plain = Server::start(unlimited).await?;
    let fixture = Fixture::create(&limited.app, &limited.base).await?;
    let measured = measure(&bench, &limited.base, &plain.base, &fixture).await;
    fixture.remove(&limited.app).await?;
    limited.stop().await?;
    plain.stop().await?;
    measured
}

/// The project's HTTP front on a loopback port of this process.
struct Server {
    app: App,
    base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(settings: Settings) -> anyhow::Result<Server> {
        let app = App::build(settings)?;
        db::migrate(&app.pg).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let task = {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move { app.serve(listener, stop).await })
        };
        Ok(Server {
            app,
            base,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.context("server task")?
    }
}

/// Calls the fixture ingests (one search page of the largest size).
const FIXTURE_CALLS: usize = 100;

/// The rows the scenarios read.
struct Fixture {
    key: String,
    key_id: Uuid,
    run: String,
    job_id: Uuid,
}

impl Fixture {
    async fn create(app: &App, base: &str) -> anyhow::Result<Fixture> {
        let run = Uuid::new_v4().simple().to_string();
        let key =
            auth::create_key(&app.pg, &format!("bench-http-{run}"), auth::Scope::Producer).await?;
        let mut call: CallInput =
            serde_json::from_str(include_str!("../../jobs/samples/call-01.json"))?;
        // A full search page: FIXTURE_CALLS calls, the first of them analysed.
        let mut call_id = Uuid::nil();
        for i in (0..FIXTURE_CALLS).rev() {
            call.external_id = Some(format!("bench-http-{run}-{i}"));
            call_id = db::insert_call(&app.pg, &call).await?.0;
        }
        let response: Value = reqwest::Client::new()
            .post(format!("{base}/v1/analyses"))
            .bearer_auth(&key.key)
            .json(&json!({ "call_id": call_id, "dimensions": ["discovery"] }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let job_id = response["job_id"]
            .as_str()
            .context("no job_id in the analysis response")?
            .parse()?;
        Ok(Fixture {
            key: key.key,
            key_id: key.id,
            run,
            job_id,
        })
    }

    async fn remove(&self, app: &App) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(self.job_id)
            .execute(&app.pg)
            .await?;
        sqlx::query("DELETE FROM calls WHERE external_id LIKE $1")
            .bind(format!("bench-http-{}-%", self.run))
            .execute(&app.pg)
            .await?;
        sqlx::query("DELETE FROM api_keys WHERE id = $1")
            .bind(self.key_id)
            .execute(&app.pg)
            .await?;
        Ok(())
    }
}

/// One scenario's figures.
struct Load {
    requests: usize,
    errors: usize,
    secs: f64,
    latencies_us: Vec<f64>,
}

impl Load {
    fn per_sec(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_by(f64::total_cmp);
        super::percentile(&sorted, p)
    }

    fn report(self) -> Value {
        let per_sec = self.per_sec();
        json!({
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_sec": per_sec.round(),
            "latency": summary_us(self.latencies_us),
        })
    }
}

async fn measure(bench: &HttpBench, base: &str, plain: &str, f: &Fixture) -> anyhow::Result<Value> {
    let key = Some(f.key.as_str());
    let job = format!("/v1/jobs/{}", f.job_id);
    let search = "/v1/calls/search?limit=20";
    let healthz = drive_one(bench, Target::new(base, "/healthz", true), None).await?;
    let job_read = drive_one(bench, Target::new(base, &job, true), key).await?;
    let search_gzip = drive_one(bench, Target::new(base, search, true), key).await?;
    let search_plain = drive_one(bench, Target::new(plain, search, false), key).await?;
    // The limiter's cost, from one run in which every client alternates between the server
    // with the limiter and the one without: both see the same load at the same moments, so
    // the difference of their latencies is the limiter's, not the machine's drift.
    let paired = [
        Target::new(base, &job, true),
        Target::new(plain, &job, true),
    ];
    let [with, without] = <[Load; 2]>::try_from(drive(bench, &paired, key).await?)
        .map_err(|_| anyhow::anyhow!("two targets give two loads"))?;
    let gzip = compression(&format!("{base}/v1/calls/search?limit=100"), &f.key).await?;
    let (floor, job_rate) = (healthz.per_sec(), job_read.per_sec());
    let overhead = json!({
        "p50_us": round1(with.percentile(0.5) - without.percentile(0.5)),
        "p99_us": round1(with.percentile(0.99) - without.percentile(0.99)),
        "target_p99_us": 300.0,
        "met": with.percentile(0.99) - without.percentile(0.99) <= 300.0,
    });
    Ok(json!({
        "benchmark": "http",
        "config": { "secs": bench.secs, "connections": bench.connections },
        "healthz": healthz.report(),
        "job_read": job_read.report(),
        "search": search_gzip.report(),
        "search_without_limiter_or_gzip": search_plain.report(),
        "paired_job_read_with_limiter": with.report(),
        "paired_job_read_without_limiter": without.report(),
        "limiter_overhead": overhead,
        "search_page_gzip": gzip,
        "job_read_vs_healthz": round1(ratio(job_rate, floor) * 100.0) / 100.0,
        "target_job_read_vs_healthz": 1.0 / 3.0,
        "met": ratio(job_rate, floor) >= 1.0 / 3.0,
    }))
}

/// One search page fetched as is and gzip-encoded: both sizes, the server's
/// `X-Compression-Ratio` and how much smaller the encoded page is.
async fn compression(url: &str, key: &str) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder().no_gzip().build()?;
    let fetch = |encoding: &'static str| {
        client
            .get(url)
            .bearer_auth(key)
            .header("accept-encoding", encoding)
            .send()
    };
    let plain = fetch("identity").await?.bytes().await?.len();
    let encoded = fetch("gzip").await?;
    let ratio = encoded
        .headers()
        .get("x-compression-ratio")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let gzipped = encoded.bytes().await?.len();
    Ok(json!({
        "bytes": plain,
        "gzip_bytes": gzipped,
        "x_compression_ratio": ratio,
        "smaller_pct": round1(100.0 * (1.0 - ratio_of(gzipped, plain))),
    }))
}

fn ratio_of(a: usize, b: usize) -> f64 {
    ratio(a as f64, b as f64)
}

/// A URL the load generator requests, and whether its client accepts gzip.
#[derive(Clone)]
struct Target {
    url: String,
    gzip: bool,
}

impl Target {
    fn new(base: &str, path: &str, gzip: bool) -> Self {
        Target {
            url: format!("{base}{path}"),
            gzip,
        }
    }

    fn client(&self, connections: usize) -> reqwest::Result<reqwest::Client> {
        let client = reqwest::Client::builder().pool_max_idle_per_host(connections);
        if self.gzip { client } else { client.no_gzip() }.build()
    }
}

/// [`drive`] with one target.
async fn drive_one(bench: &HttpBench, target: Target, key: Option<&str>) -> anyhow::Result<Load> {
    let mut loads = drive(bench, &[target], key).await?;
    loads.pop().context("one target gives one load")
}

/// `connections` clients GET the targets back to back, in turn, for `bench.secs`: one
/// [`Load`] per target.
async fn drive(
    bench: &HttpBench,
    targets: &[Target],
    key: Option<&str>,
) -> anyhow::Result<Vec<Load>> {
    let clients = targets
        .iter()
        .map(|t| Ok((t.client(bench.connections)?, t.url.clone())))
        .collect::<reqwest::Result<Vec<_>>>()?;
    let deadline = Instant::now() + Duration::from_secs_f64(bench.secs);
    let started = Instant::now();
    let tasks = (0..bench.connections).map(|_| {
        let (clients, key) = (clients.clone(), key.map(str::to_string));
        tokio::spawn(async move { client_loop(clients, key, deadline).await })
    });
    let mut loads: Vec<Load> = targets
        .iter()
        .map(|_| Load {
            requests: 0,
            errors: 0,
            secs: 0.0,
            latencies_us: Vec::new(),
        })
        .collect();
    for finished in futures::future::join_all(tasks).await {
        for (load, (latencies, errors)) in loads.iter_mut().zip(finished?) {
            load.requests += latencies.len();
            load.errors += errors;
            load.latencies_us.extend(latencies);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    loads.iter_mut().for_each(|l| l.secs = secs);
    Ok(loads)
}

/// One client's latencies of successful requests and its error count, per target.
async fn client_loop(
    clients: Vec<(reqwest::Client, String)>,
    key: Option<String>,
    deadline: Instant,
) -> Vec<(Vec<f64>, usize)> {
    let mut tallies = vec![(Vec::new(), 0); clients.len()];
    'run: loop {
        for ((client, url), (latencies, errors)) in clients.iter().zip(tallies.iter_mut()) {
            if Instant::now() >= deadline {
                break 'run;
            }
            let mut request = client.get(url);
            if let Some(key) = &key {
                request = request.bearer_auth(key);
            }
            let t = Instant::now();
            let ok = match request.send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                latencies.push(t.elapsed().as_secs_f64() * 1e6);
            } else {
                *errors += 1;
            }
        }
    }
    tallies
}
