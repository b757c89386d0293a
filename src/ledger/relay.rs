//! The ledger's background duties, run by every worker process:
//! - **relay** (outbox): pushes rows whose current delivery has not reached Redis (Redis was
//!   down at enqueue, a retry or snooze was scheduled, a rescue re-issued the row). Rows are
//!   locked with `FOR UPDATE SKIP LOCKED` while their batch is pushed, so with several
//!   workers each row is pushed by one of them per round, and the counts are real pushes.
//! - **rescuer**: a `running` row whose lease expired (its worker died or lost Postgres) gets
//!   a new delivery, or fails when its attempt budget is spent; a queued row whose delivery
//!   Redis no longer holds (lost in a restart, or dropped after apalis gave up on it, e.g.
//!   because its claim failed while Postgres was down) gets a new delivery under a new task id.
//! - **pruner**: finished rows past the retention are deleted in batches.

use super::{CLAIMABLE, JobState, names};
use crate::{
    delivery::{self, Envelope, Lane, Push},
    telemetry::names as metric,
};
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use sqlx::{PgPool, Row};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most rows one relay or rescue round handles.
const BATCH: i64 = 500;

/// What the background duties need.
#[derive(Clone)]
pub struct Upkeep {
    /// Ledger database.
    pub pg: PgPool,
    /// Delivery connection.
    pub redis: ConnectionManager,
    /// Settings.
    pub options: UpkeepOptions,
}

/// Timings of the background duties.
#[derive(Clone, Debug)]
pub struct UpkeepOptions {
    /// Relay period.
    pub relay_every: Duration,
    /// Rescuer period.
    pub rescue_every: Duration,
    /// A queued delivery due this long ago and not started is checked against Redis.
    pub redeliver_after: Duration,
    /// Finished rows older than this are pruned.
    pub retention: Duration,
    /// Pruner period.
    pub prune_every: Duration,
}

/// What one rescue round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rescued {
    /// Running rows with an expired lease, queued again.
    pub requeued: u64,
    /// Running rows with an expired lease and no attempts left, failed.
    pub failed: u64,
    /// Queued rows whose delivery Redis lost, re-issued.
    pub redelivered: u64,
}

impl Upkeep {
    /// One relay round: locks up to 500 undelivered rows (skipping rows another relay holds),
    /// pushes them to their lanes in batches, marks them delivered. Returns the rows pushed.
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        let mut tx = self.pg.begin().await?;
        let rows = sqlx::query(
            "SELECT id, kind, lane, delivery, payload, run_at FROM jobs
             WHERE delivered_at IS NULL AND finished_at IS NULL AND status = ANY($1)
             ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(names(&CLAIMABLE))
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let now = Utc::now();
        let mut pushes = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.get("id");
            let lane: Lane = super::decode(&row, "lane")?;
            let run_at: DateTime<Utc> = row.get("run_at");
            ids.push(id);
            pushes.push(Push {
                lane,
                envelope: Envelope {
                    job_id: id,
                    delivery: row.get("delivery"),
                    kind: row.get("kind"),
                    args: row.get("payload"),
                },
                delay: (run_at - now).to_std().unwrap_or_default(),
            });
        }
        delivery::push(&self.redis, pushes).await?;
        sqlx::query("UPDATE jobs SET delivered_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::counter!(metric::RELAY_PUSHED).increment(ids.len() as u64);
        tracing::debug!(pushed = ids.len(), "relay delivered jobs");
        Ok(ids.len())
    }

    /// One rescue round (see the module documentation).
    pub async fn rescue_once(&self) -> anyhow::Result<Rescued> {
        let mut rescued = self.rescue_expired_leases().await?;
        rescued.redelivered = self.redeliver_lost().await?;
        let total = rescued.requeued + rescued.failed + rescued.redelivered;
        if total > 0 {
            metrics::counter!(metric::RESCUED, "what" => "requeued").increment(rescued.requeued);
            metrics::counter!(metric::RESCUED, "what" => "failed").increment(rescued.failed);
            metrics::counter!(metric::RESCUED, "what" => "redelivered")
                .increment(rescued.redelivered);
            tracing::info!(?rescued, "rescuer re-issued jobs");
        }
        Ok(rescued)
    }

