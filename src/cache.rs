//! The coaching cache: one key format, a compact value codec, and the two tiers (Redis, then
//! the Postgres `coaching_cache` table). A Postgres hit refills Redis. Redis errors never fail
//! an analysis: they are logged, counted and treated as a miss.

use crate::{
    llm::CoachingResult,
    model::{Dimension, sha256_hex},
    telemetry::names,
};
use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::{
    io::{Read, Write},
    time::Duration,
};

/// Bumped whenever the key layout or the cached value's shape changes.
pub const KEY_FORMAT_VERSION: &str = "1";

/// Values larger than this are gzip-compressed before they go to Redis.
pub const GZIP_THRESHOLD: usize = 1024;

/// The parts of a cache key. `Display` renders the one key format:
/// `coaching:{dimension}:{transcript_hash}:{rubric_version}:{fingerprint}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    /// Dimension analysed.
    pub dimension: Dimension,
    /// SHA-256 of the normalized transcript.
    pub transcript_hash: String,
    /// Active rubric version for the call's role and this dimension.
    pub rubric_version: String,
    /// See [`fingerprint`].
    pub fingerprint: String,
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "coaching:{}:{}:{}:{}",
            self.dimension, self.transcript_hash, self.rubric_version, self.fingerprint
        )
    }
}

/// Short hash of everything besides transcript and rubric that changes the model's answer:
/// model id, prompt template version, knowledge-base version, max_tokens and the key format.
pub fn fingerprint(
    model: &str,
    template_version: &str,
    kb_version: &str,
    max_tokens: u32,
) -> String {
    let material =
        format!("{model}|{template_version}|{kb_version}|{max_tokens}|{KEY_FORMAT_VERSION}");
    sha256_hex(&material)[..12].to_string()
}

/// A cached value that is neither JSON text nor a gzip stream of JSON.
#[derive(Debug, thiserror::Error)]
#[error("corrupt cache entry: {0}")]
pub struct CorruptEntry(String);

/// Encodes a result for Redis: JSON text, gzip (level 6) when the JSON exceeds 1 KiB.
pub fn encode(result: &CoachingResult) -> Vec<u8> {
    let json = serde_json::to_vec(result).unwrap_or_default();
    if json.len() <= GZIP_THRESHOLD {
        return json;
    }
    let mut enc = GzEncoder::new(Vec::with_capacity(json.len() / 3), Compression::new(6));
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(&json);
    enc.finish().unwrap_or(json)
}

/// Decodes a Redis value, choosing the codec by its leading bytes (`{` or gzip's 1f 8b).
pub fn decode(bytes: &[u8]) -> Result<CoachingResult, CorruptEntry> {
    let json = match bytes {
        [b'{', ..] => bytes.to_vec(),
        [0x1f, 0x8b, ..] => {
            let mut out = Vec::new();
            GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .map_err(|e| CorruptEntry(format!("bad gzip stream: {e}")))?;
            out
        }
        _ => return Err(CorruptEntry("unknown leading bytes".into())),
    };
    serde_json::from_slice(&json).map_err(|e| CorruptEntry(format!("bad JSON: {e}")))
}

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

/// The tiered cache shared by every job that needs an analysis.
#[derive(Clone)]
pub struct CoachingCache {
    redis: ConnectionManager,
    pg: PgPool,
    ttl: Duration,
    enabled: bool,
}

impl CoachingCache {
    /// Builds the cache over a Redis connection and the Postgres pool.
    pub fn new(redis: ConnectionManager, pg: PgPool, ttl: Duration, enabled: bool) -> Self {
        Self {
            redis,
            pg,
            ttl,
            enabled,
        }
    }

