//! Cache, cost and health statistics (`callcoach stats`, `GET /v1/cache/stats`), in the
//! spec's shape: `redis`, `database`, `cost_savings`, `performance`, `analysis`, `health`.
//!
//! Every figure comes from this application's own records, never from Redis' global
//! `keyspace_hits`:
//! - Each analysis records where its answer came from in `analysis_runs.source` (`redis`,
//!   `postgres`, `llm`), written by every worker, so these are the fleet's per-tier hit and
//!   miss counts: a `redis` run is a Redis hit; a `postgres` run a Redis miss and a Postgres
//!   hit; an `llm` run a miss in both. (Cache warming's lookups are not analyses and are not
//!   counted.) The per-source totals and costs come from `get_cache_statistics`
//!   ([`performance::cache_statistics`]).
//! - Costs, counterfactual costs, durations and tokens are the usage stored with each run.
//! - The analysis success rate is the share of `analyze_call` jobs finished in the window
//!   that succeeded (the ledger).
//! - Redis memory is `INFO memory` `used_memory`; `keys` counts the cache's `coaching:*`
//!   keys with `SCAN` (the Redis database also holds the job queues), stopping after
//!   [`MAX_SCANNED_KEYS`] keys (`keys_exact` is then false).
//!
//! Health ([`Health`]): `unhealthy` when Postgres (the source of truth) cannot be reached;
//! `degraded` when Redis is unavailable, when the hit rate of both tiers together is below
//! the spec's target of [`HIT_RATE_TARGET_PERCENT`] % over at least [`MIN_RUNS_FOR_RATES`]
//! runs, or when fewer than [`SUCCESS_RATE_TARGET_PERCENT`] % of the analysis jobs succeeded
//! (over at least as many jobs); `healthy` otherwise. `reasons` names each finding.

use crate::{model::Dimension, performance, telemetry::names};
use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::PgPool;
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};
use tokio_util::sync::CancellationToken;

/// Window of `callcoach stats` unless `--days` says otherwise, and of the `/metrics` gauges.
pub const DEFAULT_DAYS: i32 = 7;
/// The spec's hit-rate target ("60-80 %"): below its floor the cache is degraded.
pub const HIT_RATE_TARGET_PERCENT: f64 = 60.0;
/// Fewest analysis runs (or jobs) a rate is judged on.
pub const MIN_RUNS_FOR_RATES: i64 = 20;
/// Share of analysis jobs that must succeed.
pub const SUCCESS_RATE_TARGET_PERCENT: f64 = 95.0;
/// Most cache keys counted by one stats run.
pub const MAX_SCANNED_KEYS: u64 = 100_000;
/// Longest wait for each Redis command of a stats run.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// The whole report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CacheStats {
    /// Window in days.
    pub days: i32,
    /// The Redis tier.
    pub redis: RedisStats,
    /// The Postgres tier.
    pub database: DatabaseStats,
    /// What caching saved.
    pub cost_savings: CostSavings,
    /// Analysis run times.
    pub performance: PerformanceStats,
    /// Analysis runs and jobs.
    pub analysis: AnalysisStats,
    /// Overall assessment.
    pub health: Health,
    /// Per dimension (with `--dimension-breakdown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<BTreeMap<String, DimensionStats>>,
    /// The answers by source these figures were computed from (empty without Postgres).
    #[serde(skip)]
    pub sources: Vec<performance::SourceStatistics>,
}

/// The Redis tier.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RedisStats {
    /// Answered PING.
    pub available: bool,
    /// Analyses answered by Redis, % of all analyses.
    pub hit_rate: f64,
    /// Analyses answered by Redis.
    pub hits: i64,
    /// Analyses Redis could not answer.
    pub misses: i64,
    /// `used_memory` in MiB.
    pub memory_used_mb: f64,
    /// `used_memory` in bytes (`/metrics` only).
    #[serde(skip)]
    pub memory_used_bytes: f64,
    /// Cache entries (`coaching:*` keys).
    pub keys: u64,
    /// False when counting stopped at [`MAX_SCANNED_KEYS`].
    pub keys_exact: bool,
}

