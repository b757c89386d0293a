//! The worker role: one apalis worker per lane under an apalis `Monitor`, plus the ledger
//! upkeep (relay, rescuer, pruner) and the lease heartbeat of the runs it holds.
//!
//! - apalis-redis workers stop on any Redis error, so the monitor restarts them, each time
//!   under a fresh name (apalis refuses a name seen within the orphan window), after a pause
//!   that doubles with each quick failure (capped) and once Redis answers PING again.
//! - Idle workers do not wait for their poll tick: a [`WakeHub`] per lane listens on the
//!   lane's pub/sub channel (published by every push) and wakes them at once; polling remains
//!   the fallback when a message is missed.
//! - Every claimed run holds a lease in the ledger; the heartbeat renews the leases of all
//!   runs of this process in one statement, and stops a run whose lease is no longer ours.
//! - Shutdown: stop fetching, let running jobs finish within `WORKER_DRAIN_SECS` while their
//!   leases are still renewed (so nobody else runs them), then hand the rest back to the
//!   ledger for immediate re-delivery, and return.

use crate::{
    delivery::{self, Envelope, Lane},
    jobs::{JobContext, perform_job},
    ledger::{self, relay::Upkeep},
    supervise,
};
use apalis::prelude::*;
use futures::{
    StreamExt,
    channel::mpsc::{Receiver, Sender, channel},
};
use redis::aio::ConnectionManager;
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Fans wake-ups from one Redis subscription out to the (re)started workers of a lane.
#[derive(Clone, Default)]
pub struct WakeHub {
    senders: Arc<Mutex<Vec<Sender<()>>>>,
}

