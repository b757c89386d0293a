//! The producer side: [`Queue`] records jobs in the ledger (the source of truth, an outbox)
//! and pushes their first delivery to the lane's Redis queue.
//!
//! `enqueue` inserts the row already marked delivered and pushes at once; if the push fails
//! (Redis down) the row is marked undelivered and the relay pushes it later, and if the
//! producer dies in between, the rescuer finds the delivery missing from Redis and re-issues
//! it. So accepting a job never depends on Redis. `enqueue_tx` records the row inside the
//! caller's transaction (it commits or rolls back with the caller's data) and leaves the push
//! to the relay, since no worker may see the job before the transaction commits.
//!
//! This module knows no job kinds: a [`NewJob`] carries the kind's name, and the queue only
//! accepts names in the job registry it was built with.

use crate::{
    delivery::{self, Envelope, Lane, Push},
    ledger::{self, NewRow},
    telemetry::names,
};
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use std::sync::Arc;
use uuid::Uuid;

/// A job to enqueue: kind, arguments and options. Built by `Job::to_job`.
#[derive(Clone, Debug)]
pub struct NewJob {
    kind: &'static str,
    payload: serde_json::Value,
    lane: Lane,
    max_attempts: Option<i32>,
    dedup_key: Option<String>,
    run_at: Option<DateTime<Utc>>,
}

impl NewJob {
    /// A job of `kind` with its default lane and attempt budget (`None`: the configured one).
    pub fn new(
        kind: &'static str,
        payload: serde_json::Value,
        lane: Lane,
        max_attempts: Option<i32>,
    ) -> Self {
        Self {
            kind,
            payload,
            lane,
            max_attempts,
            dedup_key: None,
            run_at: None,
        }
    }

