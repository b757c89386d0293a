//! Fleet-wide limits on LLM use: the API's rate limits ([`FleetLimiter`]) and the USD budgets
//! ([`SpendGuard`]), both kept in Redis through [`crate::rate_limit`] so every worker process
//! draws on the same allowance.
//!
//! # Rate limits
//! Three per-minute token buckets, as Anthropic counts them: requests, input tokens (uncached
//! input plus cache writes; cache reads do not count for current models) and output tokens.
//! A call is charged *before* it is sent, with an estimate ([`crate::llm::estimate_tokens`] or
//! `count_tokens` for the input, `max_tokens` or a typical figure for the output), in one
//! all-or-nothing charge over the three buckets. [`FleetLimiter::acquire`] sleeps while the
//! buckets refill, up to a maximum wait, then gives up with [`AcquireError::Throttled`] so the
//! job can snooze instead of holding a worker slot. After the call,
//! [`FleetLimiter::settle`] corrects the charge from the reported usage (a larger actual
//! usage takes the buckets below zero and later callers wait). When the API's
//! `anthropic-ratelimit-*-remaining` headers say the account is nearly spent (other clients
//! share it, or our estimates were low), [`FleetLimiter::observe_headers`] lowers the buckets
//! to what the API says is left.
//!
//! Redis unreachable: the limits *fail closed* to a local share: each process enforces
//! `1 / processes` of every limit by itself ([`FailMode::LocalShare`]), so the fleet stays
//! within the account's limits if `processes` is at least the number of worker processes.
//!
//! # Spend
//! [`SpendGuard`] keeps the fleet's spend per UTC day and month as integer micro-dollars in
//! counters `callcoach:spend:day:2026-12-02` and `callcoach:spend:month:2026-12` (expiring a
//! day after their window). [`SpendGuard::check`] runs before a call and answers
//! [`OverBudget`] with the window and when it resets (background jobs snooze until then,
//! interactive requests show the error); [`SpendGuard::charge`] adds the real cost after it.
//! Calls already under way when the budget runs out still finish, so the spend can exceed a
//! budget by what the calls in flight cost. Windows follow the process clock (UTC).
//!
//! Redis unreachable for spend: charges are counted in the process and added to Redis with
//! the next charge that reaches it (a zero charge just sends them), so no spend is lost unless
//! the process exits first; meanwhile checks compare the last
//! total read from Redis plus this process's unsent spend with the budget (other processes'
//! spend during the outage is not seen until Redis is back). Work is not stopped because
//! Redis is down: the rate limits already bound what an outage can cost.
//! Gauges `callcoach_llm_spend_usd{window}` and `callcoach_llm_budget_usd{window}` show spend
//! against budget.

use crate::{
    rate_limit::{
        Bucket, Counter, Decision, FailMode, LimiterOptions, RateLimitError, RateLimiter,
    },
    telemetry::names,
};
use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use redis::aio::ConnectionManager;
use reqwest::header::HeaderMap;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

/// Below this fraction of its limit, a `remaining` header clamps the bucket.
pub const HEADER_LOW_FRACTION: f64 = 0.2;

/// The fleet's per-minute limits; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetLimits {
    /// Requests per minute.
    pub requests_per_min: u64,
    /// Input tokens per minute (uncached input plus cache writes).
    pub input_tokens_per_min: u64,
    /// Output tokens per minute (thinking included).
    pub output_tokens_per_min: u64,
}

/// One of the three rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Requests per minute.
    Requests,
    /// Input tokens per minute.
    InputTokens,
    /// Output tokens per minute.
    OutputTokens,
}

impl Limit {
    /// All three, in bucket order.
    pub const ALL: [Limit; 3] = [Limit::Requests, Limit::InputTokens, Limit::OutputTokens];