    async fn rescue_expired_leases(&self) -> sqlx::Result<Rescued> {
        let states: Vec<String> = sqlx::query_scalar(
            "WITH lost AS (
                 SELECT id FROM jobs
                 WHERE finished_at IS NULL AND status = $1 AND lease_expires_at < now()
                 ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE jobs j SET
                 status = CASE WHEN j.attempts >= j.max_attempts THEN $3 ELSE $4 END,
                 last_error = CASE WHEN j.attempts >= j.max_attempts
                     THEN 'worker lost during the last attempt; attempt budget exhausted'
                     ELSE 'worker lost (lease expired); re-delivered' END,
                 finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
                 delivery = j.delivery + 1, delivered_at = NULL, run_at = now(),
                 lease_expires_at = NULL, updated_at = now()
             FROM lost WHERE j.id = lost.id
             RETURNING j.status",
        )
        .bind(JobState::Running.as_str())
        .bind(BATCH)
        .bind(JobState::Failed.as_str())
        .bind(JobState::Queued.as_str())
        .fetch_all(&self.pg)
        .await?;
        let failed = states
            .iter()
            .filter(|s| s.as_str() == JobState::Failed.as_str())
            .count() as u64;
        Ok(Rescued {
            requeued: states.len() as u64 - failed,
            failed,
            redelivered: 0,
        })
    }

    /// Queued rows delivered long ago and never started: asks Redis whether it still holds
    /// each delivery. Those it lost get a new delivery; those it holds are confirmed (their
    /// `delivered_at` moves on, so each waiting row is checked once per `redeliver_after`).
    async fn redeliver_lost(&self) -> anyhow::Result<u64> {
        let rows = sqlx::query(
            "SELECT id, lane, delivery FROM jobs
             WHERE finished_at IS NULL AND status = ANY($1)
               AND delivered_at < now() - make_interval(secs => $2)
               AND run_at < now() - make_interval(secs => $2)
             ORDER BY delivered_at LIMIT $3",
        )
        .bind(names(&CLAIMABLE))
        .bind(self.options.redeliver_after.as_secs_f64())
        .bind(BATCH)
        .fetch_all(&self.pg)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut waiting = Vec::with_capacity(rows.len());
        for row in rows {
            let lane: Lane = super::decode(&row, "lane")?;
            waiting.push((
                lane,
                row.get::<Uuid, _>("id"),
                row.get::<i32, _>("delivery"),
            ));
        }
        let lost = delivery::missing(&self.redis, &waiting).await?;
        let (ids, deliveries): (Vec<Uuid>, Vec<i32>) = waiting.iter().map(|w| (w.1, w.2)).unzip();
        let (lost_ids, lost_deliveries): (Vec<Uuid>, Vec<i32>) = lost.iter().copied().unzip();
        let redelivered = sqlx::query(
            "UPDATE jobs j SET
                 delivery = j.delivery + CASE WHEN l.id IS NULL THEN 0 ELSE 1 END,
                 delivered_at = CASE WHEN l.id IS NULL THEN now() END, updated_at = now()
             FROM unnest($1::uuid[], $2::int[]) AS t(id, delivery)
             LEFT JOIN unnest($3::uuid[], $4::int[]) AS l(id, delivery)
                    ON l.id = t.id AND l.delivery = t.delivery
             WHERE j.id = t.id AND j.delivery = t.delivery AND j.status = ANY($5)
             RETURNING l.id",
        )
        .bind(&ids)
        .bind(&deliveries)
        .bind(&lost_ids)
        .bind(&lost_deliveries)
        .bind(names(&CLAIMABLE))
        .fetch_all(&self.pg)
        .await?
        .iter()
        .filter(|r| r.get::<Option<Uuid>, _>(0).is_some())
        .count();
        Ok(redelivered as u64)
    }

    /// Runs relay, rescuer and pruner on their periods until `shutdown`. A failing round is
    /// logged once per outage (not per round) and retried on the next tick.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut relay = tokio::time::interval(self.options.relay_every);
        let mut rescue = tokio::time::interval(self.options.rescue_every);
        let mut prune = tokio::time::interval(self.options.prune_every);
        for tick in [&mut relay, &mut rescue, &mut prune] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut failing = false;
        loop {
            let round: anyhow::Result<()> = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = relay.tick() => self.relay_all().await,
                _ = rescue.tick() => self.rescue_once().await.map(|_| ()),
                _ = prune.tick() => self.prune().await,
            };
            match round {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %format!("{e:#}"), "ledger upkeep failing; will keep trying");
                }
                Err(_) => {}
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("ledger upkeep recovered");
                }
                Ok(()) => {}
            }
        }
    }

    /// Relays until a round finds fewer rows than a full batch.
    async fn relay_all(&self) -> anyhow::Result<()> {
        while self.relay_once().await? == BATCH as usize {}
        Ok(())
    }

    async fn prune(&self) -> anyhow::Result<()> {
        let pruned = super::prune(&self.pg, self.options.retention, 1000).await?;
        if pruned > 0 {
            metrics::counter!(metric::LEDGER_PRUNED).increment(pruned);
            tracing::info!(pruned, "pruned finished jobs past the retention");
        }
        Ok(())
    }
}
