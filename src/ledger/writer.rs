//! Grouped ledger writes for the hot path of every job: claiming a delivery and recording how
//! its run ended. Callers send a request and await its reply; one writer task takes every
//! request that is waiting and runs one `UPDATE … FROM unnest(…)` per kind of request. Under
//! light load a request runs alone (no added latency); under heavy load hundreds share one
//! statement. A reply is sent only after its statement committed, so a state is durable
//! before a job is acknowledged.
//!
//! Claims and outcomes have a writer task each, so neither waits for the other's commit.
//! Claims commit with `synchronous_commit = off`: a claim lost in a Postgres crash only
//! returns its row to `queued`, and the run's outcome is then refused by the guard (the row
//! is not running) and the delivery re-issued, so nothing is lost or applied twice. Outcomes
//! are durable (fsync) before the job is acknowledged.
//!
//! The writer tasks are supervised: if one ever panics, it is logged and restarted on the
//! same request channel, so callers never see a silently stopped writer.

use super::{CLAIMABLE, JobState, names};
use crate::{supervise, telemetry::names as metric};
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// Attempt number of this run (1-based).
    pub attempt: i32,
    /// Attempt budget of the job.
    pub max_attempts: i32,
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

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Request {
    Claim {
        id: Uuid,
        delivery: i32,
        reply: Reply<Option<Claimed>>,
    },
    Finish {
        id: Uuid,
        delivery: i32,
        outcome: Outcome,
        reply: Reply<bool>,
    },
}

/// Why a grouped write failed.
#[derive(Debug, thiserror::Error)]
#[error("ledger write failed: {0}")]
pub struct LedgerError(String);

/// Handle to the writer tasks. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    claims: mpsc::UnboundedSender<Request>,
    finishes: mpsc::UnboundedSender<Request>,
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
    /// Starts the (supervised) writer tasks on the current tokio runtime.
    pub fn start(pg: PgPool, settings: ClaimSettings) -> Self {
        let settings = Arc::new(settings);
        let start = |name| {
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(Mutex::new(rx));
            let (pg, settings) = (pg.clone(), settings.clone());
            supervise::spawn(name, move || {
                writer(pg.clone(), rx.clone(), settings.clone())
            });
            tx
        };
        Self {
            claims: start("ledger claim writer"),
            finishes: start("ledger outcome writer"),
        }
    }

    /// Claims a delivery: marks the job running under a lease and counts an attempt. `None`
    /// when the delivery is stale (job finished, cancelled, running elsewhere, or superseded
    /// by a newer delivery). Of several claims of one delivery, exactly one wins.
    pub async fn claim(&self, id: Uuid, delivery: i32) -> Result<Option<Claimed>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        Self::send(
            &self.claims,
            Request::Claim {
                id,
                delivery,
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
            Request::Finish {
                id,
                delivery,
                outcome,
                reply,
            },
        )?;
        Self::wait(answer).await
    }

    async fn wait<T>(answer: oneshot::Receiver<Result<T, String>>) -> Result<T, LedgerError> {
        answer
            .await
            .map_err(|_| LedgerError("the writer dropped the request".into()))?
            .map_err(LedgerError)
    }

    fn send(to: &mpsc::UnboundedSender<Request>, request: Request) -> Result<(), LedgerError> {
        to.send(request)
            .map_err(|_| LedgerError("the writer is not running".into()))
    }
}

async fn writer(
    pg: PgPool,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>,
    claims: Arc<ClaimSettings>,
) {
    let mut rx = rx.lock().await;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (claim_requests, finishes): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .partition(|r| matches!(r, Request::Claim { .. }));
        if !claim_requests.is_empty() {
            write_claims(&pg, &claims, claim_requests).await;
        }
        if !finishes.is_empty() {
            write_finishes(&pg, finishes).await;
        }
        metrics::counter!(metric::LEDGER_BATCHES).increment(1);
    }
}

/// Splits requests for the same (id, delivery) so that only the first goes to the database;
/// the rest are answered as losers.
fn first_per_delivery<T>(requests: Vec<(Uuid, i32, T)>) -> (Vec<(Uuid, i32, T)>, Vec<T>) {
    let mut seen = HashSet::new();
    let mut firsts = Vec::with_capacity(requests.len());
    let mut duplicates = Vec::new();
    for (id, delivery, item) in requests {
        if seen.insert((id, delivery)) {
            firsts.push((id, delivery, item));
        } else {
            duplicates.push(item);
        }
    }
    (firsts, duplicates)
}

async fn write_claims(pg: &PgPool, settings: &ClaimSettings, requests: Vec<Request>) {
    let requests = requests
        .into_iter()
        .filter_map(|r| match r {
            Request::Claim {
                id,
                delivery,
                reply,
            } => Some((id, delivery, reply)),
            Request::Finish { .. } => None,
        })
        .collect();
    let (requests, losers) = first_per_delivery(requests);
    for reply in losers {
        let _ = reply.send(Ok(None));
    }
    let ids: Vec<Uuid> = requests.iter().map(|r| r.0).collect();
    let deliveries: Vec<i32> = requests.iter().map(|r| r.1).collect();
    let rows = claim_rows(pg, settings, &ids, &deliveries).await;
    match rows {
        Ok(rows) => {
            let claimed: HashMap<(Uuid, i32), Claimed> = rows
                .iter()
                .map(|r| {
                    let claim = Claimed {
                        attempt: r.get(2),
                        max_attempts: r.get(3),
                    };
                    ((r.get(0), r.get(1)), claim)
                })
                .collect();
            for (id, delivery, reply) in requests {
                let _ = reply.send(Ok(claimed.get(&(id, delivery)).copied()));
            }
        }
        Err(e) => {
            for (_, _, reply) in requests {
                let _ = reply.send(Err(e.to_string()));
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
         RETURNING j.id, t.delivery, j.attempts, j.max_attempts",
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

async fn write_finishes(pg: &PgPool, requests: Vec<Request>) {
    let requests = requests
        .into_iter()
        .filter_map(|r| match r {
            Request::Finish {
                id,
                delivery,
                outcome,
                reply,
            } => Some((id, delivery, (FinishRow::from(outcome), reply))),
            Request::Claim { .. } => None,
        })
        .collect();
    let (requests, losers) = first_per_delivery(requests);
    for (_, reply) in losers {
        let _ = reply.send(Ok(false));
    }
    let ids: Vec<Uuid> = requests.iter().map(|r| r.0).collect();
    let deliveries: Vec<i32> = requests.iter().map(|r| r.1).collect();
    let rows: Vec<&FinishRow> = requests.iter().map(|r| &r.2.0).collect();
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
            for (id, delivery, (_, reply)) in requests {
                let _ = reply.send(Ok(applied.contains(&(id, delivery))));
            }
        }
        Err(e) => {
            for (_, _, (_, reply)) in requests {
                let _ = reply.send(Err(e.to_string()));
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
        let (firsts, dups) = first_per_delivery(vec![(a, 0, 1), (a, 0, 2), (a, 1, 3), (b, 0, 4)]);
        assert_eq!(firsts, vec![(a, 0, 1), (a, 1, 3), (b, 0, 4)]);
        assert_eq!(dups, vec![2]);
    }
}
