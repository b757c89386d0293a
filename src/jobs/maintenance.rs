//! Database upkeep jobs, on the background lane (the scheduler runs them by cron; `callcoach
//! jobs enqueue KIND` runs them now):
//! - `refresh_rep_performance`: refreshes `mv_rep_performance` concurrently (readers are
//!   never blocked).
//! - `maintain_tables`: keeps the `coaching_sessions` partitions of the coming months and
//!   moves rows out of the default partition into their month.

use super::{Job, JobContext, JobError, JobOptions};
use crate::{db, delivery::Lane, performance};
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
        let report = db::maintain_partitions(&ctx.pg, db::PARTITION_MONTHS_AHEAD)
            .await
            .map_err(|e| JobError::Retry(e.into()))?;
        report.log();
        Ok(serde_json::json!({ "partitions": report }))
    }
}