/// The Postgres tier.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DatabaseStats {
    /// Answered a query.
    pub available: bool,
    /// Analyses Redis missed that Postgres answered, %.
    pub cache_hit_rate: f64,
    /// Analyses answered by Postgres.
    pub hits: i64,
    /// Analyses neither tier answered (sent to the LLM).
    pub misses: i64,
    /// Analyses answered by either tier, % of all analyses.
    pub overall_hit_rate: f64,
}

/// What caching saved over the window.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CostSavings {
    /// Paid.
    pub cost_usd: f64,
    /// What the same analyses would have cost without any caching.
    pub cost_without_caching_usd: f64,
    /// The difference.
    pub cost_savings_usd: f64,
    /// The difference, % of the cost without caching.
    pub savings_percent: f64,
    /// Tokens cache hits did not send: for each hit, the input, cache and output tokens of
    /// the run that computed the answer.
    pub tokens_saved: i64,
}

/// Analysis run times.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PerformanceStats {
    /// Mean run time over all analyses.
    pub avg_duration_seconds: f64,
    /// Mean run time of analyses sent to the LLM.
    pub avg_llm_duration_seconds: f64,
    /// Mean run time of cache hits.
    pub avg_hit_duration_seconds: f64,
    /// Mean single-flight wait over all analyses.
    pub avg_singleflight_wait_seconds: f64,
}

/// Analysis runs and jobs.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AnalysisStats {
    /// Analysis runs (every source).
    pub runs_total: i64,
    /// `analyze_call` jobs finished in the window.
    pub jobs_finished: i64,
    /// Of them, succeeded.
    pub jobs_succeeded: i64,
    /// Succeeded, % of finished (100 when none finished).
    pub success_rate: f64,
}

/// One dimension's figures.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DimensionStats {
    /// Analysis runs.
    pub runs: i64,
    /// Answered by Redis.
    pub redis_hits: i64,
    /// Answered by Postgres.
    pub postgres_hits: i64,
    /// Sent to the LLM.
    pub llm: i64,
    /// Answered by either tier, %.
    pub hit_rate: f64,
    /// Paid.
    pub cost_usd: f64,
    /// Saved against no caching.
    pub cost_savings_usd: f64,
}

/// Overall assessment.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Health {
    /// `healthy`, `degraded` or `unhealthy`.
    pub status: HealthStatus,
    /// What made it less than healthy.
    pub reasons: Vec<String>,
}

/// Health levels.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Everything within targets.
    Healthy,
    /// Working, below a target or without Redis.
    Degraded,
    /// Postgres unreachable.
    Unhealthy,
}

impl HealthStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

/// Runs of one dimension and source in the window, with their usage.
#[derive(sqlx::FromRow)]
struct RunGroup {
    dimension: String,
    source: String,
    runs: i64,
    cost_usd: f64,
    cost_without_caching_usd: f64,
    duration_ms: i64,
    wait_ms: i64,
    tokens_saved: i64,
}

/// Per dimension and source: runs, cost, time and (for hits) the tokens of the first LLM run
/// of the same key (the origin). The origins are found with one pass over `analysis_runs`
/// (a hash semi-join on the window's hit keys; `cache_key` has no index of its own).
async fn run_groups(pg: &PgPool, days: i32) -> sqlx::Result<Vec<RunGroup>> {
    sqlx::query_as(
        "WITH w AS (
             SELECT dimension, source, cache_key, cost_usd, cost_without_caching_usd,
                    duration_ms, singleflight_wait_ms
             FROM analysis_runs WHERE created_at >= now() - make_interval(days => $1)),
         origin AS (
             SELECT DISTINCT ON (o.cache_key) o.cache_key,
                    o.input_tokens + o.output_tokens + o.cache_creation_tokens
                        + o.cache_read_tokens AS tokens
             FROM analysis_runs o
             WHERE o.source = 'llm'
               AND o.cache_key IN (SELECT cache_key FROM w WHERE source <> 'llm')
             ORDER BY o.cache_key, o.created_at)
         SELECT w.dimension, w.source, count(*) AS runs,
                coalesce(sum(w.cost_usd), 0)::float8 AS cost_usd,
                coalesce(sum(w.cost_without_caching_usd), 0)::float8 AS cost_without_caching_usd,
                coalesce(sum(w.duration_ms), 0)::bigint AS duration_ms,
                coalesce(sum(w.singleflight_wait_ms), 0)::bigint AS wait_ms,
                coalesce(sum(origin.tokens), 0)::bigint AS tokens_saved
         FROM w LEFT JOIN origin ON w.source <> 'llm' AND origin.cache_key = w.cache_key
         GROUP BY w.dimension, w.source",
    )
    .bind(days)
    .fetch_all(pg)
    .await
}

