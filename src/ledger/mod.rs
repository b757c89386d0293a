//! The `jobs` table and nothing else: the job state machine, inserts (also inside a caller's
//! transaction), reads, operator transitions (retry, cancel), hand-back on shutdown, and
//! retention.
//!
//! Every transition is guarded by the row's `(id, delivery, state)`: a claim wins only for the
//! current delivery of a queued or snoozed row, and an outcome applies only to the delivery
//! that is running. A stale run (superseded by a retry, a rescue or an operator) can therefore
//! never overwrite a newer outcome. [`writer`] groups the hot transitions (claim, outcome,
//! lease renewal); [`relay`] delivers rows to Redis and rescues rows whose run or delivery was
//! lost.

pub mod relay;
pub mod writer;

pub use writer::{Claimed, Ledger, LedgerError, Outcome};

use crate::delivery::Lane;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Row};
use std::{str::FromStr, time::Duration};
use uuid::Uuid;

/// The state of a ledger row. The database's CHECK constraint allows exactly this set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker (delivered or about to be).
    Queued,
    /// A worker claimed the current delivery and holds its lease.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished for good: permanent error or attempt budget spent (replayable).
    Failed,
    /// Stopped by an operator or by the job itself (replayable).
    Cancelled,
    /// Postponed without using an attempt (rate limit, LLM overload).
    Snoozed,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Snoozed,
    ];

    /// The name stored in `jobs.status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Snoozed => "snoozed",
        }
    }

    /// Whether the job will not run again unless an operator replays it.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown job state {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Jobs waiting to run (queued or snoozed) per lane, every lane listed (0 when empty).
pub async fn queue_depth(pg: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    let lanes: Vec<&str> = crate::delivery::Lane::ALL
        .iter()
        .map(|l| l.as_str())
        .collect();
    sqlx::query_as(
        "SELECT l.lane, count(j.id) FROM unnest($1::text[]) AS l(lane) \
         LEFT JOIN jobs j ON j.lane = l.lane AND j.status IN ('queued', 'snoozed') \
         GROUP BY l.lane",
    )
    .bind(lanes)
    .fetch_all(pg)
    .await
}

/// Names of a set of states, for binding as a `text[]` parameter.
pub fn names(states: &[JobState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

/// States a delivery can be claimed from.
pub const CLAIMABLE: [JobState; 2] = [JobState::Queued, JobState::Snoozed];
/// States an operator can replay from.
pub const REPLAYABLE: [JobState; 2] = [JobState::Failed, JobState::Cancelled];

/// A job to record.
#[derive(Clone, Debug)]
pub struct NewRow {
    /// Ledger id.
    pub id: Uuid,
    /// Registered kind.
    pub kind: &'static str,
    /// Arguments.
    pub payload: serde_json::Value,
    /// Lane.
    pub lane: Lane,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Deduplication key (unique among all rows).
    pub dedup_key: Option<String>,
    /// Earliest start.
    pub run_at: DateTime<Utc>,
}

/// Inserts rows with one statement; `delivered` records that the caller pushes them right
/// after (otherwise the relay does). Rows whose dedup key exists are skipped; returns the ids
/// inserted.
pub async fn insert<'e>(
    exec: impl sqlx::Executor<'e, Database = Postgres>,
    rows: &[NewRow],
    delivered: bool,
) -> sqlx::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
    let payloads: Vec<&serde_json::Value> = rows.iter().map(|r| &r.payload).collect();
    let lanes: Vec<&str> = rows.iter().map(|r| r.lane.as_str()).collect();
    let budgets: Vec<i32> = rows.iter().map(|r| r.max_attempts).collect();
    let dedup: Vec<Option<&str>> = rows.iter().map(|r| r.dedup_key.as_deref()).collect();
    let run_at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.run_at).collect();
    sqlx::query_scalar(
        "INSERT INTO jobs (id, kind, payload, lane, max_attempts, dedup_key, run_at, status, delivered_at)
         SELECT t.id, t.kind, t.payload, t.lane, t.max_attempts, t.dedup_key, t.run_at, $8,
                CASE WHEN $9 THEN now() END
         FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::int[], $6::text[], $7::timestamptz[])
              AS t(id, kind, payload, lane, max_attempts, dedup_key, run_at)
         ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&payloads)
    .bind(&lanes)
    .bind(&budgets)
    .bind(&dedup)
    .bind(&run_at)
    .bind(JobState::Queued.as_str())
    .bind(delivered)
    .fetch_all(exec)
    .await
}