    /// Metric label and bucket name.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::InputTokens => "input_tokens",
            Limit::OutputTokens => "output_tokens",
        }
    }

    /// The part of `anthropic-ratelimit-<part>-remaining`.
    fn header(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::InputTokens => "input-tokens",
            Limit::OutputTokens => "output-tokens",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn per_min(self, limits: &FleetLimits) -> u64 {
        match self {
            Limit::Requests => limits.requests_per_min,
            Limit::InputTokens => limits.input_tokens_per_min,
            Limit::OutputTokens => limits.output_tokens_per_min,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One limit as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// `anthropic-ratelimit-*-limit`.
    pub limit: u64,
    /// `anthropic-ratelimit-*-remaining`.
    pub remaining: u64,
}

impl Quota {
    /// Whether less than [`HEADER_LOW_FRACTION`] of the limit is left.
    pub fn is_low(&self) -> bool {
        (self.remaining as f64) < self.limit as f64 * HEADER_LOW_FRACTION
    }
}

/// The rate-limit headers of one API response, per limit (absent or unparseable → `None`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// Indexed like [`Limit::ALL`].
    quotas: [Option<Quota>; 3],
}

impl RateLimitHeaders {
    /// Reads `anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining}`.
    pub fn parse(headers: &HeaderMap) -> Self {
        let number = |name: String| headers.get(name)?.to_str().ok()?.trim().parse().ok();
        let quota = |limit: Limit| {
            let part = limit.header();
            Some(Quota {
                limit: number(format!("anthropic-ratelimit-{part}-limit"))?,
                remaining: number(format!("anthropic-ratelimit-{part}-remaining"))?,
            })
        };
        Self {
            quotas: Limit::ALL.map(quota),
        }
    }

    /// Headers with the given quotas (tests, other sources).
    pub fn with(mut self, limit: Limit, quota: Quota) -> Self {
        self.quotas[limit.index()] = Some(quota);
        self
    }

    /// The quota reported for `limit`.
    pub fn get(&self, limit: Limit) -> Option<Quota> {
        self.quotas[limit.index()]
    }
}

/// How a [`FleetLimiter`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetOptions {
    /// Worker processes sharing the limits: each enforces `1 / processes` of them while
    /// Redis is unreachable.
    pub processes: u32,
    /// Longest [`FleetLimiter::acquire`] sleeps before answering [`AcquireError::Throttled`].
    pub max_wait: Duration,
    /// Timeout of one Redis call.
    pub timeout: Duration,
    /// Bucket names are `<name>:requests`, … (keys `callcoach:rl:<name>:requests`).
    pub name: String,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            processes: 1,
            max_wait: Duration::from_secs(30),
            timeout: Duration::from_millis(200),
            name: "llm".into(),
        }
    }
}

/// Why no reservation was made.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AcquireError {
    /// The allowance would not be there within the maximum wait: snooze the job.
    #[error("fleet LLM {limit} limit reached; capacity again in {retry_after:?}")]
    Throttled {
        /// The limit that is short.
        limit: Limit,
        /// When the estimate would fit (others may take it first).
        retry_after: Duration,
    },
    /// The estimate exceeds a whole minute's limit (or is invalid): it would never fit.
    #[error(transparent)]
    Invalid(#[from] RateLimitError),
}

/// What [`FleetLimiter::acquire`] charged; hand it to [`FleetLimiter::settle`] after the call.
#[must_use = "settle the reservation with the call's usage"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Input tokens charged (the estimate).
    pub input_tokens: u64,
    /// Output tokens charged (the estimate).
    pub output_tokens: u64,
}

/// The fleet's requests / input tokens / output tokens per minute, in Redis.
#[derive(Clone)]
pub struct FleetLimiter {
    limiter: RateLimiter,
    /// Indexed like [`Limit::ALL`]; `None` = unlimited.
    buckets: [Option<Bucket>; 3],
    max_wait: Duration,
}

impl FleetLimiter {
    /// A limiter over `conn` that fails closed to a local share (see the module docs).
    pub fn new(
        conn: ConnectionManager,
        limits: FleetLimits,
        options: &FleetOptions,
    ) -> Result<Self, RateLimitError> {
        let bucket = |limit: Limit| match limit.per_min(&limits) {
            0 => Ok(None),
            n => Bucket::per_minute(&format!("{}:{}", options.name, limit.label()), n as f64)
                .map(Some),
        };
        let [requests, input, output] = Limit::ALL.map(bucket);
        let fail_mode = FailMode::LocalShare {
            processes: options.processes.max(1),
        };
        let limiter_options = LimiterOptions {
            timeout: options.timeout,
            fail_mode,
        };
        Ok(Self {
            limiter: RateLimiter::new(conn, limiter_options),
            buckets: [requests?, input?, output?],
            max_wait: options.max_wait,
        })
    }

