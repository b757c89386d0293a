//! Prompt-cache accounting.
//!
//! The prefix (model, then tools → system → messages) is hashed at every
//! block boundary. A request reads the longest prefix that is in the cache
//! and ends at a breakpoint or up to [`LOOKBACK_BLOCKS`] blocks before one,
//! and writes every longer breakpoint prefix that reaches the model's minimum
//! cacheable length. Writes become readable only when the writing response
//! is sent ([`PromptCache::commit`]), so a request that arrives while the
//! writer is in flight misses. Entries live 5 minutes or 1 hour after their
//! last use (reads refresh them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::lock;
use super::request::{ParsedRequest, TTL_1H};

/// How many blocks back from a breakpoint a lookup searches.
pub(super) const LOOKBACK_BLOCKS: usize = 20;

/// Token usage split by cache status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TokenUsage {
    /// Uncached input tokens.
    pub(super) input: u64,
    /// Cache writes with the 5-minute TTL.
    pub(super) creation_5m: u64,
    /// Cache writes with the 1-hour TTL.
    pub(super) creation_1h: u64,
    /// Cache reads.
    pub(super) cache_read: u64,
}

impl TokenUsage {
    /// All cache writes.
    pub(super) fn cache_creation(&self) -> u64 {
        self.creation_5m + self.creation_1h
    }
}

/// A cache write waiting for its response to be sent.
#[derive(Debug, Clone)]
pub(super) struct PendingWrite {
    hash: String,
    ttl: Duration,
}

/// The result of accounting one request.
#[derive(Debug)]
pub(super) struct Accounting {
    pub(super) usage: TokenUsage,
    /// Apply with [`PromptCache::commit`] once the response is sent.
    pub(super) writes: Vec<PendingWrite>,
}

/// One cached prefix.
#[derive(Debug, Clone, Copy)]
struct Entry {
    expiry: Instant,
    ttl: Duration,
}

/// The emulated prompt cache.
#[derive(Debug, Default)]
pub(super) struct PromptCache {
    entries: Mutex<HashMap<String, Entry>>,
}

/// The prefix ending after one block.
#[derive(Debug)]
struct Prefix {
    hash: String,
    tokens: u64,
    /// The block's breakpoint TTL, if it has one.
    ttl: Option<Duration>,
}

impl PromptCache {
    /// Computes the usage of `req` arriving at `now` with minimum cacheable
    /// prefix `min`; refreshes the entry it reads.
    pub(super) fn account(&self, req: &ParsedRequest, min: u64, now: Instant) -> Accounting {
        let prefixes = prefixes(req);
        let mut entries = lock(&self.entries);
        entries.retain(|_, e| e.expiry > now);
        let hit = longest_hit(&prefixes, &entries, min);
        let read = hit.map_or(0, |i| prefixes.get(i).map_or(0, |p| p.tokens));
        if let Some(entry) = hit
            .and_then(|i| prefixes.get(i))
            .and_then(|p| entries.get_mut(&p.hash))
        {
            entry.expiry = entry.expiry.max(now + entry.ttl);
        }
        drop(entries);
        let (usage, writes) = plan_writes(&prefixes, read, min);
        Accounting {
            usage: TokenUsage {
                input: req
                    .input_tokens()
                    .saturating_sub(read + usage.cache_creation()),
                ..usage
            },
            writes,
        }
    }

    /// Makes `writes` readable from `now` on (never shortening an entry).
    pub(super) fn commit(&self, writes: &[PendingWrite], now: Instant) {
        let mut entries = lock(&self.entries);
        for write in writes {
            let expiry = now + write.ttl;
            let entry = entries.entry(write.hash.clone()).or_insert(Entry {
                expiry,
                ttl: write.ttl,
            });
            entry.expiry = entry.expiry.max(expiry);
            entry.ttl = entry.ttl.max(write.ttl);
        }
    }
}

/// Index of the longest cached prefix reachable from a breakpoint.
fn longest_hit(prefixes: &[Prefix], entries: &HashMap<String, Entry>, min: u64) -> Option<usize> {
    let mut best = None;
    for (b, _) in prefixes.iter().enumerate().filter(|(_, p)| p.ttl.is_some()) {
        let from = b.saturating_sub(LOOKBACK_BLOCKS - 1);
        let found = (from..=b).rev().find(|&i| {
            prefixes
                .get(i)
                .is_some_and(|p| p.tokens >= min && entries.contains_key(&p.hash))
        });
        best = best.max(found);
    }
    best
}

/// Cache writes for breakpoints beyond the read prefix: each segment is
/// billed at the TTL of the breakpoint that ends it.
fn plan_writes(prefixes: &[Prefix], read: u64, min: u64) -> (TokenUsage, Vec<PendingWrite>) {
    let mut usage = TokenUsage {
        cache_read: read,
        ..TokenUsage::default()
    };
    let mut writes = Vec::new();
    let mut covered = read;
    for p in prefixes {
        let Some(ttl) = p.ttl else { continue };
        if p.tokens <= covered || p.tokens < min {
            continue;
        }
        let segment = p.tokens - covered;
        if ttl >= TTL_1H {
            usage.creation_1h += segment;
        } else {
            usage.creation_5m += segment;
        }
        covered = p.tokens;
        writes.push(PendingWrite {
            hash: p.hash.clone(),
            ttl,
        });
    }
    (usage, writes)
}

/// The hash and size of the prefix ending after each block.
fn prefixes(req: &ParsedRequest) -> Vec<Prefix> {
    let mut hasher = Sha256::new();
    feed(&mut hasher, req.model.as_bytes());
    let mut tokens = 0;
    req.blocks
        .iter()
        .map(|block| {
            feed(&mut hasher, block.section.as_bytes());
            feed(&mut hasher, block.content.as_bytes());
            tokens += block.tokens;
            Prefix {
                hash: hex::encode(hasher.clone().finalize()),
                tokens,
                ttl: block.ttl,
            }
        })
        .collect()
}

/// The hash of the prefix ending after each block of `req` (as the cache keys its entries).
pub(super) fn prefix_hashes(req: &ParsedRequest) -> Vec<String> {
    prefixes(req).into_iter().map(|p| p.hash).collect()
}

/// A hash of one block's section and content, independent of what precedes it.
pub(super) fn content_hash(section: &str, content: &str) -> String {
    let mut hasher = Sha256::new();
    feed(&mut hasher, section.as_bytes());
    feed(&mut hasher, content.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// Length-prefixed hash input, so block boundaries are unambiguous.
fn feed(hasher: &mut Sha256, bytes: &[u8]) {
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    hasher.update(len.to_le_bytes());
    hasher.update(bytes);
}
