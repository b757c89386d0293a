//! `bench queue`: bulk enqueue and processing throughput of no-op jobs through the same
//! apalis-redis configuration the workers use, and idle pick-up latency, against raw Redis
//! RPUSH/LPOP throughput (pipelined in the same batch size) as the baseline.

use super::{percentile, ratio};
use crate::{
    config::Settings,
    jobs::{Job, JobContext, JobError},
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

pub async fn run(
    settings: &Settings,
    jobs: usize,
    concurrency: usize,
    samples: usize,
) -> anyhow::Result<serde_json::Value> {
    let conn = crate::redis_connection(settings.redis_url.expose(), 1024)?;
    let baseline = raw_list_throughput(conn.clone(), jobs).await?;
    clear_queue(conn.clone()).await?;
    let mut store = queue::storage::<Noop>(conn.clone());
    let started = Instant::now();
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|_| Envelope {
                job_id: Uuid::nil(),
                delivery: 0,
                args: Noop {
                    pushed_at_us: now_us(),
                },
            })
            .collect();
        store.push_bulk(batch).await?;
        queue::wake(&conn, Noop::JOB_NAME).await;
    }
    let enqueue_secs = started.elapsed().as_secs_f64();
    let (processed_secs, latencies) = process(
        settings.redis_url.expose(),
        conn.clone(),
        jobs,
        concurrency,
        samples,
        settings.worker_poll,
    )
    .await?;
    clear_queue(conn).await?;
    let jobs_per_sec = jobs as f64 / processed_secs;
    Ok(json!({
        "benchmark": "queue",
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

async fn clear_queue(mut conn: redis::aio::ConnectionManager) -> anyhow::Result<()> {
    let prefix = queue::queue_name(Noop::JOB_NAME);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
    }
    Ok(())
}

/// Processes the backlog with one worker, then measures idle pick-up latency one job at a time.
async fn process(
    url: &str,
    conn: redis::aio::ConnectionManager,
    jobs: usize,
    concurrency: usize,
    samples: usize,
    poll: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let done = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(samples)));
    let stop = tokio_util::sync::CancellationToken::new();
    let hub = worker::WakeHub::spawn(redis::Client::open(url)?, Noop::JOB_NAME, stop.clone());
    let backend =
        queue::storage::<Noop>(conn.clone()).poll_with_strategy(worker::poll_strategy(&hub, poll));
    let worker = WorkerBuilder::new(format!("bench-{}", Uuid::new_v4().simple()))
        .backend(backend)
        .data(done.clone())
        .data(latencies.clone())
        .concurrency(concurrency)
        .build(
            move |env: Envelope<Noop>,
                  done: Data<Arc<AtomicUsize>>,
                  lat: Data<Arc<Mutex<Vec<f64>>>>| async move {
                let n = done.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    let ms = (now_us().saturating_sub(env.args.pushed_at_us)) as f64 / 1000.0;
                    lat.lock().await.push(ms);
                }
                Ok::<(), BoxDynError>(())
            },
        );
    let started = Instant::now();
    let running = tokio::spawn(worker.run());
    while done.load(Ordering::Relaxed) < jobs {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let processed_secs = started.elapsed().as_secs_f64();
    let mut store = queue::storage::<Noop>(conn.clone());
    for i in 0..samples {
        // Let the worker go idle, then push one job and wait for it.
        tokio::time::sleep(Duration::from_millis(20 + (i % 7) as u64 * 3)).await;
        let env = Envelope {
            job_id: Uuid::nil(),
            delivery: 0,
            args: Noop {
                pushed_at_us: now_us(),
            },
        };
        store.push(env).await?;
        queue::wake(&conn, Noop::JOB_NAME).await;
        let target = jobs + i + 1;
        let until = Instant::now() + Duration::from_secs(10);
        while done.load(Ordering::Relaxed) < target && Instant::now() < until {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    running.abort();
    stop.cancel();
    let mut latencies = latencies.lock().await.clone();
    latencies.sort_by(f64::total_cmp);
    Ok((processed_secs, latencies))
}
