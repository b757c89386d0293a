//! The coaching cache: get-or-compute for one (call, dimension), shared by every job.
//!
//! Lookup order: Redis (through a circuit breaker, see [`redis_tier`]), then the Postgres
//! `coaching_cache` table (a hit refills Redis). On a miss, single-flight makes sure only one
//! caller computes a key at a time, across workers and processes: the owner holds a lease
//! (Redis `SET NX PX` with an owner token, or a `cache_leases` row while Redis is down, never
//! a transaction held across the LLM call), renewed every third of its lifetime while it
//! computes; the others poll the tiers until the result appears, or until the lease is gone
//! (owner failed, or crashed and stopped renewing) and they may take it.
//! `ENABLE_CACHING=false` skips reads and leases; results are still recorded.

pub mod key;
pub mod redis_tier;

pub use key::{CacheKey, CorruptEntry, GZIP_THRESHOLD, decode, encode, fingerprint};
pub use redis_tier::{BreakerState, RedisTier};

use crate::{llm::CoachingResult, model::Role, telemetry::names};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};
use uuid::Uuid;

/// Which tier answered a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The Redis tier.
    Redis,
    /// The Postgres `coaching_cache` table.
    Postgres,
}

impl Tier {
    /// Label used in metrics and `analysis_runs.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Redis => "redis",
            Tier::Postgres => "postgres",
        }
    }
}

/// What [`CoachingCache::get_or_compute`] did.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Served from a tier; `waited` is the time spent waiting for another caller's computation.
    Hit {
        /// The cached result.
        result: CoachingResult,
        /// Tier that answered.
        tier: Tier,
        /// Time spent waiting on another caller's lease.
        waited: Duration,
    },
    /// Computed by this caller.
    Computed {
        /// The new result.
        result: CoachingResult,
        /// Whatever the computation returned besides the result.
        extra: T,
    },
}

/// Cache settings.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Redis entry TTL.
    pub ttl: Duration,
    /// Whether reads and single-flight are on.
    pub enabled: bool,
    /// How long a lease lives unless renewed by its (live) owner.
    pub lease_ttl: Duration,
    /// Longest a caller waits for another's computation before giving up (a retryable error).
    pub max_wait: Duration,
}

/// Where a lease is held.
#[derive(Debug)]
enum LeaseStore {
    Redis,
    Postgres,
}

/// Proof of being the one caller computing a key.
#[derive(Debug)]
pub struct Lease {
    key: String,
    cache_key: String,
    owner: Uuid,
    store: LeaseStore,
}

/// Deletes a Redis lease only if we still own it.
const RELEASE_LUA: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Extends a Redis lease only if we still own it.
const RENEW_LUA: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0";

/// The tiered cache. Cheap to clone.
#[derive(Clone)]
pub struct CoachingCache {
    redis: Arc<RedisTier>,
    pg: PgPool,
    options: CacheOptions,
    release: Arc<redis::Script>,
    renew: Arc<redis::Script>,
}

impl CoachingCache {
    /// Builds the cache over its own Redis connection (with the given command timeout).
    pub fn new(
        redis: ConnectionManager,
        redis_timeout: Duration,
        pg: PgPool,
        options: CacheOptions,
    ) -> Self {
        Self {
            redis: Arc::new(RedisTier::new(redis, redis_timeout, pg.clone())),
            pg,
            options,
            release: Arc::new(redis::Script::new(RELEASE_LUA)),
            renew: Arc::new(redis::Script::new(RENEW_LUA)),
        }
    }

    /// State of the Redis circuit breaker.
    pub fn breaker_state(&self) -> BreakerState {
        self.redis.breaker().state()
    }

