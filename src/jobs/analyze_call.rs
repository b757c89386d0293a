//! `analyze_call`: coaching analysis of one call along one or more dimensions.
//!
//! Per dimension: build the cache key, try the cache tiers, otherwise ask the LLM; then store
//! the analysis run, the coaching session (once per call, dimension and rubric version) and the
//! durable cache row in one short transaction, and refill Redis. No transaction is open while
//! the LLM is called.

use super::{Job, JobContext, JobError, JobOptions};
use crate::{
    cache::{CacheKey, Outcome, fingerprint},
    config::Settings,
    db::{self, CallForAnalysis},
    delivery::Lane,
    llm::{
        self, CacheTtl, CoachingResult, GatewayError, LlmError, PromptInputs, Usage,
        cost::{Cost, RunCost},
    },
    model::Dimension,
    telemetry::names,
};
use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};
use uuid::Uuid;

/// Payload of an `analyze_call` job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeCall {
    /// The call to analyse.
    pub call_id: Uuid,
    /// Dimensions to analyse; all four when empty. A payload is decoded with at most four
    /// entries and without duplicates ([`crate::model::dimension_set`]).
    #[serde(default, deserialize_with = "crate::model::deserialize_dimension_set")]
    pub dimensions: Vec<Dimension>,
    /// Nobody waits for this analysis (re-analysis after a rubric change, scheduled
    /// warming): with `LLM_BATCH_MODE` on, it goes through the Message Batches API at half
    /// the price, and its cache entries live an hour.
    #[serde(default)]
    pub batch: bool,
}

impl AnalyzeCall {
    /// The dimensions this job covers (all four when none were named), without duplicates.
    pub fn effective_dimensions(&self) -> Vec<Dimension> {
        let mut dims = if self.dimensions.is_empty() {
            Dimension::ALL.to_vec()
        } else {
            self.dimensions.clone()
        };
        dims.sort();
        dims.dedup();
        dims
    }
}

/// Where one dimension's result came from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DimensionOutcome {
    /// Dimension analysed.
    pub dimension: Dimension,
    /// Score 0-100.
    pub score: u8,
    /// `llm`, `redis` or `postgres`.
    pub source: String,
    /// Cache key of the result.
    pub cache_key: String,
}

impl Job for AnalyzeCall {
    const JOB_NAME: &'static str = "analyze_call";
    const OPTIONS: JobOptions = JobOptions {
        lane: Lane::Interactive,
        // Up to four dimensions, each one LLM request of at most LLM_TIMEOUT_SECS (120 s).
        timeout: std::time::Duration::from_secs(600),
        ..JobOptions::DEFAULT
    };

    async fn perform(self, job_id: Uuid, ctx: &JobContext) -> Result<serde_json::Value, JobError> {
        let call = db::call_for_analysis(&ctx.pg, self.call_id)
            .await
            .map_err(|e| JobError::Retry(e.into()))?
            .ok_or_else(|| JobError::Fail(anyhow!("call {} does not exist", self.call_id)))?;
        let (kb_text, kb_version) = db::knowledge_base(&ctx.pg)
            .await
            .map_err(|e| JobError::Retry(e.into()))?;
        let rubrics = db::role_rubrics(&ctx.pg, call.rep_role)
            .await
            .map_err(|e| JobError::Retry(e.into()))?;
        let rubric_text = role_rubric_text(&rubrics);
        // All dimensions at once: the gateway's prefix gate sends the first and holds the
        // others until the shared transcript prefix is in the prompt cache. Every analysis
        // runs to its end (none is dropped mid-call because another failed).
        let ttl = if self.batch {
            CacheTtl::OneHour
        } else {
            CacheTtl::FiveMinutes
        };
        let inputs = self
            .effective_dimensions()
            .into_iter()
            .map(|dimension| AnalysisInput {
                job_id,
                call: &call,
                dimension,
                rubric_text: &rubric_text,
                rubric_version: rubrics
                    .iter()
                    .find(|(d, _)| *d == dimension)
                    .map(|(_, r)| r.version.as_str()),
                kb_text: &kb_text,
                kb_version: &kb_version,
                ttl,
            });
        if self.batch && ctx.settings.llm_batch_mode {
            return super::collect_batch::submit(ctx, job_id, &call, inputs.collect()).await;
        }
        let analyses = inputs.map(|input| analyse_dimension(ctx, input));
        let outcomes = futures::future::join_all(analyses)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(serde_json::json!({ "dimensions": outcomes }))
    }
}

