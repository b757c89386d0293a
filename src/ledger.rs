//! Grouped ledger writes for the hot path of every job: claiming a delivery and recording its
//! end. Callers send a request and await its reply; one writer task takes every request that
//! is waiting and runs one `UPDATE … FROM unnest(…)` per kind of request. Under light load a
//! request runs alone (no added latency); under heavy load hundreds share one statement. A
//! reply is sent only after its statement committed, so a status is durable before a job is
//! acknowledged.

use serde_json::Value;
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most requests written by one statement.
const MAX_BATCH: usize = 500;

/// A terminal status to record.
#[derive(Debug)]
pub struct Finish {
    /// Ledger id.
    pub id: Uuid,
    /// succeeded, failed or cancelled.
    pub status: &'static str,
    /// Job output.
    pub result: Option<Value>,
    /// Error message.
    pub error: Option<String>,
}

enum Request {
    Claim {
        id: Uuid,
        delivery: i32,
        reply: oneshot::Sender<Result<Option<(i32, i32)>, String>>,
    },
    Finish {
        finish: Finish,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Why a grouped write failed.
#[derive(Debug, thiserror::Error)]
#[error("ledger write failed: {0}")]
pub struct LedgerError(String);

/// Handle to the writer task. Cheap to clone; the task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Request>,
}

impl Ledger {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(pg: PgPool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pg, rx));
        Self { tx }
    }

    /// Claims a delivery: marks the job running and counts an attempt. Returns the attempt
    /// number and budget, or `None` when the delivery is stale (job finished, cancelled, or
    /// superseded by a newer delivery).
    pub async fn claim(&self, id: Uuid, delivery: i32) -> Result<Option<(i32, i32)>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Claim {
            id,
            delivery,
            reply,
        })?;
        answer
            .await
            .map_err(|_| LedgerError("writer stopped".into()))?
            .map_err(LedgerError)
    }

    /// Records a terminal status.
    pub async fn finish(&self, finish: Finish) -> Result<(), LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Finish { finish, reply })?;
        answer
            .await
            .map_err(|_| LedgerError("writer stopped".into()))?
            .map_err(LedgerError)
    }

    fn send(&self, request: Request) -> Result<(), LedgerError> {
        self.tx
            .send(request)
            .map_err(|_| LedgerError("writer stopped".into()))
    }
}

async fn writer(pg: PgPool, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (claims, finishes): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .partition(|r| matches!(r, Request::Claim { .. }));
        if !claims.is_empty() {
            write_claims(&pg, claims).await;
        }
        if !finishes.is_empty() {
            write_finishes(&pg, finishes).await;
        }
    }
}

async fn write_claims(pg: &PgPool, requests: Vec<Request>) {
    let mut ids = Vec::with_capacity(requests.len());
    let mut deliveries = Vec::with_capacity(requests.len());
    let mut replies = Vec::with_capacity(requests.len());
    for r in requests {
        if let Request::Claim {
            id,
            delivery,
            reply,
        } = r
        {
            ids.push(id);
            deliveries.push(delivery);
            replies.push((id, reply));
        }
    }
    let rows = sqlx::query(
        "UPDATE jobs j SET status = 'running', attempts = j.attempts + 1, started_at = now(), updated_at = now()
         FROM unnest($1::uuid[], $2::int[]) AS t(id, delivery)
         WHERE j.id = t.id AND j.delivery = t.delivery AND j.status IN ('queued', 'running', 'snoozed')
         RETURNING j.id, j.attempts, j.max_attempts",
    )
    .bind(&ids)
    .bind(&deliveries)
    .fetch_all(pg)
    .await;
    match rows {
        Ok(rows) => {
            let claimed: HashMap<Uuid, (i32, i32)> = rows
                .iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect();
            for (id, reply) in replies {
                let _ = reply.send(Ok(claimed.get(&id).copied()));
            }
        }
        Err(e) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }
}

async fn write_finishes(pg: &PgPool, requests: Vec<Request>) {
    let n = requests.len();
    let (mut ids, mut statuses, mut results, mut errors, mut replies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in requests {
        if let Request::Finish { finish, reply } = r {
            ids.push(finish.id);
            statuses.push(finish.status);
            results.push(finish.result);
            errors.push(finish.error);
            replies.push(reply);
        }
    }
    let written = sqlx::query(
        "UPDATE jobs j SET status = t.status, result = t.result, last_error = t.error,
                finished_at = now(), updated_at = now()
         FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[]) AS t(id, status, result, error)
         WHERE j.id = t.id",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&results)
    .bind(&errors)
    .execute(pg)
    .await
    .map(|_| ())
    .map_err(|e| e.to_string());
    for reply in replies {
        let _ = reply.send(written.clone());
    }
}
