//! Local token leases of the HTTP limits: what lets a busy API key's requests be decided in
//! this process instead of one Redis round trip each, without admitting a request more than
//! the shared bucket holds.
//!
//! # How
//! Every (class, key) bucket has an entry here. Requests are counted in windows of
//! [`WINDOW`]. When a request finds no token held locally, it asks Redis for its own token
//! plus a lease of as many more as the key used in the previous window (at most a tenth of
//! the bucket and [`MAX_LEASE`]); the next requests of the window take those tokens here.
//! So a key sending one request now and then costs one `EVALSHA` per request, as before,
//! and a key sending thousands a second costs one per window.
//!
//! # Why it stays exact
//! - Tokens are taken from the shared bucket before they are handed out, so the fleet never
//!   admits more than Redis granted: a lease only moves tokens from Redis to one process.
//! - Only one lease per bucket is asked for at a time; requests arriving meanwhile charge one
//!   token each, as without leases. The first burst of a key (no previous window) takes no
//!   lease at all, so N concurrent requests against a limit of L admit exactly min(N, L).
//! - A lease ends with its window. Tokens left in it are given back to Redis (capped at the
//!   capacity) before the next charge of that bucket from this process, so a lease cannot
//!   strand tokens for more than a window while the key is active.
//! - A refusal is remembered until the time Redis said the next token exists: only refills
//!   add tokens, so Redis would refuse those requests too. They are answered here.
//! - Headers report the bucket's level when Redis last answered, refilled since at the
//!   bucket's rate, plus the tokens still held here: what the key could still send.

use super::limits::BucketState;
use crate::rate_limit::Bucket;
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Length of a counting window and of a lease.
pub const WINDOW: Duration = Duration::from_millis(50);

/// Most tokens one lease takes.
pub const MAX_LEASE: u32 = 1024;

/// Entries kept before idle ones (no request for a minute) are dropped.
const MAX_ENTRIES: usize = 4096;

/// The leases of one process, keyed by bucket name.
#[derive(Default)]
pub struct Leases {
    entries: Mutex<HashMap<String, Entry>>,
}

/// One bucket's local state.
#[derive(Debug)]
struct Entry {
    /// Start of the current counting window.
    window_start: Instant,
    /// Requests in the current window, and in the previous one.
    this_window: u32,
    last_window: u32,
    /// Tokens held here, valid until `expires`.
    held: u32,
    expires: Instant,
    /// The bucket's level when Redis last answered, and when that was.
    level: f64,
    level_at: Instant,
    /// Refused until then (Redis said no token exists before).
    refused_until: Option<Instant>,
    /// A lease is being asked for.
    asking: bool,
    last_seen: Instant,
}

/// What to do with one request.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Decided here: allowed (a held token) or refused (remembered refusal).
    Local {
        /// Whether the request may proceed.
        allowed: bool,
        /// The bucket's state for the headers.
        state: BucketState,
    },
    /// Ask Redis for `take` tokens (one for this request, the rest leased), after giving back
    /// `give_back` tokens of an ended lease.
    Remote {
        /// Tokens to charge.
        take: u32,
        /// Tokens of an ended lease to return first.
        give_back: u32,
    },
}

impl Leases {
    /// Decides `bucket`'s request now, or says what to ask Redis.
    pub fn plan(&self, bucket: &Bucket, now: Instant) -> Plan {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries
            .entry(bucket.key().to_string())
            .or_insert_with(|| Entry::new(now));
        entry.count(now);
        if let Some(until) = entry.refused_until.filter(|u| *u > now) {
            let state = entry.state(bucket, now, until - now);
            return Plan::Local {
                allowed: false,
                state,
            };
        }
        if entry.held > 0 && now < entry.expires {
            entry.held -= 1;
            let state = entry.state(bucket, now, Duration::ZERO);
            return Plan::Local {
                allowed: true,
                state,
            };
        }
        let give_back = std::mem::take(&mut entry.held);
        if entry.asking {
            return Plan::Remote { take: 1, give_back };
        }
        // At most a tenth of the bucket, and no more than it held when Redis last answered.
        let most = ((bucket.capacity() / 10.0).floor() as u32).clamp(1, MAX_LEASE + 1);
        let level = entry.level_now(bucket, now).floor() as u32;
        let take = (entry.last_window + 1).min(most).min(level.max(1));
        entry.asking = take > 1;
        Plan::Remote { take, give_back }
    }