/// `analyze_call` jobs finished in the window: (finished, succeeded).
async fn analysis_jobs(pg: &PgPool, days: i32) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed')),
                count(*) FILTER (WHERE status = 'succeeded')
         FROM jobs WHERE kind = 'analyze_call'
           AND finished_at >= now() - make_interval(days => $1)",
    )
    .bind(days)
    .fetch_one(pg)
    .await
}

/// `part` as a percentage of `whole`, two decimals (0 when `whole` is 0).
pub fn percent(part: i64, whole: i64) -> f64 {
    if whole > 0 {
        round2(part as f64 * 100.0 / whole as f64)
    } else {
        0.0
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn mean_secs(ms: i64, n: i64) -> f64 {
    if n > 0 {
        (ms as f64 / n as f64).round() / 1000.0
    } else {
        0.0
    }
}

async fn redis_cmd<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    cmd: &redis::Cmd,
) -> Option<T> {
    tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<T>(conn))
        .await
        .ok()?
        .ok()
}

/// PING, `INFO memory` and a bounded count of the cache's keys.
async fn redis_state(mut conn: ConnectionManager) -> RedisStats {
    let mut stats = RedisStats::default();
    if redis_cmd::<String>(&mut conn, &redis::cmd("PING"))
        .await
        .is_none()
    {
        return stats;
    }
    stats.available = true;
    let info: String = redis_cmd(&mut conn, redis::cmd("INFO").arg("memory"))
        .await
        .unwrap_or_default();
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    stats.memory_used_mb = round2(used / (1024.0 * 1024.0));
    stats.memory_used_bytes = used;
    let mut cursor = 0u64;
    stats.keys_exact = true;
    loop {
        let scan = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("coaching:*")
            .arg("COUNT")
            .arg(1000)
            .clone();
        let Some((next, keys)) = redis_cmd::<(u64, Vec<String>)>(&mut conn, &scan).await else {
            stats.keys_exact = false;
            break;
        };
        stats.keys += keys.len() as u64;
        if next == 0 {
            break;
        }
        if stats.keys >= MAX_SCANNED_KEYS {
            stats.keys_exact = false;
            break;
        }
        cursor = next;
    }
    stats
}

/// Collects the report over the last `days` days; `breakdown` adds the per-dimension figures.
/// Never fails: an unreachable store shows as unavailable (and in `health`).
pub async fn collect(
    pg: &PgPool,
    redis: &ConnectionManager,
    days: i32,
    breakdown: bool,
) -> CacheStats {
    let redis_stats = redis_state(redis.clone()).await;
    let db = async {
        let sources = performance::cache_statistics(pg, days).await?;
        let groups = run_groups(pg, days).await?;
        let jobs = analysis_jobs(pg, days).await?;
        Ok::<_, sqlx::Error>((sources, groups, jobs))
    };
    let (sources, groups, jobs, pg_up) = match db.await {
        Ok((s, g, j)) => (s, g, j, true),
        Err(e) => {
            tracing::warn!(error = %e, "stats: Postgres unreachable");
            (Vec::new(), Vec::new(), (0, 0), false)
        }
    };
    let mut stats = build(days, redis_stats, &sources, &groups, jobs, breakdown);
    stats.database.available = pg_up;
    stats.health = assess(&stats);
    stats
}

