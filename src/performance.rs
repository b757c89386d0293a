//! Database performance objects: the indexes, materialized views and functions in
//! `sql/performance/`, applied (idempotently) by `callcoach migrate` and `callcoach db
//! optimize`, and verified object by object.
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
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
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
    pool: &PgPool,
    rep_id: Uuid,
    days: i32,
) -> sqlx::Result<Vec<DimensionSummary>> {
    sqlx::query_as(
        "SELECT dimension, sessions, avg_score::float8 AS avg_score, min_score, max_score
         FROM get_rep_performance_summary($1, $2)",
    )
    .bind(rep_id)
    .bind(days)
    .fetch_all(pool)
    .await
}

/// One rep's row of `mv_rep_performance` (as of its last refresh).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
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

/// One rep's precomputed performance from `mv_rep_performance` (unique index on rep_id);
/// `None` for a rep the view does not hold yet.
pub async fn rep_performance(pool: &PgPool, rep_id: Uuid) -> sqlx::Result<Option<RepPerformance>> {
    let sql = format!("SELECT {REP_PERFORMANCE_COLUMNS} FROM mv_rep_performance WHERE rep_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(rep_id)
        .fetch_optional(pool)
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
    /// The last row of the previous page: (scheduled_at, id).
    pub after: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
    /// Page size (1-500).
    pub limit: i32,
}

/// One call found by [`search_calls`].
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
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
}

/// `search_calls_optimized(…)`: one page of calls, newest first.
pub async fn search_calls(pool: &PgPool, s: &CallSearch) -> sqlx::Result<Vec<CallHit>> {
    sqlx::query_as(
        "SELECT id, title, product, call_type, scheduled_at, rep_id
         FROM search_calls_optimized($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(s.rep_id)
    .bind(&s.product)
    .bind(&s.call_type)
    .bind(s.from)
    .bind(s.to)
    .bind(s.after.map(|(at, _)| at))
    .bind(s.after.map(|(_, id)| id))
    .bind(s.limit)
    .fetch_all(pool)
    .await
}

/// `get_call_with_details(id)`: the call, its rep, speakers, transcript and the latest
/// coaching per dimension as one JSON document; `None` for an unknown call.
pub async fn call_details(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<serde_json::Value>> {
    sqlx::query_scalar("SELECT get_call_with_details($1)")
        .bind(id)
        .fetch_one(pool)
        .await
}

/// `maintain_performance_tables()`, then VACUUM (ANALYZE) of each table it reports with many
/// dead rows. The names come from the catalog, quoted by the server (`regclass::text`).
pub async fn maintain_tables(pool: &PgPool) -> anyhow::Result<serde_json::Value> {
    let mut report: serde_json::Value = sqlx::query_scalar("SELECT maintain_performance_tables()")
        .fetch_one(pool)
        .await?;
    let tables: Vec<String> = report["vacuum"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    for table in &tables {
        let statement = format!("VACUUM (ANALYZE) {table}");
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await?;
    }
    report["vacuumed"] = serde_json::json!(tables);
    Ok(report)
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
