//! The one list of job kinds. The worker, the relay (through the ledger's `kind` and `lane`
//! columns), the CLI and the benches all derive from [`REGISTRY`]; a kind that is not listed
//! here cannot be enqueued ([`crate::queue::QueueError::UnknownKind`]) and a delivery naming
//! one is failed with that reason.
//!
//! To add a kind: implement [`Job`] (name, options, `perform`) in its own file and add one
//! `JobKind::of::<YourJob>()` line below.

use super::{
    AnalyzeCall, CollectBatch, InvalidateRubric, Job, JobContext, JobError, MaintainTables, Noop,
    RefreshRepPerformance, WarmCache,
};
use crate::{delivery::Lane, queue::NewJob};
use futures::future::BoxFuture;
use std::time::Duration;
use uuid::Uuid;

/// Backoff between retries: `base × 2^(attempt-1)` plus up to 25 % jitter, capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before retrying after the n-th attempt (1-based).
    pub fn delay(&self, attempt: i32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.clamp(1, 30) as u32 - 1);
        let delay = self.base.saturating_mul(factor).min(self.max);
        let jitter_ms = rand::random_range(0..=delay.as_millis() as u64 / 4);
        (delay + Duration::from_millis(jitter_ms)).min(self.max)
    }
}

/// Per-kind options, declared with the kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobOptions {
    /// Lane a job of this kind runs on unless the producer picks another.
    pub lane: Lane,
    /// Attempt budget; `None` uses `JOB_MAX_ATTEMPTS`.
    pub max_attempts: Option<i32>,
    /// Longest one run may take; a run past it is retried (it counts as an attempt).
    pub timeout: Duration,
    /// Retry backoff.
    pub backoff: Backoff,
}

impl JobOptions {
    /// Defaults: background lane, the configured attempt budget, 5 min timeout, 2 s → 10 min.
    pub const DEFAULT: JobOptions = JobOptions {
        lane: Lane::Background,
        max_attempts: None,
        timeout: Duration::from_secs(300),
        backoff: Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(600),
        },
    };
}

type Perform = fn(
    serde_json::Value,
    Uuid,
    JobContext,
) -> BoxFuture<'static, Result<serde_json::Value, JobError>>;

/// A registered kind: its name, options and a type-erased `perform`.
pub struct JobKind {
    /// Stable name (`jobs.kind`).
    pub name: &'static str,
    /// The kind's options.
    pub options: JobOptions,
    perform: Perform,
    check: fn(&serde_json::Value) -> Result<(), String>,
}

impl JobKind {
    /// The registry entry of `J`.
    pub const fn of<J: Job>() -> JobKind {
        JobKind {
            name: J::JOB_NAME,
            options: J::OPTIONS,
            perform: perform_erased::<J>,
            check: check_erased::<J>,
        }
    }

    /// A job of this kind from raw JSON arguments (CLI, dashboard), checked against the
    /// kind's payload type so a bad payload is refused before it reaches the ledger.
    pub fn new_job(&self, args: serde_json::Value) -> Result<NewJob, String> {
        (self.check)(&args).map_err(|e| format!("invalid {} arguments: {e}", self.name))?;
        Ok(NewJob::new(
            self.name,
            args,
            self.options.lane,
            self.options.max_attempts,
        ))
    }

    /// Decodes the ledger payload and runs the job. A payload that does not decode fails the
    /// job, naming the problem.
    pub fn perform(
        &self,
        args: serde_json::Value,
        job_id: Uuid,
        ctx: JobContext,
    ) -> BoxFuture<'static, Result<serde_json::Value, JobError>> {
        (self.perform)(args, job_id, ctx)
    }
}

fn check_erased<J: Job>(args: &serde_json::Value) -> Result<(), String> {
    J::deserialize(args)
        .map(|_: J| ())
        .map_err(|e| e.to_string())
}

fn perform_erased<J: Job>(
    args: serde_json::Value,
    job_id: Uuid,
    ctx: JobContext,
) -> BoxFuture<'static, Result<serde_json::Value, JobError>> {
    Box::pin(async move {
        let args: J = serde_json::from_value(args)
            .map_err(|e| JobError::Fail(anyhow::anyhow!("invalid {} payload: {e}", J::JOB_NAME)))?;
        args.perform(job_id, &ctx).await
    })
}

/// Every job kind, once.
pub const REGISTRY: &[JobKind] = &[
    JobKind::of::<AnalyzeCall>(),
    JobKind::of::<CollectBatch>(),
    JobKind::of::<InvalidateRubric>(),
    JobKind::of::<RefreshRepPerformance>(),
    JobKind::of::<MaintainTables>(),
    JobKind::of::<WarmCache>(),
    JobKind::of::<Noop>(),
];

/// The registered kind called `name`.
pub fn find(name: &str) -> Option<&'static JobKind> {
    REGISTRY.iter().find(|k| k.name == name)
}

/// Names of every registered kind.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|k| k.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let mut names = names();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "a kind is registered twice");
        for name in names {
            assert_eq!(find(name).unwrap().name, name);
        }
        assert!(find("no_such_kind").is_none());
    }

    #[test]
    fn interactive_analyses_and_background_upkeep() {
        assert_eq!(
            find("analyze_call").unwrap().options.lane,
            Lane::Interactive
        );
        assert_eq!(
            find("invalidate_rubric").unwrap().options.lane,
            Lane::Background
        );
    }

    #[test]
    fn raw_arguments_are_checked_against_the_kind() {
        let kind = find("analyze_call").unwrap();
        let err = kind.new_job(serde_json::json!({"call": 1})).unwrap_err();
        assert!(err.contains("invalid analyze_call arguments"), "{err}");
        let id = uuid::Uuid::nil();
        let job = kind.new_job(serde_json::json!({"call_id": id})).unwrap();
        assert_eq!(job.kind(), "analyze_call");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(10),
        };
        let first = b.delay(1);
        assert!(first >= Duration::from_secs(2) && first <= Duration::from_millis(2500));
        let third = b.delay(3);
        assert!(third >= Duration::from_secs(8), "{third:?}");
        assert_eq!(b.delay(20), Duration::from_secs(10));
    }
}
