//! Database performance objects: the indexes, materialized views and functions in
//! `sql/performance/`, applied (idempotently) by `callcoach migrate` and `callcoach db
//! optimize`, and verified object by object.
//!
//! The read functions take any executor (the pool, a held connection, a transaction).
//!
//! The SQL files are the single source of truth: [`expected`] reads the names of the objects
//! they create from the files themselves, so adding an index to a file adds it to the
//! verification.

use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// The files of `sql/performance/`, in the order they are applied.
const FILES: &[(&str, &str)] = &[
    (
        "001_indexes.sql",
        include_str!("../sql/performance/001_indexes.sql"),
    ),
    (
        "002_views.sql",
        include_str!("../sql/performance/002_views.sql"),
    ),
    (
        "003_functions.sql",
        include_str!("../sql/performance/003_functions.sql"),
    ),
];

/// What kind of object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An index.
    Index,
    /// A materialized view.
    MaterializedView,
    /// A function.
    Function,
}

/// One expected object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Expected {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: Kind,
}

/// The objects `sql/performance/` creates, read from its `CREATE` statements.
pub fn expected() -> Vec<Expected> {
    let patterns = [
        ("CREATE INDEX IF NOT EXISTS ", Kind::Index),
        ("CREATE UNIQUE INDEX IF NOT EXISTS ", Kind::Index),
        (
            "CREATE MATERIALIZED VIEW IF NOT EXISTS ",
            Kind::MaterializedView,
        ),
        ("CREATE OR REPLACE FUNCTION ", Kind::Function),
        ("SELECT register_hot_index('", Kind::Index),
    ];
    FILES
        .iter()
        .flat_map(|(_, sql)| sql.lines())
        .filter_map(|line| {
            patterns.iter().find_map(|(prefix, kind)| {
                let rest = line.trim_start().strip_prefix(prefix)?;
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                Some(Expected { name, kind: *kind })
            })
        })
        .collect()
}

/// Applies every file (each is idempotent).
pub async fn apply(pool: &PgPool) -> anyhow::Result<()> {
    for (name, sql) in FILES {
        sqlx::raw_sql(*sql)
            .execute(pool)
            .await
            .map_err(|e| anyhow::anyhow!("applying sql/performance/{name}: {e}"))?;
    }
    Ok(())
}

/// The state of one expected object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ObjectStatus {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// `ok`, `missing` or `invalid` (an index left unusable by a failed build).
    pub status: &'static str,
    /// Size on disk in bytes (indexes and views).
    pub bytes: Option<i64>,
    /// Index scans since statistics were reset.
    pub scans: Option<i64>,
}

impl ObjectStatus {
    /// Whether the object is usable.
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// Checks every expected object; changes nothing.
pub async fn verify(pool: &PgPool) -> anyhow::Result<Vec<ObjectStatus>> {
    let mut out = Vec::new();
    for e in expected() {
        out.push(status_of(pool, e).await?);
    }
    Ok(out)
}

async fn status_of(pool: &PgPool, e: Expected) -> sqlx::Result<ObjectStatus> {
    let (status, bytes, scans) = match e.kind {
        Kind::Function => {
            let found: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                WHERE n.nspname = current_schema() AND p.proname = $1)",
            )
            .bind(&e.name)
            .fetch_one(pool)
            .await?;
            (if found { "ok" } else { "missing" }, None, None)
        }
        Kind::Index | Kind::MaterializedView => {
            let row = sqlx::query(
                "SELECT c.oid::regclass::text, pg_relation_size(c.oid) AS bytes,
                        i.indisvalid, s.idx_scan
                 FROM pg_class c
                 LEFT JOIN pg_index i ON i.indexrelid = c.oid
                 LEFT JOIN pg_stat_all_indexes s ON s.indexrelid = c.oid
                 WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace",
            )
            .bind(&e.name)
            .fetch_optional(pool)
            .await?;
            match row {
                None => ("missing", None, None),
                Some(r) => {
                    let valid: Option<bool> = r.get("indisvalid");
                    let status = if valid == Some(false) {
                        "invalid"
                    } else {
                        "ok"
                    };
                    (status, Some(r.get("bytes")), r.get("idx_scan"))
                }
            }
        }
    };
    Ok(ObjectStatus {
        name: e.name,
        kind: e.kind,
        status,
        bytes,
        scans,
    })
}

