//! Job kinds and the protocol that runs them.
//!
//! A job kind is a serde payload implementing [`Job`]: a stable `JOB_NAME` (its ledger name),
//! its [`JobOptions`] (lane, attempt budget, timeout, backoff) and `perform`. Kinds are listed
//! once, in [`registry::REGISTRY`]. [`perform_job`] wraps every kind with the ledger protocol:
//! claim the delivery (guarded), run it under its lease and timeout, then record the
//! [`JobError`] outcome (retry with backoff, snooze without using an attempt, cancel, or
//! fail), applied only if this delivery is still the running one.

pub mod analyze_call;
pub mod collect_batch;
pub mod invalidate_rubric;
pub mod maintenance;
pub mod registry;
pub mod warm_cache;

use crate::{
    cache::CoachingCache,
    config::Settings,
    delivery::{Envelope, Lane},
    ledger::{JobState, Ledger, Outcome},
    llm::Gateway,
    queue::{NewJob, Queue},
    telemetry::names,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sqlx::PgPool;
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use analyze_call::AnalyzeCall;
pub use collect_batch::CollectBatch;
pub use invalidate_rubric::InvalidateRubric;
pub use maintenance::{MaintainTables, RefreshRepPerformance};
pub use registry::{Backoff, JobKind, JobOptions};
pub use warm_cache::WarmCache;

/// Everything a job may use, shared by all jobs of a worker.
#[derive(Clone)]
pub struct JobContext {
    /// Postgres pool.
    pub pg: PgPool,
    /// Tiered coaching cache.
    pub cache: CoachingCache,
    /// The guarded LLM path.
    pub llm: Gateway,
    /// Producer handle (follow-up jobs).
    pub queue: Queue,
    /// Grouped writer of job claims and outcomes.
    pub ledger: Ledger,
    /// Runs this process holds, whose leases the worker renews.
    pub inflight: InFlight,
    /// Process settings.
    pub settings: Arc<Settings>,
}

/// How a job run ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Transient failure: retry with the kind's backoff while attempts remain.
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// Throttled (LLM 429/529, rate limit): run again later without consuming an attempt.
    #[error("snoozed for {after:?}: {reason}")]
    Snooze {
        /// Delay before the next run.
        after: Duration,
        /// Why.
        reason: String,
    },
    /// A spend budget is used up: background work snoozes until it resets (no attempt used);
    /// interactive work fails at once with the reason, since nobody should wait that long.
    #[error("{reason}")]
    OverBudget {
        /// Time until the budget resets.
        resets_in: Duration,
        /// Which budget, how much is spent, when it resets.
        reason: String,
    },
    /// The job no longer makes sense; stop without error.
    #[error("cancelled: {0}")]
    Cancel(String),
    /// Permanent failure: no retry (bad input, unknown call, malformed model output…).
    #[error("{0:#}")]
    Fail(anyhow::Error),
}

/// Infrastructure errors (database, cache) are transient: retry.
impl From<anyhow::Error> for JobError {
    fn from(e: anyhow::Error) -> Self {
        JobError::Retry(e)
    }
}

/// A job kind.
pub trait Job: Serialize + DeserializeOwned + Clone + Send + Sync + Unpin + 'static {
    /// Stable name: `jobs.kind` in the ledger and the registry key.
    const JOB_NAME: &'static str;
    /// Lane, attempt budget, timeout and backoff.
    const OPTIONS: JobOptions = JobOptions::DEFAULT;

    /// Runs the job. Must be idempotent: a job can be delivered more than once.
    fn perform(
        self,
        job_id: Uuid,
        ctx: &JobContext,
    ) -> impl Future<Output = Result<serde_json::Value, JobError>> + Send;

    /// This job as a ledger row to enqueue, with the kind's lane and budget.
    fn to_job(&self) -> Result<NewJob, serde_json::Error> {
        Ok(NewJob::new(
            Self::JOB_NAME,
            serde_json::to_value(self)?,
            Self::OPTIONS.lane,
            Self::OPTIONS.max_attempts,
        ))
    }
}

/// A job that does nothing: queue benchmarks and smoke checks of a deployment.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Noop {
    /// Microseconds since the UNIX epoch at enqueue time (pick-up latency measurements).
    #[serde(default)]
    pub enqueued_at_us: u64,
}

impl Job for Noop {
    const JOB_NAME: &'static str = "noop";
    const OPTIONS: JobOptions = JobOptions {
        lane: Lane::Interactive,
        ..JobOptions::DEFAULT
    };
    async fn perform(self, _: Uuid, _: &JobContext) -> Result<serde_json::Value, JobError> {
        Ok(serde_json::Value::Null)
    }
}

/// Runs this process holds: each has a token that is cancelled when its lease is lost. A run
/// that ends without its outcome recorded (the write failed, or the run was dropped by a
/// shutdown that timed out) is kept as orphaned, so the worker can hand it back.
#[derive(Clone, Default)]
pub struct InFlight {
    state: Arc<Mutex<InFlightState>>,
}

