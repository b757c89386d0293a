//! The coaching cache: get-or-compute for one (call, dimension), shared by every job.
//!
//! Lookup order: Redis (through a circuit breaker, see [`redis_tier`]), then the Postgres
//! `coaching_cache` table (a hit refills Redis). On a miss, single-flight makes sure only one
//! caller computes a key at a time, across workers and processes: the owner holds the key's
//! `cache_leases` row in Postgres (one lease authority, whatever state Redis is in; a few ms
//! on a path that costs seconds of LLM time, and never a transaction held across the LLM
//! call), renewed with an ownership check every third of its lifetime while it computes; the
//! others poll the tiers until the result appears, or until the lease is gone (owner failed,
//! or crashed and stopped renewing) and they may take it. A paid answer is kept until it is
//! stored durably, so it is never paid for twice.
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

/// Proof of being the one caller computing a key: a `cache_leases` row with our owner token.
#[derive(Debug)]
pub struct Lease {
    cache_key: String,
    owner: Uuid,
}

/// How long an answer that was paid for but not stored durably is kept in Redis.
pub const PAID_TTL: Duration = Duration::from_secs(6 * 3600);

/// An answer kept between the LLM response and the durable write.
#[derive(serde::Serialize, serde::Deserialize)]
struct Paid<T> {
    result: CoachingResult,
    extra: T,
}