/// What one dimension analysis of a call is made from.
pub(super) struct AnalysisInput<'a> {
    pub(super) job_id: Uuid,
    pub(super) call: &'a CallForAnalysis,
    pub(super) dimension: Dimension,
    /// Every active rubric of the call's role (one prompt block shared by all dimensions).
    pub(super) rubric_text: &'a str,
    /// The version of this dimension's rubric; `None` when it has none.
    pub(super) rubric_version: Option<&'a str>,
    pub(super) kb_text: &'a str,
    pub(super) kb_version: &'a str,
    pub(super) ttl: CacheTtl,
}

pub(super) async fn analyse_dimension(
    ctx: &JobContext,
    input: AnalysisInput<'_>,
) -> Result<DimensionOutcome, JobError> {
    let started = Instant::now();
    let s = &ctx.settings;
    let (key, prompt) = plan(s, &input)?;
    let mut run = StoredRun {
        job_id: input.job_id,
        call: input.call,
        key: &key,
        source: "llm",
        model: &s.claude_model,
        usage: Usage::default(),
        cost: Cost::default(),
        started,
        waited: Duration::ZERO,
    };
    let outcome = ctx
        .cache
        .get_or_compute(
            &key,
            || call_llm(ctx, &prompt, input.ttl, &key),
            |result, &(usage, cost): &(Usage, Cost)| {
                let run = StoredRun {
                    usage,
                    cost,
                    ..run.clone()
                };
                async move { store(ctx, &run, &result).await.map_err(JobError::Retry) }
            },
        )
        .await?;
    let (result, source) = match outcome {
        Outcome::Computed { result, .. } => (result, "llm"),
        Outcome::Hit {
            result,
            tier,
            waited,
        } => {
            run.source = tier.as_str();
            run.waited = waited;
            return record_hit(ctx, &run, result).await;
        }
    };
    Ok(dimension_outcome(&key, result.score, source))
}

/// Stores a cache hit as a run of its tier (`run.source`) and gives the call its session.
pub(super) async fn record_hit(
    ctx: &JobContext,
    run: &StoredRun<'_>,
    result: CoachingResult,
) -> Result<DimensionOutcome, JobError> {
    let stored = store(ctx, run, &result).await.map_err(JobError::Retry)?;
    Ok(dimension_outcome(run.key, stored.score, run.source))
}

fn dimension_outcome(key: &CacheKey, score: u8, source: &str) -> DimensionOutcome {
    DimensionOutcome {
        dimension: key.dimension,
        score,
        source: source.to_string(),
        cache_key: key.to_string(),
    }
}

/// The cache key and prompt texts of one analysis.
pub(super) fn plan<'a>(
    s: &Settings,
    input: &AnalysisInput<'a>,
) -> Result<(CacheKey, PromptInputs<'a>), JobError> {
    let rubric_version = input.rubric_version.ok_or_else(|| {
        JobError::Retry(anyhow!(
            "no active rubric for role {} and dimension {}",
            input.call.rep_role.as_str(),
            input.dimension
        ))
    })?;
    let key = cache_key(
        s,
        input.call,
        input.dimension,
        rubric_version,
        input.kb_version,
    );
    let prompt = PromptInputs {
        instructions: INSTRUCTIONS,
        role: input.call.rep_role.as_str(),
        rubric: input.rubric_text,
        knowledge_base: input.kb_text,
        transcript: &input.call.transcript,
        dimension: input.dimension.as_str(),
        dimension_criteria: dimension_criteria(input.dimension),
    };
    Ok((key, prompt))
}