    /// Returns the cached result, or computes it exactly once across all callers.
    ///
    /// `compute` must durably store the result in `coaching_cache` before returning (the
    /// analysis job does so in the same transaction as the run); this function then fills
    /// Redis and releases the lease.
    pub async fn get_or_compute<T, E, Fut>(
        &self,
        key: &CacheKey,
        compute: impl FnOnce() -> Fut,
    ) -> Result<Outcome<T>, E>
    where
        Fut: Future<Output = Result<(CoachingResult, T), E>>,
        E: From<anyhow::Error>,
    {
        if !self.options.enabled {
            let (result, extra) = compute().await?;
            return Ok(Outcome::Computed { result, extra });
        }
        let started = Instant::now();
        let deadline = started + self.options.max_wait;
        let mut counted = false;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some((result, tier)) = self.lookup(key, !counted).await? {
                let waited = if counted {
                    started.elapsed()
                } else {
                    Duration::ZERO
                };
                return Ok(Outcome::Hit {
                    result,
                    tier,
                    waited,
                });
            }
            if !counted {
                counted = true;
            }
            if let Some(lease) = self.acquire(key).await? {
                return self.compute_with(key, lease, compute).await;
            }
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!("gave up waiting for the computation of {key}").into());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    async fn compute_with<T, E, Fut>(
        &self,
        key: &CacheKey,
        lease: Lease,
        compute: impl FnOnce() -> Fut,
    ) -> Result<Outcome<T>, E>
    where
        Fut: Future<Output = Result<(CoachingResult, T), E>>,
        E: From<anyhow::Error>,
    {
        // Someone may have finished between our lookup and our lease.
        if let Some((result, tier)) = self.lookup(key, false).await? {
            self.release(lease).await;
            return Ok(Outcome::Hit {
                result,
                tier,
                waited: Duration::ZERO,
            });
        }
        // The lease is renewed while the computation runs, so it only expires (letting a
        // waiter take over) when its owner died.
        let computed = tokio::select! {
            computed = compute() => computed,
            never = self.keep_renewing(&lease) => match never {},
        };
        if let Ok((result, _)) = &computed {
            self.redis_put(key, result).await;
        }
        self.release(lease).await;
        let (result, extra) = computed?;
        Ok(Outcome::Computed { result, extra })
    }

    /// Looks the key up in Redis, then Postgres (refilling Redis on a Postgres hit). `count`
    /// decides whether hit/miss counters move (waiters' polls do not count).
    pub async fn lookup(
        &self,
        key: &CacheKey,
        count: bool,
    ) -> anyhow::Result<Option<(CoachingResult, Tier)>> {
        let dim = key.dimension.as_str();
        let tally = |name: &'static str, tier: &'static str| {
            if count {
                metrics::counter!(name, "tier" => tier, "dimension" => dim).increment(1);
            }
        };
        if let Some(result) = self.redis_get(key).await {
            tally(names::CACHE_HITS, "redis");
            return Ok(Some((result, Tier::Redis)));
        }
        tally(names::CACHE_MISSES, "redis");
        let Some(result) = self.pg_get(key).await? else {
            tally(names::CACHE_MISSES, "postgres");
            return Ok(None);
        };
        tally(names::CACHE_HITS, "postgres");
        self.redis_put(key, &result).await;
        Ok(Some((result, Tier::Postgres)))
    }

    /// Reads the durable tier.
    pub async fn pg_get(&self, key: &CacheKey) -> anyhow::Result<Option<CoachingResult>> {
        let row: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT result FROM coaching_cache WHERE cache_key = $1")
                .bind(key.to_string())
                .fetch_optional(&self.pg)
                .await?;
        Ok(row.map(serde_json::from_value).transpose()?)
    }

