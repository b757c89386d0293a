//! Token leases of the HTTP limits: what lets a busy API key's requests be decided in this
//! process instead of costing one Redis round trip each, without admitting more than the
//! shared bucket holds.
//!
//! # How
//! Every (class, key) bucket has an entry here. A request takes a token the process holds
//! for that bucket, if any: no Redis call. When none is held, it asks Redis for a lease
//! ([`RateLimiter::lease`]): as many whole tokens as the key used in the current or the last
//! window of [`WINDOW`] (at least one, at most [`MAX_LEASE`], at most what the bucket holds).
//! So a key sending a request now and then costs one `EVALSHA` per request, as before, and
//! a key sending thousands a second one per window. While a key still holds tokens but fewer
//! than half a window's worth, the next lease is asked for in the background, so a busy key's
//! requests never wait for Redis.
//!
//! Only one lease per bucket is asked for at a time, by a task of its own (a client that goes
//! away cannot leave it half done). Requests that find no token while it runs wait for its
//! answer and then take from what it brought. When Redis held less than a token, the lease
//! says when the next one exists; requests finding no token before then are refused here,
//! with that `Retry-After`. Tokens held are always spent before a refusal is remembered, so a
//! refusal never turns away a request that a held token could serve.
//!
//! # Why it stays exact
//! - A token is taken from the shared bucket, atomically, before it is handed out: the fleet
//!   never admits more than Redis granted. N concurrent requests against a limit of L
//!   admit exactly min(N, L).
//! - Held tokens expire [`LEASE_LIFETIME`] after their lease; the ones left are given back to
//!   the bucket with the next lease of that bucket (up to its capacity). A key that sent a
//!   burst and stopped therefore strands at most one window's worth of tokens for 100 ms.
//! - Headers show the bucket's level when Redis last answered, refilled since at the
//!   bucket's rate, plus the tokens held here: what the key can still send. With one process
//!   this is exactly what one `EVALSHA` per request would report; with several, each sees
//!   the others' use at its next lease.
//! - While Redis is unreachable the lease fails open after the limiter's timeout, and the
//!   requests that waited for it are let through with it.

use super::limits::BucketState;
use crate::rate_limit::{Bucket, Lease, RateLimiter, Source};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// Length of a window in which a key's requests are counted to size its next lease.
pub const WINDOW: Duration = Duration::from_millis(50);

/// How long tokens of a lease may be handed out.
pub const LEASE_LIFETIME: Duration = Duration::from_millis(100);

/// Most tokens one lease takes.
pub const MAX_LEASE: u32 = 1024;

/// Rounds a request waits for leases before it asks Redis for its own token directly (only
/// reached when other requests keep taking every token a lease brings).
const MAX_ROUNDS: usize = 8;

/// Entries kept before idle ones (no request for [`IDLE`]) are dropped. After a pass, the
/// next one comes when the table has doubled, so a process serving many active keys scans
/// it once per doubling, not on every request.
const MAX_ENTRIES: usize = 4096;

/// How long an entry stays without requests before it may be dropped.
const IDLE: Duration = Duration::from_secs(60);

/// What a request got.
#[derive(Clone, Debug, PartialEq)]
pub struct Acquired {
    /// Whether the request may proceed (also when Redis could not be asked).
    pub allowed: bool,
    /// The bucket's state for the headers; `None` when Redis could not be asked.
    pub state: Option<BucketState>,
}

impl Acquired {
    const FAILED_OPEN: Acquired = Acquired {
        allowed: true,
        state: None,
    };
}

/// The leases of one process, over the fleet limiter. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    limiter: RateLimiter,
    entries: Arc<Mutex<Table>>,
}

/// The entries by bucket key, and the size at which idle ones are next dropped.
#[derive(Debug)]
struct Table {
    entries: HashMap<String, Entry>,
    prune_above: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            prune_above: MAX_ENTRIES,
        }
    }
}

impl Table {
    /// The entry of `bucket`, new if it has none (dropping idle ones first when the table
    /// has grown past `prune_above`).
    fn entry(&mut self, bucket: &Bucket, now: Instant) -> &mut Entry {
        if self.entries.len() >= self.prune_above && !self.entries.contains_key(bucket.key()) {
            self.entries
                .retain(|_, e| now.duration_since(e.last_seen) < IDLE || e.pending.is_some());
            self.prune_above = MAX_ENTRIES.max(2 * self.entries.len());
        }
        self.entries
            .entry(bucket.key().to_string())
            .or_insert_with(|| Entry::new(now))
    }
}

