//! Fleet-wide rate limiting in Redis: token buckets and fixed-window counters, shared by the
//! LLM limits ([`crate::llm::limits`]) and the HTTP front.
//!
//! # Algorithm
//! A [`Bucket`] is a token bucket: it holds at most `capacity` tokens and regains
//! `refill_per_sec` tokens per second. Its state is one Redis hash under
//! `callcoach:rl:<name>` with the level (`tokens`) and the time it was last written (`ts`, in
//! milliseconds). A missing key is a full bucket, so a key only needs to live until the bucket
//! would be full again: every write sets `PEXPIRE` to the time a full refill takes from the
//! written level, plus a margin, and idle buckets cost no memory.
//!
//! Every operation is one Lua script ([`redis::Script`]: `EVALSHA`, and on `NOSCRIPT` — after
//! a restart or `SCRIPT FLUSH` — `SCRIPT LOAD` and `EVALSHA` again). The script reads the
//! clock with `TIME` inside Redis, so workers with skewed clocks agree, and it reads, decides
//! and writes in one atomic step: Rust never reads a level to write it back. One call covers
//! several buckets (requests and tokens of one LLM call, say):
//! - [`RateLimiter::charge`] takes the costs from every bucket or from none; when one bucket
//!   is short it answers how long until all of them hold their cost;
//! - [`RateLimiter::available_in`] answers the same question without charging;
//! - [`RateLimiter::adjust`] corrects a charge after the fact (a positive delta may take the
//!   level below zero, so later callers wait; a negative one refunds, up to the capacity);
//! - [`RateLimiter::clamp`] lowers levels to what an outside source says is left.
//!
//! A cost above a bucket's capacity would never be allowed; it is an error
//! ([`RateLimitError::CostExceedsCapacity`]), not an endless wait.
//!
//! [`Counter`]s are plain fixed windows (`INCRBY`, expiring at the window's end plus a margin),
//! for budgets such as daily spend; they are atomic as well, and callers handle Redis being
//! unreachable themselves.
//!
//! # When Redis is unreachable
//! Every Redis call has a short timeout ([`LimiterOptions::timeout`]), so a hung Redis counts
//! as unreachable just like a refused connection. After a failure the limiter skips Redis for
//! a second, then tries it again. An outage is logged twice: a warning when the first call
//! fails and a line when Redis answers again, however many calls fall back in between. What
//! happens meanwhile is chosen per use with [`FailMode`]:
//! - [`FailMode::Open`] allows everything (the HTTP front: a Redis outage must not take the API
//!   down with it);
//! - [`FailMode::LocalShare`] falls back to an in-process bucket with the capacity and refill
//!   divided by the number of processes, so the fleet as a whole stays within the budget (the
//!   LLM limits: exceeding the account's limits only earns 429s). Local state is used only
//!   while Redis is unreachable and is not copied to Redis afterwards. A cost above the local
//!   capacity is let through once the local bucket is full and takes it below zero, so big
//!   calls are slowed down, not refused for ever.
//!
//! A call that timed out may still have run in Redis; under `LocalShare` it is then charged
//! twice (once in Redis, once locally), which errs on the safe side.
//! Every fallback is counted in `callcoach_rate_limit_fallbacks_total{mode}`.

use crate::telemetry::names;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// Prefix of every bucket key.
pub const KEY_PREFIX: &str = "callcoach:rl:";

/// How long a bucket key outlives the time it needs to refill fully, in milliseconds.
const EXPIRY_MARGIN_MS: u64 = 1_000;