    /// Charges one request and the estimates, sleeping while the buckets refill; after the
    /// maximum wait, [`AcquireError::Throttled`].
    pub async fn acquire(
        &self,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Result<Reservation, AcquireError> {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        loop {
            match self.charge(input_tokens, output_tokens).await {
                Err(AcquireError::Throttled { retry_after, .. })
                    if tokio::time::Instant::now() + retry_after <= deadline =>
                {
                    tokio::time::sleep(retry_after + jitter(retry_after)).await;
                }
                other => return counted(other),
            }
        }
    }

    /// Charges one request and the estimates if they fit now; never sleeps.
    pub async fn try_acquire(
        &self,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Result<Reservation, AcquireError> {
        counted(self.charge(input_tokens, output_tokens).await)
    }

    /// Corrects the token buckets from the call's usage: `input_tokens` is uncached input plus
    /// cache writes. A call that failed before the API counted it settles with zeros (a
    /// refund of the estimates; the request itself stays charged).
    pub async fn settle(&self, reservation: Reservation, input_tokens: u64, output_tokens: u64) {
        let delta = |actual: u64, estimate: u64| {
            Some(actual as f64 - estimate as f64).filter(|d| *d != 0.0)
        };
        let (_, deltas) = self.amounts(|limit| match limit {
            Limit::Requests => None,
            Limit::InputTokens => delta(input_tokens, reservation.input_tokens),
            Limit::OutputTokens => delta(output_tokens, reservation.output_tokens),
        });
        if let Err(e) = self.limiter.adjust(&deltas).await {
            tracing::warn!(error = %e, "could not settle an LLM rate-limit reservation");
        }
    }

    /// Lowers every bucket whose API quota is low (below [`HEADER_LOW_FRACTION`] of its
    /// limit) to the remaining figure; returns the limits it clamped.
    pub async fn observe_headers(&self, headers: &RateLimitHeaders) -> Vec<Limit> {
        let (limits, clamps) = self.amounts(|limit| {
            let quota = headers.get(limit).filter(Quota::is_low)?;
            Some(quota.remaining as f64)
        });
        match self.limiter.clamp(&clamps).await {
            Ok(_) => limits,
            Err(e) => {
                tracing::warn!(error = %e, "could not apply the API's rate-limit headers");
                Vec::new()
            }
        }
    }

    /// One all-or-nothing charge of a request and the estimates.
    async fn charge(
        &self,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Result<Reservation, AcquireError> {
        let (limits, costs) = self.amounts(|limit| {
            Some(match limit {
                Limit::Requests => 1.0,
                Limit::InputTokens => input_tokens as f64,
                Limit::OutputTokens => output_tokens as f64,
            })
        });
        let decision = self.limiter.charge(&costs).await?;
        if !decision.allowed {
            return Err(AcquireError::Throttled {
                limit: short_limit(&limits, &costs, &decision),
                retry_after: decision.wait,
            });
        }
        Ok(Reservation {
            input_tokens,
            output_tokens,
        })
    }

    /// The configured (limited) buckets with the amount `amount` gives each; limits it gives
    /// no amount are left out.
    fn amounts(&self, amount: impl Fn(Limit) -> Option<f64>) -> (Vec<Limit>, Vec<(Bucket, f64)>) {
        Limit::ALL
            .into_iter()
            .zip(&self.buckets)
            .filter_map(|(limit, bucket)| Some((limit, (bucket.clone()?, amount(limit)?))))
            .unzip()
    }
}

/// Counts a final refusal in `callcoach_llm_throttled_total`.
fn counted(result: Result<Reservation, AcquireError>) -> Result<Reservation, AcquireError> {
    if let Err(AcquireError::Throttled { limit, .. }) = &result {
        metrics::counter!(names::LLM_THROTTLED, "bucket" => limit.label()).increment(1);
    }
    result
}

/// The first limit whose level is below its cost in a refused decision.
fn short_limit(limits: &[Limit], costs: &[(Bucket, f64)], decision: &Decision) -> Limit {
    limits
        .iter()
        .zip(costs)
        .zip(&decision.levels)
        .find(|((_, (_, cost)), level)| *level < cost)
        .map_or(limits[0], |((limit, _), _)| *limit)
}

/// Up to a tenth of the wait (at most 50 ms), so waiting workers do not retry in lockstep.
fn jitter(wait: Duration) -> Duration {
    let most = (wait / 10).min(Duration::from_millis(50)).as_micros() as u64;
    Duration::from_micros(rand::random_range(0..=most))
}

/// A spend window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpendWindow {
    /// The UTC day.
    Day,
    /// The UTC month.
    Month,
}

impl SpendWindow {
    /// Both windows.
    pub const ALL: [SpendWindow; 2] = [SpendWindow::Day, SpendWindow::Month];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            SpendWindow::Day => "day",
            SpendWindow::Month => "month",
        }
    }

