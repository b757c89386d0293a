//! The Redis tier behind a circuit breaker.
//!
//! Every command runs with a short timeout (`REDIS_CACHE_TIMEOUT_MS`, default 25 ms). After
//! three consecutive failures the breaker opens for one second: calls skip Redis at once and
//! the cache answers from Postgres. When the second is over, the next call probes Redis; a
//! success closes the breaker, so Redis coming back is used again without a restart.
//! At most `REDIS_MAX_CONNECTIONS` commands are in flight; further callers queue for a slot
//! within the same timeout and count as a Redis error (never silently) if none frees up.

use crate::telemetry::names;
use redis::aio::ConnectionManager;
use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Consecutive failures that open the breaker.
const FAILURES_TO_OPEN: u32 = 3;

/// Whether the breaker lets calls through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Redis is used.
    Closed,
    /// Redis is skipped until the open period ends.
    Open,
}

/// A lock-free circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    epoch: Instant,
    failures: AtomicU32,
    open_until_ms: AtomicU64,
    open_for: Duration,
}

impl Breaker {
    /// A closed breaker that stays open for `open_for` once tripped.
    pub fn new(open_for: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            open_for,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        if self.now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            BreakerState::Open
        } else {
            BreakerState::Closed
        }
    }

    /// Records a successful call: closes the breaker.
    pub fn success(&self) {
        if self.failures.swap(0, Ordering::Relaxed) >= FAILURES_TO_OPEN {
            tracing::info!("redis is back; cache circuit breaker closed");
            metrics::gauge!(names::CACHE_BREAKER_OPEN).set(0.0);
        }
    }

    /// Records a failed call; returns true if this failure opened the breaker.
    pub fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_TO_OPEN {
            return false;
        }
        let until = self.now_ms() + self.open_for.as_millis() as u64;
        self.open_until_ms.store(until, Ordering::Relaxed);
        if failures == FAILURES_TO_OPEN {
            tracing::warn!("redis unavailable; cache circuit breaker open, using postgres");
            metrics::counter!(names::CACHE_BREAKER_OPENED).increment(1);
            metrics::gauge!(names::CACHE_BREAKER_OPEN).set(1.0);
            return true;
        }
        false
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
    breaker: Breaker,
}

impl RedisTier {
    /// Wraps a connection.
    pub fn new(conn: ConnectionManager, timeout: Duration) -> Self {
        Self {
            conn,
            timeout,
            breaker: Breaker::new(Duration::from_secs(1)),
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
        self.breaker.failure();
        RedisSkip::Failed(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_three_failures_and_closes_on_success() {
        let b = Breaker::new(Duration::from_millis(30));
        assert!(!b.failure());
        assert!(!b.failure());
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure());
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "half-open: a probe may pass"
        );
        assert!(
            !b.failure(),
            "a failed probe re-opens without a new announcement"
        );
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.failure());
    }
}
