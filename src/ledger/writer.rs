//! Grouped ledger statements for the hot paths: claiming a delivery, recording how its run
//! ended, and reading a job's row (`GET /v1/jobs/{id}`, which clients poll). Callers send a
//! request and await its reply; one task per kind of request takes every request that is
//! waiting and runs one statement for all of them (`UPDATE … FROM unnest(…)`, or
//! `SELECT … WHERE id = ANY(…)` for reads). Under
//! light load a request runs alone (no added latency); under heavy load hundreds share one
//! statement. A reply is sent only after its statement committed, so a state is durable
//! before a job is acknowledged.
//!
//! Claims, outcomes and reads have a task each, so none waits for another's statement. A read
//! sees every write committed before its statement starts, as a lone `SELECT` would.
//! Claims commit with `synchronous_commit = off`: a claim lost in a Postgres crash only
//! returns its row to `queued`, and the run's outcome is then refused by the guard (the row
//! is not running) and the delivery re-issued, so nothing is lost or applied twice. Outcomes
//! are durable (fsync) before the job is acknowledged.
//!
//! The writer tasks are supervised: if one ever panics, it is logged and restarted on the
//! same request channel, so callers never see a silently stopped writer.

use super::{CLAIMABLE, COLUMNS, JobRow, JobState, job_row, names};
use crate::{delivery::Lane, supervise, telemetry::names as metric};
use serde_json::Value;
use sqlx::{PgPool, Row};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

/// Most requests written by one statement.
const MAX_BATCH: usize = 500;

/// A successful claim: this worker runs the delivery.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Claimed {
    /// Attempt number of this run (1-based).
    pub attempt: i32,
    /// Attempt budget of the job.
    pub max_attempts: i32,
    /// The job's lane.
    pub lane: Lane,
    /// Seconds from when the job was due (`run_at`) to this claim.
    pub queue_wait_secs: f64,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done; the job's output.
    Succeeded(Option<Value>),
    /// Failed for good.
    Failed(String),
    /// Stopped without error.
    Cancelled(String),
    /// Run again after a delay, as a new delivery; `refund` gives the attempt back (snooze).
    Again {
        /// Queued (retry) or snoozed.
        state: JobState,
        /// Delay before the next delivery is due.
        after: Duration,
        /// Why.
        reason: String,
        /// Whether the attempt is refunded.
        refund: bool,
    },
}

type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

/// One caller's request: which delivery, what to write, where to answer.
struct Request<P, R> {
    id: Uuid,
    delivery: i32,
    payload: P,
    reply: Reply<R>,
}

type ClaimRequest = Request<(), Option<Claimed>>;
type FinishRequest = Request<Outcome, bool>;
type ReadRequest = Request<(), Option<JobRow>>;

/// Why a grouped statement failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("ledger statement failed: {message}")]
pub struct LedgerError {
    message: String,
    unavailable: bool,
}

impl LedgerError {
    fn internal(message: &str) -> Self {
        Self {
            message: message.into(),
            unavailable: false,
        }
    }

    /// Whether Postgres was unreachable or not accepting work ([`crate::db::unavailable`]):
    /// worth retrying later, not a fault of the request.
    pub fn unavailable(&self) -> bool {
        self.unavailable
    }
}

impl From<&sqlx::Error> for LedgerError {
    fn from(e: &sqlx::Error) -> Self {
        Self {
            message: e.to_string(),
            unavailable: crate::db::unavailable(e),
        }
    }
}

/// Handle to the writer and reader tasks. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    claims: mpsc::UnboundedSender<ClaimRequest>,
    finishes: mpsc::UnboundedSender<FinishRequest>,
    reads: mpsc::UnboundedSender<ReadRequest>,
}

/// Settings of the claims the writer makes.
#[derive(Clone, Debug)]
pub struct ClaimSettings {
    /// Name of this worker process, stored in `claimed_by`.
    pub worker: String,
    /// Lease of a claimed run; the worker renews it while the run lasts.
    pub lease: Duration,
}