/// The tiered cache. Cheap to clone.
#[derive(Clone)]
pub struct CoachingCache {
    redis: Arc<RedisTier>,
    pg: PgPool,
    options: CacheOptions,
    /// Paid answers not yet stored durably, for when Redis cannot keep them either.
    paid: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
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
            paid: Arc::default(),
        }
    }

    /// State of the Redis circuit breaker.
    pub fn breaker_state(&self) -> BreakerState {
        self.redis.breaker().state()
    }

    /// Returns the cached result, or computes it exactly once across all callers.
    ///
    /// One lease authority per key, the `cache_leases` row: the caller that holds it runs
    /// `compute` (the LLM call) while renewing it with an ownership check, and stops if the
    /// lease was lost. The answer is kept under [`CacheKey::paid_key`] (Redis, and in memory)
    /// before `store` writes it durably, so a run that dies or cannot reach Postgres after
    /// paying hands the answer to the next run instead of paying again. `store` must write
    /// the result to `coaching_cache` unless a row exists, and return the stored (winning)
    /// result; Redis is then filled with that row, so the tiers never disagree.
    pub async fn get_or_compute<T, E, C, CF, S, SF>(
        &self,
        key: &CacheKey,
        compute: C,
        store: S,
    ) -> Result<Outcome<T>, E>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        C: FnOnce() -> CF,
        CF: Future<Output = Result<(CoachingResult, T), E>>,
        S: FnOnce(CoachingResult, &T) -> SF,
        SF: Future<Output = Result<CoachingResult, E>>,
        E: From<anyhow::Error>,
    {
        if !self.options.enabled {
            let (result, extra) = compute().await?;
            let result = store(result, &extra).await?;
            return Ok(Outcome::Computed { result, extra });
        }
        let started = Instant::now();
        let deadline = started + self.options.max_wait;
        let mut first = true;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some((result, tier)) = self.lookup(key, first).await? {
                let waited = if first {
                    Duration::ZERO
                } else {
                    started.elapsed()
                };
                return Ok(Outcome::Hit {
                    result,
                    tier,
                    waited,
                });
            }
            first = false;
            if let Some(lease) = self.acquire(key).await? {
                // Someone may have finished between our lookup and our lease.
                let outcome = match self.lookup(key, false).await {
                    Ok(Some((result, tier))) => Ok(Outcome::Hit {
                        result,
                        tier,
                        waited: Duration::ZERO,
                    }),
                    Ok(None) => self
                        .compute_and_store(key, &lease, compute, store)
                        .await
                        .map(|(result, extra)| Outcome::Computed { result, extra }),
                    Err(e) => Err(e.into()),
                };
                // On failure too: a waiter may take over at once (reusing a paid answer).
                self.release(lease).await;
                return outcome;
            }
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!("gave up waiting for the computation of {key}").into());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Under the lease: reuses a paid answer or computes one (keeping it until stored), then
    /// stores it durably and fills Redis with the stored row.
    async fn compute_and_store<T, E, C, CF, S, SF>(
        &self,
        key: &CacheKey,
        lease: &Lease,
        compute: C,
        store: S,
    ) -> Result<(CoachingResult, T), E>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        C: FnOnce() -> CF,
        CF: Future<Output = Result<(CoachingResult, T), E>>,
        S: FnOnce(CoachingResult, &T) -> SF,
        SF: Future<Output = Result<CoachingResult, E>>,
        E: From<anyhow::Error>,
    {
        let (result, extra) = match self.take_paid::<T>(key).await {
            Some(paid) => {
                tracing::info!(key = %key, "reusing an answer paid for by an earlier run");
                metrics::counter!(names::CACHE_PAID_REUSED).increment(1);
                (paid.result, paid.extra)
            }
            None => {
                // Renewed while the computation runs; if another caller took the lease
                // (ours expired), this computation stops.
                let computed = tokio::select! {
                    computed = compute() => computed?,
                    lost = self.keep_renewing(lease) => return Err(lost.into()),
                };
                self.keep_paid(key, &computed.0, &computed.1).await;
                computed
            }
        };
        let result = store(result, &extra).await?;
        self.redis_put(key, &result).await;
        self.forget_paid(key).await;
        Ok((result, extra))
    }

    /// Keeps a paid answer until it is stored durably: in Redis (so any worker's re-run finds
    /// it) and in this process (for when Redis is unavailable too).
    async fn keep_paid<T: serde::Serialize>(
        &self,
        key: &CacheKey,
        result: &CoachingResult,
        extra: &T,
    ) {
        let Ok(bytes) = serde_json::to_vec(&Paid {
            result: result.clone(),
            extra,
        }) else {
            return;
        };
        let kept = self
            .redis
            .query::<()>(
                redis::cmd("SET")
                    .arg(key.paid_key())
                    .arg(&bytes)
                    .arg("EX")
                    .arg(PAID_TTL.as_secs()),
            )
            .await;
        if let Err(e) = kept {
            tracing::warn!(error = %e, "paid answer kept in memory only");
        }
        if let Ok(mut paid) = self.paid.lock() {
            paid.insert(key.to_string(), bytes);
        }
    }

    async fn take_paid<T: serde::de::DeserializeOwned>(&self, key: &CacheKey) -> Option<Paid<T>> {
        let local = self
            .paid
            .lock()
            .ok()
            .and_then(|p| p.get(&key.to_string()).cloned());
        let bytes = match local {
            Some(bytes) => bytes,
            None => self
                .redis
                .query::<Option<Vec<u8>>>(redis::cmd("GET").arg(key.paid_key()))
                .await
                .ok()??,
        };
        serde_json::from_slice(&bytes).ok()
    }

    async fn forget_paid(&self, key: &CacheKey) {
        if let Ok(mut paid) = self.paid.lock() {
            paid.remove(&key.to_string());
        }
        let _ = self
            .redis
            .query::<()>(redis::cmd("DEL").arg(key.paid_key()))
            .await;
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
        read_durable(&self.pg, key).await
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

    /// Tries to become the computing caller: inserts the key's lease row, or takes it over
    /// when it expired. `None` means another caller holds it.
    async fn acquire(&self, key: &CacheKey) -> anyhow::Result<Option<Lease>> {
        let owner = Uuid::new_v4();
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
        Ok(won.map(|owner| Lease {
            cache_key: key.to_string(),
            owner,
        }))
    }

    /// Extends the lease every third of its lifetime while it is ours; returns (an error)
    /// as soon as a renewal finds that another caller owns it. A renewal that cannot reach
    /// Postgres is retried on the next tick.
    async fn keep_renewing(&self, lease: &Lease) -> anyhow::Error {
        let ttl = self.options.lease_ttl;
        let mut tick = tokio::time::interval(ttl / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            let renewed = sqlx::query(
                "UPDATE cache_leases SET expires_at = now() + make_interval(secs => $3)
                 WHERE cache_key = $1 AND owner = $2",
            )
            .bind(&lease.cache_key)
            .bind(lease.owner)
            .bind(ttl.as_secs_f64())
            .execute(&self.pg)
            .await;
            match renewed {
                Ok(done) if done.rows_affected() == 0 => {
                    metrics::counter!(names::CACHE_LEASE_LOST).increment(1);
                    return anyhow::anyhow!(
                        "single-flight lease of {} was taken over; stopping this computation",
                        lease.cache_key
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lease renewal failed; it may expire"),
            }
        }
    }

    /// Gives a lease back (only if still ours); an unreleased lease expires by itself.
    async fn release(&self, lease: Lease) {
        let deleted = sqlx::query("DELETE FROM cache_leases WHERE cache_key = $1 AND owner = $2")
            .bind(&lease.cache_key)
            .bind(lease.owner)
            .execute(&self.pg)
            .await;
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "lease release failed; it will expire");
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

/// The durable tier's read on any executor (what [`CoachingCache::pg_get`] runs): the stored
/// result of `key`, decoded.
pub async fn read_durable(
    db: impl sqlx::PgExecutor<'_>,
    key: &CacheKey,
) -> anyhow::Result<Option<CoachingResult>> {
    let row = crate::performance::cached_result(db, &key.to_string()).await?;
    Ok(row.map(serde_json::from_value).transpose()?)
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
