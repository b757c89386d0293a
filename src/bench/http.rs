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

    fn p99(&self) -> f64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_by(f64::total_cmp);
        super::percentile(&sorted, 0.99)
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
    let healthz = drive(bench, format!("{base}/healthz"), None, true).await?;
    let job_read = drive(bench, format!("{base}{job}"), key, true).await?;
    let job_plain = drive(bench, format!("{plain}{job}"), key, true).await?;
    let search_gzip = drive(bench, format!("{base}{search}"), key, true).await?;
    let search_plain = drive(bench, format!("{plain}{search}"), key, false).await?;
    let gzip = compression(&format!("{base}/v1/calls/search?limit=100"), &f.key).await?;
    let (floor, job_rate) = (healthz.per_sec(), job_read.per_sec());
    let limiter_p99_us = job_read.p99() - job_plain.p99();
    Ok(json!({
        "benchmark": "http",
        "config": { "secs": bench.secs, "connections": bench.connections },
        "healthz": healthz.report(),
        "job_read": job_read.report(),
        "job_read_without_limiter": job_plain.report(),
        "search": search_gzip.report(),
        "search_without_limiter_or_gzip": search_plain.report(),
        "limiter_p99_overhead_us": round1(limiter_p99_us),
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

/// `connections` clients GET `url` back to back for `bench.secs`.
/// With `gzip` the clients accept gzip-encoded responses.
async fn drive(
    bench: &HttpBench,
    url: String,
    key: Option<&str>,
    gzip: bool,
) -> anyhow::Result<Load> {
    let mut client = reqwest::Client::builder().pool_max_idle_per_host(bench.connections);
    if !gzip {
        client = client.no_gzip();
    }
    let client = client.build()?;
    let deadline = Instant::now() + Duration::from_secs_f64(bench.secs);
    let started = Instant::now();
    let clients = (0..bench.connections).map(|_| {
        let (client, url, key) = (client.clone(), url.clone(), key.map(str::to_string));
        tokio::spawn(async move { client_loop(client, url, key, deadline).await })
    });
    let mut load = Load {
        requests: 0,
        errors: 0,
        secs: 0.0,
        latencies_us: Vec::new(),
    };
    for finished in futures::future::join_all(clients).await {
        let (latencies, errors) = finished?;
        load.requests += latencies.len();
        load.errors += errors;
        load.latencies_us.extend(latencies);
    }
    load.secs = started.elapsed().as_secs_f64();
    Ok(load)
}

/// One client's latencies of successful requests and its error count.
async fn client_loop(
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    deadline: Instant,
) -> (Vec<f64>, usize) {
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while Instant::now() < deadline {
        let mut request = client.get(&url);
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
            errors += 1;
        }
    }
    (latencies, errors)
}