/// `callcoach db optimize`: applies (unless `verify_only`), verifies, and renders the table
/// (name, kind, status, size, scans). `Ok(false)` when an object is missing or invalid.
pub async fn optimize(pool: &PgPool, verify_only: bool) -> anyhow::Result<(String, bool)> {
    if !verify_only {
        apply(pool).await?;
    }
    let report = verify(pool).await?;
    let all_ok = report.iter().all(ObjectStatus::ok);
    Ok((render(&report), all_ok))
}

/// The verification as a text table.
pub fn render(report: &[ObjectStatus]) -> String {
    let mut out = format!(
        "{:<44} {:<18} {:<8} {:>10} {:>10}\n",
        "name", "kind", "status", "size", "scans"
    );
    for o in report {
        let kind = match o.kind {
            Kind::Index => "index",
            Kind::MaterializedView => "materialized view",
            Kind::Function => "function",
        };
        let size = o
            .bytes
            .map_or("-".to_string(), |b| format!("{} kB", (b + 1023) / 1024));
        let scans = o.scans.map_or("-".to_string(), |s| s.to_string());
        out.push_str(&format!(
            "{:<44} {:<18} {:<8} {:>10} {:>10}\n",
            o.name, kind, o.status, size, scans
        ));
    }
    out
}

/// One dimension of a rep's performance summary.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DimensionSummary {
    /// Dimension.
    pub dimension: String,
    /// Sessions in the window.
    pub sessions: i64,
    /// Average score, two decimals.
    pub avg_score: f64,
    /// Lowest score.
    pub min_score: i32,
    /// Highest score.
    pub max_score: i32,
}

/// `get_rep_performance_summary(rep, days)`: the rep's sessions of the last `days` days by
/// dimension.
pub async fn rep_performance_summary(
    db: impl sqlx::PgExecutor<'_>,
    rep_id: Uuid,
    days: i32,
) -> sqlx::Result<Vec<DimensionSummary>> {
    sqlx::query_as(
        "SELECT dimension, sessions, avg_score::float8 AS avg_score, min_score, max_score
         FROM get_rep_performance_summary($1, $2)",
    )
    .bind(rep_id)
    .bind(days)
    .fetch_all(db)
    .await
}

/// The durable cache tier's read by key (`get_cached_coaching_session`, the coaching_cache
/// primary key): the stored result JSON.
pub async fn cached_result(
    db: impl sqlx::PgExecutor<'_>,
    cache_key: &str,
) -> sqlx::Result<Option<serde_json::Value>> {
    sqlx::query_scalar("SELECT result FROM get_cached_coaching_session($1)")
        .bind(cache_key)
        .fetch_optional(db)
        .await
}

/// One rep's row of `mv_rep_performance` (as of its last refresh).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RepPerformance {
    /// Rep id.
    pub rep_id: Uuid,
    /// Rep name.
    pub rep_name: String,
    /// Rep e-mail.
    pub rep_email: String,
    /// Calls of the rep.
    pub total_calls: i64,
    /// Coaching sessions of the rep.
    pub total_sessions: i64,
    /// Average score over every dimension; `None` without sessions.
    pub avg_score: Option<f64>,
    /// Average product_knowledge score.
    pub avg_product_knowledge: Option<f64>,
    /// Average discovery score.
    pub avg_discovery: Option<f64>,
    /// Average objection_handling score.
    pub avg_objection_handling: Option<f64>,
    /// Average engagement score.
    pub avg_engagement: Option<f64>,
    /// Newest session.
    pub last_coached: Option<chrono::DateTime<chrono::Utc>>,
}

/// The columns of [`RepPerformance`] as selected from `mv_rep_performance`.
const REP_PERFORMANCE_COLUMNS: &str = "rep_id, rep_name, rep_email, total_calls, total_sessions,
    avg_score::float8 AS avg_score, avg_product_knowledge::float8 AS avg_product_knowledge,
    avg_discovery::float8 AS avg_discovery,
    avg_objection_handling::float8 AS avg_objection_handling,
    avg_engagement::float8 AS avg_engagement, last_coached";