#[derive(Default)]
struct InFlightState {
    runs: HashMap<(Uuid, i32), CancellationToken>,
    /// Runs that ended without a recorded outcome, and whether their attempt is refunded.
    orphaned: Vec<((Uuid, i32), bool)>,
}

/// Removes a run from [`InFlight`] when dropped; unless [`InFlightGuard::recorded`] was
/// called, the run is kept as orphaned.
pub struct InFlightGuard {
    inflight: InFlight,
    run: (Uuid, i32),
    recorded: bool,
    refund: bool,
    /// Cancelled when the lease was lost.
    pub lost: CancellationToken,
}

impl InFlightGuard {
    /// The run's outcome is in the ledger (or no longer this worker's to record).
    pub fn recorded(mut self) {
        self.recorded = true;
    }

    /// The run ended but its outcome could not be written: hand it back without refunding
    /// the attempt (a run dropped by a shutdown, the other way to end unrecorded, is refunded).
    pub fn write_failed(mut self) {
        self.refund = false;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.inflight.state.lock() {
            state.runs.remove(&self.run);
            if !self.recorded {
                state.orphaned.push((self.run, self.refund));
            }
        }
    }
}

impl InFlight {
    /// Registers a claimed run.
    pub fn enter(&self, job_id: Uuid, delivery: i32) -> InFlightGuard {
        let lost = CancellationToken::new();
        if let Ok(mut state) = self.state.lock() {
            state.runs.insert((job_id, delivery), lost.clone());
        }
        InFlightGuard {
            inflight: self.clone(),
            run: (job_id, delivery),
            recorded: false,
            refund: true,
            lost,
        }
    }

    /// The runs held now.
    pub fn runs(&self) -> Vec<(Uuid, i32)> {
        self.state
            .lock()
            .map(|s| s.runs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Takes the runs that ended without a recorded outcome, each with whether its attempt
    /// is refunded.
    pub fn take_orphaned(&self) -> Vec<((Uuid, i32), bool)> {
        self.state
            .lock()
            .map(|mut s| std::mem::take(&mut s.orphaned))
            .unwrap_or_default()
    }

    /// Puts back orphaned runs whose hand-back failed.
    pub fn keep_orphaned(&self, runs: Vec<((Uuid, i32), bool)>) {
        if let Ok(mut state) = self.state.lock() {
            state.orphaned.extend(runs);
        }
    }

    /// Stops the work of runs whose lease was lost.
    pub fn lost(&self, runs: &[(Uuid, i32)]) {
        if let Ok(state) = self.state.lock() {
            for run in runs {
                if let Some(token) = state.runs.get(run) {
                    token.cancel();
                }
            }
        }
    }
}

/// What one delivery's run came to (for metrics and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunLabel {
    /// Stale delivery: not claimed, nothing run.
    Skipped,
    /// Succeeded.
    Succeeded,
    /// Will be retried.
    Retry,
    /// Snoozed.
    Snoozed,
    /// Cancelled.
    Cancelled,
    /// Failed for good.
    Failed,
    /// The lease was lost mid-run (rescued elsewhere) or the outcome no longer applied.
    Abandoned,
}

impl RunLabel {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RunLabel::Skipped => "skipped",
            RunLabel::Succeeded => "succeeded",
            RunLabel::Retry => "retry",
            RunLabel::Snoozed => "snoozed",
            RunLabel::Cancelled => "cancelled",
            RunLabel::Failed => "failed",
            RunLabel::Abandoned => "abandoned",
        }
    }
}

/// Runs one delivery under the ledger protocol. Errors returned here are ledger (Postgres)
/// failures only; apalis then retries the delivery a few times, and the rescuer re-issues it
/// if those fail too.
pub async fn perform_job(env: Envelope, ctx: &JobContext) -> anyhow::Result<RunLabel> {
    let span =
        tracing::info_span!("job", kind = %env.kind, job_id = %env.job_id, delivery = env.delivery);
    async move {
        let Some(claim) = ctx.ledger.claim(env.job_id, env.delivery).await? else {
            tracing::debug!("stale delivery skipped");
            return Ok(RunLabel::Skipped);
        };
        let guard = ctx.inflight.enter(env.job_id, env.delivery);
        metrics::histogram!(names::JOB_QUEUE_WAIT, "kind" => env.kind.clone(), "lane" => claim.lane.as_str())
            .record(claim.queue_wait_secs);
        let Some(kind) = registry::find(&env.kind) else {
            let error = format!("unknown job kind {:?}: not in the job registry", env.kind);
            tracing::error!(%error, "failing undeliverable job");
            return record(ctx, &env, Outcome::Failed(error), RunLabel::Failed, guard).await;
        };
        if claim.attempt > claim.max_attempts {
            let exhausted = Outcome::Failed("attempt budget exhausted".into());
            return record(ctx, &env, exhausted, RunLabel::Failed, guard).await;
        }
        let started = std::time::Instant::now();
        let run = tokio::time::timeout(
            kind.options.timeout,
            kind.perform(env.args.clone(), env.job_id, ctx.clone()),
        );
        let result = tokio::select! {
            result = run => result.unwrap_or_else(|_| Err(JobError::Retry(anyhow::anyhow!(
                "timed out after {:?}", kind.options.timeout)))),
            _ = guard.lost.cancelled() => {
                tracing::warn!("lease lost mid-run; the job was re-issued, abandoning this run");
                guard.recorded();
                return Ok(RunLabel::Abandoned);
            }
        };
        metrics::histogram!(names::JOB_DURATION, "kind" => kind.name)
            .record(started.elapsed().as_secs_f64());
        let (outcome, label) = outcome_of(kind, claim, env.delivery, result);
        let label = record(ctx, &env, outcome, label, guard).await?;
        metrics::counter!(names::JOBS_FINISHED, "kind" => kind.name, "outcome" => label.as_str())
            .increment(1);
        Ok(label)
    }
    .instrument(span)
    .await
}