    /// Records Redis' answer to a [`Plan::Remote`] of `take` tokens: `level` after the
    /// charge, `allowed`, and `wait` until the tokens exist when refused. Returns the state
    /// for the request's headers.
    pub fn record(
        &self,
        bucket: &Bucket,
        now: Instant,
        take: u32,
        answer: Option<(bool, f64, Duration)>,
    ) -> Option<BucketState> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() > MAX_ENTRIES {
            entries.retain(|_, e| now.duration_since(e.last_seen) < Duration::from_secs(60));
        }
        let entry = entries
            .entry(bucket.key().to_string())
            .or_insert_with(|| Entry::new(now));
        if take > 1 {
            entry.asking = false;
        }
        let (allowed, level, wait) = answer?;
        entry.level = level;
        entry.level_at = now;
        if allowed {
            entry.held += take - 1;
            entry.expires = now + WINDOW;
            entry.refused_until = None;
        } else if take == 1 {
            entry.refused_until = Some(now + wait);
        }
        Some(entry.state(bucket, now, if allowed { Duration::ZERO } else { wait }))
    }
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            this_window: 0,
            last_window: 0,
            held: 0,
            expires: now,
            level: 0.0,
            level_at: now,
            refused_until: None,
            asking: false,
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
        self.this_window += 1;
        self.last_seen = now;
    }

    /// Redis' level when it last answered, refilled since at the bucket's rate.
    fn level_now(&self, bucket: &Bucket, now: Instant) -> f64 {
        let refilled = bucket.refill_per_sec() * now.duration_since(self.level_at).as_secs_f64();
        (self.level + refilled).min(bucket.capacity())
    }

    /// The state the headers show: Redis' level now, plus the tokens held here.
    fn state(&self, bucket: &Bucket, now: Instant, retry_in: Duration) -> BucketState {
        let capacity = bucket.capacity();
        let level = (self.level_now(bucket, now) + f64::from(self.held)).max(0.0);
        BucketState {
            remaining: level.min(capacity).floor() as u32,
            full_in: Duration::from_secs_f64((capacity - level).max(0.0) / bucket.refill_per_sec()),
            retry_in,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn bucket(per_min: f64) -> Bucket {
        Bucket::per_minute(&format!("http:get:{}", Uuid::new_v4()), per_min).unwrap()
    }

    #[test]
    fn a_redis_answer_becomes_the_headers_state() {
        let (leases, b, now) = (Leases::default(), bucket(100.0), Instant::now());
        let s = leases
            .record(&b, now, 1, Some((true, 95.4, Duration::ZERO)))
            .unwrap();
        assert_eq!(s.remaining, 95);
        assert!((s.full_in.as_secs_f64() - 4.6 * 0.6).abs() < 1e-9);
        assert_eq!(
            leases.record(&b, now, 1, None),
            None,
            "failed open: nobody knows"
        );
    }

    #[test]
    fn a_first_burst_takes_no_lease() {
        let (leases, b, now) = (Leases::default(), bucket(1000.0), Instant::now());
        for _ in 0..5 {
            assert_eq!(
                leases.plan(&b, now),
                Plan::Remote {
                    take: 1,
                    give_back: 0
                }
            );
        }
    }

    #[test]
    fn a_busy_key_leases_what_it_used_in_the_last_window_and_spends_it_here() {
        let (leases, b, t0) = (Leases::default(), bucket(6000.0), Instant::now());
        for _ in 0..3 {
            assert!(matches!(leases.plan(&b, t0), Plan::Remote { take: 1, .. }));
            leases.record(&b, t0, 1, Some((true, 5000.0, Duration::ZERO)));
        }
        let t1 = t0 + WINDOW;
        // Its own token and the 3 the key used in the last window.
        assert_eq!(
            leases.plan(&b, t1),
            Plan::Remote {
                take: 4,
                give_back: 0
            }
        );
        // A second request while the lease is asked for charges its own token.
        assert_eq!(
            leases.plan(&b, t1),
            Plan::Remote {
                take: 1,
                give_back: 0
            }
        );
        leases.record(&b, t1, 1, Some((true, 4999.0, Duration::ZERO)));
        let state = leases.record(&b, t1, 4, Some((true, 4995.0, Duration::ZERO)));
        assert_eq!(
            state.unwrap().remaining,
            4998,
            "held tokens count as remaining"
        );
        for left in [4997, 4996, 4995] {
            match leases.plan(&b, t1) {
                Plan::Local {
                    allowed: true,
                    state,
                } => assert_eq!(state.remaining, left),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            leases.plan(&b, t1),
            Plan::Remote { give_back: 0, .. }
        ));
    }

    #[test]
    fn tokens_of_an_ended_lease_are_given_back_with_the_next_charge() {
        let (leases, b, t0) = (Leases::default(), bucket(6000.0), Instant::now());
        for _ in 0..5 {
            leases.plan(&b, t0);
            leases.record(&b, t0, 1, Some((true, 5000.0, Duration::ZERO)));
        }
        let t1 = t0 + WINDOW;
        let Plan::Remote { take, .. } = leases.plan(&b, t1) else {
            panic!("a lease is asked for")
        };
        leases.record(&b, t1, take, Some((true, 4990.0, Duration::ZERO)));
        let t2 = t1 + WINDOW + Duration::from_millis(1);
        assert!(matches!(
            leases.plan(&b, t2),
            Plan::Remote { give_back, .. } if give_back == take - 1
        ));
    }

    #[test]
    fn a_refusal_is_remembered_until_the_next_token_exists() {
        let (leases, b, t0) = (Leases::default(), bucket(60.0), Instant::now());
        leases.plan(&b, t0);
        leases.record(&b, t0, 1, Some((false, 0.4, Duration::from_millis(600))));
        match leases.plan(&b, t0 + Duration::from_millis(100)) {
            Plan::Local {
                allowed: false,
                state,
            } => {
                assert_eq!(state.retry_in, Duration::from_millis(500));
                assert_eq!(state.remaining, 0);
            }
            other => panic!("{other:?}"),
        }
        let later = t0 + Duration::from_millis(600);
        assert!(matches!(leases.plan(&b, later), Plan::Remote { .. }));
    }

    #[test]
    fn a_small_bucket_leases_at_most_a_tenth_and_never_more_than_it_holds() {
        let (leases, b, t0) = (Leases::default(), bucket(30.0), Instant::now());
        for _ in 0..10 {
            leases.plan(&b, t0);
            leases.record(&b, t0, 1, Some((true, 20.0, Duration::ZERO)));
        }
        assert_eq!(
            leases.plan(&b, t0 + WINDOW),
            Plan::Remote {
                take: 3,
                give_back: 0
            }
        );
        let (leases, b) = (Leases::default(), bucket(600.0));
        for _ in 0..10 {
            leases.plan(&b, t0);
            leases.record(&b, t0, 1, Some((true, 2.0, Duration::ZERO)));
        }
        assert_eq!(
            leases.plan(&b, t0 + WINDOW),
            Plan::Remote {
                take: 2,
                give_back: 0
            }
        );
    }
}