/// After a failed Redis call, how long calls skip Redis and go straight to the fail mode
/// (so an outage costs one timeout a second, not one per call).
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The token bucket, for every operation. KEYS: bucket hashes. ARGV[1]: operation
/// (`charge`, `peek`, `adjust`, `clamp`, `lease`); then per key: capacity, refill per
/// millisecond and amount (a cost, a delta, a remaining level, or the most tokens a lease
/// takes). ARGV[2 + 3n]: expiry margin in ms. Returns strings: allowed (1/0), wait in ms, then
/// each bucket's level afterwards.
///
/// `lease` works on one bucket: it first adds back ARGV[6] tokens (those of an ended lease,
/// up to the capacity), then takes as many whole tokens as it holds, at most the amount, and
/// returns the number taken after the level; with none taken, the wait is until one exists.
const BUCKET_SCRIPT: &str = r#"
local op = ARGV[1]
local n = #KEYS
local margin = tonumber(ARGV[2 + 3 * n])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local cap, rate, amount, level = {}, {}, {}, {}
for i = 1, n do
  local base = 2 + (i - 1) * 3
  cap[i] = tonumber(ARGV[base])
  rate[i] = tonumber(ARGV[base + 1])
  amount[i] = tonumber(ARGV[base + 2])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens, ts = tonumber(state[1]), tonumber(state[2])
  if tokens == nil or ts == nil then
    level[i] = cap[i]
  else
    level[i] = math.min(cap[i], tokens + math.max(0, now - ts) * rate[i])
  end
end
if op == 'lease' then
  local back = tonumber(ARGV[3 + 3 * n])
  local lvl = math.min(cap[1], level[1] + back)
  local granted = math.max(0, math.min(amount[1], math.floor(lvl)))
  local wait = 0
  if granted < 1 then
    wait = (1 - lvl) / rate[1]
  end
  if granted >= 1 or back > 0 then
    lvl = lvl - granted
    redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', lvl),
      'ts', string.format('%.17g', now))
    local ttl = math.ceil((cap[1] - lvl) / rate[1]) + margin
    redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl))
  end
  return {granted >= 1 and '1' or '0', string.format('%.17g', wait),
    string.format('%.17g', lvl), string.format('%.0f', granted)}
end
local wait = 0
if op == 'charge' or op == 'peek' then
  for i = 1, n do
    if level[i] < amount[i] then
      wait = math.max(wait, (amount[i] - level[i]) / rate[i])
    end
  end
end
if (op == 'charge' and wait == 0) or op == 'adjust' or op == 'clamp' then
  for i = 1, n do
    if op == 'clamp' then
      level[i] = math.min(level[i], amount[i])
    else
      level[i] = math.min(cap[i], level[i] - amount[i])
    end
    redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', level[i]),
      'ts', string.format('%.17g', now))
    local ttl = math.ceil((cap[i] - level[i]) / rate[i]) + margin
    redis.call('PEXPIRE', KEYS[i], string.format('%.0f', ttl))
  end
end
local out = {wait == 0 and '1' or '0', string.format('%.17g', wait)}
for i = 1, n do
  out[#out + 1] = string.format('%.17g', level[i])
end
return out
"#;

/// Fixed-window counters. KEYS: counters; ARGV per key: increment and expiry (Unix ms).
/// Returns each counter's value afterwards.
const COUNTER_SCRIPT: &str = r#"
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('PEXPIREAT', KEYS[i], ARGV[2 * i])
end
return out
"#;

/// What can be wrong with a rate-limit request. Redis being unreachable is not an error for
/// buckets (the [`FailMode`] answers); it is one for [`Counter`]s.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RateLimitError {
    /// A bucket's capacity or refill rate is not a positive finite number.
    #[error("bucket {key}: capacity {capacity} and refill {refill_per_sec}/s must be positive")]
    InvalidBucket {
        /// The bucket key.
        key: String,
        /// Capacity asked for.
        capacity: f64,
        /// Refill rate asked for.
        refill_per_sec: f64,
    },
    /// A cost larger than the bucket can ever hold.
    #[error("cost {cost} exceeds the capacity {capacity} of {key}: it could never be allowed")]
    CostExceedsCapacity {
        /// The bucket key.
        key: String,
        /// Cost asked for.
        cost: f64,
        /// The bucket's capacity.
        capacity: f64,
    },
    /// A cost or remaining level that is negative or not finite, or a delta that is not finite.
    #[error("invalid amount {amount} for {key}")]
    InvalidAmount {
        /// The bucket key.
        key: String,
        /// The amount given.
        amount: f64,
    },
    /// The same bucket twice in one call (its second charge would not see the first).
    #[error("bucket {key} appears twice in one call")]
    DuplicateBucket {
        /// The bucket key.
        key: String,
    },
    /// Redis did not answer in time or failed (counters only).
    #[error("redis unavailable: {0}")]
    Unavailable(String),
}

