//! The job queue: a Postgres ledger (`jobs`) that is the source of truth, and apalis-redis
//! queues that only deliver.
//!
//! Enqueue inserts the ledger row first (deduplicated by `dedup_key`), then pushes an
//! [`Envelope`] to the job kind's Redis queue and marks the row delivered. If the push fails
//! (Redis down) or the process dies in between, the row stays undelivered and the outbox
//! [`relay_once`] pushes it later, so accepting a job never depends on Redis.
//!
//! Retries and snoozes are new deliveries of the same ledger row (`delivery` + 1, delayed with
//! `run_after`); apalis never retries by itself, which sidesteps its hard-coded 25-attempt loop.

use crate::jobs::{self, Job};
use apalis::prelude::{TaskBuilder, TaskId, TaskSink};
use apalis_redis::{Config as RedisQueueConfig, RedisStorage};
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use std::time::Duration;
use uuid::Uuid;

/// What travels through Redis: the ledger id and the job's arguments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<J> {
    /// The ledger row this delivery belongs to.
    pub job_id: Uuid,
    /// Delivery number (0 = first push, n = n-th retry or snooze).
    pub delivery: i32,
    /// The job's arguments.
    pub args: J,
}

/// Redis queue name of a job kind.
pub fn queue_name(kind: &str) -> String {
    format!("callcoach:{kind}")
}

/// Pub/sub channel that wakes a kind's idle workers as soon as a job is pushed.
pub fn wake_channel(kind: &str) -> String {
    format!("callcoach:wake:{kind}")
}

/// Jobs a worker fetches per round trip (and the channel buffer apalis derives from it).
pub const FETCH_BATCH: usize = 100;

/// apalis-redis settings used for every queue: an explicit queue name, a short heartbeat so a
/// killed worker's jobs are re-delivered within 15 s, and fetches of 100 tasks.
pub fn queue_config(kind: &str) -> RedisQueueConfig {
    RedisQueueConfig::default()
        .queue(queue_name(kind))
        .heartbeat_interval(Duration::from_secs(5))
        .missed_heartbeats(3)
        .batch_size(FETCH_BATCH)
        // Per-task locks cost 10x in throughput (measured by `bench queue`) and add nothing
        // here: the ledger tracks status, and orphan recovery works on the in-flight set.
        .lock_tasks(false)
        // apalis' own pub/sub events are not used; workers are woken by `wake`.
        .emit_events(false)
}

/// A typed apalis storage for one job kind.
pub fn storage<J: Job>(conn: ConnectionManager) -> RedisStorage<Envelope<J>> {
    RedisStorage::new(conn).with_config(queue_config(J::JOB_NAME))
}

/// Tells a kind's idle workers that jobs are waiting (best effort: they also poll).
pub async fn wake(conn: &ConnectionManager, kind: &str) {
    let mut conn = conn.clone();
    let published: Result<i64, _> = redis::cmd("PUBLISH")
        .arg(wake_channel(kind))
        .arg(1)
        .query_async(&mut conn)
        .await;
    if let Err(e) = published {
        tracing::debug!(error = %e, "wake publish failed; workers will poll");
    }
}

/// apalis task id of a delivery: the ledger id, suffixed for redeliveries.
pub fn task_id(job_id: Uuid, delivery: i32) -> String {
    if delivery == 0 {
        job_id.to_string()
    } else {
        format!("{job_id}.{delivery}")
    }
}

/// An apalis task for one delivery of a ledger row, under its delivery's task id.
fn task<J: Job>(job_id: Uuid, delivery: i32, args: J) -> TaskBuilder<Envelope<J>> {
    let envelope = Envelope {
        job_id,
        delivery,
        args,
    };
    TaskBuilder::new(envelope).task_id(TaskId::from_string(task_id(job_id, delivery)))
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
}

/// Result of an enqueue.
#[derive(Clone, Debug, Serialize)]
pub struct Enqueued {
    /// Ledger id of the job.
    pub job_id: Uuid,
    /// False when `dedup_key` matched an existing job, which is returned instead.
    pub created: bool,
    /// Whether the job already reached Redis (false: the relay will deliver it).
    pub delivered: bool,
}

/// Producer handle: writes the ledger and pushes deliveries.
#[derive(Clone)]
pub struct Queue {
    pg: PgPool,
    redis: ConnectionManager,
    max_attempts: i32,
}

impl Queue {
    /// Builds a queue over the ledger database and the Redis connection.
    pub fn new(pg: PgPool, redis: ConnectionManager, max_attempts: i32) -> Self {
        Self {
            pg,
            redis,
            max_attempts,
        }
    }