/// One rep's `mv_rep_performance` columns computed live (`get_rep_performance_live`); `None`
/// for an unknown rep.
pub async fn rep_performance_live(
    db: impl sqlx::PgExecutor<'_>,
    rep_id: Uuid,
) -> sqlx::Result<Option<RepPerformance>> {
    let sql = format!("SELECT {REP_PERFORMANCE_COLUMNS} FROM get_rep_performance_live($1)");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(rep_id)
        .fetch_optional(db)
        .await
}

/// When `mv_rep_performance` was last refreshed (its rows are as of then); `None` before the
/// first refresh.
pub async fn rep_view_refreshed_at(
    db: impl sqlx::PgExecutor<'_>,
) -> sqlx::Result<Option<chrono::DateTime<chrono::Utc>>> {
    sqlx::query_scalar(
        "SELECT refreshed_at FROM view_refreshes WHERE view_name = 'mv_rep_performance'",
    )
    .fetch_optional(db)
    .await
}

/// One rep's precomputed performance from `mv_rep_performance` (unique index on rep_id);
/// `None` for a rep the view does not hold yet.
pub async fn rep_performance(
    db: impl sqlx::PgExecutor<'_>,
    rep_id: Uuid,
) -> sqlx::Result<Option<RepPerformance>> {
    let sql = format!("SELECT {REP_PERFORMANCE_COLUMNS} FROM mv_rep_performance WHERE rep_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(rep_id)
        .fetch_optional(db)
        .await
}

/// One source of answers in [`cache_statistics`].
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct SourceStatistics {
    /// `llm`, `redis` or `postgres`.
    pub source: String,
    /// Analysis runs.
    pub runs: i64,
    /// Their share of all runs, 0-1.
    pub share: f64,
    /// Paid.
    pub cost_usd: f64,
    /// What they would have cost without any caching.
    pub cost_without_caching_usd: f64,
}

/// `get_cache_statistics(days)`: where the last `days` days' answers came from, and the cost.
pub async fn cache_statistics(pool: &PgPool, days: i32) -> sqlx::Result<Vec<SourceStatistics>> {
    sqlx::query_as(
        "SELECT source, runs, share::float8 AS share, cost_usd, cost_without_caching_usd
         FROM get_cache_statistics($1)",
    )
    .bind(days)
    .fetch_all(pool)
    .await
}

/// The cache's effect over the last `days` days: the answers by source (`sources`, from
/// [`cache_statistics`] of the same window), their totals, the hit rate, what was paid and
/// saved, and the day counters of the cache (`cache_counters`: corrupt entries, breaker
/// openings…), read here.
pub async fn cache_report(
    pool: &PgPool,
    days: i32,
    sources: &[SourceStatistics],
) -> sqlx::Result<serde_json::Value> {
    let counters: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, sum(value)::bigint FROM cache_counters
         WHERE day > current_date - $1 GROUP BY name ORDER BY name",
    )
    .bind(days)
    .fetch_all(pool)
    .await?;
    let runs: i64 = sources.iter().map(|s| s.runs).sum();
    let hits: i64 = sources
        .iter()
        .filter(|s| s.source != "llm")
        .map(|s| s.runs)
        .sum();
    let paid: f64 = sources.iter().map(|s| s.cost_usd).sum();
    let without: f64 = sources.iter().map(|s| s.cost_without_caching_usd).sum();
    Ok(serde_json::json!({
        "days": days,
        "runs": runs,
        "hit_rate": if runs > 0 { hits as f64 / runs as f64 } else { 0.0 },
        "cost_usd": paid,
        "cost_without_caching_usd": without,
        "saved_usd": without - paid,
        "sources": sources,
        "counters": counters.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    }))
}

/// Filters and page of a call search; every filter is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallSearch {
    /// Calls of this rep.
    pub rep_id: Option<Uuid>,
    /// About this product.
    pub product: Option<String>,
    /// Of this type.
    pub call_type: Option<String>,
    /// Scheduled at or after.
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Scheduled before.
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// Carrying all these tags (compared lower-cased).
    pub tags: Option<Vec<String>>,
    /// Whose metadata contains this JSON object.
    pub metadata: Option<serde_json::Value>,
    /// With a participant of this e-mail address (case-insensitive).
    pub participant: Option<String>,
    /// Whose rep had this role on the call.
    pub role: Option<crate::model::Role>,
    /// With a coaching session of this dimension (and, with scores, scoring in the range).
    pub dimension: Option<crate::model::Dimension>,
    /// With a coaching session (of `dimension`, if given) scoring at least this.
    pub min_score: Option<i32>,
    /// With a coaching session (of `dimension`, if given) scoring at most this.
    pub max_score: Option<i32>,
    /// The last row of the previous page: (scheduled_at, id).
    pub after: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
    /// Page size (1-500).
    pub limit: i32,
}

