//! Postgres access: the pool, embedded migrations, seed data and the queries of the analysis
//! path. Every statement binds its parameters; no SQL is assembled from input.

use crate::model::{CallInput, Dimension, Role, normalized_transcript, sha256_hex};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row, postgres::PgPoolOptions};
use std::time::Duration;
use uuid::Uuid;

/// Migrations under `sql/migrations`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./sql/migrations");

/// Opens a pool; connecting is lazy so a process can start while Postgres restarts.
pub fn pool(url: &str, max_connections: u32, acquire_timeout: Duration) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_lazy(url)
        .context("DATABASE_URL is not a valid Postgres URL")
}

/// Whether a database error means "Postgres is unreachable or not accepting work now"
/// (no connection, connection lost, shutting down or starting up, out of connections).
pub fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

/// Applies pending migrations, keeps the `coaching_sessions` partitions of the current month
/// and [`PARTITION_MONTHS_AHEAD`] more (moving their rows out of the default partition), and
/// loads the seed rubrics and knowledge base (idempotent).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")?;
    // Here and not only in a migration: a database migrated long ago gets its months ahead
    // each time the application migrates, not only when a new migration lands.
    maintain_partitions(pool, PARTITION_MONTHS_AHEAD)
        .await
        .context("maintaining coaching_sessions partitions")?
        .log();
    crate::performance::apply(pool).await?;
    seed(pool).await
}

/// How many months past the current one get their `coaching_sessions` partition ahead of time.
pub const PARTITION_MONTHS_AHEAD: i32 = 3;

/// Advisory lock key that serializes partition upkeep runs ("ccpart" in ASCII).
const PARTITION_UPKEEP_LOCK: i64 = 0x0000_6363_7061_7274;

/// How long partition upkeep waits for a lock before it gives a month up until the next run.
/// Waiting longer would hold every query that reads the default partition in the lock queue
/// behind it.
const PARTITION_LOCK_TIMEOUT: &str = "5s";

/// What [`maintain_partitions`] did: the `jsonb` returned by `maintain_coaching_partitions`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionReport {
    /// Partitions created, in month order.
    pub created: Vec<CreatedPartition>,
    /// Months whose partition could not be created; their rows stay in the default partition
    /// and the next run tries again.
    pub failed: Vec<FailedPartition>,
}

/// A `coaching_sessions` partition created by [`maintain_partitions`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedPartition {
    /// Table name, `coaching_sessions_YYYY_MM`.
    pub partition: String,
    /// First day of its month (bounds are UTC).
    pub month: chrono::NaiveDate,
    /// Rows moved into it from the default partition.
    pub moved_rows: i64,
}

/// A month [`maintain_partitions`] could not give its partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedPartition {
    /// The table name it would have had.
    pub partition: String,
    /// First day of the month.
    pub month: chrono::NaiveDate,
    /// Postgres error code (`55P03` when a lock was not obtained in time).
    pub sqlstate: String,
    /// Postgres error message.
    pub error: String,
}

impl PartitionReport {
    /// Whether the run changed nothing and nothing failed.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.failed.is_empty()
    }

    /// Rows moved out of the default partition, over every created partition.
    pub fn moved_rows(&self) -> i64 {
        self.created.iter().map(|p| p.moved_rows).sum()
    }

    /// Logs each created partition, and each failure as a warning.
    pub fn log(&self) {
        for p in &self.created {
            tracing::info!(partition = %p.partition, moved_rows = p.moved_rows,
                "created a coaching_sessions partition");
        }
        for f in &self.failed {
            tracing::warn!(partition = %f.partition, sqlstate = %f.sqlstate, error = %f.error,
                "could not create a coaching_sessions partition; its rows stay in the default");
        }
    }
}

/// Runs `maintain_coaching_partitions(months_ahead)` (migration `20261202000003`) in its own
/// transaction with a lock timeout: creates the partitions of the current month and
/// `months_ahead` more, and gives every month the default partition holds rows of its own
/// partition, moving those rows. Idempotent; a month whose locks are not obtained in time is
/// reported in [`PartitionReport::failed`], not returned as an error.
///
/// Runs are serialized by a transaction-level advisory lock taken before the lock timeout is
/// set: a run scans the default partition (keeping its ACCESS SHARE lock until commit) before
/// it locks the parent, so two runs interleaved would each hold what the other's ATTACH
/// needs (a deadlock). A second run waits for the first, then finds its months made.
pub async fn maintain_partitions(
    pool: &PgPool,
    months_ahead: i32,
) -> sqlx::Result<PartitionReport> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PARTITION_UPKEEP_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(PARTITION_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    let report: sqlx::types::Json<PartitionReport> =
        sqlx::query_scalar("SELECT maintain_coaching_partitions($1)")
            .bind(months_ahead)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(report.0)
}