/// A token bucket's identity and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    key: String,
    capacity: f64,
    refill_per_sec: f64,
}

impl Bucket {
    /// A bucket stored under `callcoach:rl:<name>`, holding at most `capacity` tokens and
    /// regaining `refill_per_sec` per second.
    pub fn new(name: &str, capacity: f64, refill_per_sec: f64) -> Result<Self, RateLimitError> {
        let key = format!("{KEY_PREFIX}{name}");
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(capacity) || !positive(refill_per_sec) {
            return Err(RateLimitError::InvalidBucket {
                key,
                capacity,
                refill_per_sec,
            });
        }
        Ok(Self {
            key,
            capacity,
            refill_per_sec,
        })
    }

    /// A bucket allowing `per_minute` tokens a minute, in bursts of up to a minute's worth (the
    /// shape of Anthropic's own limits).
    pub fn per_minute(name: &str, per_minute: f64) -> Result<Self, RateLimitError> {
        Self::new(name, per_minute, per_minute / 60.0)
    }

    /// The Redis key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Most tokens the bucket holds.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Tokens regained per second.
    pub fn refill_per_sec(&self) -> f64 {
        self.refill_per_sec
    }

    /// The same bucket scaled down to one of `processes` equal shares.
    fn share(&self, processes: u32) -> Bucket {
        let parts = f64::from(processes.max(1));
        Bucket {
            key: self.key.clone(),
            capacity: self.capacity / parts,
            refill_per_sec: self.refill_per_sec / parts,
        }
    }
}

/// A fixed-window counter: an integer under `key` that disappears at `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The full Redis key (no prefix is added).
    pub key: String,
    /// When the key expires (the window's end plus whatever margin the caller wants).
    pub expires_at: DateTime<Utc>,
}

/// Who answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The shared buckets in Redis.
    Redis,
    /// The in-process share ([`FailMode::LocalShare`]), Redis being unreachable.
    Local,
    /// Nobody: Redis is unreachable and the mode is [`FailMode::Open`].
    FailedOpen,
    /// No bucket was asked for.
    Nothing,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Whether the costs were charged ([`RateLimiter::charge`]) or are available now
    /// ([`RateLimiter::available_in`]). Always true for adjustments and clamps.
    pub allowed: bool,
    /// How long until every bucket holds its requested cost (zero when allowed).
    pub wait: Duration,
    /// Each bucket's level afterwards, in request order; empty when nobody knows
    /// ([`Source::FailedOpen`]). May be negative after an [`RateLimiter::adjust`].
    pub levels: Vec<f64>,
    /// Who answered.
    pub source: Source,
}

/// What a [`RateLimiter::lease`] took.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// Whole tokens taken from the bucket (0 when it held less than one, or Redis could not
    /// be asked).
    pub granted: u32,
    /// The bucket's level afterwards; `None` when nobody knows ([`Source::FailedOpen`]).
    pub level: Option<f64>,
    /// With nothing granted: how long until the bucket holds one token.
    pub wait: Duration,
    /// Who answered.
    pub source: Source,
}

/// What a limiter does while Redis is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Allow every request (availability first; the HTTP front).
    Open,
    /// Enforce `1 / processes` of every bucket in this process (the budget first; the LLM).
    LocalShare {
        /// How many processes share the budget (at least 1).
        processes: u32,
    },
}

