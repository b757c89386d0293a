//! Cache keys and the Redis value codec. [`CacheKey`] is the only place a cache (or lease) key
//! is formatted; [`encode`]/[`decode`] are the only places values are.

use crate::{
    llm::CoachingResult,
    model::{Dimension, Role, sha256_hex},
};
use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use std::io::{Read, Write};

/// Bumped whenever the key layout or the cached value's shape changes.
pub const KEY_FORMAT_VERSION: &str = "1";

/// Values larger than this are gzip-compressed before they go to Redis.
pub const GZIP_THRESHOLD: usize = 1024;

/// The parts of a cache key. `Display` renders the one key format:
/// `coaching:{dimension}:{transcript_hash}:{rubric_version}:{fingerprint}`, where the rubric
/// version is qualified by its role (`ae-1.0.0`) because each role has its own rubric.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheKey {
    /// Dimension analysed.
    pub dimension: Dimension,
    /// SHA-256 of the normalized transcript.
    pub transcript_hash: String,
    /// Role whose rubric applies.
    pub role: Role,
    /// Active rubric version for the role and dimension.
    pub rubric_version: String,
    /// See [`fingerprint`].
    pub fingerprint: String,
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "coaching:{}:{}:{}-{}:{}",
            self.dimension,
            self.transcript_hash,
            self.role.as_str(),
            self.rubric_version,
            self.fingerprint
        )
    }
}

impl CacheKey {
    /// Redis key of an answer that was paid for but is not stored durably yet.
    pub fn paid_key(&self) -> String {
        format!("paid:{self}")
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

/// Encodes a JSON-serializable value for Redis: JSON text, gzip (level 6) above 1 KiB.
pub fn encode_json(json: Vec<u8>) -> Vec<u8> {
    if json.len() <= GZIP_THRESHOLD {
        return json;
    }
    let mut enc = GzEncoder::new(Vec::with_capacity(json.len() / 3), Compression::new(6));
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(&json);
    enc.finish().unwrap_or(json)
}

/// Encodes a coaching result for Redis.
pub fn encode(result: &CoachingResult) -> Vec<u8> {
    encode_json(serde_json::to_vec(result).unwrap_or_default())
}

/// Returns the JSON bytes of a Redis value, choosing the codec by its leading bytes
/// (`{` or gzip's 1f 8b).
pub fn decode_json(bytes: &[u8]) -> Result<Vec<u8>, CorruptEntry> {
    match bytes {
        [b'{', ..] => Ok(bytes.to_vec()),
        [0x1f, 0x8b, ..] => {
            let mut out = Vec::with_capacity(bytes.len() * 4);
            GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .map_err(|e| CorruptEntry(format!("bad gzip stream: {e}")))?;
            Ok(out)
        }
        _ => Err(CorruptEntry("unknown leading bytes".into())),
    }
}

/// Decodes a Redis value into a coaching result.
pub fn decode(bytes: &[u8]) -> Result<CoachingResult, CorruptEntry> {
    let json = decode_json(bytes)?;
    serde_json::from_slice(&json).map_err(|e| CorruptEntry(format!("bad JSON: {e}")))
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
        assert!(decode(b"").is_err());
    }

    #[test]
    fn key_has_the_documented_shape() {
        let key = CacheKey {
            dimension: Dimension::Discovery,
            transcript_hash: "abc".into(),
            role: Role::Se,
            rubric_version: "1.0.0".into(),
            fingerprint: fingerprint("m", "1", "kb", 1024),
        };
        let s = key.to_string();
        assert!(s.starts_with("coaching:discovery:abc:se-1.0.0:"), "{s}");
        assert_eq!(s.split(':').count(), 5);
        assert_eq!(key.paid_key(), format!("paid:{s}"));
    }

    #[test]
    fn fingerprint_changes_with_each_input() {
        let base = fingerprint("m", "1", "kb", 1024);
        for other in [
            fingerprint("m2", "1", "kb", 1024),
            fingerprint("m", "2", "kb", 1024),
            fingerprint("m", "1", "kb2", 1024),
            fingerprint("m", "1", "kb", 2048),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(base.len(), 12);
    }
}