/// Inserts the rubrics and knowledge base shipped in `jobs/seed/`, each entry unless its
/// role + dimension (or product + category) already has a version. One statement per file.
async fn seed(pool: &PgPool) -> anyhow::Result<()> {
    let rubrics: serde_json::Value =
        serde_json::from_str(include_str!("../jobs/seed/rubrics.json")).context("rubrics.json")?;
    sqlx::query(
        "INSERT INTO coaching_rubrics (role, dimension, version, criteria, active)
         SELECT s.role, s.dimension, s.version, s.criteria, true
         FROM jsonb_to_recordset($1) AS s(role text, dimension text, version text, criteria text)
         WHERE NOT EXISTS (SELECT 1 FROM coaching_rubrics r
                           WHERE r.role = s.role AND r.dimension = s.dimension)",
    )
    .bind(rubrics)
    .execute(pool)
    .await
    .context("seeding rubrics")?;
    let kb: serde_json::Value =
        serde_json::from_str(include_str!("../jobs/seed/knowledge_base.json"))
            .context("knowledge_base.json")?;
    sqlx::query(
        "INSERT INTO knowledge_base (product, category, version, content, active)
         SELECT s.product, s.category, s.version, s.content, true
         FROM jsonb_to_recordset($1) AS s(product text, category text, version text, content text)
         WHERE NOT EXISTS (SELECT 1 FROM knowledge_base k
                           WHERE k.product = s.product AND k.category = s.category)",
    )
    .bind(kb)
    .execute(pool)
    .await
    .context("seeding the knowledge base")?;
    Ok(())
}