/// The id of the job holding a dedup key.
pub async fn by_dedup_key<'e>(
    exec: impl sqlx::Executor<'e, Database = Postgres>,
    key: &str,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar("SELECT id FROM jobs WHERE dedup_key = $1")
        .bind(key)
        .fetch_optional(exec)
        .await
}

/// Marks deliveries as not in Redis (their push failed), so the relay delivers them.
pub async fn mark_undelivered(pg: &PgPool, ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query("UPDATE jobs SET delivered_at = NULL WHERE id = ANY($1) AND status = ANY($2)")
        .bind(ids)
        .bind(names(&CLAIMABLE))
        .execute(pg)
        .await
        .map(|_| ())
}

/// Replays a failed or cancelled job (the dead-letter queue): a fresh attempt budget and a new
/// delivery, which the relay pushes. Returns false if the job is in another state.
pub async fn retry(pg: &PgPool, id: Uuid) -> sqlx::Result<bool> {
    Ok(retry_many(pg, &[id], &REPLAYABLE).await? == 1)
}

/// Replays the failed jobs (the dead-letter list without the jobs an operator cancelled), at
/// most `limit`, oldest failure first, as [`retry`] does one. Returns how many were replayed.
pub async fn replay_failed(pg: &PgPool, limit: i64) -> sqlx::Result<u64> {
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE status = $1 ORDER BY finished_at LIMIT $2")
            .bind(JobState::Failed.as_str())
            .bind(limit)
            .fetch_all(pg)
            .await?;
    retry_many(pg, &ids, &[JobState::Failed]).await
}

/// Queues the jobs of `ids` that are in one of `from` again with a fresh attempt budget and a
/// new delivery; returns how many were.
async fn retry_many(pg: &PgPool, ids: &[Uuid], from: &[JobState]) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE jobs SET status = $2, attempts = 0, delivery = delivery + 1, delivered_at = NULL,
                run_at = now(), finished_at = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE id = ANY($1) AND status = ANY($3)",
    )
    .bind(ids)
    .bind(JobState::Queued.as_str())
    .bind(names(from))
    .execute(pg)
    .await?;
    Ok(done.rows_affected())
}

/// Cancels a job that has not started; a delivery already in Redis is skipped when it
/// arrives (its claim fails). Returns false if the job is in another state.
pub async fn cancel(pg: &PgPool, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET status = $2, last_error = 'cancelled by an operator',
                finished_at = now(), updated_at = now()
         WHERE id = $1 AND status = ANY($3)",
    )
    .bind(id)
    .bind(JobState::Cancelled.as_str())
    .bind(names(&CLAIMABLE))
    .execute(pg)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives back runs this worker holds but will not finish: each row (still running this
/// delivery) is queued again under a new delivery for immediate re-delivery. `refund` gives
/// the attempt back (a stopping worker's runs were not at fault); runs whose outcome could
/// not be written keep it, so a run that keeps failing that way still meets its budget.
/// Returns how many were handed back.
pub async fn hand_back(pg: &PgPool, runs: &[(Uuid, i32)], refund: bool) -> sqlx::Result<u64> {
    let (ids, deliveries): (Vec<Uuid>, Vec<i32>) = runs.iter().copied().unzip();
    let done = sqlx::query(
        "UPDATE jobs j SET status = $3, delivery = j.delivery + 1, delivered_at = NULL,
                attempts = greatest(j.attempts - CASE WHEN $5 THEN 1 ELSE 0 END, 0), run_at = now(),
                lease_expires_at = NULL, last_error = 'handed back by its worker', updated_at = now()
         FROM unnest($1::uuid[], $2::int[]) AS t(id, delivery)
         WHERE j.id = t.id AND j.delivery = t.delivery AND j.status = $4",
    )
    .bind(&ids)
    .bind(&deliveries)
    .bind(JobState::Queued.as_str())
    .bind(JobState::Running.as_str())
    .bind(refund)
    .execute(pg)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes finished rows older than `retention`, `batch` rows per statement, so the table
/// stays bounded without long locks. Returns how many were deleted.
pub async fn prune(pg: &PgPool, retention: Duration, batch: i64) -> sqlx::Result<u64> {
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM jobs WHERE id IN (
                 SELECT id FROM jobs WHERE finished_at < now() - make_interval(secs => $1)
                 ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(retention.as_secs_f64())
        .bind(batch)
        .execute(pg)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
    }
}

/// A ledger row as shown by `GET /v1/jobs/{id}` and `callcoach jobs show`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRow {
    /// Ledger id.
    pub id: Uuid,
    /// Job kind (`analyze_call`, …).
    pub kind: String,
    /// Lane it runs on.
    pub lane: Lane,
    /// Current state.
    pub status: JobState,
    /// Arguments.
    pub payload: serde_json::Value,
    /// Attempts consumed so far.
    pub attempts: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Current delivery number.
    pub delivery: i32,
    /// Last error message, if any.
    pub last_error: Option<String>,
    /// Job output, once succeeded.
    pub result: Option<serde_json::Value>,
    /// When the job was accepted.
    pub enqueued_at: DateTime<Utc>,
    /// When the current delivery reached Redis (None: waiting for the relay).
    pub delivered_at: Option<DateTime<Utc>>,
    /// When the last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the row last changed state.
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, kind, lane, status, payload, attempts, max_attempts, delivery, last_error, result,
     enqueued_at, delivered_at, started_at, finished_at, updated_at";

/// Reads one ledger row.
pub async fn job(pg: &PgPool, id: Uuid) -> sqlx::Result<Option<JobRow>> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pg)
        .await?;
    row.map(job_row).transpose()
}