impl Ledger {
    /// Starts the (supervised) writer and reader tasks on the current tokio runtime.
    pub fn start(pg: PgPool, settings: ClaimSettings) -> Self {
        let settings = Arc::new(settings);
        let claims = {
            let pg = pg.clone();
            spawn_writer("ledger claim writer", move |batch| {
                let (pg, settings) = (pg.clone(), settings.clone());
                async move { write_claims(&pg, &settings, batch).await }
            })
        };
        let finishes = {
            let pg = pg.clone();
            spawn_writer("ledger outcome writer", move |batch| {
                let pg = pg.clone();
                async move { write_finishes(&pg, batch).await }
            })
        };
        let reads = spawn_writer("ledger reader", move |batch| {
            let pg = pg.clone();
            async move { read_jobs(&pg, batch).await }
        });
        Self {
            claims,
            finishes,
            reads,
        }
    }

    /// Reads one job's ledger row, in one statement with every other read waiting at the
    /// same time. `None` when there is no such job.
    pub async fn job(&self, id: Uuid) -> Result<Option<JobRow>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        Self::send(
            &self.reads,
            Request {
                id,
                delivery: 0,
                payload: (),
                reply,
            },
        )?;
        Self::wait(answer).await
    }

    /// Claims a delivery: marks the job running under a lease and counts an attempt. `None`
    /// when the delivery is stale (job finished, cancelled, running elsewhere, or superseded
    /// by a newer delivery). Of several claims of one delivery, exactly one wins.
    pub async fn claim(&self, id: Uuid, delivery: i32) -> Result<Option<Claimed>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        Self::send(
            &self.claims,
            Request {
                id,
                delivery,
                payload: (),
                reply,
            },
        )?;
        Self::wait(answer).await
    }

    /// Records how a run ended. Returns false when the outcome was discarded because the
    /// delivery is no longer the running one (rescued, replayed or handed back meanwhile).
    pub async fn finish(
        &self,
        id: Uuid,
        delivery: i32,
        outcome: Outcome,
    ) -> Result<bool, LedgerError> {
        let (reply, answer) = oneshot::channel();
        Self::send(
            &self.finishes,
            Request {
                id,
                delivery,
                payload: outcome,
                reply,
            },
        )?;
        Self::wait(answer).await
    }

    async fn wait<T>(answer: oneshot::Receiver<Result<T, LedgerError>>) -> Result<T, LedgerError> {
        answer
            .await
            .map_err(|_| LedgerError::internal("the writer dropped the request"))?
    }

    fn send<P, R>(
        to: &mpsc::UnboundedSender<Request<P, R>>,
        request: Request<P, R>,
    ) -> Result<(), LedgerError> {
        to.send(request)
            .map_err(|_| LedgerError::internal("the writer is not running"))
    }
}

/// Starts a supervised task that hands every waiting request (up to [`MAX_BATCH`]) to
/// `write` as one batch, and returns the channel callers send to.
fn spawn_writer<P, R, F, Fut>(name: &'static str, write: F) -> mpsc::UnboundedSender<Request<P, R>>
where
    P: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<Request<P, R>>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(rx));
    supervise::spawn(name, move || {
        let (rx, write) = (rx.clone(), write.clone());
        async move {
            let mut rx = rx.lock().await;
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                write(std::mem::take(&mut batch)).await;
                metrics::counter!(metric::LEDGER_BATCHES).increment(1);
            }
        }
    });
    tx
}

/// A batch of requests of one kind.
type Batch<P, R> = Vec<Request<P, R>>;

/// Splits requests for the same (id, delivery) so that only the first goes to the database;
/// the rest are the losers.
fn first_per_delivery<P, R>(requests: Batch<P, R>) -> (Batch<P, R>, Batch<P, R>) {
    let mut seen = HashSet::new();
    requests
        .into_iter()
        .partition(|r| seen.insert((r.id, r.delivery)))
}