/// Stores a call, its speakers and transcript. Returns `(id, created)`; an `external_id` that
/// already exists returns the existing call unchanged.
pub async fn insert_call(pool: &PgPool, call: &CallInput) -> sqlx::Result<(Uuid, bool)> {
    let mut tx = pool.begin().await?;
    let id = Uuid::now_v7();
    let rep_id = upsert_rep(&mut tx, call).await?;
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO calls (id, external_id, title, product, call_type, scheduled_at,
                            duration_seconds, rep_email, rep_role, rep_id, tags, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (external_id) DO NOTHING RETURNING id",
    )
    .bind(id)
    .bind(&call.external_id)
    .bind(&call.title)
    .bind(&call.product)
    .bind(&call.call_type)
    .bind(call.scheduled_at)
    .bind(call.duration_seconds)
    .bind(&call.rep_email)
    .bind(call.rep_role.as_str())
    .bind(rep_id)
    .bind(call.normalized_tags())
    .bind(sqlx::types::Json(call.metadata.clone().unwrap_or_default()))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = inserted else {
        let existing = sqlx::query_scalar("SELECT id FROM calls WHERE external_id = $1")
            .bind(&call.external_id)
            .fetch_one(&mut *tx)
            .await?;
        return Ok((existing, false));
    };
    for s in &call.speakers {
        sqlx::query(
            "INSERT INTO speakers (call_id, name, email, role, company_side) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(&s.name)
        .bind(&s.email)
        .bind(&s.role)
        .bind(&s.company_side)
        .execute(&mut *tx)
        .await?;
    }
    let text = normalized_transcript(&call.transcript);
    sqlx::query(
        "INSERT INTO transcripts (call_id, transcript_hash, full_text, utterances) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(sha256_hex(&text))
    .bind(&text)
    .bind(sqlx::types::Json(&call.transcript))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((id, true))
}

/// What an analysis needs to know about a call.
#[derive(Clone, Debug)]
pub struct CallForAnalysis {
    /// Call id.
    pub id: Uuid,
    /// The rep being coached.
    pub rep_email: String,
    /// Their row in `reps`.
    pub rep_id: Uuid,
    /// Selects the rubric.
    pub rep_role: Role,
    /// Normalized transcript text.
    pub transcript: String,
    /// SHA-256 of `transcript`.
    pub transcript_hash: String,
}

/// The call's rep, created on first sight of its e-mail address (matched case-insensitively
/// afterwards). The name comes from `rep_name`, else the internal speaker with that address,
/// else the address's local part; a `rep_team` given later fills in the team.
async fn upsert_rep(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    call: &CallInput,
) -> sqlx::Result<Uuid> {
    let speaker = call.speakers.iter().find(|s| {
        s.email
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(&call.rep_email))
    });
    let name = call
        .rep_name
        .clone()
        .or_else(|| speaker.map(|s| s.name.clone()))
        .unwrap_or_else(|| {
            call.rep_email
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string()
        });
    sqlx::query_scalar(
        "INSERT INTO reps (id, name, email, role, team) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT ((lower(email))) DO UPDATE SET team = coalesce(EXCLUDED.team, reps.team)
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(&call.rep_email)
    .bind(call.rep_role.as_str())
    .bind(&call.rep_team)
    .fetch_one(&mut **tx)
    .await
}

/// Loads a call with its transcript, or `None` if it does not exist.
pub async fn call_for_analysis(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<CallForAnalysis>> {
    let row = sqlx::query(
        "SELECT c.id, c.rep_email, c.rep_id, c.rep_role, t.full_text, t.transcript_hash
         FROM calls c JOIN transcripts t ON t.call_id = c.id WHERE c.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        let role: String = r.get("rep_role");
        Ok(CallForAnalysis {
            id: r.get("id"),
            rep_email: r.get("rep_email"),
            rep_id: r.get("rep_id"),
            rep_role: role
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            transcript: r.get("full_text"),
            transcript_hash: r.get("transcript_hash"),
        })
    })
    .transpose()
}

/// Whether a call exists.
pub async fn call_exists(pool: &PgPool, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM calls WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
}

/// The active rubric for a role and dimension.
#[derive(Clone, Debug)]
pub struct Rubric {
    /// Version string, part of the cache key.
    pub version: String,
    /// Criteria text given to the model.
    pub criteria: String,
}

/// Loads the active rubric of a role and dimension.
pub async fn active_rubric(pool: &PgPool, role: Role, dim: Dimension) -> sqlx::Result<Rubric> {
    let row = sqlx::query(
        "SELECT version, criteria FROM coaching_rubrics WHERE role = $1 AND dimension = $2 AND active",
    )
    .bind(role.as_str())
    .bind(dim.as_str())
    .fetch_one(pool)
    .await?;
    Ok(Rubric {
        version: row.get("version"),
        criteria: row.get("criteria"),
    })
}

/// The active rubrics of a role, one per dimension that has one, in [`Dimension::ALL`] order.
pub async fn role_rubrics(pool: &PgPool, role: Role) -> sqlx::Result<Vec<(Dimension, Rubric)>> {
    let rows = sqlx::query(
        "SELECT dimension, version, criteria FROM coaching_rubrics WHERE role = $1 AND active",
    )
    .bind(role.as_str())
    .fetch_all(pool)
    .await?;
    let mut rubrics: Vec<(Dimension, Rubric)> = rows
        .iter()
        .filter_map(|r| {
            let dimension: Dimension = r.get::<String, _>(0).parse().ok()?;
            let rubric = Rubric {
                version: r.get(1),
                criteria: r.get(2),
            };
            Some((dimension, rubric))
        })
        .collect();
    rubrics.sort_by_key(|(d, _)| *d);
    Ok(rubrics)
}

/// The active knowledge base: its text and a version digest that changes with any entry.
pub async fn knowledge_base(pool: &PgPool) -> sqlx::Result<(String, String)> {
    let rows = sqlx::query(
        "SELECT product, category, version, content FROM knowledge_base WHERE active ORDER BY product, category",
    )
    .fetch_all(pool)
    .await?;
    let mut text = String::new();
    let mut versions = String::new();
    for r in rows {
        let (product, category, version, content): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        text.push_str(&format!("## {product} / {category}\n{content}\n\n"));
        versions.push_str(&format!("{product}/{category}@{version};"));
    }
    Ok((text, sha256_hex(&versions)[..12].to_string()))
}

/// Outcome of [`replace_rubric`].
#[derive(Debug)]
pub enum RubricUpdate {
    /// The new version is active; `previous` is the version it replaced, if any.
    Replaced {
        /// The superseded version.
        previous: Option<String>,
    },
    /// That version already exists for this role and dimension.
    VersionExists,
}

/// Stores a new rubric version and makes it the active one, inside the caller's transaction
/// (rolled back to its state before the call when the version exists); old versions stay
/// for history.
pub async fn replace_rubric(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    role: Role,
    dim: Dimension,
    version: &str,
    criteria: &str,
) -> sqlx::Result<RubricUpdate> {
    let mut tx = sqlx::Acquire::begin(&mut **tx).await?;
    let previous: Option<String> = sqlx::query_scalar(
        "UPDATE coaching_rubrics SET active = false
         WHERE role = $1 AND dimension = $2 AND active RETURNING version",
    )
    .bind(role.as_str())
    .bind(dim.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let inserted = sqlx::query(
        "INSERT INTO coaching_rubrics (role, dimension, version, criteria, active)
         VALUES ($1, $2, $3, $4, true) ON CONFLICT (role, dimension, version) DO NOTHING",
    )
    .bind(role.as_str())
    .bind(dim.as_str())
    .bind(version)
    .bind(criteria)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(RubricUpdate::VersionExists);
    }
    tx.commit().await?;
    Ok(RubricUpdate::Replaced { previous })
}
