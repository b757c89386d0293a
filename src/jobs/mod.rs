//! Job kinds and the code that runs them.
//!
//! A job kind is a serde payload implementing [`Job`] with a stable `JOB_NAME` (its queue and
//! ledger name). [`perform_job`] wraps every kind with the ledger protocol: claim the row, run,
//! then record the [`JobError`] outcome (retry with backoff, snooze without using an attempt,
//! cancel, or fail). A new kind is registered in two places: the `match` in [`deliver_raw`]
//! (relay) and `worker::run` (consumers).

pub mod analyze_call;
pub mod invalidate_rubric;

use crate::{
    cache::CoachingCache,
    config::Settings,
    ledger::{Finish, Ledger, LedgerError},
    llm::LlmClient,
    queue::{Envelope, Queue},
    telemetry::names,
};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::PgPool;
use std::{future::Future, sync::Arc, time::Duration};
use tracing::Instrument;
use uuid::Uuid;

pub use analyze_call::AnalyzeCall;
pub use invalidate_rubric::InvalidateRubric;

/// Everything a job may use, shared by all jobs of a worker.
#[derive(Clone)]
pub struct JobContext {
    /// Postgres pool.
    pub pg: PgPool,
    /// Tiered coaching cache.
    pub cache: CoachingCache,
    /// LLM client.
    pub llm: LlmClient,
    /// Producer handle (retries, follow-up jobs).
    pub queue: Queue,
    /// Grouped writer of job claims and outcomes.
    pub ledger: Ledger,
    /// Process settings.
    pub settings: Arc<Settings>,
}

/// How a job run ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Transient failure: retry with exponential backoff while attempts remain.
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
    /// Stable name: queue name suffix and `jobs.kind` in the ledger.
    const JOB_NAME: &'static str;

    /// Runs the job. Must be idempotent: a job can be delivered more than once.
    fn perform(
        self,
        job_id: Uuid,
        ctx: &JobContext,
    ) -> impl Future<Output = Result<serde_json::Value, JobError>> + Send;
}

/// Pushes a ledger row's payload for a kind known only by name (used by the outbox relay).
pub async fn deliver_raw(
    queue: &Queue,
    kind: &str,
    id: Uuid,
    delivery: i32,
    payload: serde_json::Value,
    delay: Duration,
) -> anyhow::Result<bool> {
    match kind {
        AnalyzeCall::JOB_NAME => {
            let args: AnalyzeCall = serde_json::from_value(payload)?;
            Ok(queue.deliver(id, delivery, args, delay).await)
        }
        InvalidateRubric::JOB_NAME => {
            let args: InvalidateRubric = serde_json::from_value(payload)?;
            Ok(queue.deliver(id, delivery, args, delay).await)
        }
        other => anyhow::bail!("unknown job kind {other:?}"),
    }
}

/// Exponential backoff with jitter for the n-th attempt: 2 s, 4 s, 8 s … capped at 10 min.
pub fn backoff(attempt: i32) -> Duration {
    let base = 2u64.saturating_pow(attempt.clamp(1, 20) as u32).min(600);
    let jitter = rand::random_range(0..=base * 250);
    Duration::from_millis(base * 1000 + jitter)
}

/// Records a terminal status through the grouped ledger writer.
async fn finish(
    ctx: &JobContext,
    id: Uuid,
    status: &'static str,
    result: Option<serde_json::Value>,
    error: Option<String>,
) -> Result<(), LedgerError> {
    ctx.ledger
        .finish(Finish {
            id,
            status,
            result,
            error,
        })
        .await
}

/// Schedules the next delivery of a job (retry or snooze) and pushes it.
async fn redeliver<J: Job>(
    ctx: &JobContext,
    env: &Envelope<J>,
    status: &str,
    refund_attempt: bool,
    after: Duration,
    error: &str,
) -> sqlx::Result<()> {
    let next = env.delivery + 1;
    sqlx::query(
        "UPDATE jobs SET status = $2, delivery = $3, delivered_at = NULL, last_error = $4,
                attempts = attempts - CASE WHEN $5 THEN 1 ELSE 0 END,
                run_at = now() + make_interval(secs => $6), updated_at = now()
         WHERE id = $1",
    )
    .bind(env.job_id)
    .bind(status)
    .bind(next)
    .bind(error)
    .bind(refund_attempt)
    .bind(after.as_secs_f64())
    .execute(&ctx.pg)
    .await?;
    ctx.queue
        .deliver(env.job_id, next, env.args.clone(), after)
        .await;
    Ok(())
}

/// Runs one delivery of a job under the ledger protocol. Errors returned here are ledger
/// (Postgres) failures only; apalis then re-delivers the same task later.
pub async fn perform_job<J: Job>(
    env: Envelope<J>,
    ctx: &JobContext,
) -> anyhow::Result<&'static str> {
    let span = tracing::info_span!("job", kind = J::JOB_NAME, job_id = %env.job_id, delivery = env.delivery);
    async move {
        let Some((attempt, max_attempts)) = ctx.ledger.claim(env.job_id, env.delivery).await?
        else {
            tracing::info!("stale delivery skipped");
            return Ok("skipped");
        };
        if attempt > max_attempts {
            let exhausted = Some("attempt budget exhausted".to_string());
            finish(ctx, env.job_id, "failed", None, exhausted).await?;
            return Ok("failed");
        }
        let started = std::time::Instant::now();
        let outcome = env.args.clone().perform(env.job_id, ctx).await;
        metrics::histogram!(names::JOB_DURATION, "kind" => J::JOB_NAME)
            .record(started.elapsed().as_secs_f64());
        let label = record_outcome(ctx, &env, attempt, max_attempts, outcome).await?;
        metrics::counter!(names::JOBS_FINISHED, "kind" => J::JOB_NAME, "outcome" => label)
            .increment(1);
        Ok(label)
    }
    .instrument(span)
    .await
}

async fn record_outcome<J: Job>(
    ctx: &JobContext,
    env: &Envelope<J>,
    attempt: i32,
    max_attempts: i32,
    outcome: Result<serde_json::Value, JobError>,
) -> anyhow::Result<&'static str> {
    let label = match outcome {
        Ok(result) => {
            finish(ctx, env.job_id, "succeeded", Some(result), None).await?;
            "succeeded"
        }
        Err(JobError::Retry(e)) if attempt < max_attempts => {
            let after = backoff(attempt);
            tracing::warn!(error = %format!("{e:#}"), ?after, attempt, "job failed; will retry");
            redeliver(ctx, env, "queued", false, after, &format!("{e:#}")).await?;
            "retry"
        }
        Err(JobError::Snooze { after, reason }) => {
            tracing::info!(?after, %reason, "job snoozed");
            redeliver(ctx, env, "snoozed", true, after, &reason).await?;
            "snoozed"
        }
        Err(JobError::Cancel(reason)) => {
            finish(ctx, env.job_id, "cancelled", None, Some(reason)).await?;
            "cancelled"
        }
        Err(e @ (JobError::Retry(_) | JobError::Fail(_))) => {
            tracing::error!(error = %e, attempt, "job failed permanently");
            finish(ctx, env.job_id, "failed", None, Some(e.to_string())).await?;
            "failed"
        }
    };
    Ok(label)
}