    /// Reads and decodes a Redis entry; a corrupt entry is deleted and counted; errors are misses.
    async fn redis_get(&self, key: &CacheKey) -> Option<CoachingResult> {
        let rendered = key.to_string();
        let bytes: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("GET").arg(&rendered))
            .await
            .ok()?;
        match decode(&bytes?) {
            Ok(result) => Some(result),
            Err(e) => {
                tracing::warn!(key = %rendered, error = %e, "deleting corrupt cache entry");
                metrics::counter!(names::CACHE_CORRUPT).increment(1);
                record_counter(&self.pg, "corrupt", key.dimension.as_str()).await;
                let _ = self
                    .redis
                    .query::<()>(redis::cmd("DEL").arg(&rendered))
                    .await;
                None
            }
        }
    }

    /// Stores an entry in Redis with the configured TTL; failures are counted, not raised.
    pub async fn redis_put(&self, key: &CacheKey, result: &CoachingResult) {
        let stored = self
            .redis
            .query::<()>(
                redis::cmd("SET")
                    .arg(key.to_string())
                    .arg(encode(result))
                    .arg("EX")
                    .arg(self.options.ttl.as_secs()),
            )
            .await;
        if let Err(e) = stored {
            tracing::debug!(error = %e, "redis cache write skipped");
        }
    }

    /// Tries to become the computing caller: a Redis lease, or a Postgres lease row when Redis
    /// is unavailable. `None` means someone else holds it.
    async fn acquire(&self, key: &CacheKey) -> anyhow::Result<Option<Lease>> {
        let owner = Uuid::new_v4();
        let ttl_ms = self.options.lease_ttl.as_millis() as u64;
        let lease_key = key.lease_key();
        let set = self
            .redis
            .query::<Option<String>>(
                redis::cmd("SET")
                    .arg(&lease_key)
                    .arg(owner.to_string())
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms),
            )
            .await;
        let store = match set {
            Ok(Some(_)) => LeaseStore::Redis,
            Ok(None) => return Ok(None),
            Err(_) => {
                if !self.pg_acquire(key, owner).await? {
                    return Ok(None);
                }
                LeaseStore::Postgres
            }
        };
        Ok(Some(Lease {
            key: lease_key,
            cache_key: key.to_string(),
            owner,
            store,
        }))
    }

    async fn pg_acquire(&self, key: &CacheKey, owner: Uuid) -> sqlx::Result<bool> {
        let won: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO cache_leases (cache_key, owner, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (cache_key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
             WHERE cache_leases.expires_at < now()
             RETURNING owner",
        )
        .bind(key.to_string())
        .bind(owner)
        .bind(self.options.lease_ttl.as_secs_f64())
        .fetch_optional(&self.pg)
        .await?;
        Ok(won.is_some())
    }

    /// Extends the lease every third of its lifetime, forever (the caller stops it).
    async fn keep_renewing(&self, lease: &Lease) -> std::convert::Infallible {
        let ttl = self.options.lease_ttl;
        let mut tick = tokio::time::interval(ttl / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.renew(lease, ttl).await {
                tracing::warn!(error = %e, "lease renewal failed; it may expire");
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> anyhow::Result<()> {
        let owner = lease.owner.to_string();
        match lease.store {
            LeaseStore::Redis => {
                let ttl_ms = ttl.as_millis().to_string();
                self.redis
                    .script::<i64>(&self.renew, &[&lease.key], &[&owner, &ttl_ms])
                    .await?;
            }
            LeaseStore::Postgres => {
                sqlx::query(
                    "UPDATE cache_leases SET expires_at = now() + make_interval(secs => $3)
                     WHERE cache_key = $1 AND owner = $2",
                )
                .bind(&lease.cache_key)
                .bind(lease.owner)
                .bind(ttl.as_secs_f64())
                .execute(&self.pg)
                .await?;
            }
        }
        Ok(())
    }

    /// Gives a lease back (only if still ours); an expired lease needs nothing.
    async fn release(&self, lease: Lease) {
        let owner = lease.owner.to_string();
        match lease.store {
            LeaseStore::Redis => {
                let released = self
                    .redis
                    .script::<i64>(&self.release, &[&lease.key], &[&owner])
                    .await;
                if let Err(e) = released {
                    tracing::debug!(error = %e, "lease release skipped; it will expire");
                }
            }
            LeaseStore::Postgres => {
                let deleted =
                    sqlx::query("DELETE FROM cache_leases WHERE cache_key = $1 AND owner = $2")
                        .bind(&lease.cache_key)
                        .bind(lease.owner)
                        .execute(&self.pg)
                        .await;
                if let Err(e) = deleted {
                    tracing::warn!(error = %e, "lease release failed; it will expire");
                }
            }
        }
    }

    /// Removes Redis entries in batches of 500 with UNLINK. Returns how many existed.
    pub async fn unlink(&self, keys: &[String]) -> anyhow::Result<u64> {
        let mut removed = 0;
        for batch in keys.chunks(500) {
            let n: u64 = self
                .redis
                .query(redis::cmd("UNLINK").arg(batch))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            removed += n;
        }
        Ok(removed)
    }

    /// Every Redis key of one rubric version, from the Postgres cache table (never a keyspace scan).
    pub async fn keys_for_rubric(
        &self,
        role: Role,
        dimension: &str,
        version: &str,
    ) -> sqlx::Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT cache_key FROM coaching_cache WHERE role = $1 AND dimension = $2 AND rubric_version = $3",
        )
        .bind(role.as_str())
        .bind(dimension)
        .bind(version)
        .fetch_all(&self.pg)
        .await
    }
}

/// Adds one to a daily cache counter in Postgres (read by stats and the dashboard); failures
/// are logged only. `dimension` is `""` for counters that have none.
pub async fn record_counter(pg: &PgPool, name: &str, dimension: &str) {
    let recorded = sqlx::query(
        "INSERT INTO cache_counters (day, name, dimension, value) VALUES (current_date, $1, $2, 1)
         ON CONFLICT (day, name, dimension) DO UPDATE SET value = cache_counters.value + 1",
    )
    .bind(name)
    .bind(dimension)
    .execute(pg)
    .await;
    if let Err(e) = recorded {
        tracing::warn!(error = %e, name, "could not record cache counter");
    }
}