/// How a lease ended, for the requests that waited for it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Round {
    Pending,
    Answered,
    FailedOpen,
}

/// One bucket's state in this process.
#[derive(Debug)]
struct Entry {
    /// Tokens held here, usable until `held_until`.
    held: u32,
    held_until: Instant,
    /// The bucket's level when Redis last answered, and when that was.
    level: f64,
    level_at: Instant,
    /// No token exists before then (Redis said so, and nothing was held).
    refused_until: Option<Instant>,
    /// The lease being asked for, if any.
    pending: Option<watch::Receiver<Round>>,
    /// Requests in the current window (started at `window_start`) and in the last one.
    window_start: Instant,
    this_window: u32,
    last_window: u32,
    last_seen: Instant,
}

/// What a request does next.
enum Step {
    Done(Acquired),
    Wait(watch::Receiver<Round>),
}

impl Leases {
    /// Leases over `limiter`.
    pub fn new(limiter: RateLimiter) -> Self {
        Self {
            limiter,
            entries: Arc::default(),
        }
    }

    /// Takes one token of `bucket` for a request: from what this process holds, else from a
    /// lease (waiting for it), else refused until the next token exists.
    pub async fn acquire(&self, bucket: &Bucket) -> Acquired {
        for round in 0..MAX_ROUNDS {
            match self.step(bucket, Instant::now(), round == 0) {
                Step::Done(acquired) => return acquired,
                Step::Wait(mut answer) => {
                    // An error means the task ended without a word: ask again.
                    let _ = answer.changed().await;
                    if *answer.borrow() == Round::FailedOpen {
                        return Acquired::FAILED_OPEN;
                    }
                }
            }
        }
        let lease = self.limiter.lease(bucket, 1, 0).await;
        let mut entries = lock(&self.entries);
        let entry = entries.entry(bucket, Instant::now());
        if entry.record(&lease, Instant::now()) == Round::FailedOpen {
            return Acquired::FAILED_OPEN;
        }
        entry
            .take(bucket, Instant::now())
            .unwrap_or_else(|| entry.refusal(bucket, Instant::now()))
    }

    /// One decision under the lock: a held token, a lease to wait for, or a refusal.
    fn step(&self, bucket: &Bucket, now: Instant, first: bool) -> Step {
        let mut entries = lock(&self.entries);
        let entry = entries.entry(bucket, now);
        if first {
            entry.count(now);
        }
        if let Some(acquired) = entry.take(bucket, now) {
            if entry.pending.is_none() && entry.running_low(now) {
                self.ask(bucket, entry, now);
            }
            return Step::Done(acquired);
        }
        if let Some(pending) = &entry.pending {
            return Step::Wait(pending.clone());
        }
        if entry.held == 0 && entry.refused_until.is_some_and(|until| until > now) {
            return Step::Done(entry.refusal(bucket, now));
        }
        Step::Wait(self.ask(bucket, entry, now))
    }

    /// Starts the task that asks Redis for a lease of `bucket`, giving back the tokens of an
    /// ended lease; returns what it will answer.
    fn ask(&self, bucket: &Bucket, entry: &mut Entry, now: Instant) -> watch::Receiver<Round> {
        let (done, answer) = watch::channel(Round::Pending);
        entry.pending = Some(answer.clone());
        let give_back = if now >= entry.held_until {
            std::mem::take(&mut entry.held)
        } else {
            0
        };
        let want = entry.demand().clamp(1, MAX_LEASE);
        let (limiter, entries, bucket) = (
            self.limiter.clone(),
            Arc::clone(&self.entries),
            bucket.clone(),
        );
        tokio::spawn(async move {
            let lease = limiter.lease(&bucket, want, give_back).await;
            let round = {
                let now = Instant::now();
                let mut entries = lock(&entries);
                let entry = entries.entry(&bucket, now);
                entry.pending = None;
                entry.record(&lease, now)
            };
            let _ = done.send(round);
        });
        answer
    }
}

