//! `bench queue`: throughput and pick-up latency of no-op jobs, each beside raw Redis list
//! throughput (RPUSH/LPOP, pipelined) measured in the same run.
//!
//! - **direct**: envelopes pushed straight to the interactive lane and consumed by 1 and then
//!   2 in-process apalis workers that only count: the delivery layer alone.
//! - **ledger** (the path producers' jobs take): `Queue::enqueue_many` / `enqueue` into the
//!   Postgres ledger, push and wake, then real `callcoach worker` processes (1, then 2) claim
//!   and finish every job through the grouped ledger writer, fsync on. Processed jobs/s is
//!   computed from the ledger's own timestamps (first start to last finish); pick-up latency
//!   is `started_at - enqueued_at` of single jobs enqueued while the workers are idle.
//! - **soak** (`--soak N`): N jobs through the ledger path while Redis memory and key count
//!   are sampled before, during and after, then the ledger is pruned.

use super::{percentile, ratio, round1};
use crate::{
    App,
    config::Settings,
    delivery::{self, Envelope, Lane},
    jobs::{Job, Noop},
    ledger, worker,
};
use apalis::prelude::*;
use indicatif::ProgressBar;
use serde_json::{Value, json};
use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::Mutex;
use uuid::Uuid;

/// Options of one benchmark run.
#[derive(Clone, Debug)]
pub struct QueueBench {
    /// Jobs per throughput measurement.
    pub jobs: usize,
    /// Concurrency of each worker.
    pub concurrency: usize,
    /// Pick-up latency samples.
    pub samples: usize,
    /// Measure the ledger path too.
    pub ledger: bool,
    /// Back-to-back repetitions of the ledger measurement.
    pub runs: usize,
    /// Soak size (0: no soak).
    pub soak: usize,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

fn noop_envelope() -> Envelope {
    Envelope {
        job_id: Uuid::now_v7(),
        delivery: 0,
        kind: Noop::JOB_NAME.into(),
        args: json!({ "enqueued_at_us": now_us() }),
    }
}

/// Runs the queue benchmark and returns its report.
pub async fn run(settings: Settings, bench: QueueBench) -> anyhow::Result<Value> {
    let conn = crate::redis_connection(&settings, 1024)?;
    let baseline = raw_list_throughput(conn.clone(), bench.jobs).await?;
    let mut report = json!({
        "benchmark": "queue",
        "jobs": bench.jobs,
        "concurrency_per_worker": bench.concurrency,
        "baseline_raw_redis_rpush_lpop_items_per_sec": baseline.round(),
        "reference_bullmq_6_7": { "processed_jobs_per_sec": 26000, "pickup_ms_p50": 0.6, "pickup_ms_p99": 2.0 },
    });
    let direct = Direct {
        settings: &settings,
        conn: conn.clone(),
        bench: &bench,
    };
    report["direct"] = direct.measure(baseline).await?;
    if bench.ledger || bench.soak > 0 {
        let app = App::build(settings.clone())?;
        crate::db::migrate(&app.pg).await?;
        let ledger = LedgerPath {
            app: &app,
            bench: &bench,
        };
        if bench.ledger {
            report["ledger"] = ledger.measure(baseline).await?;
        }
        if bench.soak > 0 {
            report["soak"] = ledger.soak().await?;
        }
    }
    Ok(report)
}

/// The delivery layer alone.
struct Direct<'a> {
    settings: &'a Settings,
    conn: redis::aio::ConnectionManager,
    bench: &'a QueueBench,
}