    /// Looks the key up in Redis, then Postgres (refilling Redis on a Postgres hit).
    pub async fn get(&self, key: &CacheKey) -> anyhow::Result<Option<(CoachingResult, Tier)>> {
        if !self.enabled {
            return Ok(None);
        }
        let dim = key.dimension.as_str();
        let rendered = key.to_string();
        if let Some(result) = self.redis_get(&rendered).await {
            metrics::counter!(names::CACHE_HITS, "tier" => "redis", "dimension" => dim)
                .increment(1);
            return Ok(Some((result, Tier::Redis)));
        }
        metrics::counter!(names::CACHE_MISSES, "tier" => "redis", "dimension" => dim).increment(1);
        let row: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT result FROM coaching_cache WHERE cache_key = $1")
                .bind(&rendered)
                .fetch_optional(&self.pg)
                .await?;
        let Some(value) = row else {
            metrics::counter!(names::CACHE_MISSES, "tier" => "postgres", "dimension" => dim)
                .increment(1);
            return Ok(None);
        };
        let result: CoachingResult = serde_json::from_value(value)?;
        metrics::counter!(names::CACHE_HITS, "tier" => "postgres", "dimension" => dim).increment(1);
        self.redis_put(&rendered, &result).await;
        Ok(Some((result, Tier::Postgres)))
    }

    /// Reads and decodes a Redis entry; a corrupt entry is deleted and counted; errors are misses.
    async fn redis_get(&self, key: &str) -> Option<CoachingResult> {
        let mut conn = self.redis.clone();
        let bytes: Option<Vec<u8>> = match redis::cmd("GET").arg(key).query_async(&mut conn).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, "redis cache read failed; falling back to postgres");
                metrics::counter!(names::CACHE_ERRORS, "tier" => "redis").increment(1);
                return None;
            }
        };
        match decode(&bytes?) {
            Ok(result) => Some(result),
            Err(e) => {
                tracing::warn!(%key, error = %e, "deleting corrupt cache entry");
                metrics::counter!(names::CACHE_CORRUPT).increment(1);
                let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
                None
            }
        }
    }

    /// Stores an entry in Redis with the configured TTL; failures are logged, not raised.
    pub async fn redis_put(&self, key: &str, result: &CoachingResult) {
        let mut conn = self.redis.clone();
        let stored: Result<(), _> = redis::cmd("SET")
            .arg(key)
            .arg(encode(result))
            .arg("EX")
            .arg(self.ttl.as_secs())
            .query_async(&mut conn)
            .await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, "redis cache write failed");
            metrics::counter!(names::CACHE_ERRORS, "tier" => "redis").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(len: usize) -> CoachingResult {
        CoachingResult {
            score: 71,
            strengths: vec!["x".repeat(len)],
            improvements: vec![],
            examples: vec![],
            summary: "s".into(),
        }
    }

    #[test]
    fn small_values_are_json_large_ones_gzip() {
        let small = encode(&result(10));
        assert_eq!(small[0], b'{');
        let large = encode(&result(5000));
        assert_eq!(&large[..2], &[0x1f, 0x8b]);
        assert!(large.len() < 1000);
        assert_eq!(decode(&small).unwrap(), result(10));
        assert_eq!(decode(&large).unwrap(), result(5000));
    }

    #[test]
    fn garbage_is_corrupt() {
        assert!(decode(b"hello").is_err());
        assert!(decode(&[0x1f, 0x8b, 1, 2, 3]).is_err());
        assert!(decode(b"{not json").is_err());
    }

    #[test]
    fn key_has_the_documented_shape() {
        let key = CacheKey {
            dimension: Dimension::Discovery,
            transcript_hash: "abc".into(),
            rubric_version: "1.0.0".into(),
            fingerprint: fingerprint("m", "1", "kb", 1024),
        };
        let s = key.to_string();
        assert!(s.starts_with("coaching:discovery:abc:1.0.0:"));
        assert_eq!(s.split(':').count(), 5);
        assert_ne!(
            fingerprint("m", "1", "kb", 1024),
            fingerprint("m2", "1", "kb", 1024)
        );
    }
}