/// The role rubric block: every active rubric of the role, by dimension. One block for all
/// dimensions keeps the prompt prefix up to the transcript the same for the four analyses of
/// a call, so the transcript is written to the prompt cache once; the analysis result is
/// keyed by its own dimension's rubric version.
fn role_rubric_text(rubrics: &[(Dimension, db::Rubric)]) -> String {
    rubrics
        .iter()
        .map(|(d, r)| format!("## {d} (rubric {})\n{}\n", r.version, r.criteria))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The cache key of one analysis: the one place its parts are gathered.
pub fn cache_key(
    settings: &Settings,
    call: &CallForAnalysis,
    dimension: Dimension,
    rubric_version: &str,
    kb_version: &str,
) -> CacheKey {
    CacheKey {
        dimension,
        transcript_hash: call.transcript_hash.clone(),
        role: call.rep_role,
        rubric_version: rubric_version.to_string(),
        fingerprint: fingerprint(
            &settings.claude_model,
            &prompt_variant(settings),
            kb_version,
            settings.claude_max_tokens,
        ),
    }
}

/// The prompt template version with the options that change the answer (block order,
/// effort): analyses built differently never share a cache entry.
fn prompt_variant(settings: &Settings) -> String {
    let effort = settings.claude_effort.map_or("default", |e| e.as_str());
    format!(
        "{}:{:?}:{effort}",
        llm::PROMPT_TEMPLATE_VERSION,
        settings.prompt_order
    )
}

/// The cache key the next analysis of a call and dimension will use (for tools and tests).
pub async fn cache_key_for(
    ctx: &JobContext,
    call_id: Uuid,
    dimension: Dimension,
) -> anyhow::Result<CacheKey> {
    let call = db::call_for_analysis(&ctx.pg, call_id)
        .await?
        .with_context(|| format!("call {call_id} does not exist"))?;
    let rubric = db::active_rubric(&ctx.pg, call.rep_role, dimension).await?;
    let (_, kb_version) = db::knowledge_base(&ctx.pg).await?;
    Ok(cache_key(
        &ctx.settings,
        &call,
        dimension,
        &rubric.version,
        &kb_version,
    ))
}

/// One LLM request through the gateway; maps its failure onto a job outcome.
async fn call_llm(
    ctx: &JobContext,
    prompt: &PromptInputs<'_>,
    ttl: CacheTtl,
    key: &CacheKey,
) -> Result<(CoachingResult, (Usage, Cost)), JobError> {
    let s = &ctx.settings;
    let request = llm::build_request(&s.prompt_options(ttl), prompt);
    let answer = ctx.llm.send(&request, ttl, &key.to_string()).await;
    let outcome = match &answer {
        Ok(_) => "ok",
        Err(GatewayError::Api(e)) if e.is_throttle() => "throttled",
        Err(GatewayError::Throttled { .. }) => "fleet_limited",
        Err(GatewayError::OverBudget(_)) => "over_budget",
        Err(GatewayError::Api(_)) => "error",
    };
    metrics::counter!(names::LLM_REQUESTS, "outcome" => outcome).increment(1);
    let answer = answer.map_err(gateway_error_outcome)?;
    record_usage(&s.claude_model, &answer.response.usage, answer.cost.usd);
    let result =
        llm::parse_coaching(&answer.response.text).map_err(|e| JobError::Fail(e.into()))?;
    Ok((result, (answer.response.usage, answer.cost)))
}

/// Token and cost metrics of one answer.
fn record_usage(model: &str, u: &Usage, usd: f64) {
    let (write_5m, write_1h) = u.cache_writes();
    for (kind, n) in [
        ("input", u.input_tokens),
        ("output", u.output_tokens),
        ("thinking", u.thinking_tokens()),
        ("cache_creation_5m", write_5m),
        ("cache_creation_1h", write_1h),
        ("cache_read", u.cache_read_input_tokens),
    ] {
        metrics::counter!(names::LLM_TOKENS, "kind" => kind).increment(n);
    }
    metrics::counter!(names::LLM_COST_MICRO_USD, "model" => model.to_string())
        .increment((usd * 1e6) as u64);
}

pub(super) fn gateway_error_outcome(e: GatewayError) -> JobError {
    match e {
        GatewayError::Api(e) => llm_error_outcome(e),
        GatewayError::Throttled {
            retry_after,
            reason,
        } => JobError::Snooze {
            after: retry_after,
            reason,
        },
        GatewayError::OverBudget(over) => JobError::OverBudget {
            resets_in: over.retry_after(chrono::Utc::now()),
            reason: over.to_string(),
        },
    }
}

pub(super) fn llm_error_outcome(e: LlmError) -> JobError {
    if e.is_throttle() {
        // The back-off floor (`snooze_delay`) grows with repeated throttles.
        let after = e.retry_after().unwrap_or_default();
        JobError::Snooze {
            after,
            reason: e.to_string(),
        }
    } else if e.is_retryable() {
        JobError::Retry(e.into())
    } else {
        JobError::Fail(e.into())
    }
}

/// One analysis run to record.
#[derive(Clone)]
pub(super) struct StoredRun<'a> {
    pub(super) job_id: Uuid,
    pub(super) call: &'a CallForAnalysis,
    pub(super) key: &'a CacheKey,
    pub(super) source: &'static str,
    pub(super) model: &'a str,
    pub(super) usage: Usage,
    /// What the answer cost, as the gateway priced it (zero for a cache hit).
    pub(super) cost: Cost,
    pub(super) started: Instant,
    pub(super) waited: Duration,
}