    /// Records a job in the ledger and tries to deliver it at once.
    pub async fn enqueue<J: Job>(
        &self,
        args: &J,
        dedup_key: Option<&str>,
    ) -> Result<Enqueued, QueueError> {
        let id = Uuid::now_v7();
        let payload = serde_json::to_value(args)?;
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO jobs (id, kind, payload, max_attempts, dedup_key) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
        )
        .bind(id)
        .bind(J::JOB_NAME)
        .bind(&payload)
        .bind(self.max_attempts)
        .bind(dedup_key)
        .fetch_optional(&self.pg)
        .await?;
        if inserted.is_none() {
            let existing: Uuid = sqlx::query_scalar("SELECT id FROM jobs WHERE dedup_key = $1")
                .bind(dedup_key)
                .fetch_one(&self.pg)
                .await?;
            return Ok(Enqueued {
                job_id: existing,
                created: false,
                delivered: true,
            });
        }
        metrics::counter!(crate::telemetry::names::JOBS_ENQUEUED, "kind" => J::JOB_NAME)
            .increment(1);
        let delivered = self.deliver(id, 0, args.clone(), Duration::ZERO).await;
        Ok(Enqueued {
            job_id: id,
            created: true,
            delivered,
        })
    }

    /// Records many jobs with one ledger statement, pushes them to Redis in one batch and marks
    /// them delivered with one more statement. Returns their ids in order. As with
    /// [`Queue::enqueue`], jobs that could not be pushed are left to the relay.
    pub async fn enqueue_many<J: Job>(&self, args: Vec<J>) -> Result<Vec<Uuid>, QueueError> {
        let ids: Vec<Uuid> = args.iter().map(|_| Uuid::now_v7()).collect();
        let payloads = args
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, max_attempts)
             SELECT id, $3, payload, $4 FROM unnest($1::uuid[], $2::jsonb[]) AS t(id, payload)",
        )
        .bind(&ids)
        .bind(&payloads)
        .bind(J::JOB_NAME)
        .bind(self.max_attempts)
        .execute(&self.pg)
        .await?;
        metrics::counter!(crate::telemetry::names::JOBS_ENQUEUED, "kind" => J::JOB_NAME)
            .increment(ids.len() as u64);
        let tasks = ids
            .iter()
            .zip(args)
            .map(|(id, args)| task(*id, 0, args).build())
            .collect::<Vec<_>>();
        let mut store = storage::<J>(self.redis.clone());
        let mut tasks = futures::stream::iter(tasks);
        match store.push_all(&mut tasks).await {
            Ok(()) => wake(&self.redis, J::JOB_NAME).await,
            Err(e) => {
                tracing::warn!(error = %e, "bulk push to redis failed; the relay will deliver");
                return Ok(ids);
            }
        }
        sqlx::query("UPDATE jobs SET delivered_at = now() WHERE id = ANY($1) AND delivery = 0")
            .bind(&ids)
            .execute(&self.pg)
            .await?;
        Ok(ids)
    }

    /// Pushes one delivery to Redis and marks the ledger row delivered. Returns false (and leaves
    /// the row for the relay) if Redis is unreachable.
    pub async fn deliver<J: Job>(
        &self,
        job_id: Uuid,
        delivery: i32,
        args: J,
        delay: Duration,
    ) -> bool {
        let mut store = storage::<J>(self.redis.clone());
        let mut task = task(job_id, delivery, args);
        if !delay.is_zero() {
            task = task.run_after(delay);
        }
        let pushed =
            tokio::time::timeout(Duration::from_secs(2), store.push_task(task.build())).await;
        match pushed {
            Ok(Ok(())) => wake(&self.redis, J::JOB_NAME).await,
            Ok(Err(e)) => {
                tracing::warn!(%job_id, error = %e, "push to redis failed; the relay will deliver");
                return false;
            }
            Err(_) => {
                tracing::warn!(%job_id, "push to redis timed out; the relay will deliver");
                return false;
            }
        }
        let marked =
            sqlx::query("UPDATE jobs SET delivered_at = now() WHERE id = $1 AND delivery = $2")
                .bind(job_id)
                .bind(delivery)
                .execute(&self.pg)
                .await;
        if let Err(e) = marked {
            // Harmless: the relay will push again and apalis drops the duplicate task id.
            tracing::warn!(%job_id, error = %e, "could not mark job delivered");
        }
        true
    }

    /// One pass of the outbox relay. It pushes ledger rows that were never delivered (Redis
    /// was down, or the producer died between insert and push), and re-pushes rows delivered
    /// but still not started `redeliver_after` past their due time (Redis lost them, e.g. a
    /// restart without persistence; if Redis still has the task, the push is a no-op).
    /// Returns how many it pushed.
    pub async fn relay_once(&self, redeliver_after: Duration) -> anyhow::Result<usize> {
        let rows = sqlx::query(
            "SELECT id, kind, payload, delivery, run_at FROM jobs
             WHERE status IN ('queued', 'snoozed')
               AND ((delivered_at IS NULL AND updated_at < now() - interval '2 seconds')
                 OR (delivered_at < now() - make_interval(secs => $1)
                     AND run_at < now() - make_interval(secs => $1)))
             ORDER BY enqueued_at LIMIT 500",
        )
        .bind(redeliver_after.as_secs_f64())
        .fetch_all(&self.pg)
        .await?;
        let mut pushed = 0;
        for row in rows {
            let id: Uuid = row.get("id");
            let kind: String = row.get("kind");
            let run_at: DateTime<Utc> = row.get("run_at");
            let delay = (run_at - Utc::now()).to_std().unwrap_or_default();
            let ok = jobs::deliver_raw(
                self,
                &kind,
                id,
                row.get("delivery"),
                row.get("payload"),
                delay,
            )
            .await;
            match ok {
                Ok(true) => pushed += 1,
                Ok(false) => break, // Redis still down: try the rest next pass.
                Err(e) => {
                    tracing::error!(%id, %kind, error = %e, "undeliverable ledger row; failing it");
                    self.fail_undeliverable(id, &e.to_string()).await?;
                }
            }
        }
        if pushed > 0 {
            metrics::counter!(crate::telemetry::names::RELAY_PUSHED).increment(pushed as u64);
            tracing::info!(pushed, "relay delivered pending jobs");
        }
        Ok(pushed)
    }

    /// Replays a failed or cancelled job (the dead-letter queue): a fresh attempt budget and a
    /// new delivery. Returns false if the job is not failed or cancelled.
    pub async fn retry(&self, id: Uuid) -> anyhow::Result<bool> {
        let row = sqlx::query(
            "UPDATE jobs SET status = 'queued', attempts = 0, delivery = delivery + 1,
                    delivered_at = NULL, run_at = now(), finished_at = NULL, updated_at = now()
             WHERE id = $1 AND status IN ('failed', 'cancelled')
             RETURNING kind, payload, delivery",
        )
        .bind(id)
        .fetch_optional(&self.pg)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let kind: String = row.get("kind");
        jobs::deliver_raw(
            self,
            &kind,
            id,
            row.get("delivery"),
            row.get("payload"),
            Duration::ZERO,
        )
        .await?;
        Ok(true)
    }

    /// Cancels a job that has not started (queued or snoozed); a delivery already in Redis is
    /// skipped when it arrives. Returns false if the job is in another state.
    pub async fn cancel(&self, id: Uuid) -> sqlx::Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', last_error = 'cancelled by an operator',
                    finished_at = now(), updated_at = now()
             WHERE id = $1 AND status IN ('queued', 'snoozed')",
        )
        .bind(id)
        .execute(&self.pg)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn fail_undeliverable(&self, id: Uuid, error: &str) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE jobs SET status = 'failed', last_error = $2, finished_at = now(), updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .execute(&self.pg)
        .await
        .map(|_| ())
    }

    /// Runs the relay every `every` until `shutdown` resolves.
    pub async fn run_relay(
        self,
        every: Duration,
        redeliver_after: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {
                    if let Err(e) = self.relay_once(redeliver_after).await {
                        tracing::warn!(error = %e, "relay pass failed");
                    }
                }
            }
        }
    }
}