impl Direct<'_> {
    async fn measure(&self, baseline: f64) -> anyhow::Result<Value> {
        let mut by_workers = serde_json::Map::new();
        for workers in [1, 2] {
            clear_lane(self.conn.clone()).await?;
            let started = Instant::now();
            for _ in 0..self.bench.jobs.div_ceil(1000) {
                let batch: Vec<_> = (0..1000).map(|_| noop_envelope()).collect();
                delivery::storage(self.conn.clone(), Lane::Interactive)
                    .push_bulk(batch)
                    .await?;
            }
            let total = self.bench.jobs.div_ceil(1000) * 1000;
            let enqueue_secs = started.elapsed().as_secs_f64();
            let (secs, latencies) = self.process(workers, total).await?;
            let rate = total as f64 / secs;
            by_workers.insert(
                format!("{workers}_worker"),
                json!({
                    "bulk_enqueue_jobs_per_sec": (total as f64 / enqueue_secs).round(),
                    "processed_jobs_per_sec": rate.round(),
                    "ratio_processed_vs_raw_redis": ratio(rate, baseline),
                    "pickup_ms": latency_summary(latencies),
                }),
            );
        }
        clear_lane(self.conn.clone()).await?;
        Ok(Value::Object(by_workers))
    }

    /// Drains the backlog with `workers` counting workers, then measures idle pick-up.
    async fn process(&self, workers: usize, total: usize) -> anyhow::Result<(f64, Vec<f64>)> {
        let done = Arc::new(AtomicUsize::new(0));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let client = crate::redis_client(self.settings)?;
        let hub = worker::WakeHub::spawn(client, Lane::Interactive, stop.clone());
        let started = Instant::now();
        let mut running = Vec::new();
        for _ in 0..workers {
            let conn = crate::redis_connection(self.settings, 1024)?;
            let backend = delivery::storage(conn, Lane::Interactive)
                .poll_with_strategy(worker::poll_strategy(&hub, self.settings.worker_poll));
            let w = WorkerBuilder::new(worker::worker_name("bench", 0))
                .backend(backend)
                .data(done.clone())
                .data(latencies.clone())
                .concurrency(self.bench.concurrency)
                .build(
                    move |env: Envelope,
                          done: Data<Arc<AtomicUsize>>,
                          lat: Data<Arc<Mutex<Vec<f64>>>>| async move {
                        if done.fetch_add(1, Ordering::Relaxed) >= total {
                            let at = env.args["enqueued_at_us"].as_u64().unwrap_or_default();
                            lat.lock()
                                .await
                                .push(now_us().saturating_sub(at) as f64 / 1000.0);
                        }
                        Ok::<(), BoxDynError>(())
                    },
                );
            running.push(tokio::spawn(w.run()));
        }
        while done.load(Ordering::Relaxed) < total {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        for i in 0..self.bench.samples {
            tokio::time::sleep(Duration::from_millis(20 + (i % 7) as u64 * 3)).await;
            delivery::push(
                &self.conn,
                vec![delivery::Push {
                    lane: Lane::Interactive,
                    envelope: noop_envelope(),
                    delay: Duration::ZERO,
                }],
            )
            .await?;
            let until = Instant::now() + Duration::from_secs(10);
            while done.load(Ordering::Relaxed) < total + i + 1 && Instant::now() < until {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        for r in running {
            r.abort();
        }
        stop.cancel();
        let latencies = latencies.lock().await.clone();
        Ok((secs, latencies))
    }
}

/// The producers' path: ledger, delivery, real worker processes.
struct LedgerPath<'a> {
    app: &'a App,
    bench: &'a QueueBench,
}

/// Worker processes of this binary, stopped when dropped.
struct Workers(Vec<Child>);

impl Workers {
    fn start(app: &App, n: usize, concurrency: usize) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for _ in 0..n {
            let child = Command::new(&exe)
                .args(["worker", "--lanes", "interactive"])
                .env("DATABASE_URL", app.settings.database_url.expose())
                .env("REDIS_URL", app.settings.redis_url.expose())
                .env("WORKER_CONCURRENCY", concurrency.to_string())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()?;
            children.push(child);
        }
        Ok(Workers(children))
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) every worker process.
    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        for child in &self.0 {
            Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()?;
        }
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.signal("-CONT");
        for child in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl LedgerPath<'_> {
    async fn measure(&self, baseline: f64) -> anyhow::Result<Value> {
        let mut by_workers = serde_json::Map::new();
        for n in [1, 2] {
            let workers = Workers::start(self.app, n, self.bench.concurrency)?;
            self.wait_until_processed(&self.enqueue_single(1).await?, 30)
                .await?;
            let mut runs = Vec::new();
            for _ in 0..self.bench.runs.max(1) {
                workers.signal("-STOP")?;
                let started = Instant::now();
                let ids = self.enqueue_bulk(self.bench.jobs).await?;
                let bulk = ids.len() as f64 / started.elapsed().as_secs_f64();
                workers.signal("-CONT")?;
                self.wait_until_processed(&ids, 300).await?;
                self.all_succeeded(&ids).await?;
                let rate = ids.len() as f64 / self.processing_secs(&ids).await?;
                runs.push(json!({ "bulk_enqueue_jobs_per_sec": bulk.round(), "processed_jobs_per_sec": rate.round(),
                                  "ratio_processed_vs_raw_redis": ratio(rate, baseline) }));
            }
            let single = self.single_enqueue_rate().await?;
            let pickup = self.pickup().await?;
            drop(workers);
            let rates: Vec<f64> = runs
                .iter()
                .filter_map(|r| r["processed_jobs_per_sec"].as_f64())
                .collect();
            let (lo, hi) = rates
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
            by_workers.insert(
                format!("{n}_worker_processes"),
                json!({
                    "runs": runs,
                    "slowest_vs_fastest_run": ratio(lo, hi),
                    "single_enqueue_jobs_per_sec_16_producers": single.round(),
                    "pickup_ms": latency_summary(pickup),
                }),
            );
            self.cleanup().await?;
        }
        Ok(Value::Object(by_workers))
    }

    async fn enqueue_bulk(&self, n: usize) -> anyhow::Result<Vec<Uuid>> {
        let mut ids = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let batch = chunk
                .iter()
                .map(|_| {
                    Noop {
                        enqueued_at_us: now_us(),
                    }
                    .to_job()
                })
                .collect::<Result<Vec<_>, _>>()?;
            ids.extend(self.app.queue.enqueue_many(batch).await?);
        }
        Ok(ids)
    }

    async fn enqueue_single(&self, n: usize) -> anyhow::Result<Vec<Uuid>> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let job = Noop {
                enqueued_at_us: now_us(),
            }
            .to_job()?;
            ids.push(self.app.queue.enqueue(job).await?.job_id);
        }
        Ok(ids)
    }

    /// Single enqueues from 16 concurrent producers (the HTTP front's shape).
    async fn single_enqueue_rate(&self) -> anyhow::Result<f64> {
        let per_producer = (self.bench.jobs / 16).clamp(50, 500);
        let started = Instant::now();
        let all = futures::future::try_join_all((0..16).map(|_| self.enqueue_single(per_producer)))
            .await?;
        let rate = (per_producer * 16) as f64 / started.elapsed().as_secs_f64();
        self.wait_until_processed(&all.concat(), 120).await?;
        Ok(rate)
    }

    /// Idle pick-up: one job at a time, `started_at - enqueued_at` from the ledger.
    async fn pickup(&self) -> anyhow::Result<Vec<f64>> {
        let mut ids = Vec::new();
        for i in 0..self.bench.samples {
            tokio::time::sleep(Duration::from_millis(20 + (i % 7) as u64 * 3)).await;
            let batch = self.enqueue_single(1).await?;
            self.wait_until_processed(&batch, 10).await?;
            ids.extend(batch);
        }
        let ms: Vec<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM started_at - enqueued_at)::float8 * 1000 FROM jobs WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.app.pg)
        .await?;
        Ok(ms)
    }

    async fn wait_until_processed(&self, ids: &[Uuid], secs: u64) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND status <> $2")
                    .bind(ids)
                    .bind(ledger::JobState::Succeeded.as_str())
                    .fetch_one(&self.app.pg)
                    .await?;
            if left == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < until,
                "{left} jobs not processed after {secs}s"
            );
            tokio::time::sleep(Duration::from_millis(if ids.len() == 1 { 1 } else { 50 })).await;
        }
    }

    /// Fails if any of these jobs did not succeed.
    async fn all_succeeded(&self, ids: &[Uuid]) -> anyhow::Result<()> {
        let failed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND status <> $2")
                .bind(ids)
                .bind(ledger::JobState::Succeeded.as_str())
                .fetch_one(&self.app.pg)
                .await?;
        anyhow::ensure!(failed == 0, "{failed} benchmark jobs did not succeed");
        Ok(())
    }

    /// First start to last finish of these jobs, by the ledger's clock.
    async fn processing_secs(&self, ids: &[Uuid]) -> anyhow::Result<f64> {
        Ok(sqlx::query_scalar(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 FROM jobs WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(&self.app.pg)
        .await?)
    }

    async fn cleanup(&self) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM jobs WHERE kind = $1")
            .bind(Noop::JOB_NAME)
            .execute(&self.app.pg)
            .await?;
        sqlx::query("VACUUM (ANALYZE) jobs")
            .execute(&self.app.pg)
            .await?;
        Ok(())
    }

    /// `--soak N`: Redis memory and keys before, during and after N jobs, then after pruning.
    async fn soak(&self) -> anyhow::Result<Value> {
        let redis = &self.app.redis;
        let before = redis_footprint(redis).await?;
        let workers = Workers::start(self.app, 2, self.bench.concurrency)?;
        let bar = ProgressBar::new(self.bench.soak as u64);
        let mut ids = Vec::with_capacity(self.bench.soak);
        let mut during = before.clone();
        for chunk in (0..self.bench.soak).collect::<Vec<_>>().chunks(10_000) {
            ids.extend(self.enqueue_bulk(chunk.len()).await?);
            bar.inc(chunk.len() as u64);
            let now = redis_footprint(redis).await?;
            if now["used_memory"].as_u64() > during["used_memory"].as_u64() {
                during = now;
            }
        }
        bar.finish_and_clear();
        self.wait_until_processed(&ids, 900).await?;
        self.all_succeeded(&ids).await?;
        drop(workers);
        let after = redis_footprint(redis).await?;
        let ledger_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&self.app.pg)
            .await?;
        sqlx::query("UPDATE jobs SET finished_at = now() - interval '400 days' WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&self.app.pg)
            .await?;
        let pruned = ledger::prune(&self.app.pg, self.app.settings.job_retention, 5000).await?;
        let after_prune = redis_footprint(redis).await?;
        let growth = |a: &Value, b: &Value, field: &str| {
            let (a, b) = (
                a[field].as_f64().unwrap_or(0.0),
                b[field].as_f64().unwrap_or(0.0),
            );
            round1((b - a) / a.max(1.0) * 100.0)
        };
        Ok(json!({
            "jobs": ids.len(),
            "redis_before": before,
            "redis_peak_during": during,
            "redis_after": after,
            "redis_after_prune": after_prune,
            "used_memory_growth_pct": growth(&before, &after_prune, "used_memory"),
            "keys_growth": after_prune["keys"].as_i64().unwrap_or(0) - before["keys"].as_i64().unwrap_or(0),
            "ledger_rows_before_prune": ledger_rows,
            "ledger_rows_pruned": pruned,
        }))
    }
}