/// Writes the analysis run, this call's coaching session for the key (unless it has one) and
/// the durable cache row (unless another caller's row won), in one transaction serialized per
/// cache key. Returns the stored result: the winner's, if a cache row already existed, so the
/// session, the cache row and Redis all carry the same answer. The cache row always points at
/// a session that exists.
pub(super) async fn store(
    ctx: &JobContext,
    run: &StoredRun<'_>,
    result: &CoachingResult,
) -> anyhow::Result<CoachingResult> {
    let key = run.key.to_string();
    let mut tx = ctx.pg.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    let winner: Option<(serde_json::Value, Option<f64>, Option<f64>)> = sqlx::query_as(
        "SELECT c.result, r.cost_usd, r.cost_without_prompt_cache_usd
         FROM coaching_cache c
         LEFT JOIN coaching_sessions s ON s.id = c.session_id
         LEFT JOIN analysis_runs r ON r.id = s.analysis_run_id
         WHERE c.cache_key = $1",
    )
    .bind(&key)
    .fetch_optional(&mut *tx)
    .await?;
    let cached = winner.is_some();
    let (result_json, origin) = match winner {
        Some((json, usd, without)) => (
            json,
            Cost {
                usd: usd.unwrap_or(0.0),
                without_prompt_cache_usd: without.unwrap_or(0.0),
            },
        ),
        None => (serde_json::to_value(result)?, Cost::default()),
    };
    let stored: CoachingResult = serde_json::from_value(result_json.clone())?;
    let cost = match run.source {
        "llm" => RunCost::computed(run.cost),
        _ => RunCost::hit(origin),
    };
    let run_id = insert_run(&mut tx, run, &key, &cost).await?;
    let existing: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM coaching_sessions WHERE call_id = $1 AND cache_key = $2 LIMIT 1",
    )
    .bind(run.call.id)
    .bind(&key)
    .fetch_optional(&mut *tx)
    .await?;
    let session_id = match existing {
        Some(id) => id,
        None => insert_session(&mut tx, run, &key, &stored, &result_json, run_id).await?,
    };
    if !cached {
        sqlx::query(
            "INSERT INTO coaching_cache (cache_key, dimension, transcript_hash, role, rubric_version,
                 fingerprint, result, session_id, model)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&key)
        .bind(run.key.dimension.as_str())
        .bind(&run.key.transcript_hash)
        .bind(run.key.role.as_str())
        .bind(&run.key.rubric_version)
        .bind(&run.key.fingerprint)
        .bind(&result_json)
        .bind(session_id)
        .bind(run.model)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    metrics::counter!(names::ANALYSIS_RUNS, "source" => run.source).increment(1);
    if !run.waited.is_zero() {
        metrics::counter!(names::CACHE_SINGLEFLIGHT_WAITS, "dimension" => run.key.dimension.as_str())
            .increment(1);
    }
    Ok(stored)
}

