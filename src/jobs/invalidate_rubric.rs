//! `invalidate_rubric`: after a rubric update, removes the superseded version's Redis entries.
//! The Postgres cache table is the index of which keys exist (batched UNLINK; never a KEYS or
//! SCAN over the keyspace). The Postgres rows stay: they are history, and no new key matches
//! them because the active version is part of every key.

use super::{Job, JobContext, JobError};
use crate::model::{Dimension, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Payload of an `invalidate_rubric` job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InvalidateRubric {
    /// Role of the rubric.
    pub role: Role,
    /// Dimension of the rubric.
    pub dimension: Dimension,
    /// The superseded version whose entries go ([`crate::model::check_rubric_version`]).
    #[serde(deserialize_with = "crate::model::deserialize_rubric_version")]
    pub version: String,
}

impl Job for InvalidateRubric {
    const JOB_NAME: &'static str = "invalidate_rubric";

    async fn perform(self, _: Uuid, ctx: &JobContext) -> Result<serde_json::Value, JobError> {
        let keys = ctx
            .cache
            .keys_for_rubric(self.role, self.dimension.as_str(), &self.version)
            .await
            .map_err(|e| JobError::Retry(e.into()))?;
        let removed = ctx.cache.unlink(&keys).await.map_err(JobError::Retry)?;
        tracing::info!(
            role = self.role.as_str(),
            dimension = %self.dimension,
            version = %self.version,
            keys = keys.len(),
            removed,
            "rubric invalidated"
        );
        Ok(serde_json::json!({ "keys": keys.len(), "removed": removed }))
    }
}