    /// Deduplicates by `key`: enqueueing the same key again returns the first job.
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// Runs on another lane than the kind's default (e.g. a re-analysis in the background).
    pub fn on_lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }

    /// Does not start before `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// Errors of the producer side.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The ledger could not be written; nothing was accepted.
    #[error("job ledger unavailable: {0}")]
    Ledger(#[from] sqlx::Error),
    /// The payload could not be serialized.
    #[error("invalid job payload: {0}")]
    Payload(#[from] serde_json::Error),
    /// The kind is not in the job registry, so no worker could run it.
    #[error("unknown job kind {0:?}: it is not in the job registry")]
    UnknownKind(String),
}

/// Result of an enqueue.
#[derive(Clone, Debug, Serialize)]
pub struct Enqueued {
    /// Ledger id of the job.
    pub job_id: Uuid,
    /// False when the dedup key matched an existing job, which is returned instead.
    pub created: bool,
    /// Whether the job already reached Redis (false: the relay will deliver it).
    pub delivered: bool,
}

/// Producer handle: writes the ledger and pushes first deliveries. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pg: PgPool,
    redis: ConnectionManager,
    max_attempts: i32,
    kinds: Arc<[&'static str]>,
}

impl Queue {
    /// A queue over the ledger database and the delivery connection that accepts `kinds`
    /// (the registry's names) with `max_attempts` as the default budget.
    pub fn new(
        pg: PgPool,
        redis: ConnectionManager,
        max_attempts: i32,
        kinds: Vec<&'static str>,
    ) -> Self {
        Self {
            pg,
            redis,
            max_attempts,
            kinds: kinds.into(),
        }
    }

    fn row(&self, job: NewJob) -> Result<(NewRow, Lane), QueueError> {
        if !self.kinds.contains(&job.kind) {
            return Err(QueueError::UnknownKind(job.kind.to_string()));
        }
        let lane = job.lane;
        let row = NewRow {
            id: Uuid::now_v7(),
            kind: job.kind,
            payload: job.payload,
            lane,
            max_attempts: job.max_attempts.unwrap_or(self.max_attempts),
            dedup_key: job.dedup_key,
            run_at: job.run_at.unwrap_or_else(Utc::now),
        };
        Ok((row, lane))
    }

    /// Records a job in the ledger and delivers it at once (or leaves it to the relay).
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        let (row, _) = self.row(job)?;
        let inserted = ledger::insert(&self.pg, std::slice::from_ref(&row), true).await?;
        if inserted.is_empty() {
            return self.existing(&self.pg, &row).await;
        }
        metrics::counter!(names::JOBS_ENQUEUED, "kind" => row.kind).increment(1);
        let delivered = self.push(vec![row.clone()]).await;
        Ok(Enqueued {
            job_id: row.id,
            created: true,
            delivered,
        })
    }

    /// Records a job inside the caller's transaction: it exists only if that transaction
    /// commits. The relay delivers it after the commit.
    pub async fn enqueue_tx(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        job: NewJob,
    ) -> Result<Enqueued, QueueError> {
        let (row, _) = self.row(job)?;
        let inserted = ledger::insert(&mut **tx, std::slice::from_ref(&row), false).await?;
        if inserted.is_empty() {
            return self.existing(&mut **tx, &row).await;
        }
        metrics::counter!(names::JOBS_ENQUEUED, "kind" => row.kind).increment(1);
        Ok(Enqueued {
            job_id: row.id,
            created: true,
            delivered: false,
        })
    }

    /// Records many jobs with one ledger statement and pushes them with one batch per lane.
    /// Jobs whose dedup key exists are skipped. Returns the ids of the jobs created, in order.
    pub async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Uuid>, QueueError> {
        let rows = jobs
            .into_iter()
            .map(|j| self.row(j).map(|(row, _)| row))
            .collect::<Result<Vec<_>, _>>()?;
        let inserted = ledger::insert(&self.pg, &rows, true).await?;
        let created: Vec<NewRow> = if inserted.len() == rows.len() {
            rows
        } else {
            let inserted: std::collections::HashSet<Uuid> = inserted.iter().copied().collect();
            rows.into_iter()
                .filter(|r| inserted.contains(&r.id))
                .collect()
        };
        for row in &created {
            metrics::counter!(names::JOBS_ENQUEUED, "kind" => row.kind).increment(1);
        }
        let ids = created.iter().map(|r| r.id).collect();
        self.push(created).await;
        Ok(ids)
    }

    async fn existing<'e>(
        &self,
        exec: impl sqlx::Executor<'e, Database = Postgres>,
        row: &NewRow,
    ) -> Result<Enqueued, QueueError> {
        let key = row.dedup_key.as_deref().unwrap_or_default();
        let job_id = ledger::by_dedup_key(exec, key).await?.ok_or_else(|| {
            sqlx::Error::Protocol(format!("dedup key {key:?} conflicted but no job holds it"))
        })?;
        Ok(Enqueued {
            job_id,
            created: false,
            delivered: true,
        })
    }

    /// Pushes first deliveries; on failure marks them undelivered for the relay. Returns
    /// whether they reached Redis.
    async fn push(&self, rows: Vec<NewRow>) -> bool {
        let now = Utc::now();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let pushes = rows
            .into_iter()
            .map(|r| Push {
                lane: r.lane,
                delay: (r.run_at - now).to_std().unwrap_or_default(),
                envelope: Envelope {
                    job_id: r.id,
                    delivery: 0,
                    kind: r.kind.to_string(),
                    args: r.payload,
                },
            })
            .collect();
        let Err(e) = delivery::push(&self.redis, pushes).await else {
            return true;
        };
        tracing::warn!(error = %e, jobs = ids.len(), "push to redis failed; the relay will deliver");
        if let Err(e) = ledger::mark_undelivered(&self.pg, &ids).await {
            // The rescuer will find these deliveries missing from Redis and re-issue them.
            tracing::warn!(error = %e, "could not mark jobs undelivered");
        }
        false
    }
}
