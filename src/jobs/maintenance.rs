//! Database upkeep jobs, on the background lane (the scheduler runs them by cron; `callcoach
//! jobs enqueue KIND` runs them now):
//! - `refresh_rep_performance`: refreshes `mv_rep_performance` concurrently (readers are
//!   never blocked).
//! - `maintain_tables`: `maintain_performance_tables()` (partitions of the coming months,
//!   rows moved out of the default partition, ANALYZE where rows changed), then VACUUM of the
//!   tables it names (VACUUM cannot run inside a function).

use super::{Job, JobContext, JobError, JobOptions};
use crate::{delivery::Lane, performance};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Options of both upkeep kinds: background lane, the default budget and back-off.
const UPKEEP: JobOptions = JobOptions {
    lane: Lane::Background,
    ..JobOptions::DEFAULT
};

/// Payload of a `refresh_rep_performance` job (none).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RefreshRepPerformance {}

impl Job for RefreshRepPerformance {
    const JOB_NAME: &'static str = "refresh_rep_performance";
    const OPTIONS: JobOptions = UPKEEP;

    async fn perform(self, _: Uuid, ctx: &JobContext) -> Result<serde_json::Value, JobError> {
        let started = std::time::Instant::now();
        performance::refresh_rep_performance(&ctx.pg)
            .await
            .map_err(|e| JobError::Retry(e.into()))?;
        Ok(serde_json::json!({ "refreshed_ms": started.elapsed().as_millis() as u64 }))
    }
}

/// Payload of a `maintain_tables` job.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MaintainTables {}

impl Job for MaintainTables {
    const JOB_NAME: &'static str = "maintain_tables";
    const OPTIONS: JobOptions = UPKEEP;

    async fn perform(self, _: Uuid, ctx: &JobContext) -> Result<serde_json::Value, JobError> {
        let report = performance::maintain_tables(&ctx.pg)
            .await
            .map_err(JobError::Retry)?;
        Ok(report)
    }
}