fn build(
    days: i32,
    mut redis: RedisStats,
    sources: &[performance::SourceStatistics],
    groups: &[RunGroup],
    (jobs_finished, jobs_succeeded): (i64, i64),
    breakdown: bool,
) -> CacheStats {
    let runs_of = |source: &str| -> i64 {
        sources
            .iter()
            .filter(|s| s.source == source)
            .map(|s| s.runs)
            .sum()
    };
    let (from_redis, from_pg, from_llm) = (runs_of("redis"), runs_of("postgres"), runs_of("llm"));
    let runs = from_redis + from_pg + from_llm;
    redis.hits = from_redis;
    redis.misses = from_pg + from_llm;
    redis.hit_rate = percent(from_redis, runs);
    let paid: f64 = sources.iter().map(|s| s.cost_usd).sum();
    let without: f64 = sources.iter().map(|s| s.cost_without_caching_usd).sum();
    let sum = |f: fn(&RunGroup) -> i64, hit: Option<bool>| -> i64 {
        groups
            .iter()
            .filter(|g| hit.is_none_or(|h| (g.source != "llm") == h))
            .map(f)
            .sum()
    };
    let hits = from_redis + from_pg;
    CacheStats {
        days,
        redis,
        database: DatabaseStats {
            available: true,
            cache_hit_rate: percent(from_pg, from_pg + from_llm),
            hits: from_pg,
            misses: from_llm,
            overall_hit_rate: percent(hits, runs),
        },
        cost_savings: CostSavings {
            cost_usd: round6(paid),
            cost_without_caching_usd: round6(without),
            cost_savings_usd: round6(without - paid),
            savings_percent: if without > 0.0 {
                round2((without - paid) * 100.0 / without)
            } else {
                0.0
            },
            tokens_saved: sum(|g| g.tokens_saved, None),
        },
        performance: PerformanceStats {
            avg_duration_seconds: mean_secs(sum(|g| g.duration_ms, None), runs),
            avg_llm_duration_seconds: mean_secs(sum(|g| g.duration_ms, Some(false)), from_llm),
            avg_hit_duration_seconds: mean_secs(sum(|g| g.duration_ms, Some(true)), hits),
            avg_singleflight_wait_seconds: mean_secs(sum(|g| g.wait_ms, None), runs),
        },
        analysis: AnalysisStats {
            runs_total: runs,
            jobs_finished,
            jobs_succeeded,
            success_rate: if jobs_finished > 0 {
                percent(jobs_succeeded, jobs_finished)
            } else {
                100.0
            },
        },
        health: Health {
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
        },
        dimensions: breakdown.then(|| dimension_breakdown(groups)),
        sources: sources.to_vec(),
    }
}

/// Rounded to micro-USD; an empty sum's `-0.0` becomes `0.0`.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6 + 0.0
}

fn dimension_breakdown(groups: &[RunGroup]) -> BTreeMap<String, DimensionStats> {
    let mut dims: BTreeMap<String, DimensionStats> = Dimension::ALL
        .iter()
        .map(|d| (d.as_str().to_string(), DimensionStats::default()))
        .collect();
    for g in groups {
        let d = dims.entry(g.dimension.clone()).or_default();
        d.runs += g.runs;
        match g.source.as_str() {
            "redis" => d.redis_hits += g.runs,
            "postgres" => d.postgres_hits += g.runs,
            _ => d.llm += g.runs,
        }
        d.cost_usd += g.cost_usd;
        d.cost_savings_usd += g.cost_without_caching_usd - g.cost_usd;
    }
    for d in dims.values_mut() {
        d.hit_rate = percent(d.redis_hits + d.postgres_hits, d.runs);
        d.cost_usd = round6(d.cost_usd);
        d.cost_savings_usd = round6(d.cost_savings_usd);
    }
    dims
}