    /// The window's name at `now`: `2026-12-02` or `2026-12`.
    fn period(self, now: DateTime<Utc>) -> String {
        match self {
            SpendWindow::Day => now.format("%Y-%m-%d").to_string(),
            SpendWindow::Month => now.format("%Y-%m").to_string(),
        }
    }

    /// When the window containing `now` ends.
    pub fn resets_at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let today = now.date_naive();
        let next = match self {
            SpendWindow::Day => today.succ_opt(),
            SpendWindow::Month => {
                let (year, month) = match today.month() {
                    12 => (today.year() + 1, 1),
                    m => (today.year(), m + 1),
                };
                NaiveDate::from_ymd_opt(year, month, 1)
            }
        };
        next.unwrap_or(NaiveDate::MAX)
            .and_time(Default::default())
            .and_utc()
    }
}

impl std::fmt::Display for SpendWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpendWindow::Day => "daily",
            SpendWindow::Month => "monthly",
        })
    }
}

/// The fleet's LLM budgets in USD; 0 means no budget.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpendBudgets {
    /// Per UTC day.
    pub daily_usd: f64,
    /// Per UTC month.
    pub monthly_usd: f64,
}

impl SpendBudgets {
    fn get(&self, window: SpendWindow) -> f64 {
        match window {
            SpendWindow::Day => self.daily_usd,
            SpendWindow::Month => self.monthly_usd,
        }
    }
}

/// A budget is spent.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{window} LLM budget spent: ${spent_usd:.2} of ${budget_usd:.2}; resets at {resets_at}")]
pub struct OverBudget {
    /// The window whose budget is spent (the one resetting last, if both are).
    pub window: SpendWindow,
    /// Spend in the window so far.
    pub spent_usd: f64,
    /// The window's budget.
    pub budget_usd: f64,
    /// When the window ends and its budget is available again.
    pub resets_at: DateTime<Utc>,
}

impl OverBudget {
    /// How long from `now` until the budget resets (to snooze background work).
    pub fn retry_after(&self, now: DateTime<Utc>) -> Duration {
        (self.resets_at - now).to_std().unwrap_or_default()
    }
}

/// Spend so far in the current windows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpendTotals {
    /// Today (UTC).
    pub day_usd: f64,
    /// This month (UTC).
    pub month_usd: f64,
}

/// How a [`SpendGuard`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendOptions {
    /// Timeout of one Redis call.
    pub timeout: Duration,
    /// Counter keys are `<key_prefix>:day:<date>` and `<key_prefix>:month:<month>`.
    pub key_prefix: String,
}

impl Default for SpendOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(200),
            key_prefix: "callcoach:spend".into(),
        }
    }
}

/// How long a spend counter outlives its window.
const SPEND_KEY_MARGIN: TimeDelta = TimeDelta::days(1);

const MICROS_PER_USD: f64 = 1_000_000.0;

/// Daily and monthly USD budgets for the fleet, in Redis.
#[derive(Clone)]
pub struct SpendGuard {
    limiter: RateLimiter,
    budgets: SpendBudgets,
    key_prefix: String,
    tallies: Arc<Mutex<Tallies>>,
}

/// One window as the current window at some moment.
struct WindowAt {
    window: SpendWindow,
    counter: Counter,
    resets_at: DateTime<Utc>,
}

impl SpendGuard {
    /// A guard over `conn` (see the module docs for Redis being unreachable).
    pub fn new(conn: ConnectionManager, budgets: SpendBudgets, options: &SpendOptions) -> Self {
        // Only counters are used, which have no fail mode: unreachable is handled here.
        let limiter_options = LimiterOptions {
            timeout: options.timeout,
            fail_mode: FailMode::Open,
        };
        for window in SpendWindow::ALL {
            metrics::gauge!(names::LLM_BUDGET_USD, "window" => window.label())
                .set(budgets.get(window));
        }
        Self {
            limiter: RateLimiter::new(conn, limiter_options),
            budgets,
            key_prefix: options.key_prefix.clone(),
            tallies: Arc::default(),
        }
    }

    /// Before a call: whether every budget has money left.
    pub async fn check(&self) -> Result<(), OverBudget> {
        self.check_at(Utc::now()).await
    }

