//! The Redis tier behind a circuit breaker.
//!
//! Every command runs with a short timeout (`REDIS_CACHE_TIMEOUT_MS`, default 25 ms). After
//! three consecutive failures the breaker opens: calls skip Redis at once and the cache
//! answers from Postgres. While it is open, one background task PINGs Redis every 250 ms;
//! only an answer within the same 25 ms counts (a slow Redis stays skipped), and it half-opens
//! the breaker: one trial call goes to Redis and closes it, or opens it again without
//! flapping. Redis coming back is used again without a restart.
//! At most `REDIS_MAX_CONNECTIONS` commands are in flight; further callers queue for a slot
//! within the same timeout and count as a Redis error (never silently) if none frees up.

use crate::{supervise, telemetry::names};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering},
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
    /// A probe succeeded: one trial call goes to Redis; its outcome closes or re-opens.
    HalfOpen,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Whether a call may use Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Closed: go ahead.
    Call,
    /// Half-open: this call is the trial.
    Trial,
    /// Open, or half-open with a trial already under way: skip Redis.
    Skip,
}

/// A lock-free circuit breaker: closed → (3 failures) open → (probe answered within the
/// command timeout) half-open → (trial call succeeds) closed, or (trial fails) open.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    state: AtomicU8,
    trial: AtomicBool,
}

impl Breaker {
    /// Current state.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Asks to use Redis for one call.
    pub fn permit(&self) -> Permit {
        match self.state() {
            BreakerState::Closed => Permit::Call,
            BreakerState::Open => Permit::Skip,
            BreakerState::HalfOpen => {
                if self
                    .trial
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    Permit::Trial
                } else {
                    Permit::Skip
                }
            }
        }
    }

    /// Records a successful call: a closed breaker forgets its failures; a successful trial
    /// closes a half-open one.
    pub fn success(&self, permit: Permit) {
        self.failures.store(0, Ordering::Relaxed);
        if permit == Permit::Trial {
            self.trial.store(false, Ordering::Release);
            if self
                .state
                .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                tracing::info!("redis is back; cache circuit breaker closed");
                metrics::gauge!(names::CACHE_BREAKER_OPEN).set(0.0);
            }
        }
    }

    /// Records a failed call; returns true if this failure opened the breaker (the caller
    /// then starts a probe).
    pub fn failure(&self, permit: Permit) -> bool {
        if permit == Permit::Trial {
            self.trial.store(false, Ordering::Release);
            return self
                .state
                .compare_exchange(HALF_OPEN, OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_TO_OPEN
            || self
                .state
                .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        tracing::warn!("redis unavailable; cache circuit breaker open, using postgres");
        metrics::counter!(names::CACHE_BREAKER_OPENED).increment(1);
        metrics::gauge!(names::CACHE_BREAKER_OPEN).set(1.0);
        true
    }

    /// A probe got an answer within the command timeout: let one trial call through.
    pub fn probe_succeeded(&self) {
        let _ = self
            .state
            .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire);
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
        let permit = self.breaker.permit();
        if permit == Permit::Skip {
            return Err(RedisSkip::Open);
        }
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(value)) => {
                self.breaker.success(permit);
                Ok(value)
            }
            Ok(Err(e)) => Err(self.failed(permit, e.to_string())),
            Err(_) => Err(self.failed(permit, format!("timed out after {:?}", self.timeout))),
        }
    }

    fn failed(&self, permit: Permit, message: String) -> RedisSkip {
        metrics::counter!(names::CACHE_ERRORS, "tier" => "redis").increment(1);
        tracing::debug!(%message, "redis cache command failed");
        if self.breaker.failure(permit) {
            let pg = self.pg.clone();
            tokio::spawn(async move { super::record_counter(&pg, "breaker_open", "").await });
            let (conn, breaker, timeout) = (self.conn.clone(), self.breaker.clone(), self.timeout);
            supervise::spawn("breaker probe", move || {
                probe(conn.clone(), breaker.clone(), timeout)
            });
        }
        RedisSkip::Failed(message)
    }
}

/// Waits until Redis answers PING within the cache's own command timeout (an answer that
/// takes longer would only time out again), then lets a trial call through.
async fn probe(conn: ConnectionManager, breaker: Arc<Breaker>, timeout: Duration) {
    crate::wait_for_redis(conn, timeout).await;
    breaker.probe_succeeded();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_three_failures_and_closes_after_a_trial() {
        let b = Breaker::default();
        assert!(!b.failure(Permit::Call));
        assert!(!b.failure(Permit::Call));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure(Permit::Call), "the third failure opens it");
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.permit(), Permit::Skip);
        assert!(
            !b.failure(Permit::Call),
            "already open: no second announcement"
        );
        b.probe_succeeded();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.permit(), Permit::Trial, "one trial call");
        assert_eq!(b.permit(), Permit::Skip, "only one at a time");
        b.success(Permit::Trial);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.failure(Permit::Call), "the count starts again");
    }

    #[test]
    fn a_failed_trial_opens_the_breaker_again() {
        let b = Breaker::default();
        for _ in 0..3 {
            b.failure(Permit::Call);
        }
        b.probe_succeeded();
        let trial = b.permit();
        assert_eq!(trial, Permit::Trial);
        assert!(b.failure(trial), "re-opened: a new probe starts");
        assert_eq!(b.state(), BreakerState::Open);
        b.probe_succeeded();
        assert_eq!(b.permit(), Permit::Trial, "the trial slot was given back");
    }
}