/// Maps a run's result onto the ledger outcome, honouring the attempt budget and backoff.
fn outcome_of(
    kind: &JobKind,
    claim: crate::ledger::Claimed,
    delivery: i32,
    result: Result<serde_json::Value, JobError>,
) -> (Outcome, RunLabel) {
    match result {
        Ok(value) => (Outcome::Succeeded(Some(value)), RunLabel::Succeeded),
        Err(JobError::Retry(e)) if claim.attempt < claim.max_attempts => {
            let after = kind.options.backoff.delay(claim.attempt);
            let reason = format!("{e:#}");
            tracing::warn!(error = %reason, ?after, attempt = claim.attempt, "job failed; will retry");
            let again = Outcome::Again {
                state: JobState::Queued,
                after,
                reason,
                refund: false,
            };
            (again, RunLabel::Retry)
        }
        Err(JobError::Snooze { after, reason }) => {
            // Deliveries beyond attempts are (mostly) earlier snoozes.
            let after = snooze_delay(after, delivery - claim.attempt);
            tracing::info!(?after, %reason, "job snoozed");
            let again = Outcome::Again {
                state: JobState::Snoozed,
                after,
                reason,
                refund: true,
            };
            (again, RunLabel::Snoozed)
        }
        Err(JobError::OverBudget { resets_in, reason }) if claim.lane == Lane::Background => {
            tracing::warn!(%reason, "over budget; background job snoozed until the budget resets");
            let again = Outcome::Again {
                state: JobState::Snoozed,
                after: resets_in + Duration::from_millis(rand::random_range(0..=60_000)),
                reason,
                refund: true,
            };
            (again, RunLabel::Snoozed)
        }
        Err(JobError::Cancel(reason)) => (Outcome::Cancelled(reason), RunLabel::Cancelled),
        Err(e @ (JobError::Retry(_) | JobError::Fail(_) | JobError::OverBudget { .. })) => {
            tracing::error!(error = %e, attempt = claim.attempt, "job failed permanently");
            (Outcome::Failed(e.to_string()), RunLabel::Failed)
        }
    }
}

/// Longest snooze the back-off alone imposes.
const MAX_SNOOZE_BACKOFF: Duration = Duration::from_secs(60);

/// The delay before a snoozed job runs again: what the job asked for (e.g. the API's
/// `retry-after`), but at least 1 s doubled per earlier snooze (capped at a minute), plus up
/// to 25 % jitter so a fleet throttled together does not come back together.
pub fn snooze_delay(requested: Duration, earlier_snoozes: i32) -> Duration {
    let doublings = earlier_snoozes.clamp(0, 6) as u32;
    let floor = Duration::from_secs(1 << doublings).min(MAX_SNOOZE_BACKOFF);
    let delay = requested.max(floor);
    let jitter_ms = rand::random_range(0..=delay.as_millis() as u64 / 4);
    delay + Duration::from_millis(jitter_ms)
}

/// Writes an outcome; a discarded one (the delivery is no longer the running one) is reported
/// as [`RunLabel::Abandoned`]. A failed write leaves the run to be handed back.
async fn record(
    ctx: &JobContext,
    env: &Envelope,
    outcome: Outcome,
    label: RunLabel,
    guard: InFlightGuard,
) -> anyhow::Result<RunLabel> {
    match ctx.ledger.finish(env.job_id, env.delivery, outcome).await {
        Ok(true) => {
            guard.recorded();
            Ok(label)
        }
        Ok(false) => {
            guard.recorded();
            tracing::warn!("outcome discarded: this delivery is no longer the running one");
            Ok(RunLabel::Abandoned)
        }
        Err(e) => {
            guard.write_failed();
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snoozes_honour_the_request_and_back_off_with_jitter() {
        for _ in 0..50 {
            let d = snooze_delay(Duration::from_millis(1500), 0);
            assert!(d >= Duration::from_millis(1500) && d <= Duration::from_millis(1875));
            let d = snooze_delay(Duration::from_millis(100), 3);
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(10),
                "{d:?}"
            );
            let d = snooze_delay(Duration::ZERO, 40);
            assert!(d >= MAX_SNOOZE_BACKOFF && d <= MAX_SNOOZE_BACKOFF * 5 / 4);
            let d = snooze_delay(Duration::from_secs(120), 40);
            assert!(
                d >= Duration::from_secs(120),
                "the API's retry-after wins: {d:?}"
            );
        }
    }
}