/// How a limiter talks to Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimiterOptions {
    /// Longest wait for one Redis call; after it Redis counts as unreachable.
    pub timeout: Duration,
    /// What to do while Redis is unreachable.
    pub fail_mode: FailMode,
}

impl LimiterOptions {
    /// Options with the default timeout (200 ms).
    pub fn new(fail_mode: FailMode) -> Self {
        Self {
            timeout: Duration::from_millis(200),
            fail_mode,
        }
    }
}

/// The operations of the bucket script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Charge,
    Peek,
    Adjust,
    Clamp,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Charge => "charge",
            Op::Peek => "peek",
            Op::Adjust => "adjust",
            Op::Clamp => "clamp",
        }
    }
}

/// Token buckets and counters in Redis. Cheap to clone; clones share the local fallback.
#[derive(Clone)]
pub struct RateLimiter {
    conn: ConnectionManager,
    options: LimiterOptions,
    buckets: Arc<redis::Script>,
    counters: Arc<redis::Script>,
    local: Arc<Mutex<LocalBuckets>>,
    /// Until when Redis is skipped after a failure.
    skip_until: Arc<Mutex<Option<Instant>>>,
    /// Whether the last Redis call was answered (for logging outages once).
    reachable: Arc<Reachability>,
}

impl RateLimiter {
    /// A limiter over `conn` (give it its own connection so other traffic never delays it).
    pub fn new(conn: ConnectionManager, options: LimiterOptions) -> Self {
        Self {
            conn,
            options,
            buckets: Arc::new(redis::Script::new(BUCKET_SCRIPT)),
            counters: Arc::new(redis::Script::new(COUNTER_SCRIPT)),
            local: Arc::default(),
            skip_until: Arc::default(),
            reachable: Arc::default(),
        }
    }

    /// Its options.
    pub fn options(&self) -> LimiterOptions {
        self.options
    }

    /// Takes each cost from its bucket, all or none. When refused, `wait` is how long until
    /// every bucket holds its cost (another caller may take them first).
    pub async fn charge(&self, costs: &[(Bucket, f64)]) -> Result<Decision, RateLimitError> {
        self.run(Op::Charge, costs).await
    }

    /// How long until every bucket holds the given amount; charges nothing.
    pub async fn available_in(
        &self,
        amounts: &[(Bucket, f64)],
    ) -> Result<Decision, RateLimitError> {
        self.run(Op::Peek, amounts).await
    }

    /// Corrects levels after the fact: a positive delta is charged even if it takes the level
    /// below zero (later callers wait until it is paid back); a negative delta refunds, up to
    /// the capacity.
    pub async fn adjust(&self, deltas: &[(Bucket, f64)]) -> Result<Decision, RateLimitError> {
        self.run(Op::Adjust, deltas).await
    }

    /// Lowers each level to at most `remaining` (when an outside source says less is left).
    pub async fn clamp(&self, remaining: &[(Bucket, f64)]) -> Result<Decision, RateLimitError> {
        self.run(Op::Clamp, remaining).await
    }

    /// Takes up to `most` whole tokens from `bucket` at once, after giving back `give_back`
    /// tokens of an ended lease: a process then hands them out itself
    /// ([`crate::http::leases`]). Never fails: while Redis is unreachable the fail mode answers
    /// for one token ([`Source::FailedOpen`] grants nothing but allows).
    pub async fn lease(&self, bucket: &Bucket, most: u32, give_back: u32) -> Lease {
        match self.lease_in_redis(bucket, most.max(1), give_back).await {
            Ok(lease) => lease,
            Err(e) => {
                let one = [(bucket.clone(), 1.0_f64.min(bucket.capacity))];
                let decision = self.fallback(Op::Charge, &one, &e);
                Lease {
                    granted: u32::from(decision.allowed && decision.source == Source::Local),
                    level: decision.levels.first().copied(),
                    wait: decision.wait,
                    source: decision.source,
                }
            }
        }
    }