    /// [`SpendGuard::check`] as at `now` (which windows are current).
    pub async fn check_at(&self, now: DateTime<Utc>) -> Result<(), OverBudget> {
        let windows = self.windows(now);
        let totals = self.read_totals(&windows).await;
        windows
            .iter()
            .zip(totals)
            .filter_map(|(w, spent)| self.over(w, spent))
            .max_by_key(|over| over.resets_at)
            .map_or(Ok(()), Err)
    }

    /// The budgets this guard enforces.
    pub fn budgets(&self) -> SpendBudgets {
        self.budgets
    }

    /// The fleet's spend in the current windows as Redis counts it (plus this process's
    /// unsent spend), without charging anything; for the dashboard.
    pub async fn spent(&self) -> SpendTotals {
        let windows = self.windows(Utc::now());
        let totals = self.read_totals(&windows).await;
        SpendTotals {
            day_usd: usd_of(totals[0]),
            month_usd: usd_of(totals[1]),
        }
    }

    /// Each window's total in micro-dollars, read without charging.
    async fn read_totals(&self, windows: &[WindowAt]) -> Vec<i64> {
        let counters: Vec<Counter> = windows.iter().map(|w| w.counter.clone()).collect();
        let read = self.limiter.read_counters(&counters).await;
        self.tally(windows, read, |_, _| {})
    }

    /// After a call: adds its real cost to both windows.
    pub async fn charge(&self, usd: f64) -> SpendTotals {
        self.charge_at(usd, Utc::now()).await
    }

    /// [`SpendGuard::charge`] as at `now`.
    pub async fn charge_at(&self, usd: f64, now: DateTime<Utc>) -> SpendTotals {
        let micros = (usd.max(0.0) * MICROS_PER_USD).round() as i64;
        let windows = self.windows(now);
        let adds: Vec<(Counter, i64)> = {
            let mut tallies = self.lock();
            windows
                .iter()
                .map(|w| {
                    (
                        w.counter.clone(),
                        tallies.take_unsent(&w.counter.key) + micros,
                    )
                })
                .collect()
        };
        let added = self.limiter.add_to_counters(&adds).await;
        let totals = self.tally(&windows, added, |tallies, i| {
            tallies.unsent(&adds[i].0.key, adds[i].1);
        });
        SpendTotals {
            day_usd: usd_of(totals[0]),
            month_usd: usd_of(totals[1]),
        }
    }

    /// The current windows at `now`, and forgets tallies of earlier ones.
    fn windows(&self, now: DateTime<Utc>) -> Vec<WindowAt> {
        let windows: Vec<WindowAt> = SpendWindow::ALL
            .into_iter()
            .map(|window| {
                let resets_at = window.resets_at(now);
                let key = format!(
                    "{}:{}:{}",
                    self.key_prefix,
                    window.label(),
                    window.period(now)
                );
                let expires_at = resets_at + SPEND_KEY_MARGIN;
                WindowAt {
                    window,
                    counter: Counter { key, expires_at },
                    resets_at,
                }
            })
            .collect();
        let keys: Vec<&str> = windows.iter().map(|w| w.counter.key.as_str()).collect();
        self.lock().retain(&keys);
        windows
    }