impl WakeHub {
    /// Starts listening (supervised) on `lane`'s wake channel until `shutdown`.
    pub fn spawn(client: redis::Client, lane: Lane, shutdown: CancellationToken) -> Self {
        let hub = WakeHub::default();
        let listener = hub.clone();
        supervise::spawn("wake hub", move || {
            let (hub, client, shutdown) = (listener.clone(), client.clone(), shutdown.clone());
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = hub.listen(client, lane.wake_channel()) => {}
                }
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
    /// Lanes this process consumes, each with its concurrency.
    pub lanes: Vec<(Lane, usize)>,
    /// Idle poll interval.
    pub poll: Duration,
    /// Lease of a claimed run (renewed every quarter of it).
    pub lease: Duration,
    /// How long a stopping worker lets running jobs finish.
    pub drain: Duration,
}

/// A unique worker name: lane, host, pid, a random suffix and the restart count.
pub fn worker_name(lane: &str, restarts: usize) -> String {
    let nonce = &Uuid::new_v4().simple().to_string()[..8];
    format!("{lane}@{}-{nonce}-r{restarts}", process_name())
}

/// This process's name in `jobs.claimed_by`: host and pid.
pub fn process_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

/// The apalis handler: the ledger protocol around the registered kind's `perform`.
async fn handle(env: Envelope, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    perform_job(env, &ctx).await.map(|_| ()).map_err(Into::into)
}

/// How an idle worker learns of new jobs: a wake message, or else its poll tick.
pub fn poll_strategy(wake: &WakeHub, poll: Duration) -> Strategy {
    Strategy::new().stream(wake.subscribe()).interval(poll)
}

/// Consecutive quick failures of one lane's worker: each restart waits longer (capped); a
/// run that lasted a minute resets the count.
#[derive(Default)]
struct RestartBackoff {
    failures: AtomicU32,
    last_start: Mutex<Option<Instant>>,
}

impl RestartBackoff {
    /// The pause before the start at `now`.
    fn delay(&self, now: Instant) -> Duration {
        let lasted = self
            .last_start
            .lock()
            .ok()
            .and_then(|mut s| s.replace(now))
            .map(|t| now.saturating_duration_since(t));
        if lasted.is_some_and(|d| d > Duration::from_secs(60)) {
            self.failures.store(0, Ordering::Relaxed);
        }
        supervise::restart_delay(self.failures.fetch_add(1, Ordering::Relaxed))
    }
}

/// Runs the lane workers, the ledger upkeep and the lease heartbeat until `shutdown` is
/// cancelled, then drains and hands back unfinished runs.
pub async fn run(
    ctx: JobContext,
    redis: ConnectionManager,
    upkeep: Upkeep,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let upkeep_task = supervise::spawn("ledger upkeep", {
        let (upkeep, shutdown) = (upkeep, shutdown.clone());
        move || upkeep.clone().run(shutdown.clone())
    });
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = supervise::spawn("lease heartbeat", {
        let (ctx, stop, lease) = (ctx.clone(), heartbeat_stop.clone(), options.lease);
        move || heartbeat_loop(ctx.clone(), lease, stop.clone())
    });
    let client = crate::redis_client(&ctx.settings)?;
    let mut monitor = Monitor::new()
        .should_restart(|worker, error| {
            tracing::warn!(worker = %worker.name(), ?error, "worker stopped; restarting");
            true
        })
        .shutdown_timeout(options.drain);
    for (lane, concurrency) in &options.lanes {
        let wake = WakeHub::spawn(client.clone(), *lane, shutdown.clone());
        monitor = register(
            monitor,
            &ctx,
            &redis,
            wake,
            *lane,
            *concurrency,
            options.poll,
        );
    }
    let result = monitor
        .run_with_signal(async move {
            shutdown.cancelled().await;
            Ok(())
        })
        .await;
    hand_back(&ctx).await;
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    let _ = upkeep_task.await;
    result?;
    Ok(())
}

/// Hands every run this process still holds (or dropped) back to the ledger.
async fn hand_back(ctx: &JobContext) {
    let mut runs = ctx.inflight.take_orphaned();
    runs.extend(ctx.inflight.runs().into_iter().map(|run| (run, true)));
    if let Err(e) = hand_back_runs(ctx, runs.clone()).await {
        tracing::warn!(error = %e, runs = runs.len(),
            "could not hand jobs back; the rescuer re-delivers them when their leases expire");
    }
}

/// Hands runs back, refunded or not as each says.
async fn hand_back_runs(
    ctx: &JobContext,
    runs: Vec<((Uuid, i32), bool)>,
) -> Result<(), sqlx::Error> {
    for refund in [true, false] {
        let group: Vec<(Uuid, i32)> = runs.iter().filter(|r| r.1 == refund).map(|r| r.0).collect();
        if group.is_empty() {
            continue;
        }
        let n = ledger::hand_back(&ctx.pg, &group, refund).await?;
        tracing::info!(
            handed_back = n,
            refund,
            "unfinished jobs handed back for re-delivery"
        );
    }
    Ok(())
}

/// Renews the leases of this process's runs every quarter lease; stops runs whose lease was
/// lost; hands back runs that ended without a recorded outcome.
async fn heartbeat_loop(ctx: JobContext, lease: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(lease / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let runs = ctx.inflight.runs();
        match ledger::writer::renew_leases(&ctx.pg, &runs, lease).await {
            Ok(lost) if !lost.is_empty() => {
                // Mostly runs whose outcome was written since the snapshot; a run that is
                // still working on a re-issued job stops here.
                tracing::debug!(
                    runs = lost.len(),
                    "leases no longer held; stopping those runs"
                );
                ctx.inflight.lost(&lost);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
        }
        let orphaned = ctx.inflight.take_orphaned();
        if !orphaned.is_empty() && hand_back_runs(&ctx, orphaned.clone()).await.is_err() {
            ctx.inflight.keep_orphaned(orphaned);
        }
    }
}

fn register(
    monitor: Monitor,
    ctx: &JobContext,
    redis: &ConnectionManager,
    wake: WakeHub,
    lane: Lane,
    concurrency: usize,
    poll: Duration,
) -> Monitor {
    let (ctx, redis) = (ctx.clone(), redis.clone());
    let backoff = Arc::new(RestartBackoff::default());
    monitor.register(move |restarts| {
        let (probe, backoff) = (redis.clone(), backoff.clone());
        let backend = delivery::storage(redis.clone(), lane)
            .before_start(move |_| {
                let (probe, backoff) = (probe.clone(), backoff.clone());
                async move {
                    let pause = backoff.delay(Instant::now());
                    if restarts > 0 {
                        tokio::time::sleep(pause).await;
                        crate::wait_for_redis(probe, Duration::from_millis(500)).await;
                    }
                    Ok(())
                }
            })
            .poll_with_strategy(poll_strategy(&wake, poll));
        WorkerBuilder::new(worker_name(lane.as_str(), restarts))
            .backend(backend)
            .data(ctx.clone())
            .concurrency(concurrency)
            .build(handle)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_on_quick_failures_and_reset_after_a_long_run() {
        let backoff = RestartBackoff::default();
        let t0 = Instant::now();
        let step = Duration::from_millis(10);
        let delays: Vec<_> = (0..4).map(|i| backoff.delay(t0 + step * i)).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800].map(Duration::from_millis),
            "each quick failure doubles the pause"
        );
        let after_long_run = backoff.delay(t0 + Duration::from_secs(120));
        assert_eq!(after_long_run, Duration::from_millis(100));
    }
}
