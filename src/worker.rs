//! The worker role: one apalis worker per job kind under an apalis `Monitor`.
//!
//! apalis-redis workers stop on any Redis error, so the monitor restarts them, each time under
//! a fresh name (apalis refuses a name seen within the orphan window). A restarted worker first
//! waits until Redis answers PING, so an outage does not turn into a restart storm. Graceful
//! shutdown: the monitor stops fetching and lets running jobs finish.

use crate::{
    jobs::{AnalyzeCall, InvalidateRubric, Job, JobContext, perform_job},
    queue::{self, Envelope},
};
use apalis::prelude::*;
use redis::aio::ConnectionManager;
use std::{future::Future, time::Duration};
use uuid::Uuid;

/// Worker options.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Jobs run at once per kind.
    pub concurrency: usize,
    /// Idle poll interval.
    pub poll: Duration,
}

/// A unique worker name: kind, host, pid, a random suffix and the restart count.
fn worker_name(kind: &str, restarts: usize) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let nonce = &Uuid::new_v4().simple().to_string()[..8];
    format!("{kind}@{host}-{}-{nonce}-r{restarts}", std::process::id())
}

/// Waits until Redis answers, polling every 250 ms.
async fn wait_for_redis(mut conn: ConnectionManager) {
    loop {
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        if pong.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The apalis handler: the ledger protocol around [`Job::perform`].
async fn handle<J: Job>(env: Envelope<J>, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    perform_job(env, &ctx).await.map(|_| ()).map_err(Into::into)
}

/// Runs workers for every job kind until `shutdown` resolves.
pub async fn run(
    ctx: JobContext,
    redis: ConnectionManager,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let monitor = Monitor::new()
        .should_restart(|worker, error| {
            tracing::warn!(worker = %worker.name(), ?error, "worker stopped; restarting");
            true
        })
        .shutdown_timeout(Duration::from_secs(30));
    let monitor = register::<AnalyzeCall>(monitor, ctx.clone(), redis.clone(), options.clone());
    let monitor = register::<InvalidateRubric>(monitor, ctx, redis, options);
    monitor
        .run_with_signal(async {
            shutdown.await;
            Ok(())
        })
        .await?;
    Ok(())
}

fn register<J: Job>(
    monitor: Monitor,
    ctx: JobContext,
    redis: ConnectionManager,
    options: WorkerOptions,
) -> Monitor {
    monitor.register(move |restarts| {
        let probe = redis.clone();
        let backend = queue::storage::<J>(redis.clone())
            .before_start(move |_| {
                let probe = probe.clone();
                async move {
                    if restarts > 0 {
                        wait_for_redis(probe).await;
                    }
                    Ok(())
                }
            })
            .poll_with_interval(options.poll);
        WorkerBuilder::new(worker_name(J::JOB_NAME, restarts))
            .backend(backend)
            .data(ctx.clone())
            .concurrency(options.concurrency)
            .build(handle::<J>)
    })
}
