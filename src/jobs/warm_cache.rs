//! `warm_cache`: makes sure every (call, dimension) of the recent calls has its result in both
//! cache tiers, so the next reads are Redis hits.
//!
//! For each call scheduled in the last `days` days (optionally one role) and each dimension
//! (optionally one), the cache key of the *current* rubric, knowledge base and model is built
//! with [`analyze_call::cache_key`], then looked up with [`crate::cache::CoachingCache::lookup`] without
//! moving the hit/miss counters:
//! - a Redis hit is already warm;
//! - a Postgres hit refills Redis (the lookup does that) and counts as refilled;
//! - a miss is analysed through the normal `analyze_call` path (rate limits, single-flight,
//!   budget guard): as a job on the background lane, `batch: true` when `LLM_BATCH_MODE` is
//!   on, or, with `--inline`, run in this process and waited for.
//!
//! The active rubrics and the knowledge base are read once per run (once per role for the
//! rubrics) to build the keys. No process or Redis cache of rubrics, knowledge base or rep
//! summaries exists to preload: every analysis reads them from Postgres, and rep summaries
//! come from `mv_rep_performance`, which `refresh_rep_performance` keeps up to date.

use super::{AnalyzeCall, Job, JobContext, JobError, JobOptions, analyze_call};
use crate::{
    db,
    delivery::Lane,
    model::{Dimension, Role},
};
use anyhow::Context;
use indicatif::ProgressBar;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// Longest window a warm run may cover.
pub const MAX_WARM_DAYS: u32 = 3650;

/// Window of the warm run enqueued after a rubric update.
pub const RUBRIC_UPDATE_WARM_DAYS: u32 = 7;

/// Payload of a `warm_cache` job (and the `callcoach warm` options).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WarmCache {
    /// Calls scheduled in the last `days` days (1 to [`MAX_WARM_DAYS`]).
    #[serde(default = "default_days", deserialize_with = "deserialize_days")]
    pub days: u32,
    /// Only this dimension (all four when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimension: Option<Dimension>,
    /// Only calls of reps with this role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

fn default_days() -> u32 {
    30
}

/// Checks a warm window: 1 to [`MAX_WARM_DAYS`] days.
pub fn check_days(days: u32) -> Result<u32, String> {
    if (1..=MAX_WARM_DAYS).contains(&days) {
        Ok(days)
    } else {
        Err(format!(
            "days must be between 1 and {MAX_WARM_DAYS}, got {days}"
        ))
    }
}

fn deserialize_days<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    check_days(u32::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// What a warm run found and did, per (call, dimension).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WarmReport {
    /// Calls in the window.
    pub calls: u64,
    /// Already in Redis.
    pub already_warm: u64,
    /// Only in Postgres; copied to Redis.
    pub refilled: u64,
    /// Missing; analysed in this process (`--inline`).
    pub analysed: u64,
    /// Missing; enqueued as `analyze_call` jobs on the background lane.
    pub enqueued: u64,
    /// Could not be looked up, analysed or enqueued.
    pub failed: u64,
    /// The `analyze_call` jobs enqueued.
    pub jobs: Vec<Uuid>,
}

/// How a warm run handles what is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Enqueue `analyze_call` jobs on the background lane (the job system retries and guards).
    Enqueue,
    /// Run the analyses here and wait for them.
    Inline,
}

impl Job for WarmCache {
    const JOB_NAME: &'static str = "warm_cache";
    const OPTIONS: JobOptions = JobOptions {
        lane: Lane::Background,
        timeout: std::time::Duration::from_secs(1800),
        ..JobOptions::DEFAULT
    };

    async fn perform(self, _: Uuid, ctx: &JobContext) -> Result<serde_json::Value, JobError> {
        let report = warm(ctx, &self, Mode::Enqueue, None)
            .await
            .map_err(JobError::Retry)?;
        Ok(serde_json::to_value(report).map_err(anyhow::Error::from)?)
    }
}

