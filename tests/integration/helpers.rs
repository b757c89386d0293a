//! Test helpers: a private Redis server per test, a fresh Postgres database per test, the LLM
//! emulator in-process, and `spawn_app` wiring them into a running web front (and, on request,
//! a worker).

use crate::proxy::FaultProxy;
use callcoach::{
    App,
    config::Settings,
    db,
    delivery::Envelope,
    http::auth::{self, Scope},
    jobs::{AnalyzeCall, Job, RunLabel, perform_job},
    llm::emulator::{self, EmulatorConfig, EmulatorHandle},
    model::Dimension,
};
use serde_json::Value;
use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::Duration,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A redis-server process owned by one test, on its own port.
pub struct TestRedis {
    pub port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl TestRedis {
    pub async fn start() -> TestRedis {
        let mut redis = TestRedis {
            port: free_port(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (deploy/dev.sh test installs it)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (its data is gone, like a crash without persistence).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl TestRedis {
    /// A direct connection, to read and write raw keys.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database() -> String {
    let admin = std::env::var("CALLCOACH_TEST_ADMIN_URL")
        .expect("CALLCOACH_TEST_ADMIN_URL must be set: run the tests with deploy/dev.sh test");
    let name = format!("cc_test_{}", Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("create database");
    pool.close().await;
    let base = admin.rsplit_once('/').expect("admin URL has a database").0;
    format!("{base}/{name}")
}

/// A running application for one test.
pub struct TestApp {
    pub app: App,
    pub base: String,
    pub http: reqwest::Client,
    /// Producer key.
    pub key: String,
    /// Admin key.
    pub admin_key: String,
    /// The environment the app was built from (to build more apps on the same stores).
    pub env: HashMap<String, String>,
    pub redis: TestRedis,
    pub emulator: EmulatorHandle,
    /// The network to Postgres, when `Options::proxy_postgres`.
    pub pg_proxy: Option<FaultProxy>,
    /// The network to Redis, when `Options::proxy_redis`.
    pub redis_proxy: Option<FaultProxy>,
    shutdown: CancellationToken,
    worker: Option<WorkerProcess>,
}

/// A worker running on its own runtime, as a separate process would.
pub struct WorkerProcess {
    token: CancellationToken,
    killed: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl WorkerProcess {
    /// SIGTERM: graceful shutdown; returns the worker's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.token.cancel();
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || thread.join().expect("worker thread panicked"))
            .await
            .unwrap()
    }

    /// SIGKILL: every task of the worker stops where it is.
    pub fn kill(self) {
        self.killed.cancel();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.killed.cancel();
    }
}

/// Options of [`spawn_app_with`].
#[derive(Default)]
pub struct Options {
    pub env: Vec<(&'static str, String)>,
    pub emulator: EmulatorConfig,
    /// Reach Postgres through a [`FaultProxy`] (`TestApp::pg_proxy`).
    pub proxy_postgres: bool,
    /// Reach Redis through a [`FaultProxy`] (`TestApp::redis_proxy`).
    pub proxy_redis: bool,
}

/// Rewrites `scheme://[user@]host:port/rest` to go through a proxy; returns the new URL and
/// the proxy.
async fn through_proxy(url: &str) -> (String, FaultProxy) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = match rest.split_once('@') {
        Some((user, rest)) => (format!("{user}@"), rest),
        None => (String::new(), rest),
    };
    let (addr, path) = rest.split_once('/').unwrap();
    let proxy = FaultProxy::start(addr.to_string()).await;
    (
        format!("{scheme}://{user}127.0.0.1:{}/{path}", proxy.port),
        proxy,
    )
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    callcoach::telemetry::init_tracing();
    let redis = TestRedis::start().await;
    let mut database_url = fresh_database().await;
    let mut redis_url = redis.url();
    let mut pg_proxy = None;
    let mut redis_proxy = None;
    if options.proxy_postgres {
        let (url, proxy) = through_proxy(&database_url).await;
        (database_url, pg_proxy) = (url, Some(proxy));
    }
    if options.proxy_redis {
        let (url, proxy) = through_proxy(&redis_url).await;
        (redis_url, redis_proxy) = (url, Some(proxy));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emulator = emulator::spawn(listener, options.emulator).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut env: HashMap<String, String> = [
        ("DATABASE_URL", database_url),
        ("REDIS_URL", redis_url),
        ("ANTHROPIC_BASE_URL", emulator.base_url().to_string()),
        ("PUBLIC_URL", base.clone()),
        ("WORKER_POLL_MS", "20".into()),
        ("RELAY_INTERVAL_MS", "200".into()),
        ("DATABASE_MAX_CONNECTIONS", "10".into()),
        // HTTP rate limits stay on (every request goes through them) but never bind, unless
        // a test sets its own.
        ("RATE_LIMIT_GET_PER_MIN", "1000000".into()),
        ("RATE_LIMIT_POST_PER_MIN", "1000000".into()),
        ("RATE_LIMIT_ANALYSIS_PER_MIN", "1000000".into()),
        ("RATE_LIMIT_INSIGHTS_PER_MIN", "1000000".into()),
        ("RATE_LIMIT_SEARCH_PER_MIN", "1000000".into()),
        ("RATE_LIMIT_KEY_LOOKUPS_PER_MIN", "1000000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(options.env.into_iter().map(|(k, v)| (k.to_string(), v)));
    let app = App::build(Settings::from_map(&env).unwrap()).unwrap();
    let env_copy = env.clone();
    db::migrate(&app.pg).await.unwrap();
    let key = auth::create_key(&app.pg, "test-producer", Scope::Producer)
        .await
        .unwrap()
        .key;
    let admin_key = auth::create_key(&app.pg, "test-admin", Scope::Admin)
        .await
        .unwrap()
        .key;
    let shutdown = CancellationToken::new();
    let server = app.clone();
    let token = shutdown.clone();
    tokio::spawn(async move { server.serve(listener, token).await });
    TestApp {
        app,
        base,
        http: reqwest::Client::new(),
        key,
        admin_key,
        env: env_copy,
        redis,
        emulator,
        pg_proxy,
        redis_proxy,
        shutdown,
        worker: None,
    }
}

impl TestApp {
    /// Starts a worker "process": its own App (pools, ledger writer) on its own tokio runtime
    /// in a thread, running every lane and the ledger upkeep.
    pub fn start_worker(&mut self) {
        self.worker = Some(self.spawn_worker(&[]));
    }

    /// A worker process with environment overrides; stop it with [`WorkerProcess::stop`] or
    /// crash it with [`WorkerProcess::kill`].
    pub fn spawn_worker(&self, overrides: &[(&str, &str)]) -> WorkerProcess {
        let mut env = self.env.clone();
        env.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let token = CancellationToken::new();
        let killed = CancellationToken::new();
        let (run, kill) = (token.clone(), killed.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let result = runtime.block_on(async move {
                let app = App::build(Settings::from_map(&env).unwrap()).unwrap();
                tokio::select! {
                    result = app.run_worker(&[], run) => result,
                    _ = kill.cancelled() => Ok(()),
                }
            });
            // Every task still running stops where it is, like at a process exit.
            runtime.shutdown_background();
            result
        });
        WorkerProcess {
            token,
            killed,
            thread: Some(thread),
        }
    }

    /// Stops the worker gracefully and waits for it.
    pub async fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await.unwrap();
        }
    }

    /// Kills the worker without a graceful shutdown, as a crash would: jobs in flight are
    /// dropped mid-run and every background task of it (heartbeats, leases) stops at once.
    pub fn kill_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.kill();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The web front's `/metrics` text, read with the admin key.
    pub async fn scrape_metrics(&self) -> String {
        let resp = self
            .http
            .get(self.url("/metrics"))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// POST JSON with the producer key; returns status and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// GET with the producer key; returns status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Ingests a sample call and returns its id.
    pub async fn ingest(&self, call: &Value) -> Uuid {
        let (status, body) = self.post("/v1/calls", call).await;
        assert!(status == 201 || status == 200, "ingest: {status} {body}");
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// Enqueues an analysis over HTTP and returns the job id.
    pub async fn enqueue(&self, call_id: Uuid, dimensions: &[&str]) -> Uuid {
        let (status, body) = self
            .post(
                "/v1/analyses",
                &serde_json::json!({ "call_id": call_id, "dimensions": dimensions }),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        body["job_id"].as_str().unwrap().parse().unwrap()
    }

    /// Polls the job until it reaches a terminal status (or panics after `secs`).
    pub async fn wait_for_job(&self, job_id: Uuid, secs: u64) -> Value {
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, job) = self.get(&format!("/v1/jobs/{job_id}")).await;
            assert_eq!(status, 200, "{job}");
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "job still {job} after {secs}s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Another app (another "process") on the same Postgres and Redis, with overrides.
    pub fn another_app(&self, overrides: &[(&str, &str)]) -> App {
        let mut env = self.env.clone();
        env.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        App::build(Settings::from_map(&env).unwrap()).unwrap()
    }

    /// Records an analysis job in the ledger and runs it here, as a worker would (workers of
    /// the test see it only an hour later).
    pub async fn perform(&self, app: &App, call_id: Uuid, dimensions: &[Dimension]) -> Value {
        let args = AnalyzeCall {
            call_id,
            dimensions: dimensions.to_vec(),
            batch: false,
        };
        // Due in an hour, so no running worker claims it before this run does.
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        let job_id = app
            .queue
            .enqueue(args.to_job().unwrap().run_at(later))
            .await
            .unwrap()
            .job_id;
        perform_job(envelope(job_id, 0, &args), &app.jobs)
            .await
            .unwrap();
        let job = callcoach::ledger::job(&app.pg, job_id)
            .await
            .unwrap()
            .unwrap();
        serde_json::to_value(job).unwrap()
    }

    /// Sources (`llm`, `redis`, `postgres`) of the analysis runs of a call, oldest first.
    pub async fn run_sources(&self, call_id: Uuid) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT source FROM analysis_runs WHERE call_id = $1 ORDER BY created_at, id",
        )
        .bind(call_id)
        .fetch_all(&self.app.pg)
        .await
        .unwrap()
    }

    /// Number of coaching sessions stored for a call and dimension.
    pub async fn session_count(&self, call_id: Uuid, dimension: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM coaching_sessions WHERE call_id = $1 AND dimension = $2",
        )
        .bind(call_id)
        .bind(dimension)
        .fetch_one(&self.app.pg)
        .await
        .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A small valid call; `tag` makes its transcript (and so its cache key) unique.
pub fn sample_call(tag: &str) -> Value {
    serde_json::json!({
        "title": format!("Discovery call {tag}"),
        "product": "Lumen Analytics",
        "call_type": "discovery",
        "scheduled_at": "2026-11-02T15:00:00Z",
        "duration_seconds": 1200,
        "speakers": [
            {"name": "Ana Rep", "email": "ana@lumen.example", "role": "ae", "company_side": "internal"},
            {"name": "Cal Buyer", "email": "cal@customer.example", "company_side": "external"}
        ],
        "rep_email": "ana@lumen.example",
        "rep_role": "ae",
        "transcript": [
            {"speaker": "Ana Rep", "start_seconds": 0, "text": format!("Thanks for joining, {tag}. What prompted you to look at analytics tools now?")},
            {"speaker": "Cal Buyer", "start_seconds": 8, "text": "Our dashboards take hours to refresh and the board wants daily numbers."},
            {"speaker": "Ana Rep", "start_seconds": 20, "text": "How are you refreshing them today, and who owns that pipeline?"},
            {"speaker": "Cal Buyer", "start_seconds": 31, "text": "One analyst with cron jobs. Honestly your price looked high compared to Brightline."},
            {"speaker": "Ana Rep", "start_seconds": 45, "text": "Fair point. Teams like yours usually recover the cost in analyst time within a quarter. Shall we book a technical session next Tuesday?"}
        ]
    })
}

/// The envelope of one delivery of `args` (what a worker receives from Redis).
pub fn envelope<J: Job>(job_id: Uuid, delivery: i32, args: &J) -> Envelope {
    Envelope {
        job_id,
        delivery,
        kind: J::JOB_NAME.to_string(),
        args: serde_json::to_value(args).unwrap(),
    }
}

/// Runs one delivery as a worker would and returns what it came to.
pub async fn perform<J: Job>(app: &App, job_id: Uuid, delivery: i32, args: &J) -> RunLabel {
    perform_job(envelope(job_id, delivery, args), &app.jobs)
        .await
        .unwrap()
}

/// Asserts that a job of `kind` whose payload contains `payload` is in the ledger, in
/// `state`, and returns its id.
pub async fn assert_enqueued(
    pg: &sqlx::PgPool,
    kind: &str,
    payload: Value,
    state: callcoach::ledger::JobState,
) -> Uuid {
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE kind = $1 AND payload @> $2 AND status = $3")
            .bind(kind)
            .bind(&payload)
            .bind(state.as_str())
            .fetch_all(pg)
            .await
            .unwrap();
    assert_eq!(
        ids.len(),
        1,
        "expected one {state} {kind} job with {payload}, found {}",
        ids.len()
    );
    ids[0]
}
