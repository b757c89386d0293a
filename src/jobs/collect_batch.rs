//! Batch mode: analyses nobody waits on (`AnalyzeCall { batch: true }` with `LLM_BATCH_MODE`
//! on) go through the Message Batches API at half the price.
//!
//! `submit` (called by `analyze_call`) answers the dimensions already in the cache as
//! usual, sends the others as one batch (1-hour cache TTL, so the call's shared prefix stays
//! warm across the batch) and enqueues a `collect_batch` job. [`CollectBatch`] snoozes while
//! the batch runs (no attempt used; `BATCH_POLL_SECS` between looks, growing with the
//! snooze back-off); once it has ended it stores each answer through the same path as a
//! direct analysis (analysis run with its cost, coaching session, durable cache row, Redis)
//! and re-enqueues the dimensions that errored, were canceled or expired (the 24 h window)
//! as ordinary background analyses.
//!
//! A crash between the submission and the enqueue of the collector would submit the batch
//! again on the retry: the window is one Postgres insert.

use super::{
    AnalyzeCall, Job, JobContext, JobError, JobOptions,
    analyze_call::{
        AnalysisInput, DimensionOutcome, StoredRun, gateway_error_outcome, llm_error_outcome, plan,
        record_hit, store,
    },
};
use crate::{
    cache::CacheKey,
    db::{self, CallForAnalysis},
    delivery::Lane,
    llm::{self, CacheTtl, GatewayError, batch::BatchOutcome, cost::Cost},
    model::Dimension,
};
use anyhow::anyhow;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Payload of a `collect_batch` job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollectBatch {
    /// The API's batch id.
    pub batch_id: String,
    /// The call analysed.
    pub call_id: Uuid,
    /// The `analyze_call` job that submitted the batch (recorded on the analysis runs).
    pub job_id: Uuid,
    /// The cache key of each request; its dimension is the request's `custom_id`.
    pub keys: Vec<CacheKey>,
}

impl Job for CollectBatch {
    const JOB_NAME: &'static str = "collect_batch";
    const OPTIONS: JobOptions = JobOptions {
        lane: Lane::Background,
        ..JobOptions::DEFAULT
    };

    async fn perform(self, _: Uuid, ctx: &JobContext) -> Result<serde_json::Value, JobError> {
        let client = ctx.llm.client();
        let info = client
            .batch(&self.batch_id)
            .await
            .map_err(llm_error_outcome)?;
        if !info.ended() {
            return Err(JobError::Snooze {
                after: ctx.settings.batch_poll,
                reason: format!("batch {} is {}", info.id, info.processing_status),
            });
        }
        let results = client
            .batch_results(&self.batch_id)
            .await
            .map_err(llm_error_outcome)?;
        let call = db::call_for_analysis(&ctx.pg, self.call_id)
            .await
            .map_err(|e| JobError::Retry(e.into()))?
            .ok_or_else(|| JobError::Fail(anyhow!("call {} does not exist", self.call_id)))?;
        let mut stored = Vec::new();
        let mut again = Vec::new();
        for key in &self.keys {
            let outcome = results
                .iter()
                .find(|(id, _)| id == key.dimension.as_str())
                .map(|(_, outcome)| outcome);
            match outcome {
                Some(BatchOutcome::Succeeded(response)) => {
                    match self.store_answer(ctx, &call, key, response).await? {
                        Some(score) => {
                            stored.push(json!({"dimension": key.dimension, "score": score}))
                        }
                        None => again.push(key.dimension),
                    }
                }
                other => {
                    tracing::warn!(dimension = %key.dimension, ?other, "batch request not answered; analysing it directly");
                    again.push(key.dimension);
                }
            }
        }
        if !again.is_empty() {
            requeue(ctx, self.call_id, again.clone()).await?;
        }
        Ok(json!({ "batch_id": self.batch_id, "stored": stored, "requeued": again }))
    }
}

