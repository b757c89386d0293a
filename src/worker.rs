//! The worker role: one apalis worker per job kind under an apalis `Monitor`.
//!
//! apalis-redis workers stop on any Redis error, so the monitor restarts them, each time under
//! a fresh name (apalis refuses a name seen within the orphan window). A restarted worker first
//! waits until Redis answers PING, so an outage does not turn into a restart storm. Graceful
//! shutdown: the monitor stops fetching and lets running jobs finish.
//!
//! Idle workers do not wait for their poll tick: a [`WakeHub`] per kind listens on the kind's
//! pub/sub channel (published by every push) and wakes them at once; polling remains as the
//! fallback when a message is missed.

use crate::{
    jobs::{AnalyzeCall, InvalidateRubric, Job, JobContext, perform_job},
    queue::{self, Envelope},
};
use apalis::prelude::*;
use futures::{
    StreamExt,
    channel::mpsc::{Receiver, Sender, channel},
};
use redis::aio::ConnectionManager;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Fans wake-ups from one Redis subscription out to the (re)started workers of a kind.
#[derive(Clone, Default)]
pub struct WakeHub {
    senders: Arc<Mutex<Vec<Sender<()>>>>,
}

impl WakeHub {
    /// Starts listening on `kind`'s wake channel until `shutdown`; reconnects after errors.
    pub fn spawn(client: redis::Client, kind: &str, shutdown: CancellationToken) -> Self {
        let hub = WakeHub::default();
        let listener = hub.clone();
        let channel = queue::wake_channel(kind);
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = listener.listen(client, channel) => {}
            }
        });
        hub
    }

    async fn listen(&self, client: redis::Client, channel: String) {
        loop {
            if let Ok(mut pubsub) = client.get_async_pubsub().await
                && pubsub.subscribe(&channel).await.is_ok()
            {
                // Anything pushed while we were away is picked up by this wake.
                self.notify();
                let mut messages = pubsub.on_message();
                while messages.next().await.is_some() {
                    self.notify();
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Wakes every live subscriber; a subscriber with a wake pending is not woken twice.
    fn notify(&self) {
        if let Ok(mut senders) = self.senders.lock() {
            senders.retain_mut(|tx| match tx.try_send(()) {
                Ok(()) => true,
                Err(e) => e.is_full(),
            });
        }
    }

    /// A new wake stream for one worker run.
    pub fn subscribe(&self) -> Receiver<()> {
        let (tx, rx) = channel(1);
        if let Ok(mut senders) = self.senders.lock() {
            senders.push(tx);
        }
        rx
    }
}

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

/// The apalis handler: the ledger protocol around [`Job::perform`].
async fn handle<J: Job>(env: Envelope<J>, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    perform_job(env, &ctx).await.map(|_| ()).map_err(Into::into)
}

/// How an idle worker learns of new jobs: a wake message, or else its poll tick.
pub fn poll_strategy(wake: &WakeHub, poll: Duration) -> Strategy {
    Strategy::new().stream(wake.subscribe()).interval(poll)
}

/// Runs workers for every job kind until `shutdown` is cancelled.
pub async fn run(
    ctx: JobContext,
    redis: ConnectionManager,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let monitor = Monitor::new()
        .should_restart(|worker, error| {
            tracing::warn!(worker = %worker.name(), ?error, "worker stopped; restarting");
            true
        })
        .shutdown_timeout(Duration::from_secs(30));
    let client = redis::Client::open(ctx.settings.redis_url.expose())?;
    let wake = |kind| WakeHub::spawn(client.clone(), kind, shutdown.clone());
    let monitor = register::<AnalyzeCall>(
        monitor,
        ctx.clone(),
        redis.clone(),
        wake(AnalyzeCall::JOB_NAME),
        options.clone(),
    );
    let monitor = register::<InvalidateRubric>(
        monitor,
        ctx,
        redis,
        wake(InvalidateRubric::JOB_NAME),
        options,
    );
    monitor
        .run_with_signal(async move {
            shutdown.cancelled().await;
            Ok(())
        })
        .await?;
    Ok(())
}

fn register<J: Job>(
    monitor: Monitor,
    ctx: JobContext,
    redis: ConnectionManager,
    wake: WakeHub,
    options: WorkerOptions,
) -> Monitor {
    monitor.register(move |restarts| {
        let probe = redis.clone();
        let backend = queue::storage::<J>(redis.clone())
            .before_start(move |_| {
                let probe = probe.clone();
                async move {
                    if restarts > 0 {
                        crate::wait_for_redis(probe).await;
                    }
                    Ok(())
                }
            })
            .poll_with_strategy(poll_strategy(&wake, options.poll));
        WorkerBuilder::new(worker_name(J::JOB_NAME, restarts))
            .backend(backend)
            .data(ctx.clone())
            .concurrency(options.concurrency)
            .build(handle::<J>)
    })
}