/// A ledger row as shown by `GET /v1/jobs/{id}` and `callcoach jobs show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRow {
    /// Ledger id.
    pub id: Uuid,
    /// Job kind (`analyze_call`, …).
    pub kind: String,
    /// queued / running / succeeded / failed / cancelled / snoozed.
    pub status: String,
    /// Arguments.
    pub payload: serde_json::Value,
    /// Attempts consumed so far.
    pub attempts: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Last error message, if any.
    pub last_error: Option<String>,
    /// Job output, once succeeded.
    pub result: Option<serde_json::Value>,
    /// When the job was accepted.
    pub enqueued_at: DateTime<Utc>,
    /// When it last reached Redis (None: waiting for the relay).
    pub delivered_at: Option<DateTime<Utc>>,
    /// When the last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Reads one ledger row.
pub async fn job(pg: &PgPool, id: Uuid) -> sqlx::Result<Option<JobRow>> {
    let row = sqlx::query(
        "SELECT id, kind, status, payload, attempts, max_attempts, last_error, result, enqueued_at,
                delivered_at, started_at, finished_at FROM jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pg)
    .await?;
    Ok(row.map(job_row))
}

/// The newest ledger rows, optionally only those with one status.
pub async fn jobs(pg: &PgPool, status: Option<&str>, limit: i64) -> sqlx::Result<Vec<JobRow>> {
    let rows = sqlx::query(
        "SELECT id, kind, status, payload, attempts, max_attempts, last_error, result, enqueued_at,
                delivered_at, started_at, finished_at FROM jobs
         WHERE $1::text IS NULL OR status = $1 ORDER BY enqueued_at DESC LIMIT $2",
    )
    .bind(status)
    .bind(limit)
    .fetch_all(pg)
    .await?;
    Ok(rows.into_iter().map(job_row).collect())
}

fn job_row(r: sqlx::postgres::PgRow) -> JobRow {
    JobRow {
        id: r.get("id"),
        kind: r.get("kind"),
        status: r.get("status"),
        payload: r.get("payload"),
        attempts: r.get("attempts"),
        max_attempts: r.get("max_attempts"),
        last_error: r.get("last_error"),
        result: r.get("result"),
        enqueued_at: r.get("enqueued_at"),
        delivered_at: r.get("delivered_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
    }
}