/// The health rules of the module overview.
fn assess(s: &CacheStats) -> Health {
    let mut status = HealthStatus::Healthy;
    let mut reasons = Vec::new();
    let mut find = |level: HealthStatus, reason: String| {
        status = status.max(level);
        reasons.push(reason);
    };
    if !s.database.available {
        find(HealthStatus::Unhealthy, "Postgres is unreachable".into());
    }
    if !s.redis.available {
        find(
            HealthStatus::Degraded,
            "Redis is unavailable: analyses are served from Postgres".into(),
        );
    }
    if s.analysis.runs_total >= MIN_RUNS_FOR_RATES
        && s.database.overall_hit_rate < HIT_RATE_TARGET_PERCENT
    {
        find(
            HealthStatus::Degraded,
            format!(
                "cache hit rate {:.1} % is below the {HIT_RATE_TARGET_PERCENT} % target",
                s.database.overall_hit_rate
            ),
        );
    }
    if s.analysis.jobs_finished >= MIN_RUNS_FOR_RATES
        && s.analysis.success_rate < SUCCESS_RATE_TARGET_PERCENT
    {
        find(
            HealthStatus::Degraded,
            format!(
                "{:.1} % of analysis jobs succeeded (target {SUCCESS_RATE_TARGET_PERCENT} %)",
                s.analysis.success_rate
            ),
        );
    }
    Health { status, reasons }
}