/// Redis `used_memory` and key count.
async fn redis_footprint(conn: &redis::aio::ConnectionManager) -> anyhow::Result<Value> {
    let mut conn = conn.clone();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_default();
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
    Ok(json!({ "used_memory": used, "keys": keys }))
}

fn latency_summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({ "p50": round2(percentile(&ms, 0.5)), "p99": round2(percentile(&ms, 0.99)), "samples": ms.len() })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Baseline: RPUSH then LPOP `n` items in pipelines of 1000 on one connection.
async fn raw_list_throughput(
    mut conn: redis::aio::ConnectionManager,
    n: usize,
) -> anyhow::Result<f64> {
    let key = "callcoach:bench:raw";
    let payload = serde_json::to_vec(&noop_envelope())?;
    let started = Instant::now();
    for cmd in ["RPUSH", "LPOP"] {
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let mut pipe = redis::pipe();
            for _ in chunk {
                let c = pipe.cmd(cmd).arg(key);
                if cmd == "RPUSH" {
                    c.arg(&payload);
                }
                c.ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
    }
    let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
    // One item = one push and one pop, like one job = one enqueue and one fetch.
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Empties the interactive lane's Redis keys before a direct measurement (bench databases
/// only: the direct path pushes envelopes no ledger row backs).
async fn clear_lane(mut conn: redis::aio::ConnectionManager) -> anyhow::Result<()> {
    let pattern = format!("{}*", Lane::Interactive.queue_name());
    let mut keys = Vec::new();
    {
        let mut iter: redis::AsyncIter<String> =
            redis::AsyncCommands::scan_match(&mut conn, &pattern).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
    }
    for batch in keys.chunks(1000) {
        let _: () = redis::cmd("UNLINK")
            .arg(batch)
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}
