//! Per-minute rate limits and the `anthropic-ratelimit-*` headers.
//!
//! Each bucket (requests, input tokens, output tokens) is a sliding
//! one-minute window. Input tokens count uncached input plus cache writes,
//! never cache reads. A limit that is not configured is reported in the
//! headers with a nominal value but never enforced. Over an enforced limit a
//! request is refused with 429 `rate_limit_error`, `retry-after` and
//! `retry-after-ms` saying when the window has room again.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use chrono::{SecondsFormat, Utc};

use super::errors::ApiError;
use super::lock;

/// The window every limit is counted over.
const WINDOW: Duration = Duration::from_secs(60);
/// Reported when no requests-per-minute limit is configured.
const NOMINAL_RPM: u64 = 4_000;
/// Reported when no input-tokens-per-minute limit is configured.
const NOMINAL_ITPM: u64 = 2_000_000;
/// Reported when no output-tokens-per-minute limit is configured.
const NOMINAL_OTPM: u64 = 400_000;
/// Accepted-request timestamps kept for [`Limiter::request_times`].
const MAX_KEPT_TIMES: usize = 100_000;

/// Enforced per-minute limits; `None` leaves a bucket unenforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Input tokens per minute (uncached input + cache writes).
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute (thinking included).
    pub output_tokens_per_minute: Option<u64>,
}

/// Timestamped amounts within the window.
#[derive(Debug, Default)]
struct Bucket {
    events: VecDeque<(Instant, u64)>,
}

impl Bucket {
    /// Drops events older than the window.
    fn prune(&mut self, now: Instant) {
        while self
            .events
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW)
        {
            self.events.pop_front();
        }
    }

    /// Sum within the window.
    fn used(&self) -> u64 {
        self.events.iter().map(|(_, n)| n).sum()
    }

    /// When the window is fully replenished.
    fn reset_in(&self, now: Instant) -> Duration {
        self.events.front().map_or(Duration::ZERO, |(t, _)| {
            (*t + WINDOW).saturating_duration_since(now)
        })
    }

    /// How long until the used amount drops below `limit`.
    fn wait_for_room(&self, limit: u64, now: Instant) -> Duration {
        let mut used = self.used();
        for (t, n) in &self.events {
            if used < limit {
                break;
            }
            used -= n;
            if used < limit {
                return (*t + WINDOW).saturating_duration_since(now);
            }
        }
        Duration::ZERO
    }
}

/// The three buckets.
#[derive(Debug, Default)]
struct Window {
    requests: Bucket,
    input: Bucket,
    output: Bucket,
    accepted: VecDeque<Instant>,
}

/// Rate limiter shared by all `/v1/messages` requests.
#[derive(Debug, Default)]
pub(super) struct Limiter {
    limits: RateLimits,
    window: Mutex<Window>,
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub(super) fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            window: Mutex::new(Window::default()),
        }
    }

    /// Admits a request arriving at `now` or refuses it with a 429.
    pub(super) fn admit(&self, now: Instant) -> Result<(), ApiError> {
        let mut w = lock(&self.window);
        prune(&mut w, now);
        let checks = [
            (&w.requests, self.limits.requests_per_minute, "requests"),
            (
                &w.input,
                self.limits.input_tokens_per_minute,
                "input tokens",
            ),
            (
                &w.output,
                self.limits.output_tokens_per_minute,
                "output tokens",
            ),
        ];
        for (bucket, limit, what) in checks {
            if let Some(limit) = limit
                && bucket.used() >= limit
            {
                let wait = bucket
                    .wait_for_room(limit, now)
                    .max(Duration::from_millis(1));
                return Err(ApiError::rate_limited(
                    format!(
                        "This request would exceed your organization's rate limit of {limit} {what} per minute (emulated)."
                    ),
                    wait,
                ));
            }
        }
        w.requests.events.push_back((now, 1));
        if w.accepted.len() >= MAX_KEPT_TIMES {
            w.accepted.pop_front();
        }
        w.accepted.push_back(now);
        Ok(())
    }

    /// Records the tokens of an answered request.
    pub(super) fn record(&self, now: Instant, input: u64, output: u64) {
        let mut w = lock(&self.window);
        w.input.events.push_back((now, input));
        w.output.events.push_back((now, output));
    }

    /// Arrival times of admitted requests (the latest 100,000).
    pub(super) fn request_times(&self) -> Vec<Instant> {
        lock(&self.window).accepted.iter().copied().collect()
    }

    /// Adds the `anthropic-ratelimit-*` headers for the state at `now`.
    pub(super) fn add_headers(&self, headers: &mut HeaderMap, now: Instant) {
        let mut w = lock(&self.window);
        prune(&mut w, now);
        let rpm = self.limits.requests_per_minute.unwrap_or(NOMINAL_RPM);
        let itpm = self.limits.input_tokens_per_minute.unwrap_or(NOMINAL_ITPM);
        let otpm = self.limits.output_tokens_per_minute.unwrap_or(NOMINAL_OTPM);
        let tokens_used = w.input.used() + w.output.used();
        let tokens_reset = w.input.reset_in(now).max(w.output.reset_in(now));
        let rows = [
            ("requests", rpm, w.requests.used(), w.requests.reset_in(now)),
            ("input-tokens", itpm, w.input.used(), w.input.reset_in(now)),
            (
                "output-tokens",
                otpm,
                w.output.used(),
                w.output.reset_in(now),
            ),
            ("tokens", itpm + otpm, tokens_used, tokens_reset),
        ];
        for (name, limit, used, reset_in) in rows {
            let reset = Utc::now() + chrono::Duration::from_std(reset_in).unwrap_or_default();
            let values = [
                ("limit", limit.to_string()),
                ("remaining", limit.saturating_sub(used).to_string()),
                ("reset", reset.to_rfc3339_opts(SecondsFormat::Secs, true)),
            ];
            for (field, value) in values {
                if let (Ok(name), Ok(value)) = (
                    axum::http::HeaderName::try_from(format!("anthropic-ratelimit-{name}-{field}")),
                    HeaderValue::from_str(&value),
                ) {
                    headers.insert(name, value);
                }
            }
        }
    }
}

/// Prunes every bucket.
fn prune(w: &mut Window, now: Instant) {
    w.requests.prune(now);
    w.input.prune(now);
    w.output.prune(now);
}