impl CacheStats {
    /// The spec's Prometheus exposition, with `# HELP` and `# TYPE` lines. It is its own
    /// exposition, not `/metrics`: `analysis_runs_total` here counts the window's runs, while
    /// `/metrics` has a counter of that name (by `source`) since the process started.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let days = self.days;
        metric(
            names::STATS_CACHE_HIT_RATE,
            "gauge",
            &format!("Cache hit rate in percent over the last {days} days, by tier."),
            &[
                (r#"{source="database"}"#, self.database.cache_hit_rate),
                (r#"{source="redis"}"#, self.redis.hit_rate),
                (r#"{source="overall"}"#, self.database.overall_hit_rate),
            ],
        );
        metric(
            names::STATS_REDIS_HIT_RATE,
            "gauge",
            "Analyses answered by Redis, percent.",
            &[("", self.redis.hit_rate)],
        );
        metric(
            names::STATS_REDIS_MEMORY_MB,
            "gauge",
            "Redis used_memory in MiB.",
            &[("", self.redis.memory_used_mb)],
        );
        metric(
            names::STATS_COST_SAVINGS_USD,
            "gauge",
            "USD saved by caching against no caching.",
            &[("", self.cost_savings.cost_savings_usd)],
        );
        metric(
            names::STATS_TOKENS_SAVED,
            "gauge",
            "Tokens cache hits did not send.",
            &[("", self.cost_savings.tokens_saved as f64)],
        );
        // A counter by its `_total` name (promtool requires `_total` names to be counters).
        metric(
            names::ANALYSIS_RUNS,
            "counter",
            &format!("Analysis runs over the last {days} days."),
            &[("", self.analysis.runs_total as f64)],
        );
        metric(
            names::STATS_ANALYSIS_SUCCESS_RATE,
            "gauge",
            "Analysis jobs that succeeded, percent of those finished.",
            &[("", self.analysis.success_rate)],
        );
        out
    }

    /// Sets the `/metrics` gauges of the report: the spec's names, except that Redis memory
    /// is in bytes (`redis_memory_used_bytes`; promtool refuses the abbreviated unit of
    /// `redis_memory_used_mb`) and `analysis_runs_total` is left to the counter of that name.
    pub fn record_gauges(&self) {
        for (source, rate) in [
            ("database", self.database.cache_hit_rate),
            ("redis", self.redis.hit_rate),
            ("overall", self.database.overall_hit_rate),
        ] {
            metrics::gauge!(names::STATS_CACHE_HIT_RATE, "source" => source).set(rate);
        }
        metrics::gauge!(names::STATS_REDIS_HIT_RATE).set(self.redis.hit_rate);
        metrics::gauge!(names::STATS_REDIS_MEMORY_BYTES).set(self.redis.memory_used_bytes);
        metrics::gauge!(names::STATS_COST_SAVINGS_USD).set(self.cost_savings.cost_savings_usd);
        metrics::gauge!(names::STATS_TOKENS_SAVED).set(self.cost_savings.tokens_saved as f64);
        metrics::gauge!(names::STATS_ANALYSIS_SUCCESS_RATE).set(self.analysis.success_rate);
    }

    /// A table for people.
    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let rows: Vec<(&str, String)> = vec![
            ("window", format!("{} days", self.days)),
            ("redis available", yes_no(self.redis.available).into()),
            ("redis hit rate", format!("{:.2} %", self.redis.hit_rate)),
            (
                "redis memory",
                format!("{:.2} MB", self.redis.memory_used_mb),
            ),
            (
                "redis cache keys",
                format!(
                    "{}{}",
                    self.redis.keys,
                    if self.redis.keys_exact { "" } else { "+" }
                ),
            ),
            ("postgres available", yes_no(self.database.available).into()),
            (
                "postgres hit rate",
                format!("{:.2} %", self.database.cache_hit_rate),
            ),
            (
                "overall hit rate",
                format!("{:.2} %", self.database.overall_hit_rate),
            ),
            ("cost paid", format!("${:.4}", self.cost_savings.cost_usd)),
            (
                "cost without caching",
                format!("${:.4}", self.cost_savings.cost_without_caching_usd),
            ),
            (
                "saved",
                format!(
                    "${:.4} ({:.2} %)",
                    self.cost_savings.cost_savings_usd, self.cost_savings.savings_percent
                ),
            ),
            ("tokens saved", self.cost_savings.tokens_saved.to_string()),
            ("analysis runs", self.analysis.runs_total.to_string()),
            (
                "job success rate",
                format!("{:.2} %", self.analysis.success_rate),
            ),
            (
                "avg duration",
                format!("{:.3} s", self.performance.avg_duration_seconds),
            ),
            ("health", self.health.status.as_str().into()),
        ];
        for (name, value) in rows {
            let _ = writeln!(t, "{name:<22} {value}");
        }
        for reason in &self.health.reasons {
            let _ = writeln!(t, "{:<22} {reason}", "");
        }
        if let Some(dims) = &self.dimensions {
            let _ = writeln!(
                t,
                "\n{:<20} {:>6} {:>6} {:>6} {:>6} {:>8} {:>10}",
                "dimension", "runs", "redis", "pg", "llm", "hit %", "saved $"
            );
            for (name, d) in dims {
                let _ = writeln!(
                    t,
                    "{name:<20} {:>6} {:>6} {:>6} {:>6} {:>8.2} {:>10.4}",
                    d.runs, d.redis_hits, d.postgres_hits, d.llm, d.hit_rate, d.cost_savings_usd
                );
            }
        }
        t
    }
}

/// Every `every` (first after one period) until `shutdown`, collects the report over [`DEFAULT_DAYS`] and sets the
/// `/metrics` gauges from it ([`CacheStats::record_gauges`]).
pub async fn sample_gauges(
    pg: PgPool,
    redis: ConnectionManager,
    every: Duration,
    shutdown: CancellationToken,
) {
    // The first sample waits one period: start-up has enough to do.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
        collect(&pg, &redis, DEFAULT_DAYS, false)
            .await
            .record_gauges();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_rules() {
        let mut s = build(7, RedisStats::default(), &[], &[], (0, 0), false);
        s.redis.available = true;
        assert_eq!(assess(&s).status, HealthStatus::Healthy);
        s.redis.available = false;
        assert_eq!(assess(&s).status, HealthStatus::Degraded);
        s.database.available = false;
        let h = assess(&s);
        assert_eq!(h.status, HealthStatus::Unhealthy);
        assert_eq!(h.reasons.len(), 2, "{h:?}");
        s.redis.available = true;
        s.database.available = true;
        s.analysis.runs_total = MIN_RUNS_FOR_RATES;
        s.database.overall_hit_rate = 59.9;
        assert_eq!(assess(&s).status, HealthStatus::Degraded);
    }
}