/// Locks the entries, also after a panic elsewhere (every update keeps an entry consistent).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            held: 0,
            held_until: now,
            level: 0.0,
            level_at: now,
            refused_until: None,
            pending: None,
            window_start: now,
            this_window: 0,
            last_window: 0,
            last_seen: now,
        }
    }

    /// Counts a request, moving to a new window when the current one is over.
    fn count(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= WINDOW {
            self.last_window = if elapsed < 2 * WINDOW {
                self.this_window
            } else {
                0
            };
            self.this_window = 0;
            self.window_start = now;
        }
        self.this_window = self.this_window.saturating_add(1);
        self.last_seen = now;
    }

    /// Requests expected in a window: the busier of the current and the last one.
    fn demand(&self) -> u32 {
        self.this_window.max(self.last_window)
    }

    /// Whether the tokens held are fewer than half a window's demand, so the next lease
    /// should be asked for now (unless Redis is known to be empty).
    fn running_low(&self, now: Instant) -> bool {
        let empty = self.refused_until.is_some_and(|until| until > now);
        !empty && self.held < self.demand() / 2
    }

    /// Takes a held token, if one is valid.
    fn take(&mut self, bucket: &Bucket, now: Instant) -> Option<Acquired> {
        if self.held == 0 || now >= self.held_until {
            return None;
        }
        self.held -= 1;
        Some(Acquired {
            allowed: true,
            state: Some(self.state(bucket, now, Duration::ZERO)),
        })
    }

    /// A refusal until the next token exists.
    fn refusal(&self, bucket: &Bucket, now: Instant) -> Acquired {
        let retry_in = self
            .refused_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        Acquired {
            allowed: false,
            state: Some(self.state(bucket, now, retry_in)),
        }
    }

    /// Records a lease's answer.
    fn record(&mut self, lease: &Lease, now: Instant) -> Round {
        let Some(level) = lease.level.filter(|_| lease.source != Source::FailedOpen) else {
            return Round::FailedOpen;
        };
        self.level = level;
        self.level_at = now;
        if lease.granted > 0 {
            self.held += lease.granted;
            self.held_until = now + LEASE_LIFETIME;
            self.refused_until = None;
        } else if self.held == 0 || now >= self.held_until {
            self.refused_until = Some(now + lease.wait);
        }
        Round::Answered
    }

    /// Redis' level when it last answered, refilled since at the bucket's rate.
    fn level_now(&self, bucket: &Bucket, now: Instant) -> f64 {
        let refilled = bucket.refill_per_sec() * now.duration_since(self.level_at).as_secs_f64();
        (self.level + refilled).min(bucket.capacity())
    }

    /// The state the headers show: Redis' level now, plus the valid tokens held here.
    fn state(&self, bucket: &Bucket, now: Instant, retry_in: Duration) -> BucketState {
        let capacity = bucket.capacity();
        let held = if now < self.held_until { self.held } else { 0 };
        let level = (self.level_now(bucket, now) + f64::from(held)).clamp(0.0, capacity);
        BucketState {
            remaining: level.floor() as u32,
            full_in: Duration::from_secs_f64((capacity - level) / bucket.refill_per_sec()),
            retry_in,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_min: f64) -> Bucket {
        Bucket::per_minute("http:get:t", per_min).unwrap()
    }

    fn answer(granted: u32, level: f64, wait_ms: u64) -> Lease {
        Lease {
            granted,
            level: Some(level),
            wait: Duration::from_millis(wait_ms),
            source: Source::Redis,
        }
    }

    #[test]
    fn idle_entries_are_dropped_once_per_doubling_of_the_table() {
        let t0 = Instant::now();
        let key = |i: usize| Bucket::per_minute(&format!("http:get:{i}"), 60.0).unwrap();
        let mut table = Table::default();
        let mut passes = 0;
        for i in 0..4 * MAX_ENTRIES {
            let before = table.prune_above;
            table.entry(&key(i), t0);
            passes += usize::from(table.prune_above != before);
        }
        assert_eq!(table.entries.len(), 4 * MAX_ENTRIES, "active entries stay");
        assert_eq!(passes, 2, "passes at 1× and 2× MAX_ENTRIES only");
        assert_eq!(table.prune_above, 4 * MAX_ENTRIES);
        let later = t0 + IDLE + Duration::from_secs(1);
        table.entry(&key(0), later).count(later);
        assert_eq!(
            table.entries.len(),
            4 * MAX_ENTRIES,
            "a known key is no pass"
        );
        table.entry(&key(usize::MAX), later);
        assert_eq!(
            table.entries.len(),
            2,
            "idle entries dropped, the two recent kept"
        );
        assert_eq!(table.prune_above, MAX_ENTRIES);
    }

    #[test]
    fn held_tokens_count_as_remaining_and_are_spent_here() {
        let (b, t0) = (bucket(6000.0), Instant::now());
        let mut entry = Entry::new(t0);
        assert_eq!(entry.take(&b, t0), None, "nothing held yet");
        assert_eq!(entry.record(&answer(4, 4990.0, 0), t0), Round::Answered);
        for left in [4993, 4992, 4991, 4990] {
            let got = entry.take(&b, t0).unwrap();
            assert!(got.allowed);
            assert_eq!(got.state.unwrap().remaining, left);
        }
        assert_eq!(entry.take(&b, t0), None, "all four spent");
        let later = t0 + Duration::from_millis(600);
        assert_eq!(
            entry.state(&b, later, Duration::ZERO).remaining,
            5050,
            "refilled at 100/s since Redis answered"
        );
    }

    #[test]
    fn held_tokens_expire_with_their_lease() {
        let (b, t0) = (bucket(6000.0), Instant::now());
        let mut entry = Entry::new(t0);
        entry.record(&answer(3, 100.0, 0), t0);
        let late = t0 + LEASE_LIFETIME;
        assert_eq!(entry.take(&b, late), None);
        assert_eq!(entry.held, 3, "kept to be given back with the next lease");
        assert_eq!(
            entry.state(&b, late, Duration::ZERO).remaining,
            110,
            "expired tokens no longer count"
        );
    }

    #[test]
    fn a_refusal_is_remembered_only_when_nothing_is_held() {
        let (b, t0) = (bucket(60.0), Instant::now());
        let mut entry = Entry::new(t0);
        entry.record(&answer(2, 0.0, 0), t0);
        // A background lease comes back empty while two tokens are still held.
        entry.record(&answer(0, 0.0, 1_000), t0);
        assert_eq!(entry.refused_until, None);
        assert!(entry.take(&b, t0).is_some() && entry.take(&b, t0).is_some());
        entry.record(&answer(0, 0.4, 600), t0);
        let refused = entry.refusal(&b, t0 + Duration::from_millis(100));
        assert!(!refused.allowed);
        let state = refused.state.unwrap();
        assert_eq!(state.retry_in, Duration::from_millis(500));
        assert_eq!(state.remaining, 0);
    }

    #[test]
    fn a_lease_is_sized_by_the_busier_window() {
        let t0 = Instant::now();
        let mut entry = Entry::new(t0);
        for _ in 0..30 {
            entry.count(t0);
        }
        assert_eq!(entry.demand(), 30);
        entry.count(t0 + WINDOW);
        assert_eq!((entry.this_window, entry.last_window), (1, 30));
        assert_eq!(entry.demand(), 30);
        entry.count(t0 + 4 * WINDOW);
        assert_eq!(entry.demand(), 1, "an idle window forgets the burst");
        entry.held = 0;
        assert!(!entry.running_low(t0), "no demand, no lease ahead");
        for _ in 0..9 {
            entry.count(t0 + 4 * WINDOW);
        }
        assert!(entry.running_low(t0), "10 expected, none held");
        entry.refused_until = Some(t0 + Duration::from_secs(1));
        assert!(!entry.running_low(t0), "Redis is empty");
    }

    #[test]
    fn a_failed_lease_answers_failed_open() {
        let t0 = Instant::now();
        let mut entry = Entry::new(t0);
        let open = Lease {
            granted: 0,
            level: None,
            wait: Duration::ZERO,
            source: Source::FailedOpen,
        };
        assert_eq!(entry.record(&open, t0), Round::FailedOpen);
        assert_eq!((entry.held, entry.refused_until), (0, None));
    }
}