/// One call found by [`search_calls`].
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct CallHit {
    /// Call id.
    pub id: Uuid,
    /// Title.
    pub title: String,
    /// Product.
    pub product: Option<String>,
    /// Call type.
    pub call_type: Option<String>,
    /// When it took place.
    pub scheduled_at: chrono::DateTime<chrono::Utc>,
    /// Its rep.
    pub rep_id: Uuid,
    /// Its tags.
    pub tags: Vec<String>,
}

/// `search_calls_optimized(…)`: one page of calls, newest first.
pub async fn search_calls(
    db: impl sqlx::PgExecutor<'_>,
    s: &CallSearch,
) -> sqlx::Result<Vec<CallHit>> {
    let tags = s.tags.as_ref().map(|t| {
        t.iter()
            .map(|t| t.trim().to_lowercase())
            .collect::<Vec<_>>()
    });
    sqlx::query_as(
        "SELECT id, title, product, call_type, scheduled_at, rep_id, tags
         FROM search_calls_optimized($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                                     $14, $15)",
    )
    .bind(s.rep_id)
    .bind(&s.product)
    .bind(&s.call_type)
    .bind(s.from)
    .bind(s.to)
    .bind(tags)
    .bind(s.metadata.as_ref().map(sqlx::types::Json))
    .bind(&s.participant)
    .bind(s.after.map(|(at, _)| at))
    .bind(s.after.map(|(_, id)| id))
    .bind(s.limit)
    .bind(s.role.map(crate::model::Role::as_str))
    .bind(s.dimension.map(|d| d.as_str()))
    .bind(s.min_score)
    .bind(s.max_score)
    .fetch_all(db)
    .await
}

/// `get_call_with_details(id)`: the call, its rep, speakers, transcript and the latest
/// coaching per dimension as one JSON document; `None` for an unknown call.
pub async fn call_details(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
) -> sqlx::Result<Option<serde_json::Value>> {
    sqlx::query_scalar(CALL_DETAILS_SQL)
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The statement of [`call_details`].
pub const CALL_DETAILS_SQL: &str = "SELECT details FROM get_call_with_details($1)";

/// Weekly average of one dimension's scores, all reps (`get_score_trends`).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct WeeklyScore {
    /// Monday of the week (UTC).
    pub week: chrono::NaiveDate,
    /// Sessions that week.
    pub sessions: i64,
    /// Their average score.
    pub avg_score: f64,
}

/// Weekly averages of one dimension, oldest first: of every rep (`get_score_trends`) or of one
/// (`get_rep_score_trends`).
pub async fn score_trends(
    pool: &PgPool,
    dimension: &str,
    days: i32,
    rep_id: Option<Uuid>,
) -> sqlx::Result<Vec<WeeklyScore>> {
    let query = match rep_id {
        None => sqlx::query_as(
            "SELECT week, sessions, avg_score::float8 AS avg_score
             FROM get_score_trends($1, $2)",
        )
        .bind(dimension)
        .bind(days),
        Some(rep) => sqlx::query_as(
            "SELECT week, sessions, avg_score::float8 AS avg_score
             FROM get_rep_score_trends($1, $2, $3)",
        )
        .bind(rep)
        .bind(dimension)
        .bind(days),
    };
    query.fetch_all(pool).await
}

/// Sessions scoring below this are listed by [`coaching_opportunities`]; the partial index
/// coaching_sessions_needs_work_idx has the same constant in its predicate.
pub const NEEDS_WORK_BELOW: i32 = 60;

/// One coaching session in a rep's history.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct SessionItem {
    /// Session id.
    pub id: Uuid,
    /// The call analysed.
    pub call_id: Uuid,
    /// Dimension.
    pub dimension: String,
    /// Score.
    pub score: i32,
    /// When it was stored.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The statement of [`rep_sessions`]: $1 rep, $2/$3 cursor (created_at, id), $4 limit.