    async fn lease_in_redis(
        &self,
        bucket: &Bucket,
        most: u32,
        give_back: u32,
    ) -> Result<Lease, RateLimitError> {
        let mut invocation = self.buckets.prepare_invoke();
        invocation
            .arg("lease")
            .key(&bucket.key)
            .arg(bucket.capacity)
            .arg(bucket.refill_per_sec / 1000.0)
            .arg(most)
            .arg(EXPIRY_MARGIN_MS)
            .arg(give_back);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self.timed(invocation.invoke_async(&mut conn)).await?;
        parse_lease(&reply)
            .ok_or_else(|| RateLimitError::Unavailable(format!("unexpected reply {reply:?}")))
    }

    /// Adds to fixed-window counters and returns their values afterwards. Redis being
    /// unreachable is [`RateLimitError::Unavailable`]: counters have no fallback here.
    pub async fn add_to_counters(
        &self,
        adds: &[(Counter, i64)],
    ) -> Result<Vec<i64>, RateLimitError> {
        if adds.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.counters.prepare_invoke();
        for (counter, amount) in adds {
            invocation
                .key(&counter.key)
                .arg(*amount)
                .arg(counter.expires_at.timestamp_millis());
        }
        let mut conn = self.conn.clone();
        self.timed(invocation.invoke_async(&mut conn)).await
    }

    /// The counters' values (0 for a missing key); read only.
    pub async fn read_counters(&self, counters: &[Counter]) -> Result<Vec<i64>, RateLimitError> {
        if counters.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for counter in counters {
            cmd.arg(&counter.key);
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<i64>> = self.timed(cmd.query_async(&mut conn)).await?;
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn run(&self, op: Op, items: &[(Bucket, f64)]) -> Result<Decision, RateLimitError> {
        validate(op, items)?;
        if items.is_empty() {
            return Ok(Decision {
                allowed: true,
                wait: Duration::ZERO,
                levels: Vec::new(),
                source: Source::Nothing,
            });
        }
        match self.in_redis(op, items).await {
            Ok(decision) => Ok(decision),
            Err(e) => Ok(self.fallback(op, items, &e)),
        }
    }

    async fn in_redis(&self, op: Op, items: &[(Bucket, f64)]) -> Result<Decision, RateLimitError> {
        let mut invocation = self.buckets.prepare_invoke();
        invocation.arg(op.name());
        for (bucket, amount) in items {
            invocation
                .key(&bucket.key)
                .arg(bucket.capacity)
                .arg(bucket.refill_per_sec / 1000.0)
                .arg(*amount);
        }
        invocation.arg(EXPIRY_MARGIN_MS);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self.timed(invocation.invoke_async(&mut conn)).await?;
        parse_reply(&reply, items.len())
            .ok_or_else(|| RateLimitError::Unavailable(format!("unexpected reply {reply:?}")))
    }

    /// Runs a Redis future within the timeout, unless Redis failed within the last second;
    /// any failure is `Unavailable`.
    async fn timed<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RateLimitError> {
        let skip_until = *lock(&self.skip_until);
        if skip_until.is_some_and(|until| Instant::now() < until) {
            return Err(RateLimitError::Unavailable(
                "failed within the last second".into(),
            ));
        }
        let message = match tokio::time::timeout(self.options.timeout, call).await {
            Ok(Ok(value)) => {
                if self.reachable.answered() {
                    tracing::info!(mode = self.mode_name(), "rate limiter: redis answers again");
                }
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.options.timeout),
        };
        if self.reachable.failed() {
            tracing::warn!(
                error = %message,
                mode = self.mode_name(),
                "rate limiter: redis unreachable; answering with the fail mode until it is back"
            );
        }
        *lock(&self.skip_until) = Some(Instant::now() + SKIP_AFTER_FAILURE);
        Err(RateLimitError::Unavailable(message))
    }

    /// The fail mode's metric label.
    fn mode_name(&self) -> &'static str {
        match self.options.fail_mode {
            FailMode::Open => "open",
            FailMode::LocalShare { .. } => "local",
        }
    }

    fn fallback(&self, op: Op, items: &[(Bucket, f64)], error: &RateLimitError) -> Decision {
        let mode = self.mode_name();
        metrics::counter!(names::RATE_LIMIT_FALLBACKS, "mode" => mode).increment(1);
        tracing::debug!(%error, mode, "rate limiter: answering with the fail mode");
        match self.options.fail_mode {
            FailMode::Open => Decision {
                allowed: true,
                wait: Duration::ZERO,
                levels: Vec::new(),
                source: Source::FailedOpen,
            },
            FailMode::LocalShare { processes } => {
                let shares: Vec<(Bucket, f64)> = items
                    .iter()
                    .map(|(bucket, amount)| (bucket.share(processes), *amount))
                    .collect();
                lock(&self.local).apply(op, &shares, Instant::now())
            }
        }
    }
}

/// Whether Redis answered the last call. Every call records its outcome; only the changes
/// are reported, so an outage is logged when it starts and when it ends, not per call.
#[derive(Debug)]
struct Reachability(AtomicBool);

impl Default for Reachability {
    fn default() -> Self {
        Self(AtomicBool::new(true))
    }
}

impl Reachability {
    /// Records an answer; true if Redis was unreachable until now.
    fn answered(&self) -> bool {
        // The load keeps the common case (reachable before and after) free of writes.
        !self.0.load(Ordering::Relaxed) && !self.0.swap(true, Ordering::Relaxed)
    }