/// Which ledger rows [`jobs`] lists; every filter is optional.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    /// Only rows in this state (index jobs_status_enqueued_idx).
    pub state: Option<JobState>,
    /// Only rows of this kind (index jobs_kind_enqueued_idx).
    pub kind: Option<String>,
    /// Only jobs about this call, any kind (index jobs_call_idx).
    pub call_id: Option<Uuid>,
}

/// The newest ledger rows matching `filter`. The statement carries only the filters given
/// (each bound as a parameter) and is planned for their values, so each mix is planned on the
/// index that serves it.
pub async fn jobs(pg: &PgPool, filter: &JobFilter, limit: i64) -> sqlx::Result<Vec<JobRow>> {
    // Not prepared: planned for the values given, so a rare kind or state gets its index
    // (a cached generic plan assumes average selectivity and scans by date instead).
    let rows = jobs_query(filter, limit)
        .build()
        .persistent(false)
        .fetch_all(pg)
        .await?;
    rows.into_iter().map(job_row).collect()
}

/// The statement of [`jobs`] with its parameters bound in order: state, kind, call, limit
/// (absent filters bind nothing).
pub fn jobs_query(filter: &JobFilter, limit: i64) -> sqlx::QueryBuilder<sqlx::Postgres> {
    let mut q = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM jobs WHERE true"));
    if let Some(state) = filter.state {
        q.push(" AND status = ").push_bind(state.as_str());
    }
    if let Some(kind) = &filter.kind {
        q.push(" AND kind = ").push_bind(kind.clone());
    }
    if let Some(call) = filter.call_id {
        q.push(" AND payload ? 'call_id' AND payload ->> 'call_id' = ")
            .push_bind(call.to_string());
    }
    q.push(" ORDER BY enqueued_at DESC LIMIT ").push_bind(limit);
    q
}

fn decode<T: FromStr<Err = String>>(row: &sqlx::postgres::PgRow, col: &str) -> sqlx::Result<T> {
    let raw: String = row.try_get(col)?;
    raw.parse().map_err(|e: String| sqlx::Error::ColumnDecode {
        index: col.to_string(),
        source: e.into(),
    })
}

fn job_row(r: sqlx::postgres::PgRow) -> sqlx::Result<JobRow> {
    Ok(JobRow {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        lane: decode(&r, "lane")?,
        status: decode(&r, "status")?,
        payload: r.try_get("payload")?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        delivery: r.try_get("delivery")?,
        last_error: r.try_get("last_error")?,
        result: r.try_get("result")?,
        enqueued_at: r.try_get("enqueued_at")?,
        delivered_at: r.try_get("delivered_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, state.as_str());
        }
        assert!("done".parse::<JobState>().unwrap_err().contains("done"));
    }

    #[test]
    fn only_finished_states_are_terminal() {
        let terminal: Vec<_> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        );
    }
}
