//! Delivery through apalis-redis: lane queues, the [`Envelope`] that travels through them,
//! batched pushes and wake-ups. This module knows no job kinds: an envelope carries the kind's
//! name and its JSON arguments, and the worker looks the kind up in the job registry.
//!
//! Redis only delivers. Whether a delivery still matters is decided by the ledger (its
//! `delivery` number and state), so a duplicate or stale task is harmless: its claim fails.

use apalis::prelude::{TaskBuilder, TaskId, TaskSink};
use apalis_redis::{Config as RedisQueueConfig, RedisStorage};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::{str::FromStr, time::Duration};
use uuid::Uuid;

/// A priority lane: its own Redis queue and its own worker concurrency, so a backlog in one
/// never delays the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Analyses someone is waiting for (HTTP, CLI).
    Interactive,
    /// Warming, re-analysis, invalidation, maintenance.
    Background,
}

impl Lane {
    /// Every lane.
    pub const ALL: [Lane; 2] = [Lane::Interactive, Lane::Background];

    /// Name stored in `jobs.lane` and used in queue names and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Background => "background",
        }
    }

    /// The lane's Redis queue name.
    pub fn queue_name(self) -> String {
        format!("callcoach:{}", self.as_str())
    }

    /// Pub/sub channel that wakes the lane's idle workers as soon as a job is pushed.
    pub fn wake_channel(self) -> String {
        format!("callcoach:wake:{}", self.as_str())
    }
}

impl FromStr for Lane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "interactive" => Ok(Lane::Interactive),
            "background" => Ok(Lane::Background),
            other => Err(format!(
                "unknown lane {other:?} (expected interactive or background)"
            )),
        }
    }
}

/// What travels through Redis: which ledger row and delivery, the kind and its arguments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The ledger row this delivery belongs to.
    pub job_id: Uuid,
    /// Delivery number (0 = first push; each retry, snooze or rescue adds one).
    pub delivery: i32,
    /// Registered job kind.
    pub kind: String,
    /// The job's arguments as stored in the ledger.
    pub args: serde_json::Value,
}

impl Envelope {
    /// apalis task id of this delivery: the ledger id, suffixed for later deliveries, so a
    /// re-delivery is a new task even when Redis still holds (or dead-lettered) the old one.
    pub fn task_id(&self) -> String {
        task_id(self.job_id, self.delivery)
    }
}

/// apalis task id of one delivery of a ledger row.
pub fn task_id(job_id: Uuid, delivery: i32) -> String {
    if delivery == 0 {
        job_id.to_string()
    } else {
        format!("{job_id}.{delivery}")
    }
}

/// Jobs a worker fetches per round trip (and the channel buffer apalis derives from it).
pub const FETCH_BATCH: usize = 100;

/// apalis retries a failed handler (only ledger outages fail it) this many times, at +1 s,
/// +2 s…; after that the task is dropped and the ledger's rescuer re-delivers the row.
pub const DELIVERY_ATTEMPTS: usize = 4;

/// apalis-redis settings used for every lane: an explicit queue name, a short heartbeat so a
/// killed worker's fetched tasks go back to the queue within 15 s, and fetches of 100 tasks.
pub fn queue_config(lane: Lane) -> RedisQueueConfig {
    RedisQueueConfig::default()
        .queue(lane.queue_name())
        .heartbeat_interval(Duration::from_secs(5))
        .missed_heartbeats(3)
        .batch_size(FETCH_BATCH)
        // Per-task locks cost 10x in throughput (measured by `bench queue`) and add nothing
        // here: the ledger's guarded claim decides who runs a delivery.
        .lock_tasks(false)
        // apalis' own pub/sub events are not used; workers are woken by `wake`.
        .emit_events(false)
}

/// The apalis storage of one lane.
pub fn storage(conn: ConnectionManager, lane: Lane) -> RedisStorage<Envelope> {
    RedisStorage::new(conn).with_config(queue_config(lane))
}