/// The calls in the window, newest first.
async fn calls_in_window(ctx: &JobContext, args: &WarmCache) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM calls
         WHERE scheduled_at >= now() - make_interval(days => $1)
           AND ($2::text IS NULL OR rep_role = $2)
         ORDER BY scheduled_at DESC, id",
    )
    .bind(args.days as i32)
    .bind(args.role.map(Role::as_str))
    .fetch_all(&ctx.pg)
    .await
}

/// Active rubric versions per role, read once per run.
#[derive(Default)]
struct RubricVersions(Vec<(Role, Vec<(Dimension, String)>)>);

impl RubricVersions {
    async fn of(&mut self, ctx: &JobContext, role: Role) -> sqlx::Result<&[(Dimension, String)]> {
        if let Some(i) = self.0.iter().position(|(r, _)| *r == role) {
            return Ok(&self.0[i].1);
        }
        let versions = db::role_rubrics(&ctx.pg, role)
            .await?
            .into_iter()
            .map(|(d, r)| (d, r.version))
            .collect();
        self.0.push((role, versions));
        Ok(&self.0[self.0.len() - 1].1)
    }
}

/// Warms the window of `args`. `progress`, when given, advances once per call.
pub async fn warm(
    ctx: &JobContext,
    args: &WarmCache,
    mode: Mode,
    progress: Option<&ProgressBar>,
) -> anyhow::Result<WarmReport> {
    let calls = calls_in_window(ctx, args)
        .await
        .context("listing the calls to warm")?;
    let (_, kb_version) = db::knowledge_base(&ctx.pg)
        .await
        .context("reading the knowledge base")?;
    let mut rubrics = RubricVersions::default();
    let mut report = WarmReport {
        calls: calls.len() as u64,
        ..WarmReport::default()
    };
    if let Some(bar) = progress {
        bar.set_length(calls.len() as u64);
    }
    for call_id in calls {
        match warm_call(ctx, args, call_id, &kb_version, &mut rubrics).await {
            Ok(missing) => report.add_missing(ctx, call_id, missing, mode).await,
            Err((counted, e)) => {
                tracing::warn!(call = %call_id, error = %e, "warming a call failed");
                report.failed += counted;
            }
        }
        if let Some(bar) = progress {
            bar.inc(1);
        }
    }
    Ok(report)
}

/// The lookups of one call: what was warm, refilled or failed, and the dimensions still
/// missing with their cache keys; or, when the call itself cannot be read, the number of
/// (call, dimension) pairs that failed.
async fn warm_call(
    ctx: &JobContext,
    args: &WarmCache,
    call_id: Uuid,
    kb_version: &str,
    rubrics: &mut RubricVersions,
) -> Result<Missing, (u64, anyhow::Error)> {
    let wanted: Vec<Dimension> = match args.dimension {
        Some(d) => vec![d],
        None => Dimension::ALL.to_vec(),
    };
    let fail = |e: anyhow::Error| (wanted.len() as u64, e);
    let call = db::call_for_analysis(&ctx.pg, call_id)
        .await
        .map_err(|e| fail(e.into()))?
        .with_context(|| format!("call {call_id} is gone"))
        .map_err(fail)?;
    let versions = rubrics
        .of(ctx, call.rep_role)
        .await
        .map_err(|e| fail(e.into()))?;
    let mut missing = Missing::default();
    for dimension in wanted {
        let Some((_, version)) = versions.iter().find(|(d, _)| *d == dimension) else {
            missing.failed += 1;
            continue;
        };
        let key = analyze_call::cache_key(&ctx.settings, &call, dimension, version, kb_version);
        match ctx.cache.lookup(&key, false).await {
            Ok(Some((_, crate::cache::Tier::Redis))) => missing.already_warm += 1,
            Ok(Some((_, crate::cache::Tier::Postgres))) => missing.refilled += 1,
            Ok(None) => missing.keys.push((dimension, key.to_string())),
            Err(e) => {
                tracing::warn!(call = %call_id, %dimension, error = %e, "cache lookup failed");
                missing.failed += 1;
            }
        }
    }
    Ok(missing)
}

