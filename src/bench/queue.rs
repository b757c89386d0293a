//! `bench queue`: bulk enqueue and processing throughput of no-op jobs through the same
//! apalis-redis configuration the workers use, and idle pick-up latency, against raw Redis
//! RPUSH/LPOP throughput (pipelined in the same batch size) as the baseline.

use super::{percentile, ratio};
use crate::{
    App,
    config::Settings,
    jobs::{Job, JobContext, JobError, perform_job},
    queue::{self, Envelope},
    worker,
};
use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::Mutex;
use uuid::Uuid;

/// A job that does nothing but record when it ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Noop {
    /// Microseconds since the UNIX epoch at push time.
    pub pushed_at_us: u64,
}

impl Job for Noop {
    const JOB_NAME: &'static str = "bench_noop";
    async fn perform(self, _: Uuid, _: &JobContext) -> Result<serde_json::Value, JobError> {
        Ok(serde_json::Value::Null)
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// Where benchmark jobs go: straight to the apalis queue, or through the ledger as producers'
/// jobs do (ledger insert, push, wake; claim and outcome written by the grouped ledger writer).
#[derive(Clone)]
enum Path {
    Direct(redis::aio::ConnectionManager),
    Ledger(Box<App>),
}

impl Path {
    fn envelope() -> Envelope<Noop> {
        Envelope {
            job_id: Uuid::nil(),
            delivery: 0,
            args: Noop {
                pushed_at_us: now_us(),
            },
        }
    }

    /// Enqueues `n` jobs in batches of 1000.
    async fn bulk(&self, n: usize) -> anyhow::Result<()> {
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            match self {
                Path::Direct(conn) => {
                    let batch = chunk.iter().map(|_| Self::envelope()).collect();
                    queue::storage::<Noop>(conn.clone())
                        .push_bulk(batch)
                        .await?;
                    queue::wake(conn, Noop::JOB_NAME).await;
                }
                Path::Ledger(app) => {
                    let batch = chunk.iter().map(|_| Self::envelope().args).collect();
                    app.queue.enqueue_many(batch).await?;
                }
            }
        }
        Ok(())
    }

    /// Enqueues one job the way a single producer request does.
    async fn one(&self) -> anyhow::Result<()> {
        match self {
            Path::Direct(conn) => {
                queue::storage::<Noop>(conn.clone())
                    .push(Self::envelope())
                    .await?;
                queue::wake(conn, Noop::JOB_NAME).await;
            }
            Path::Ledger(app) => {
                app.queue.enqueue(&Self::envelope().args, None).await?;
            }
        }
        Ok(())
    }
}

/// Runs the queue benchmark.
pub async fn run(
    settings: Settings,
    jobs: usize,
    concurrency: usize,
    samples: usize,
    ledger: bool,
) -> anyhow::Result<serde_json::Value> {
    let conn = crate::redis_connection(settings.redis_url.expose(), 1024)?;
    let baseline = raw_list_throughput(conn.clone(), jobs).await?;
    clear_queue(conn.clone()).await?;
    let url = settings.redis_url.expose().to_string();
    let poll = settings.worker_poll;
    let path = if ledger {
        let app = App::build(settings)?;
        crate::db::migrate(&app.pg).await?;
        Path::Ledger(Box::new(app))
    } else {
        Path::Direct(conn.clone())
    };
    let started = Instant::now();
    path.bulk(jobs).await?;
    let enqueue_secs = started.elapsed().as_secs_f64();
    let run = Run {
        url,
        conn: conn.clone(),
        jobs,
        concurrency,
        samples,
        poll,
    };
    let (processed_secs, latencies) = run.process(&path).await?;
    clear_queue(conn).await?;
    if let Path::Ledger(app) = &path {
        sqlx::query("DELETE FROM jobs WHERE kind = $1")
            .bind(Noop::JOB_NAME)
            .execute(&app.pg)
            .await?;
    }
    let jobs_per_sec = jobs as f64 / processed_secs;
    Ok(json!({
        "benchmark": "queue",
        "path": if ledger { "ledger (Postgres ledger + Redis delivery)" } else { "direct (Redis delivery only)" },
        "jobs": jobs,
        "concurrency": concurrency,
        "bulk_enqueue_jobs_per_sec": (jobs as f64 / enqueue_secs).round(),
        "processed_jobs_per_sec": jobs_per_sec.round(),
        "pickup_latency_ms": { "p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "samples": latencies.len() },
        "baseline_raw_redis_rpush_lpop_items_per_sec": baseline.round(),
        "ratio_processed_vs_raw_redis": ratio(jobs_per_sec, baseline),
        "ratio_processed_vs_bullmq": ratio(jobs_per_sec, 26_000.0),
        "reference_bullmq_6_7": { "processed_jobs_per_sec": 26000, "bulk_enqueue_jobs_per_sec": 33000, "pickup_ms_p50": 0.6, "pickup_ms_p99": 2.0 },
    }))
}

/// Baseline: RPUSH then LPOP `n` items in pipelines of 1000 on one connection.
async fn raw_list_throughput(
    mut conn: redis::aio::ConnectionManager,
    n: usize,
) -> anyhow::Result<f64> {
    let key = "callcoach:bench:raw";
    let payload = serde_json::to_vec(&Noop { pushed_at_us: 0 })?;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for _ in chunk {
            pipe.cmd("RPUSH").arg(key).arg(&payload).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for _ in chunk {
            pipe.cmd("LPOP").arg(key).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
    // One item = one push and one pop, like one job = one enqueue and one fetch.
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Removes the benchmark queue's keys (SCAN over its own prefix; the bench queue only).
async fn clear_queue(mut conn: redis::aio::ConnectionManager) -> anyhow::Result<()> {
    let pattern = format!("{}*", queue::queue_name(Noop::JOB_NAME));
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<String> =
            redis::AsyncCommands::scan_match(&mut conn, &pattern).await?;
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
        keys
    };
    for batch in keys.chunks(1000) {
        let _: () = redis::cmd("UNLINK")
            .arg(batch)
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}

/// Parameters of one processing run.
struct Run {
    url: String,
    conn: redis::aio::ConnectionManager,
    jobs: usize,
    concurrency: usize,
    samples: usize,
    poll: Duration,
}

/// Counts a finished job; past the backlog, records its pick-up latency.
async fn record(env: &Envelope<Noop>, jobs: usize, done: &AtomicUsize, lat: &Mutex<Vec<f64>>) {
    if done.fetch_add(1, Ordering::Relaxed) >= jobs {
        let ms = (now_us().saturating_sub(env.args.pushed_at_us)) as f64 / 1000.0;
        lat.lock().await.push(ms);
    }
}

impl Run {
    /// Processes the backlog with one worker, then measures idle pick-up one job at a time.
    async fn process(&self, path: &Path) -> anyhow::Result<(f64, Vec<f64>)> {
        let done = Arc::new(AtomicUsize::new(0));
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(self.samples)));
        let stop = tokio_util::sync::CancellationToken::new();
        let client = redis::Client::open(self.url.as_str())?;
        let hub = worker::WakeHub::spawn(client, Noop::JOB_NAME, stop.clone());
        let backend = queue::storage::<Noop>(self.conn.clone())
            .poll_with_strategy(worker::poll_strategy(&hub, self.poll));
        let ctx = match path {
            Path::Ledger(app) => Some(app.jobs.clone()),
            Path::Direct(_) => None,
        };
        let jobs = self.jobs;
        let worker = WorkerBuilder::new(format!("bench-{}", Uuid::new_v4().simple()))
            .backend(backend)
            .data(done.clone())
            .data(latencies.clone())
            .data(ctx)
            .concurrency(self.concurrency)
            .build(
                move |env: Envelope<Noop>,
                      done: Data<Arc<AtomicUsize>>,
                      lat: Data<Arc<Mutex<Vec<f64>>>>,
                      ctx: Data<Option<JobContext>>| async move {
                    if let Some(ctx) = ctx.as_ref() {
                        perform_job(env.clone(), ctx).await?;
                    }
                    record(&env, jobs, &done, &lat).await;
                    Ok::<(), BoxDynError>(())
                },
            );
        let started = Instant::now();
        let running = tokio::spawn(worker.run());
        while done.load(Ordering::Relaxed) < jobs {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let processed_secs = started.elapsed().as_secs_f64();
        for i in 0..self.samples {
            // Let the worker go idle, then enqueue one job and wait for it.
            tokio::time::sleep(Duration::from_millis(20 + (i % 7) as u64 * 3)).await;
            path.one().await?;
            let until = Instant::now() + Duration::from_secs(10);
            while done.load(Ordering::Relaxed) < jobs + i + 1 && Instant::now() < until {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        running.abort();
        stop.cancel();
        let mut latencies = latencies.lock().await.clone();
        latencies.sort_by(f64::total_cmp);
        Ok((processed_secs, latencies))
    }
}