/// One delivery to push: the envelope and how long to hold it back.
#[derive(Clone, Debug)]
pub struct Push {
    /// Lane queue to push to.
    pub lane: Lane,
    /// The delivery.
    pub envelope: Envelope,
    /// Delay before it is due (zero: now).
    pub delay: Duration,
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Redis answered with an error.
    #[error("redis push failed: {0}")]
    Redis(String),
    /// Redis did not answer in time.
    #[error("redis push timed out after {0:?}")]
    Timeout(Duration),
}

/// Longest a push may take before it counts as failed (the relay delivers later).
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Pushes deliveries, one batch per lane, and wakes each lane's idle workers. All or nothing
/// per lane batch (one Lua call); on error none of that lane's pushes may be counted.
pub async fn push(conn: &ConnectionManager, pushes: Vec<Push>) -> Result<(), PushError> {
    for lane in Lane::ALL {
        let tasks: Vec<_> = pushes
            .iter()
            .filter(|p| p.lane == lane)
            .map(|p| {
                let mut task = TaskBuilder::new(p.envelope.clone())
                    .task_id(TaskId::from_string(p.envelope.task_id()))
                    .max_attempts(DELIVERY_ATTEMPTS);
                if !p.delay.is_zero() {
                    task = task.run_after(p.delay);
                }
                task.build()
            })
            .collect();
        if tasks.is_empty() {
            continue;
        }
        let mut store = storage(conn.clone(), lane);
        let mut stream = futures::stream::iter(tasks);
        match tokio::time::timeout(PUSH_TIMEOUT, store.push_all(&mut stream)).await {
            Ok(Ok(())) => wake(conn, lane).await,
            Ok(Err(e)) => return Err(PushError::Redis(e.to_string())),
            Err(_) => return Err(PushError::Timeout(PUSH_TIMEOUT)),
        }
    }
    Ok(())
}

/// Tells a lane's idle workers that jobs are waiting (best effort: they also poll).
pub async fn wake(conn: &ConnectionManager, lane: Lane) {
    let mut conn = conn.clone();
    let published: Result<i64, _> = redis::cmd("PUBLISH")
        .arg(lane.wake_channel())
        .arg(1)
        .query_async(&mut conn)
        .await;
    if let Err(e) = published {
        tracing::debug!(error = %e, "wake publish failed; workers will poll");
    }
}

/// Which of these deliveries Redis no longer holds (lost in a restart, or dropped after
/// apalis gave up on them). One `HMGET` per lane.
pub async fn missing(
    conn: &ConnectionManager,
    deliveries: &[(Lane, Uuid, i32)],
) -> redis::RedisResult<Vec<(Uuid, i32)>> {
    let mut gone = Vec::new();
    for lane in Lane::ALL {
        let ids: Vec<(Uuid, i32)> = deliveries
            .iter()
            .filter(|(l, _, _)| *l == lane)
            .map(|(_, id, d)| (*id, *d))
            .collect();
        if ids.is_empty() {
            continue;
        }
        let fields: Vec<String> = ids.iter().map(|(id, d)| task_id(*id, *d)).collect();
        let mut conn = conn.clone();
        let present: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(queue_config(lane).job_data_hash())
            .arg(&fields)
            .query_async(&mut conn)
            .await?;
        gone.extend(
            ids.into_iter()
                .zip(present)
                .filter(|(_, p)| p.is_none())
                .map(|(id, _)| id),
        );
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_round_trip_and_have_distinct_queues() {
        for lane in Lane::ALL {
            assert_eq!(lane.as_str().parse::<Lane>().unwrap(), lane);
        }
        assert_ne!(
            Lane::Interactive.queue_name(),
            Lane::Background.queue_name()
        );
        assert!("fast".parse::<Lane>().unwrap_err().contains("fast"));
    }

    #[test]
    fn later_deliveries_get_new_task_ids() {
        let id = Uuid::now_v7();
        assert_eq!(task_id(id, 0), id.to_string());
        assert_ne!(task_id(id, 1), task_id(id, 0));
        assert_ne!(task_id(id, 1), task_id(id, 2));
    }
}
