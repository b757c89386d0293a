//! The Redis tier behind a circuit breaker.
//!
//! Every command runs with a short timeout (`REDIS_CACHE_TIMEOUT_MS`, default 25 ms). After
//! three consecutive failures the breaker opens: calls skip Redis at once and the cache
//! answers from Postgres. While it is open, one background task PINGs Redis every 250 ms; the
//! first answer closes the breaker, so Redis coming back is used again without a restart.
//! At most `REDIS_MAX_CONNECTIONS` commands are in flight; further callers queue for a slot
//! within the same timeout and count as a Redis error (never silently) if none frees up.

use crate::telemetry::names;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

/// Consecutive failures that open the breaker.
const FAILURES_TO_OPEN: u32 = 3;

/// Whether the breaker lets calls through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Redis is used.
    Closed,
    /// Redis is skipped until a probe succeeds.
    Open,
}

/// A lock-free circuit breaker.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
}

impl Breaker {
    /// Current state.
    pub fn state(&self) -> BreakerState {
        if self.open.load(Ordering::Acquire) {
            BreakerState::Open
        } else {
            BreakerState::Closed
        }
    }

    /// Records a successful call: closes the breaker.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("redis is back; cache circuit breaker closed");
            metrics::gauge!(names::CACHE_BREAKER_OPEN).set(0.0);
        }
    }

    /// Records a failed call; returns true if this failure opened the breaker.
    pub fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_TO_OPEN || self.open.swap(true, Ordering::AcqRel) {
            return false;
        }
        tracing::warn!("redis unavailable; cache circuit breaker open, using postgres");
        metrics::counter!(names::CACHE_BREAKER_OPENED).increment(1);
        metrics::gauge!(names::CACHE_BREAKER_OPEN).set(1.0);
        true
    }
}

/// Why a Redis call produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisSkip {
    /// The breaker is open.
    #[error("circuit breaker open")]
    Open,
    /// The command failed or timed out.
    #[error("redis error: {0}")]
    Failed(String),
}

/// Redis commands with a timeout, through the breaker.
pub struct RedisTier {
    conn: ConnectionManager,
    timeout: Duration,
    breaker: Arc<Breaker>,
    pg: PgPool,
}

impl RedisTier {
    /// Wraps a connection; breaker openings are also counted in Postgres through `pg`.
    pub fn new(conn: ConnectionManager, timeout: Duration, pg: PgPool) -> Self {
        Self {
            conn,
            timeout,
            pg,
            breaker: Arc::new(Breaker::default()),
        }
    }

    /// The breaker, for status reporting.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Runs one command. Errors are recorded by the breaker and counted.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisSkip> {
        let mut conn = self.conn.clone();
        self.guarded(cmd.query_async::<T>(&mut conn)).await
    }

    /// Runs a Lua script with the same protection as [`RedisTier::query`].
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, RedisSkip> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.guarded(invocation.invoke_async::<T>(&mut conn)).await
    }

    /// Runs a Redis future unless the breaker is open, with the timeout, recording the outcome.
    async fn guarded<T>(
        &self,
        run: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisSkip> {
        if self.breaker.state() == BreakerState::Open {
            return Err(RedisSkip::Open);
        }
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(value)) => {
                self.breaker.success();
                Ok(value)
            }
            Ok(Err(e)) => Err(self.failed(e.to_string())),
            Err(_) => Err(self.failed(format!("timed out after {:?}", self.timeout))),
        }
    }

    fn failed(&self, message: String) -> RedisSkip {
        metrics::counter!(names::CACHE_ERRORS, "tier" => "redis").increment(1);
        tracing::debug!(%message, "redis cache command failed");
        if self.breaker.failure() {
            let pg = self.pg.clone();
            tokio::spawn(async move { super::record_counter(&pg, "breaker_open", "").await });
            tokio::spawn(probe(self.conn.clone(), self.breaker.clone()));
        }
        RedisSkip::Failed(message)
    }
}

/// Waits until Redis answers, then closes the breaker.
async fn probe(conn: ConnectionManager, breaker: Arc<Breaker>) {
    crate::wait_for_redis(conn, Duration::from_millis(500)).await;
    breaker.success();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_three_failures_and_closes_on_success() {
        let b = Breaker::default();
        assert!(!b.failure());
        assert!(!b.failure());
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure(), "the third failure opens it");
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.failure(), "already open: no second announcement");
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.failure(), "the count starts again");
    }
}