    /// Records a failure; true if Redis was reachable until now.
    fn failed(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// Locks a mutex, also after a panic elsewhere (the data stays consistent: every update is a
/// single assignment).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks the amounts before anything is sent.
fn validate(op: Op, items: &[(Bucket, f64)]) -> Result<(), RateLimitError> {
    let mut seen = HashSet::new();
    for (bucket, amount) in items {
        let key = || bucket.key.clone();
        if !seen.insert(bucket.key.as_str()) {
            return Err(RateLimitError::DuplicateBucket { key: key() });
        }
        let sane = amount.is_finite() && (op == Op::Adjust || *amount >= 0.0);
        if !sane {
            return Err(RateLimitError::InvalidAmount {
                key: key(),
                amount: *amount,
            });
        }
        if matches!(op, Op::Charge | Op::Peek) && *amount > bucket.capacity {
            return Err(RateLimitError::CostExceedsCapacity {
                key: key(),
                cost: *amount,
                capacity: bucket.capacity,
            });
        }
    }
    Ok(())
}

/// Reads the script's reply: allowed, wait in ms, one level per bucket.
fn parse_reply(reply: &[String], buckets: usize) -> Option<Decision> {
    let [allowed, wait, levels @ ..] = reply else {
        return None;
    };
    let levels: Vec<f64> = levels
        .iter()
        .map(|l| l.parse().ok())
        .collect::<Option<_>>()?;
    let wait_ms: f64 = wait.parse().ok()?;
    (levels.len() == buckets).then(|| Decision {
        allowed: allowed == "1",
        wait: Duration::from_secs_f64(wait_ms.max(0.0) / 1000.0),
        levels,
        source: Source::Redis,
    })
}

/// Reads the script's reply to a lease: allowed, wait in ms, level, tokens granted.
fn parse_lease(reply: &[String]) -> Option<Lease> {
    let [_, wait, level, granted] = reply else {
        return None;
    };
    let wait_ms: f64 = wait.parse().ok()?;
    Some(Lease {
        granted: granted.parse().ok()?,
        level: Some(level.parse().ok()?),
        wait: Duration::from_secs_f64(wait_ms.max(0.0) / 1000.0),
        source: Source::Redis,
    })
}

/// One bucket's level at a moment.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LocalLevel {
    tokens: f64,
    at: Instant,
}

/// The in-process buckets of [`FailMode::LocalShare`]: the same algorithm as the script, on
/// the process clock.
#[derive(Debug, Default)]
struct LocalBuckets {
    levels: HashMap<String, LocalLevel>,
}

impl LocalBuckets {
    /// Applies `op` to buckets that are already this process's share.
    fn apply(&mut self, op: Op, items: &[(Bucket, f64)], now: Instant) -> Decision {
        let current: Vec<f64> = items
            .iter()
            .map(|(bucket, _)| self.level(bucket, now))
            .collect();
        let (wait, written) = plan(op, items, current.clone());
        if let Some(levels) = &written {
            for ((bucket, _), tokens) in items.iter().zip(levels) {
                let state = LocalLevel {
                    tokens: *tokens,
                    at: now,
                };
                self.levels.insert(bucket.key.clone(), state);
            }
        }
        Decision {
            allowed: wait.is_zero(),
            wait,
            levels: written.unwrap_or(current),
            source: Source::Local,
        }
    }