async fn write_claims(pg: &PgPool, settings: &ClaimSettings, requests: Vec<ClaimRequest>) {
    let (requests, losers) = first_per_delivery(requests);
    for loser in losers {
        let _ = loser.reply.send(Ok(None));
    }
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    let deliveries: Vec<i32> = requests.iter().map(|r| r.delivery).collect();
    let rows = claim_rows(pg, settings, &ids, &deliveries).await;
    match rows {
        Ok(rows) => {
            let claimed: HashMap<(Uuid, i32), Claimed> = rows
                .iter()
                .map(|r| {
                    let claim = Claimed {
                        attempt: r.get(2),
                        max_attempts: r.get(3),
                        // The table's CHECK allows only lane names.
                        lane: super::decode(r, "lane").unwrap_or(Lane::Interactive),
                        queue_wait_secs: r.get("queue_wait"),
                    };
                    ((r.get(0), r.get(1)), claim)
                })
                .collect();
            for r in requests {
                let _ = r.reply.send(Ok(claimed.get(&(r.id, r.delivery)).copied()));
            }
        }
        Err(e) => {
            for r in requests {
                let _ = r.reply.send(Err(LedgerError::from(&e)));
            }
        }
    }
}

/// Answers every waiting read with one `SELECT … WHERE id = ANY(…)` (primary-key lookups).
async fn read_jobs(pg: &PgPool, requests: Vec<ReadRequest>) {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ANY($1)");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .fetch_all(pg)
        .await
        .and_then(|rows| {
            rows.into_iter()
                .map(job_row)
                .collect::<sqlx::Result<Vec<_>>>()
        });
    match rows {
        Ok(rows) => {
            let by_id: HashMap<Uuid, JobRow> = rows.into_iter().map(|r| (r.id, r)).collect();
            for r in requests {
                let _ = r.reply.send(Ok(by_id.get(&r.id).cloned()));
            }
        }
        Err(e) => {
            let error = LedgerError::from(&e);
            for r in requests {
                let _ = r.reply.send(Err(error.clone()));
            }
        }
    }
}

/// The grouped claim: one statement in a transaction that does not wait for fsync (see the
/// module documentation for why that is safe).
async fn claim_rows(
    pg: &PgPool,
    settings: &ClaimSettings,
    ids: &[Uuid],
    deliveries: &[i32],
) -> sqlx::Result<Vec<sqlx::postgres::PgRow>> {
    let mut tx = pg.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit TO off")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(
        "UPDATE jobs j SET status = $3, attempts = j.attempts + 1, started_at = now(),
                lease_expires_at = now() + make_interval(secs => $5), claimed_by = $6, updated_at = now()
         FROM unnest($1::uuid[], $2::int[]) AS t(id, delivery)
         WHERE j.id = t.id AND j.delivery = t.delivery AND j.status = ANY($4)
         RETURNING j.id, t.delivery, j.attempts, j.max_attempts, j.lane,
                   GREATEST(0, extract(epoch FROM now() - j.run_at))::float8 AS queue_wait",
    )
    .bind(ids)
    .bind(deliveries)
    .bind(JobState::Running.as_str())
    .bind(names(&CLAIMABLE))
    .bind(settings.lease.as_secs_f64())
    .bind(&settings.worker)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// One outcome as the columns of the grouped update.
struct FinishRow {
    state: &'static str,
    result: Option<Value>,
    error: Option<String>,
    again: bool,
    refund: bool,
    delay_secs: f64,
}

impl From<Outcome> for FinishRow {
    fn from(outcome: Outcome) -> Self {
        let done = |state: JobState, result, error| FinishRow {
            state: state.as_str(),
            result,
            error,
            again: false,
            refund: false,
            delay_secs: 0.0,
        };
        match outcome {
            Outcome::Succeeded(result) => done(JobState::Succeeded, result, None),
            Outcome::Failed(e) => done(JobState::Failed, None, Some(e)),
            Outcome::Cancelled(e) => done(JobState::Cancelled, None, Some(e)),
            Outcome::Again {
                state,
                after,
                reason,
                refund,
            } => FinishRow {
                state: state.as_str(),
                result: None,
                error: Some(reason),
                again: true,
                refund,
                delay_secs: after.as_secs_f64(),
            },
        }
    }
}