    /// Records what Redis answered (or, on failure, calls `on_failure` per window) and
    /// returns each window's total in micro-dollars, updating the gauges.
    fn tally(
        &self,
        windows: &[WindowAt],
        redis: Result<Vec<i64>, RateLimitError>,
        on_failure: impl Fn(&mut Tallies, usize),
    ) -> Vec<i64> {
        let mut tallies = self.lock();
        if let Err(e) = &redis {
            tracing::warn!(error = %e, "spend guard: redis unreachable, counting locally");
        }
        let totals: Vec<i64> = windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let key = &w.counter.key;
                match &redis {
                    Ok(values) => tallies.seen(key, values[i]),
                    Err(_) => on_failure(&mut tallies, i),
                }
                tallies.total(key)
            })
            .collect();
        for (w, total) in windows.iter().zip(&totals) {
            metrics::gauge!(names::LLM_SPEND_USD, "window" => w.window.label()).set(usd_of(*total));
        }
        totals
    }

    fn over(&self, window: &WindowAt, spent: i64) -> Option<OverBudget> {
        let budget_usd = self.budgets.get(window.window);
        let spent_usd = usd_of(spent);
        (budget_usd > 0.0 && spent_usd >= budget_usd).then_some(OverBudget {
            window: window.window,
            spent_usd,
            budget_usd,
            resets_at: window.resets_at,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tallies> {
        self.tallies.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn usd_of(micros: i64) -> f64 {
    micros as f64 / MICROS_PER_USD
}

/// This process's view of the spend counters, in micro-dollars.
#[derive(Debug, Default)]
struct Tallies {
    by_key: HashMap<String, Tally>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    /// The counter's value last read from Redis.
    seen: i64,
    /// Charged here but not yet added in Redis.
    unsent: i64,
}

impl Tallies {
    /// Keeps only the current windows' keys.
    fn retain(&mut self, keys: &[&str]) {
        self.by_key.retain(|k, _| keys.contains(&k.as_str()));
    }

    /// Takes the unsent spend of `key`, to be sent now.
    fn take_unsent(&mut self, key: &str) -> i64 {
        self.by_key
            .get_mut(key)
            .map_or(0, |t| std::mem::take(&mut t.unsent))
    }

    /// Spend that could not be sent to Redis.
    fn unsent(&mut self, key: &str, micros: i64) {
        self.by_key.entry(key.to_string()).or_default().unsent += micros;
    }

    /// The counter's value in Redis.
    /// Counters only grow within a window, so a late answer never lowers it.
    fn seen(&mut self, key: &str, micros: i64) {
        let tally = self.by_key.entry(key.to_string()).or_default();
        tally.seen = tally.seen.max(micros);
    }

    /// Best known total: Redis's value plus what it has not been told yet.
    fn total(&self, key: &str) -> i64 {
        self.by_key.get(key).map_or(0, |t| t.seen + t.unsent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn windows_reset_at_the_next_utc_day_and_month() {
        let now = at("2026-12-31T23:59:59Z");
        assert_eq!(SpendWindow::Day.resets_at(now), at("2027-01-01T00:00:00Z"));
        assert_eq!(
            SpendWindow::Month.resets_at(now),
            at("2027-01-01T00:00:00Z")
        );
        let now = at("2026-02-14T08:00:00Z");
        assert_eq!(SpendWindow::Day.resets_at(now), at("2026-02-15T00:00:00Z"));
        assert_eq!(
            SpendWindow::Month.resets_at(now),
            at("2026-03-01T00:00:00Z")
        );
        assert_eq!(SpendWindow::Day.period(now), "2026-02-14");
        assert_eq!(SpendWindow::Month.period(now), "2026-02");
    }

    #[test]
    fn headers_parse_per_limit() {
        let mut map = HeaderMap::new();
        for (name, value) in [
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "29000"),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "lots"),
        ] {
            map.insert(name, HeaderValue::from_static(value));
        }
        let h = RateLimitHeaders::parse(&map);
        let requests = h.get(Limit::Requests).unwrap();
        assert_eq!((requests.limit, requests.remaining), (50, 3));
        assert!(requests.is_low());
        assert!(!h.get(Limit::InputTokens).unwrap().is_low());
        assert_eq!(h.get(Limit::OutputTokens), None, "unparseable");
        assert_eq!(
            RateLimitHeaders::parse(&HeaderMap::new()),
            RateLimitHeaders::default()
        );
    }

    #[test]
    fn unsent_spend_is_kept_until_redis_takes_it() {
        let mut t = Tallies::default();
        t.seen("k", 100);
        t.unsent("k", 5);
        assert_eq!(t.total("k"), 105);
        assert_eq!(t.take_unsent("k"), 5);
        assert_eq!(t.take_unsent("k"), 0, "taken once");
        t.retain(&["other"]);
        assert_eq!(t.total("k"), 0, "an ended window is forgotten");
    }

    #[test]
    fn over_budget_says_how_long_to_wait() {
        let over = OverBudget {
            window: SpendWindow::Day,
            spent_usd: 1.1,
            budget_usd: 1.0,
            resets_at: at("2026-12-03T00:00:00Z"),
        };
        let now = at("2026-12-02T23:00:00Z");
        assert_eq!(over.retry_after(now), Duration::from_secs(3600));
        assert_eq!(over.retry_after(at("2026-12-04T00:00:00Z")), Duration::ZERO);
        assert_eq!(
            over.to_string(),
            "daily LLM budget spent: $1.10 of $1.00; resets at 2026-12-03 00:00:00 UTC"
        );
    }
}