pub const REP_SESSIONS_SQL: &str = "SELECT id, call_id, dimension, score, created_at
     FROM coaching_sessions
     WHERE rep_id = $1 AND (created_at, id) < ($2, $3)
     ORDER BY created_at DESC, id DESC LIMIT $4";

/// A rep's coaching history, newest first: pass the last item's (created_at, id) as `after`
/// for the next page (coaching_sessions_rep_created_idx).
pub async fn rep_sessions(
    pool: &PgPool,
    rep_id: Uuid,
    after: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<SessionItem>> {
    let (at, id) = after.unwrap_or((chrono::DateTime::<chrono::Utc>::MAX_UTC, Uuid::max()));
    sqlx::query_as(REP_SESSIONS_SQL)
        .bind(rep_id)
        .bind(at)
        .bind(id)
        .bind(limit.clamp(1, 500))
        .fetch_all(pool)
        .await
}

/// The statement of [`coaching_opportunities`]: $1 rep, $2 limit.
pub const COACHING_OPPORTUNITIES_SQL: &str = "SELECT id, call_id, dimension, score, created_at
     FROM coaching_sessions
     WHERE rep_id = $1 AND score < 60
     ORDER BY created_at DESC LIMIT $2";

/// A rep's newest sessions scoring below [`NEEDS_WORK_BELOW`]: the calls to review with the
/// rep (coaching_sessions_needs_work_idx).
pub async fn coaching_opportunities(
    pool: &PgPool,
    rep_id: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<SessionItem>> {
    sqlx::query_as(COACHING_OPPORTUNITIES_SQL)
        .bind(rep_id)
        .bind(limit.clamp(1, 500))
        .fetch_all(pool)
        .await
}

/// The statement of [`leaderboard`]: $1 limit.
pub fn leaderboard_sql() -> String {
    format!(
        "SELECT {REP_PERFORMANCE_COLUMNS} FROM mv_rep_performance
         ORDER BY avg_score DESC NULLS LAST, rep_id LIMIT $1"
    )
}

/// The best reps by average score, from `mv_rep_performance` (a few hundred rows: a top-N sort
/// of the view beats any index).
pub async fn leaderboard(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<RepPerformance>> {
    sqlx::query_as(sqlx::AssertSqlSafe(leaderboard_sql()))
        .bind(limit.clamp(1, 500))
        .fetch_all(pool)
        .await
}

/// A rep as listed by [`list_reps`].
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RepItem {
    /// Rep id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// E-mail.
    pub email: String,
    /// ae, se or csm.
    pub role: String,
    /// Team.
    pub team: Option<String>,
}

/// The rep with this e-mail address, compared case-insensitively (reps_email_key).
pub async fn rep_by_email(
    db: impl sqlx::PgExecutor<'_>,
    email: &str,
) -> sqlx::Result<Option<RepItem>> {
    sqlx::query_as("SELECT id, name, email, role, team FROM reps WHERE lower(email) = lower($1)")
        .bind(email)
        .fetch_optional(db)
        .await
}

/// Which reps [`list_reps`] lists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepFilter {
    /// Active reps of this team (reps_team_name_idx).
    pub team: Option<String>,
    /// With this role (with `team`).
    pub role: Option<crate::model::Role>,
    /// Whose name starts with this, case-insensitive (reps_name_prefix_idx).
    pub name_prefix: Option<String>,
}

/// Reps by name: a team's active reps, or every rep whose name starts with a prefix.
pub async fn list_reps(pool: &PgPool, f: &RepFilter, limit: i64) -> sqlx::Result<Vec<RepItem>> {
    // Not prepared: planned for the values given (teams differ widely in size).
    list_reps_query(f, limit)
        .build_query_as()
        .persistent(false)
        .fetch_all(pool)
        .await
}

/// The statement of [`list_reps`] with its parameters bound in order: team, role, the name
/// range (low, high), limit (absent filters bind nothing).
pub fn list_reps_query(f: &RepFilter, limit: i64) -> sqlx::QueryBuilder<sqlx::Postgres> {
    let mut q = sqlx::QueryBuilder::new("SELECT id, name, email, role, team FROM reps WHERE true");
    if let Some(team) = &f.team {
        q.push(" AND active AND team = ").push_bind(team.clone());
    }
    if let Some(role) = f.role {
        q.push(" AND role = ").push_bind(role.as_str());
    }
    if let Some((low, high)) = f.name_prefix.as_deref().and_then(prefix_range) {
        // A range rather than LIKE: a parameterized LIKE cannot use the index in a generic
        // plan, a range on the text_pattern_ops operators can.
        q.push(" AND lower(name) ~>=~ ")
            .push_bind(low)
            .push(" AND lower(name) ~<~ ")
            .push_bind(high);
    }
    q.push(" ORDER BY name, id LIMIT ")
        .push_bind(limit.clamp(1, 500));
    q
}

/// The byte-wise range of lower-cased names starting with `prefix`: `[prefix, next)` where
/// `next` is the prefix with its last character incremented; `None` for an empty prefix.
fn prefix_range(prefix: &str) -> Option<(String, String)> {
    let low = prefix.to_lowercase();
    let mut chars: Vec<char> = low.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = char::from_u32(u32::from(last) + 1) {
            chars.push(next);
            return Some((low, chars.into_iter().collect()));
        }
    }
    None
}

/// One analysis run of a job.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobRun {
    /// Dimension analysed.
    pub dimension: String,
    /// llm, redis or postgres.
    pub source: String,
    /// Model that answered (LLM runs).
    pub model: Option<String>,
    /// Paid.
    pub cost_usd: f64,
    /// Duration.
    pub duration_ms: i64,
    /// When.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The statement of [`job_runs`].
pub const JOB_RUNS_SQL: &str = "SELECT dimension, source, model, cost_usd, duration_ms, created_at
     FROM analysis_runs WHERE job_id = $1 ORDER BY created_at";

/// The analysis runs a job made, oldest first (analysis_runs_job_idx).
pub async fn job_runs(pool: &PgPool, job_id: Uuid) -> sqlx::Result<Vec<JobRun>> {
    sqlx::query_as(JOB_RUNS_SQL)
        .bind(job_id)
        .fetch_all(pool)
        .await
}

/// How many days of analysis runs and cache counters `maintain_tables` keeps.
pub const RETENTION_DAYS: i32 = 400;

/// How long the swap of a rebuilt hot index waits for its table lock before giving up (the
/// next run tries again); while it waits, other queries on the table queue behind it.
const SWAP_LOCK_TIMEOUT: &str = "2s";

/// `maintain_performance_tables()` (partitions, retention, ANALYZE), then what a function
/// cannot do: VACUUM (ANALYZE) of each table it reports with many dead rows, and the rebuild
/// of each hot partial index whose cutoff fell behind (see [`roll_hot_index`]). Table names
/// come from the catalog, quoted by the server (`regclass::text`).
pub async fn maintain_tables(pool: &PgPool) -> anyhow::Result<serde_json::Value> {
    let mut report: serde_json::Value =
        sqlx::query_scalar("SELECT maintain_performance_tables($1)")
            .bind(RETENTION_DAYS)
            .fetch_one(pool)
            .await?;
    let names = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect()
    };
    let (tables, due) = (names("vacuum"), names("hot_indexes_due"));
    for table in &tables {
        let statement = format!("VACUUM (ANALYZE) {table}");
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await?;
    }
    let mut rolled = Vec::new();
    for index in &due {
        rolled.push(roll_hot_index(pool, index).await?);
    }
    report["vacuumed"] = serde_json::json!(tables);
    report["hot_indexes_rolled"] = serde_json::json!(rolled);
    Ok(report)
}