async fn write_finishes(pg: &PgPool, requests: Vec<FinishRequest>) {
    let (requests, losers) = first_per_delivery(requests);
    for loser in losers {
        let _ = loser.reply.send(Ok(false));
    }
    let n = requests.len();
    let (mut ids, mut deliveries, mut rows, mut replies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in requests {
        ids.push(r.id);
        deliveries.push(r.delivery);
        rows.push(FinishRow::from(r.payload));
        replies.push(r.reply);
    }
    let applied = sqlx::query_as::<_, (Uuid, i32)>(
        "UPDATE jobs j SET status = t.state, result = t.result, last_error = t.error,
                delivery = j.delivery + CASE WHEN t.again THEN 1 ELSE 0 END,
                delivered_at = CASE WHEN t.again THEN NULL ELSE j.delivered_at END,
                attempts = j.attempts - CASE WHEN t.refund THEN 1 ELSE 0 END,
                run_at = CASE WHEN t.again THEN now() + make_interval(secs => t.delay) ELSE j.run_at END,
                finished_at = CASE WHEN t.again THEN NULL ELSE now() END,
                lease_expires_at = NULL, updated_at = now()
         FROM unnest($1::uuid[], $2::int[], $3::text[], $4::jsonb[], $5::text[], $6::bool[],
                     $7::bool[], $8::float8[])
              AS t(id, delivery, state, result, error, again, refund, delay)
         WHERE j.id = t.id AND j.delivery = t.delivery AND j.status = $9
         RETURNING j.id, t.delivery",
    )
    .bind(&ids)
    .bind(&deliveries)
    .bind(rows.iter().map(|r| r.state).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.result.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.error.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.again).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.refund).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.delay_secs).collect::<Vec<_>>())
    .bind(JobState::Running.as_str())
    .fetch_all(pg)
    .await;
    match applied {
        Ok(applied) => {
            let applied: HashSet<(Uuid, i32)> = applied.into_iter().collect();
            for ((id, delivery), reply) in ids.into_iter().zip(deliveries).zip(replies) {
                let _ = reply.send(Ok(applied.contains(&(id, delivery))));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(LedgerError::from(&e)));
            }
        }
    }
}

/// Extends the leases of runs this worker holds, in one statement. Returns the runs whose
/// lease is no longer ours (rescued, replayed or handed back): their work must stop.
pub async fn renew_leases(
    pg: &PgPool,
    runs: &[(Uuid, i32)],
    lease: Duration,
) -> sqlx::Result<Vec<(Uuid, i32)>> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, deliveries): (Vec<Uuid>, Vec<i32>) = runs.iter().copied().unzip();
    let kept: HashSet<Uuid> = sqlx::query_scalar::<_, Uuid>(
        "UPDATE jobs j SET lease_expires_at = now() + make_interval(secs => $3)
         FROM unnest($1::uuid[], $2::int[]) AS t(id, delivery)
         WHERE j.id = t.id AND j.delivery = t.delivery AND j.status = $4
         RETURNING j.id",
    )
    .bind(&ids)
    .bind(&deliveries)
    .bind(lease.as_secs_f64())
    .bind(JobState::Running.as_str())
    .fetch_all(pg)
    .await?
    .into_iter()
    .collect();
    Ok(runs
        .iter()
        .copied()
        .filter(|(id, _)| !kept.contains(id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_deliveries_have_one_first() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let request = |id, delivery, payload: u8| Request::<u8, ()> {
            id,
            delivery,
            payload,
            reply: oneshot::channel().0,
        };
        let batch = vec![
            request(a, 0, 1),
            request(a, 0, 2),
            request(a, 1, 3),
            request(b, 0, 4),
        ];
        let (firsts, dups) = first_per_delivery(batch);
        let payloads = |rs: &[Request<u8, ()>]| rs.iter().map(|r| r.payload).collect::<Vec<_>>();
        assert_eq!(payloads(&firsts), [1, 3, 4]);
        assert_eq!(payloads(&dups), [2]);
    }
}