/// One call's lookups.
#[derive(Default)]
struct Missing {
    already_warm: u64,
    refilled: u64,
    failed: u64,
    /// Dimensions without a result, with the cache key the analysis will fill.
    keys: Vec<(Dimension, String)>,
}

impl WarmReport {
    /// Counts one call's lookups and analyses or enqueues what it misses.
    async fn add_missing(&mut self, ctx: &JobContext, call_id: Uuid, m: Missing, mode: Mode) {
        self.already_warm += m.already_warm;
        self.refilled += m.refilled;
        self.failed += m.failed;
        if m.keys.is_empty() {
            return;
        }
        let n = m.keys.len() as u64;
        let job = AnalyzeCall {
            call_id,
            dimensions: m.keys.iter().map(|(d, _)| *d).collect(),
            batch: mode == Mode::Enqueue && ctx.settings.llm_batch_mode,
        };
        let done = match mode {
            Mode::Inline => job.perform(Uuid::now_v7(), ctx).await.map(|_| None),
            Mode::Enqueue => enqueue(ctx, &job, &m.keys).await.map(Some),
        };
        match done {
            Ok(None) => self.analysed += n,
            Ok(Some(id)) => {
                self.enqueued += n;
                self.jobs.push(id);
            }
            Err(e) => {
                tracing::warn!(call = %call_id, error = %e, "analysis for warming failed");
                self.failed += n;
            }
        }
    }
}

/// Enqueues the analysis of a call's missing dimensions on the background lane, deduplicated
/// by the cache keys it will fill and the day: warming twice on one day does not enqueue the
/// same analysis twice, and a failed one is tried again the next day.
async fn enqueue(
    ctx: &JobContext,
    job: &AnalyzeCall,
    keys: &[(Dimension, String)],
) -> Result<Uuid, JobError> {
    let joined: Vec<&str> = keys.iter().map(|(_, k)| k.as_str()).collect();
    let hash = crate::model::sha256_hex(&joined.join("\n"));
    let day = chrono::Utc::now().format("%Y-%m-%d");
    let new = job
        .to_job()
        .map_err(anyhow::Error::from)?
        .on_lane(Lane::Background)
        .dedup_key(format!("warm:{day}:{}:{}", job.call_id, &hash[..24]));
    let enqueued = ctx.queue.enqueue(new).await.map_err(anyhow::Error::from)?;
    Ok(enqueued.job_id)
}

/// The `warm_cache` job enqueued after a rubric update: that role and dimension over the last
/// [`RUBRIC_UPDATE_WARM_DAYS`] days, deduplicated per new rubric version.
pub fn after_rubric_update(
    role: Role,
    dimension: Dimension,
    version: &str,
) -> Result<crate::queue::NewJob, serde_json::Error> {
    let job = WarmCache {
        days: RUBRIC_UPDATE_WARM_DAYS,
        dimension: Some(dimension),
        role: Some(role),
    };
    Ok(job.to_job()?.dedup_key(format!(
        "warm:rubric:{}:{dimension}:{version}",
        role.as_str()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_args_decode_and_bad_days_are_refused() {
        let job: WarmCache = serde_json::from_value(serde_json::json!({"days": 30})).unwrap();
        assert_eq!(job.days, 30);
        assert_eq!((job.dimension, job.role), (None, None));
        let default: WarmCache = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(default.days, 30);
        for bad in [
            serde_json::json!({"days": 0}),
            serde_json::json!({"days": 4000}),
            serde_json::json!({"days": 7, "dimension": "charisma"}),
            serde_json::json!({"days": 7, "team": "x"}),
        ] {
            assert!(
                serde_json::from_value::<WarmCache>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let err = serde_json::from_value::<WarmCache>(serde_json::json!({"days": 0})).unwrap_err();
        assert!(err.to_string().contains("days must be between 1"), "{err}");
    }
}