    /// The bucket's level now (full when never used).
    fn level(&self, bucket: &Bucket, now: Instant) -> f64 {
        self.levels.get(&bucket.key).map_or(bucket.capacity, |l| {
            let elapsed = now.saturating_duration_since(l.at).as_secs_f64();
            bucket
                .capacity
                .min(l.tokens + elapsed * bucket.refill_per_sec)
        })
    }
}

/// The decision of the bucket algorithm over current `levels`: the wait, and the new levels
/// when something is written. Admission asks for at most the capacity, so a cost above it
/// (only possible in a local share) passes when the bucket is full and takes it below zero.
fn plan(op: Op, items: &[(Bucket, f64)], levels: Vec<f64>) -> (Duration, Option<Vec<f64>>) {
    let wait_secs = match op {
        Op::Charge | Op::Peek => items
            .iter()
            .zip(&levels)
            .map(|((b, amount), level)| {
                (amount.min(b.capacity) - level).max(0.0) / b.refill_per_sec
            })
            .fold(0.0, f64::max),
        Op::Adjust | Op::Clamp => 0.0,
    };
    let wait = Duration::from_secs_f64(wait_secs);
    let write = match op {
        Op::Charge => wait.is_zero(),
        Op::Peek => false,
        Op::Adjust | Op::Clamp => true,
    };
    let written = write.then(|| {
        items
            .iter()
            .zip(levels)
            .map(|((b, amount), level)| match op {
                Op::Clamp => level.min(*amount),
                _ => b.capacity.min(level - amount),
            })
            .collect()
    });
    (wait, written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(capacity: f64, refill: f64) -> Bucket {
        Bucket::new("t", capacity, refill).unwrap()
    }

    #[test]
    fn buckets_need_a_positive_shape() {
        assert!(Bucket::new("a", 0.0, 1.0).is_err());
        assert!(Bucket::new("a", 1.0, -1.0).is_err());
        assert!(Bucket::new("a", f64::INFINITY, 1.0).is_err());
        let b = Bucket::per_minute("llm:requests", 600.0).unwrap();
        assert_eq!(b.key(), "callcoach:rl:llm:requests");
        assert_eq!((b.capacity(), b.refill_per_sec()), (600.0, 10.0));
    }

    #[test]
    fn validation_refuses_impossible_costs_and_duplicates() {
        let b = bucket(10.0, 1.0);
        assert!(matches!(
            validate(Op::Charge, &[(b.clone(), 11.0)]),
            Err(RateLimitError::CostExceedsCapacity { .. })
        ));
        assert!(matches!(
            validate(Op::Peek, &[(b.clone(), -1.0)]),
            Err(RateLimitError::InvalidAmount { .. })
        ));
        assert!(matches!(
            validate(Op::Charge, &[(b.clone(), 1.0), (b.clone(), 1.0)]),
            Err(RateLimitError::DuplicateBucket { .. })
        ));
        assert!(validate(Op::Adjust, &[(b.clone(), 1e6)]).is_ok(), "forced");
        assert!(validate(Op::Adjust, &[(b.clone(), -1e6)]).is_ok(), "refund");
        assert!(validate(Op::Adjust, &[(b, f64::NAN)]).is_err());
    }

    #[test]
    fn charging_is_all_or_nothing_and_reports_the_longest_wait() {
        let (a, b) = (bucket(10.0, 1.0), bucket(5.0, 2.0));
        let items = [(a, 4.0), (b, 5.0)];
        let (wait, levels) = plan(Op::Charge, &items, vec![10.0, 1.0]);
        assert_eq!(wait, Duration::from_secs(2), "(5 - 1) / 2 per second");
        assert_eq!(levels, None, "nothing written");
        let (wait, levels) = plan(Op::Charge, &items, vec![10.0, 5.0]);
        assert!(wait.is_zero());
        assert_eq!(levels, Some(vec![6.0, 0.0]));
    }

    #[test]
    fn adjust_goes_negative_and_refunds_up_to_capacity() {
        let items = [(bucket(10.0, 1.0), 25.0)];
        assert_eq!(plan(Op::Adjust, &items, vec![5.0]).1, Some(vec![-20.0]));
        let items = [(bucket(10.0, 1.0), -25.0)];
        assert_eq!(plan(Op::Adjust, &items, vec![5.0]).1, Some(vec![10.0]));
        let items = [(bucket(10.0, 1.0), 3.0)];
        assert_eq!(plan(Op::Clamp, &items, vec![5.0]).1, Some(vec![3.0]));
        assert_eq!(plan(Op::Clamp, &items, vec![2.0]).1, Some(vec![2.0]));
    }

    #[test]
    fn local_buckets_refill_over_time() {
        let mut local = LocalBuckets::default();
        let b = bucket(2.0, 10.0);
        let t0 = Instant::now();
        let one = [(b, 1.0)];
        assert!(local.apply(Op::Charge, &one, t0).allowed);
        assert!(local.apply(Op::Charge, &one, t0).allowed);
        let refused = local.apply(Op::Charge, &one, t0);
        assert!(!refused.allowed);
        assert_eq!(refused.wait, Duration::from_millis(100));
        assert_eq!(refused.levels, vec![0.0]);
        assert!(
            local
                .apply(Op::Charge, &one, t0 + Duration::from_millis(100))
                .allowed
        );
    }

    #[test]
    fn a_local_share_lets_a_big_cost_through_a_full_bucket() {
        let mut local = LocalBuckets::default();
        let share = bucket(100.0, 10.0).share(4);
        assert_eq!((share.capacity, share.refill_per_sec), (25.0, 2.5));
        let t0 = Instant::now();
        let big = [(share, 60.0)];
        let first = local.apply(Op::Charge, &big, t0);
        assert!(first.allowed);
        assert_eq!(first.levels, vec![-35.0]);
        let second = local.apply(Op::Charge, &big, t0);
        assert_eq!(
            second.wait,
            Duration::from_secs(24),
            "60 to refill at 2.5/s"
        );
    }

    #[test]
    fn an_outage_is_reported_when_it_starts_and_when_it_ends() {
        let r = Reachability::default();
        assert!(!r.answered(), "reachable from the start: nothing to report");
        assert!(r.failed(), "the first failure starts the outage");
        assert!(
            !r.failed() && !r.failed(),
            "later failures are the same outage"
        );
        assert!(r.answered(), "the first answer ends it");
        assert!(!r.answered());
        assert!(r.failed(), "a new outage");
    }

    #[test]
    fn replies_parse() {
        let reply: Vec<String> = ["0", "1500", "3", "-2.5"].map(String::from).into();
        let d = parse_reply(&reply, 2).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.wait, Duration::from_millis(1500));
        assert_eq!(d.levels, vec![3.0, -2.5]);
        assert!(parse_reply(&reply, 3).is_none());
        assert!(parse_reply(&["1".to_string()], 0).is_none());
    }
}