impl CollectBatch {
    /// Stores one answer like a direct analysis; `None` when the model's output is unusable
    /// (the dimension is then analysed again directly).
    async fn store_answer(
        &self,
        ctx: &JobContext,
        call: &CallForAnalysis,
        key: &CacheKey,
        response: &llm::LlmResponse,
    ) -> Result<Option<u8>, JobError> {
        let cost = Cost::for_model(&response.model, &response.usage).unwrap_or_default();
        ctx.llm.spend().charge(cost.usd).await;
        let result = match llm::parse_coaching(&response.text) {
            Ok(result) => result,
            Err(e) => {
                tracing::warn!(dimension = %key.dimension, error = %e, "batch answer rejected");
                return Ok(None);
            }
        };
        let run = StoredRun {
            job_id: self.job_id,
            call,
            key,
            source: "llm",
            model: &response.model,
            usage: response.usage,
            cost,
            started: Instant::now(),
            waited: Duration::ZERO,
        };
        let stored = store(ctx, &run, &result).await.map_err(JobError::Retry)?;
        ctx.cache.redis_put(key, &stored).await;
        Ok(Some(stored.score))
    }
}

/// Analyses `dimensions` of a call directly, in the background.
async fn requeue(
    ctx: &JobContext,
    call_id: Uuid,
    dimensions: Vec<Dimension>,
) -> Result<(), JobError> {
    let job = AnalyzeCall {
        call_id,
        dimensions,
        batch: false,
    }
    .to_job()
    .map_err(|e| JobError::Fail(e.into()))?
    .on_lane(Lane::Background);
    ctx.queue
        .enqueue(job)
        .await
        .map_err(|e| JobError::Retry(e.into()))?;
    Ok(())
}

/// The batch side of `analyze_call`: cached dimensions as usual, the rest as one batch with a
/// `collect_batch` job to pick up its answers.
pub(super) async fn submit(
    ctx: &JobContext,
    job_id: Uuid,
    call: &CallForAnalysis,
    inputs: Vec<AnalysisInput<'_>>,
) -> Result<serde_json::Value, JobError> {
    let options = ctx.settings.prompt_options(CacheTtl::OneHour);
    let mut answered: Vec<DimensionOutcome> = Vec::new();
    let mut requests = Vec::new();
    let mut keys = Vec::new();
    for input in inputs {
        let started = Instant::now();
        let (key, prompt) = plan(&ctx.settings, &input)?;
        // A cached dimension is answered here, from this lookup (counted once).
        if let Some((result, tier)) = ctx.cache.lookup(&key, true).await? {
            let run = StoredRun {
                job_id: input.job_id,
                call,
                key: &key,
                source: tier.as_str(),
                model: &ctx.settings.claude_model,
                usage: llm::Usage::default(),
                cost: Cost::default(),
                started,
                waited: Duration::ZERO,
            };
            answered.push(record_hit(ctx, &run, result).await?);
            continue;
        }
        let request = llm::build_request(&options, &prompt);
        requests.push((key.dimension.as_str().to_string(), request.body));
        keys.push(key);
    }
    if requests.is_empty() {
        return Ok(json!({ "dimensions": answered }));
    }
    ctx.llm
        .spend()
        .check()
        .await
        .map_err(|over| gateway_error_outcome(GatewayError::OverBudget(over)))?;
    let batch = ctx
        .llm
        .client()
        .create_batch(&requests)
        .await
        .map_err(llm_error_outcome)?;
    let pending: Vec<Dimension> = keys.iter().map(|k| k.dimension).collect();
    let collector = CollectBatch {
        batch_id: batch.id.clone(),
        call_id: call.id,
        job_id,
        keys,
    };
    let due = chrono::Utc::now()
        + chrono::Duration::from_std(ctx.settings.batch_poll).unwrap_or_default();
    let job = collector
        .to_job()
        .map_err(|e| JobError::Fail(e.into()))?
        .run_at(due);
    ctx.queue
        .enqueue(job)
        .await
        .map_err(|e| JobError::Retry(e.into()))?;
    tracing::info!(batch = %batch.id, ?pending, "analyses sent as a batch");
    Ok(json!({ "dimensions": answered, "batch_id": batch.id, "pending": pending }))
}