/// A hot partial index rebuilt by [`roll_hot_index`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RolledIndex {
    /// Index name.
    pub index: String,
    /// Its new cutoff, or `None` when the swap's lock was not obtained (the old index stays).
    pub cutoff: Option<chrono::DateTime<chrono::Utc>>,
}

/// Rebuilds a hot partial index with the cutoff `window_days` before today: builds
/// `<name>_next` with CREATE INDEX CONCURRENTLY (writes carry on), then in one transaction
/// records the new cutoff, drops the old index and renames the new one. Queries reading the
/// cutoff see either the old cutoff and index or the new ones, never a mix. A leftover
/// `<name>_next` of an interrupted run is dropped first.
pub async fn roll_hot_index(pool: &PgPool, index: &str) -> anyhow::Result<RolledIndex> {
    let next = format!("{index}_next");
    let (create, cutoff): (String, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT format(definition, 'CONCURRENTLY', $2::text, c), c
         FROM hot_indexes, LATERAL (SELECT date_trunc('day', now())
                                           - make_interval(days => window_days) AS c) _
         WHERE index_name = $1",
    )
    .bind(index)
    .bind(&next)
    .fetch_one(pool)
    .await?;
    let drop_next = format!("DROP INDEX CONCURRENTLY IF EXISTS {}", quote_ident(&next));
    sqlx::query(sqlx::AssertSqlSafe(drop_next.clone()))
        .execute(pool)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(pool)
        .await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(SWAP_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE hot_indexes SET cutoff = $2, rolled_at = now() WHERE index_name = $1")
        .bind(index)
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
    let swap = format!(
        "DROP INDEX IF EXISTS {old}; ALTER INDEX {new} RENAME TO {old}",
        old = quote_ident(index),
        new = quote_ident(&next)
    );
    let swapped = sqlx::raw_sql(sqlx::AssertSqlSafe(swap))
        .execute(&mut *tx)
        .await;
    match swapped {
        Ok(_) => {
            tx.commit().await?;
            Ok(RolledIndex {
                index: index.to_string(),
                cutoff: Some(cutoff),
            })
        }
        Err(e) if is_lock_timeout(&e) => {
            tx.rollback().await?;
            sqlx::query(sqlx::AssertSqlSafe(drop_next))
                .execute(pool)
                .await?;
            tracing::warn!(
                index,
                "hot index swap did not get its lock; the next run retries"
            );
            Ok(RolledIndex {
                index: index.to_string(),
                cutoff: None,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether an error is Postgres's lock_timeout (55P03, lock_not_available).
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "55P03")
}

/// An identifier quoted for SQL (`"` doubled).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `refresh_rep_performance_view()`: refreshes `mv_rep_performance` without blocking readers.
pub async fn refresh_rep_performance(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("SELECT refresh_rep_performance_view()")
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_prefix_becomes_a_half_open_range() {
        assert_eq!(prefix_range("Al"), Some(("al".into(), "am".into())));
        assert_eq!(prefix_range("o'z"), Some(("o'z".into(), "o'{".into())));
        assert_eq!(prefix_range(""), None);
    }

    #[test]
    fn the_needs_work_threshold_matches_the_partial_index() {
        let predicate = format!("score < {NEEDS_WORK_BELOW}");
        assert!(COACHING_OPPORTUNITIES_SQL.contains(&predicate));
        let indexes = FILES[0].1;
        let at = indexes.find("coaching_sessions_needs_work_idx\n").unwrap();
        assert!(
            indexes[at..]
                .lines()
                .take(3)
                .any(|l| l.contains(&predicate))
        );
    }

    #[test]
    fn the_expected_objects_come_from_the_files() {
        let names: Vec<(String, Kind)> = expected().into_iter().map(|e| (e.name, e.kind)).collect();
        assert!(names.contains(&("coaching_sessions_rep_dim_created_idx".into(), Kind::Index)));
        assert!(names.contains(&("mv_rep_performance_rep_idx".into(), Kind::Index)));
        assert!(names.contains(&("mv_rep_performance".into(), Kind::MaterializedView)));
        assert!(names.contains(&("get_rep_performance_summary".into(), Kind::Function)));
        assert!(names.iter().all(|(n, _)| !n.is_empty()));
    }

    #[test]
    fn the_table_shows_each_object_and_its_state() {
        let report = [
            ObjectStatus {
                name: "some_idx".into(),
                kind: Kind::Index,
                status: "missing",
                bytes: None,
                scans: None,
            },
            ObjectStatus {
                name: "some_fn".into(),
                kind: Kind::Function,
                status: "ok",
                bytes: None,
                scans: None,
            },
        ];
        let table = render(&report);
        assert_eq!(table.lines().count(), 3);
        assert!(table.lines().nth(1).unwrap().contains("missing"));
        assert!(table.lines().nth(2).unwrap().starts_with("some_fn"));
    }
}