async fn insert_run(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    run: &StoredRun<'_>,
    key: &str,
    cost: &RunCost,
) -> sqlx::Result<Uuid> {
    let run_id = Uuid::now_v7();
    let u = run.usage;
    let (write_5m, write_1h) = u.cache_writes();
    let tier = (run.source == "llm").then(|| u.service_tier.as_str());
    sqlx::query(
        "INSERT INTO analysis_runs (id, job_id, call_id, dimension, rubric_version, cache_key, source,
             model, input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens, duration_ms,
             singleflight_wait_ms, cache_write_5m_tokens, cache_write_1h_tokens, thinking_tokens,
             service_tier, cost_usd, cost_without_prompt_cache_usd, cost_without_session_cache_usd,
             cost_without_caching_usd)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
             $19, $20, $21, $22)",
    )
    .bind(run_id)
    .bind(run.job_id)
    .bind(run.call.id)
    .bind(run.key.dimension.as_str())
    .bind(&run.key.rubric_version)
    .bind(key)
    .bind(run.source)
    .bind(run.model)
    .bind(u.input_tokens as i64)
    .bind(u.output_tokens as i64)
    .bind(u.cache_creation_input_tokens as i64)
    .bind(u.cache_read_input_tokens as i64)
    .bind(run.started.elapsed().as_millis() as i64)
    .bind(run.waited.as_millis() as i64)
    .bind(write_5m as i64)
    .bind(write_1h as i64)
    .bind(u.thinking_tokens() as i64)
    .bind(tier)
    .bind(cost.usd)
    .bind(cost.without_prompt_cache_usd)
    .bind(cost.without_session_cache_usd)
    .bind(cost.without_caching_usd)
    .execute(&mut **tx)
    .await?;
    Ok(run_id)
}

async fn insert_session(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    run: &StoredRun<'_>,
    key: &str,
    result: &CoachingResult,
    result_json: &serde_json::Value,
    run_id: Uuid,
) -> sqlx::Result<Uuid> {
    let session_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO coaching_sessions (id, call_id, rep_email, dimension, rubric_version, cache_key,
             score, result, analysis_run_id, rep_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(session_id)
    .bind(run.call.id)
    .bind(&run.call.rep_email)
    .bind(run.key.dimension.as_str())
    .bind(&run.key.rubric_version)
    .bind(key)
    .bind(i32::from(result.score))
    .bind(result_json)
    .bind(run_id)
    .bind(run.call.rep_id)
    .execute(&mut **tx)
    .await?;
    Ok(session_id)
}

/// General coaching instructions (the first cached prompt block).
const INSTRUCTIONS: &str = include_str!("../../jobs/prompts/instructions.md");

/// Per-dimension task text from `jobs/prompts/dimensions.json`.
fn dimension_criteria(dimension: Dimension) -> &'static str {
    static_criteria()
        .get(dimension.as_str())
        .map(String::as_str)
        .unwrap_or("")
}

fn static_criteria() -> &'static HashMap<String, String> {
    static CRITERIA: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
    CRITERIA.get_or_init(|| {
        serde_json::from_str(include_str!("../../jobs/prompts/dimensions.json")).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dimension_has_criteria() {
        for d in Dimension::ALL {
            assert!(!dimension_criteria(d).is_empty(), "{d}");
        }
    }

    #[test]
    fn empty_dimensions_mean_all() {
        let job = AnalyzeCall {
            call_id: Uuid::nil(),
            dimensions: vec![],
            batch: false,
        };
        assert_eq!(job.effective_dimensions(), Dimension::ALL.to_vec());
    }
}
