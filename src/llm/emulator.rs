//! Local Anthropic-compatible Messages API emulator for development, demos
//! and tests.
//!
//! It behaves like the real API as of `anthropic-version` 2023-06-01 and
//! 2026-10-21 (see `/work/shared/notes/anthropic-api.md`):
//!
//! - `request`: authentication (`x-api-key` or `Authorization: Bearer`),
//!   the version header and body validation with the real error messages
//!   (sampling parameters per version, `thinking`, `output_config`, the
//!   four-breakpoint `cache_control` limit, models not served → 404).
//! - `cache`: prompt-cache accounting per breakpoint prefix with 5 minute /
//!   1 hour TTLs, per-model minimum lengths and in-flight writers.
//! - `reply` / `schema`: a deterministic coaching JSON, or a value
//!   conforming to the requested JSON schema; thinking tokens by effort.
//! - `limits`: `anthropic-ratelimit-*` headers and optional enforced
//!   per-minute limits (429 with `retry-after` / `retry-after-ms`).
//! - `batches`: the Message Batches API.
//! - `errors`: error bodies `{"type":"error","error":{…},"request_id":…}`.
//!
//! Faults can be injected randomly (`fail_rate`, `malformed_rate`) or exactly
//! ([`EmulatorHandle::inject_failures`]), and latency can be added. A
//! transcript containing [`MALFORMED_MARKER`] gets an answer that is not
//! valid JSON.
//!
//! For cost benchmarks: a simulated clock ([`EmulatorHandle::advance`]) moves
//! the time the prompt cache and the rate limits see, so cache entries expire
//! as they would between requests hours apart; `output_tokens` pads answers
//! to a target output size; `record_requests` keeps the size, hashes and usage
//! of every answered request ([`EmulatorState::recorded_requests`]).

mod batches;
mod cache;
mod errors;
mod limits;
mod reply;
mod request;
mod schema;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use cache::{PromptCache, TokenUsage};
use errors::{ApiError, json_ok, new_id};
use limits::Limiter;
pub use limits::RateLimits;
pub use reply::MALFORMED_MARKER;
use reply::Reply;
use request::{Endpoint, ParsedRequest, check_headers, parse_body, parse_request};

/// Request body limit, like the real Messages API (32 MB).
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// How long [`EmulatorHandle::shutdown`] waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Statuses picked at random when `fail_rate` triggers, by default.
pub const DEFAULT_FAIL_STATUSES: [u16; 3] = [429, 529, 500];
/// Default wait asked for by emulated 429s.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Default delay before a batch is processed.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(200);

/// Emulator settings.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Delay before answering each request.
    pub latency: Duration,
    /// Fraction (`0.0..=1.0`) of `/v1/messages` requests answered with a
    /// random status from `fail_statuses`.
    pub fail_rate: f64,
    /// Statuses random faults draw from (default 429, 529, 500).
    pub fail_statuses: Vec<u16>,
    /// Wait that emulated 429s ask for (`retry-after`, `retry-after-ms`).
    pub retry_after: Duration,
    /// Fraction (`0.0..=1.0`) of successful answers whose text is not JSON.
    pub malformed_rate: f64,
    /// Required API key; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    /// Overrides every model's minimum cacheable prefix (tokens); `None`
    /// uses `min_cacheable_tokens` from the model table.
    pub min_cacheable_tokens: Option<u64>,
    /// Enforced per-minute limits.
    pub rate_limits: RateLimits,
    /// Delay before a batch's requests are processed.
    pub batch_delay: Duration,
    /// Make every batch expire (all results `expired`) instead of
    /// processing it, to test 24-hour expiry handling.
    pub batch_expire: bool,
    /// Output tokens every successful answer reports at least (text plus
    /// thinking): when the text and the effort's thinking fall short, more
    /// thinking tokens make up the difference, within `max_tokens` (thinking
    /// is billed as output, like the real API bills it). `None`, the default,
    /// leaves answers their own size. Deterministic; lets a cost benchmark
    /// model long answers (e.g. 1,500 tokens) without generating long texts.
    pub output_tokens: Option<u64>,
    /// Keep a [`RecordedRequest`] (sizes, hashes and usage, no texts) for
    /// every answered Messages request, batch requests included. Off by
    /// default, so a long-running emulator does not grow.
    pub record_requests: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            fail_rate: 0.0,
            fail_statuses: DEFAULT_FAIL_STATUSES.to_vec(),
            retry_after: DEFAULT_RETRY_AFTER,
            malformed_rate: 0.0,
            api_key: None,
            min_cacheable_tokens: None,
            rate_limits: RateLimits::default(),
            batch_delay: DEFAULT_BATCH_DELAY,
            batch_expire: false,
            output_tokens: None,
            record_requests: false,
        }
    }
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("latency", &self.latency)
            .field("fail_rate", &self.fail_rate)
            .field("fail_statuses", &self.fail_statuses)
            .field("retry_after", &self.retry_after)
            .field("malformed_rate", &self.malformed_rate)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("min_cacheable_tokens", &self.min_cacheable_tokens)
            .field("rate_limits", &self.rate_limits)
            .field("batch_delay", &self.batch_delay)
            .field("batch_expire", &self.batch_expire)
            .field("output_tokens", &self.output_tokens)
            .field("record_requests", &self.record_requests)
            .finish()
    }
}

/// Invalid [`EmulatorConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmulatorConfigError {
    /// `fail_rate` is not a number within `0.0..=1.0`.
    #[error("emulator fail_rate must be within 0.0..=1.0, got {0}")]
    FailRate(f64),
    /// `malformed_rate` is not a number within `0.0..=1.0`.
    #[error("emulator malformed_rate must be within 0.0..=1.0, got {0}")]
    MalformedRate(f64),
    /// A `fail_statuses` entry is not an error status, or the list is empty.
    #[error("emulator fail_statuses must be a non-empty list of statuses 400-599, got {0:?}")]
    FailStatuses(Vec<u16>),
}

impl EmulatorConfig {
    /// Checks that the settings are usable.
    ///
    /// # Errors
    ///
    /// [`EmulatorConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), EmulatorConfigError> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(EmulatorConfigError::FailRate(self.fail_rate));
        }
        if !(0.0..=1.0).contains(&self.malformed_rate) {
            return Err(EmulatorConfigError::MalformedRate(self.malformed_rate));
        }
        let bad_status = |s: &u16| !(400..=599).contains(s);
        if self.fail_statuses.is_empty() || self.fail_statuses.iter().any(bad_status) {
            return Err(EmulatorConfigError::FailStatuses(
                self.fail_statuses.clone(),
            ));
        }
        Ok(())
    }

    /// A copy whose out-of-range rates are clamped and empty / bad statuses
    /// replaced by the defaults.
    fn sanitized(mut self) -> Self {
        let clamp = |rate: f64| {
            if rate.is_nan() {
                0.0
            } else {
                rate.clamp(0.0, 1.0)
            }
        };
        self.fail_rate = clamp(self.fail_rate);
        self.malformed_rate = clamp(self.malformed_rate);
        if matches!(self.validate(), Err(EmulatorConfigError::FailStatuses(_))) {
            self.fail_statuses = DEFAULT_FAIL_STATUSES.to_vec();
        }
        self
    }
}

/// Shared emulator state: counters, fault queue, prompt cache, rate limiter
/// and batches. Cheap to clone.
#[derive(Clone)]
pub struct EmulatorState {
    inner: Arc<Inner>,
}

/// The data behind [`EmulatorState`].
struct Inner {
    config: EmulatorConfig,
    cache: PromptCache,
    limiter: Limiter,
    batches: batches::BatchStore,
    /// Pending injected failures: (status, remaining count).
    injected: Mutex<VecDeque<(u16, u32)>>,
    requests_total: AtomicU64,
    messages_served: AtomicU64,
    failures_served: AtomicU64,
    /// When the emulator started (real time).
    started: Instant,
    /// Simulated time added to the real clock, in nanoseconds ([`EmulatorState::advance`]).
    clock_offset_nanos: AtomicU64,
    /// Answered requests, when `record_requests` is on.
    recorded: Mutex<Vec<RecordedRequest>>,
}

/// One answered Messages request as [`EmulatorConfig::record_requests`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// When it was answered, on the emulator's clock (simulated time
    /// included), since the emulator started.
    pub at: Duration,
    /// Model id.
    pub model: String,
    /// `standard`, or `batch` for Message Batches requests.
    pub service_tier: String,
    /// The prompt's blocks in order (tools, system, messages).
    pub blocks: Vec<RecordedBlock>,
    /// Uncached input tokens billed.
    pub input_tokens: u64,
    /// Cache writes with the 5-minute TTL.
    pub cache_write_5m_tokens: u64,
    /// Cache writes with the 1-hour TTL.
    pub cache_write_1h_tokens: u64,
    /// Cache reads.
    pub cache_read_tokens: u64,
    /// Output tokens, thinking included.
    pub output_tokens: u64,
    /// Thinking tokens.
    pub thinking_tokens: u64,
}

/// One prompt block of a [`RecordedRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedBlock {
    /// `tools`, `system`, `user` or `assistant`.
    pub section: &'static str,
    /// The block's first 40 characters (enough to tell what it is).
    pub head: String,
    /// Its tokens by the emulator's tokenizer.
    pub tokens: u64,
    /// Hash of the block's section and content: the same text anywhere has the same hash.
    pub content_hash: String,
    /// The prompt cache's hash of the prefix ending after this block: the same only when
    /// every block up to and including this one is the same.
    pub prefix_hash: String,
    /// The TTL of the block's `cache_control` breakpoint, if it has one.
    pub breakpoint: Option<Duration>,
}

impl fmt::Debug for EmulatorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorState")
            .field("config", &self.inner.config)
            .field("requests_total", &self.requests_total())
            .field("messages_served", &self.messages_served())
            .field("failures_served", &self.failures_served())
            .finish_non_exhaustive()
    }
}

/// Locks a mutex, recovering the data if a previous holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EmulatorState {
    /// Creates state for `config`; out-of-range settings are clamped (use
    /// [`EmulatorConfig::validate`] to reject them instead).
    fn new(config: EmulatorConfig) -> Self {
        if let Err(e) = config.validate() {
            tracing::warn!(error = %e, "sanitizing emulator config");
        }
        let config = config.sanitized();
        Self {
            inner: Arc::new(Inner {
                limiter: Limiter::new(config.rate_limits),
                config,
                cache: PromptCache::default(),
                batches: batches::BatchStore::default(),
                injected: Mutex::new(VecDeque::new()),
                requests_total: AtomicU64::new(0),
                messages_served: AtomicU64::new(0),
                failures_served: AtomicU64::new(0),
                started: Instant::now(),
                clock_offset_nanos: AtomicU64::new(0),
                recorded: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Successful `/v1/messages` responses so far.
    pub fn messages_served(&self) -> u64 {
        self.inner.messages_served.load(Ordering::Relaxed)
    }

    /// The emulator's clock: the real monotonic clock plus the simulated time added by
    /// [`EmulatorState::advance`]. The prompt cache (entry expiry) and the rate limits use
    /// it; batch timestamps and the rate-limit reset headers stay on wall-clock time.
    pub fn now(&self) -> Instant {
        Instant::now() + self.clock_offset()
    }

    /// Simulated time added so far.
    pub fn clock_offset(&self) -> Duration {
        Duration::from_nanos(self.inner.clock_offset_nanos.load(Ordering::Relaxed))
    }

    /// Moves the emulator's clock forward by `by` (never backward): prompt-cache entries
    /// whose TTL runs out in that time expire, rate-limit windows pass.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner
            .clock_offset_nanos
            .fetch_add(nanos, Ordering::Relaxed);
    }

    /// The requests recorded so far (see [`EmulatorConfig::record_requests`]).
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.recorded).clone()
    }

    /// Returns the recorded requests and forgets them.
    pub fn take_recorded_requests(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut *lock(&self.inner.recorded))
    }

    /// Keeps `req`'s answer when recording is on.
    fn record(
        &self,
        req: &ParsedRequest,
        usage: TokenUsage,
        reply: &Reply,
        tier: &str,
        at: Instant,
    ) {
        if !self.inner.config.record_requests {
            return;
        }
        let prefix_hashes = cache::prefix_hashes(req);
        let blocks = req
            .blocks
            .iter()
            .zip(prefix_hashes)
            .map(|(b, prefix_hash)| RecordedBlock {
                section: b.section,
                head: b.content.chars().take(40).collect(),
                tokens: b.tokens,
                content_hash: cache::content_hash(b.section, &b.content),
                prefix_hash,
                breakpoint: b.ttl,
            })
            .collect();
        let recorded = RecordedRequest {
            at: at.saturating_duration_since(self.inner.started),
            model: req.model.clone(),
            service_tier: tier.to_string(),
            blocks,
            input_tokens: usage.input,
            cache_write_5m_tokens: usage.creation_5m,
            cache_write_1h_tokens: usage.creation_1h,
            cache_read_tokens: usage.cache_read,
            output_tokens: reply.output_tokens,
            thinking_tokens: reply.thinking_tokens,
        };
        lock(&self.inner.recorded).push(recorded);
    }

    /// All `/v1/messages` requests received so far, including failures.
    pub fn requests_total(&self) -> u64 {
        self.inner.requests_total.load(Ordering::Relaxed)
    }

    /// `/v1/messages` requests answered with an error status (injected,
    /// random, validation or rate-limit failures).
    pub fn failures_served(&self) -> u64 {
        self.inner.failures_served.load(Ordering::Relaxed)
    }

    /// Arrival times of the `/v1/messages` requests the rate limiter
    /// admitted (valid requests not refused with 429; the latest 100,000),
    /// oldest first — to prove a client stayed under a rate.
    pub fn request_times(&self) -> Vec<Instant> {
        self.inner.limiter.request_times()
    }

    /// Makes the next `count` `/v1/messages` requests answer `status` with
    /// the matching Anthropic error body (429 carries `retry-after` and
    /// `retry-after-ms` from `retry_after`, 529 is `overloaded_error`, 500
    /// `api_error`). Statuses below 400 or above 999 are served as 500.
    /// Calls queue up.
    pub fn inject_failures(&self, status: u16, count: u32) {
        if count > 0 {
            lock(&self.inner.injected).push_back((status, count));
        }
    }

    /// Takes the next injected failure, or draws one according to
    /// `fail_rate`.
    fn take_fault(&self) -> Option<u16> {
        if let Some(status) = self.pop_injected() {
            return Some(status);
        }
        let config = &self.inner.config;
        if config.fail_rate > 0.0 && rand::random::<f64>() < config.fail_rate {
            let statuses = &config.fail_statuses;
            statuses
                .get(rand::random_range(0..statuses.len().max(1)))
                .copied()
        } else {
            None
        }
    }

    /// Pops one injected failure off the queue.
    fn pop_injected(&self) -> Option<u16> {
        let mut queue = lock(&self.inner.injected);
        let (status, remaining) = queue.front_mut()?;
        let status = *status;
        *remaining = remaining.saturating_sub(1);
        if *remaining == 0 {
            queue.pop_front();
        }
        Some(status)
    }

    /// Whether this answer should be malformed (per `malformed_rate`).
    fn draw_malformed(&self) -> bool {
        let rate = self.inner.config.malformed_rate;
        rate > 0.0 && rand::random::<f64>() < rate
    }

    /// The minimum cacheable prefix for `req`.
    fn min_cacheable(&self, req: &ParsedRequest) -> u64 {
        self.inner
            .config
            .min_cacheable_tokens
            .unwrap_or(req.min_cacheable_tokens)
    }

    /// Answers `req` at once (cache writes readable immediately), as batch
    /// processing does; returns the message object.
    fn answer_now(&self, req: &ParsedRequest, tier: &str, now: Instant) -> Value {
        let accounting = self.inner.cache.account(req, self.min_cacheable(req), now);
        self.inner.cache.commit(&accounting.writes, now);
        let reply = reply::reply(req, self.draw_malformed(), self.inner.config.output_tokens);
        self.record(req, accounting.usage, &reply, tier, now);
        message_json(req, &reply, accounting.usage, tier)
    }
}

/// The message object of a successful answer.
fn message_json(req: &ParsedRequest, reply: &Reply, usage: TokenUsage, tier: &str) -> Value {
    json!({
        "id": new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": reply.stop_reason,
        "stop_sequence": null,
        "usage": {
            "input_tokens": usage.input,
            "cache_creation_input_tokens": usage.cache_creation(),
            "cache_read_input_tokens": usage.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": usage.creation_5m,
                "ephemeral_1h_input_tokens": usage.creation_1h,
            },
            "output_tokens": reply.output_tokens,
            "output_tokens_details": {"thinking_tokens": reply.thinking_tokens},
            "service_tier": tier,
        },
    })
}

/// A running emulator server.
#[derive(Debug)]
pub struct EmulatorHandle {
    base_url: String,
    state: EmulatorState,
    task: JoinHandle<io::Result<()>>,
    shutdown: oneshot::Sender<()>,
}

impl EmulatorHandle {
    /// Base URL to point an [`LlmClient`](super::LlmClient) at, e.g.
    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Shared state (counters, fault injection).
    pub fn state(&self) -> &EmulatorState {
        &self.state
    }

    /// Successful `/v1/messages` responses so far.
    pub fn messages_served(&self) -> u64 {
        self.state.messages_served()
    }

    /// All `/v1/messages` requests received so far, including failures.
    pub fn requests_total(&self) -> u64 {
        self.state.requests_total()
    }

    /// `/v1/messages` requests answered with an error status.
    pub fn failures_served(&self) -> u64 {
        self.state.failures_served()
    }

    /// Arrival times of admitted `/v1/messages` requests; see
    /// [`EmulatorState::request_times`].
    pub fn request_times(&self) -> Vec<Instant> {
        self.state.request_times()
    }

    /// Makes the next `count` `/v1/messages` requests answer `status`; see
    /// [`EmulatorState::inject_failures`].
    pub fn inject_failures(&self, status: u16, count: u32) {
        self.state.inject_failures(status, count);
    }

    /// Moves the emulator's clock forward; see [`EmulatorState::advance`].
    pub fn advance(&self, by: Duration) {
        self.state.advance(by);
    }

    /// Stops accepting connections and waits (up to 5 s) for in-flight
    /// requests; the server task is aborted after that.
    pub async fn shutdown(self) {
        let Self {
            shutdown, mut task, ..
        } = self;
        // The receiver only disappears once the server has already stopped.
        let _ = shutdown.send(());
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "emulator server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "emulator task failed"),
            Err(_) => {
                tracing::warn!("emulator did not stop in time; aborting");
                task.abort();
            }
        }
    }
}

/// Serves the emulator on `listener` in a background tokio task. Dropping
/// the handle also stops the server.
///
/// # Errors
///
/// `InvalidInput` when the config fails [`EmulatorConfig::validate`], or the
/// error from reading the listener's local address.
pub async fn spawn(listener: TcpListener, config: EmulatorConfig) -> io::Result<EmulatorHandle> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let addr = listener.local_addr()?;
    let (app, state) = router(config);
    let (shutdown, stop) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // Either an explicit shutdown or a dropped handle stops us.
                let _ = stop.await;
            })
            .await
    });
    Ok(EmulatorHandle {
        base_url: base_url_for(addr),
        state,
        task,
        shutdown,
    })
}

/// `http://ADDR`, with an unspecified bind address replaced by loopback.
fn base_url_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Builds the emulator router and returns it with its shared state.
///
/// Out-of-range settings are clamped here; [`spawn`] rejects them.
pub fn router(config: EmulatorConfig) -> (Router, EmulatorState) {
    let state = EmulatorState::new(config);
    let app = Router::new()
        .route("/v1/messages", post(messages_handler))
        .route("/v1/messages/count_tokens", post(count_tokens_handler))
        .route(
            "/v1/messages/batches",
            post(batches::create).get(batches::list),
        )
        .route(
            "/v1/messages/batches/{id}",
            get(batches::retrieve).delete(batches::delete),
        )
        .route("/v1/messages/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/messages/batches/{id}/results", get(batches::results))
        .fallback(not_found_handler)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone());
    (app, state)
}

// ---------------------------------------------------------------------------
// Handlers

/// `POST /v1/messages`: every answer carries the rate-limit headers.
async fn messages_handler(
    State(state): State<EmulatorState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.inner.requests_total.fetch_add(1, Ordering::Relaxed);
    let mut response = match serve_messages(&state, &headers, body).await {
        Ok(response) => {
            state.inner.messages_served.fetch_add(1, Ordering::Relaxed);
            response
        }
        Err(e) => {
            state.inner.failures_served.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    };
    state
        .inner
        .limiter
        .add_headers(response.headers_mut(), state.now());
    response
}

/// The `/v1/messages` pipeline: faults, checks, rate limit, cache, reply,
/// latency, then the cache writes become readable.
async fn serve_messages(
    state: &EmulatorState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some(status) = state.take_fault() {
        sleep_latency(state).await;
        return Err(ApiError::for_status(status, state.inner.config.retry_after));
    }
    let version = check_headers(headers, state.inner.config.api_key.as_deref())?;
    let req = parse_request(&parse_body(body)?, version, Endpoint::Create)?;
    state.inner.limiter.admit(state.now())?;
    let accounting = state
        .inner
        .cache
        .account(&req, state.min_cacheable(&req), state.now());
    let reply = reply::reply(
        &req,
        state.draw_malformed(),
        state.inner.config.output_tokens,
    );
    sleep_latency(state).await;
    let done = state.now();
    state.inner.cache.commit(&accounting.writes, done);
    let usage = accounting.usage;
    state.record(&req, usage, &reply, "standard", done);
    state.inner.limiter.record(
        done,
        usage.input + usage.cache_creation(),
        reply.output_tokens,
    );
    Ok(json_ok(message_json(&req, &reply, usage, "standard")))
}

/// `POST /v1/messages/count_tokens` (no faults, not counted).
async fn count_tokens_handler(
    State(state): State<EmulatorState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    sleep_latency(&state).await;
    let counted = check_headers(&headers, state.inner.config.api_key.as_deref())
        .and_then(|version| parse_request(&parse_body(body)?, version, Endpoint::CountTokens));
    match counted {
        Ok(req) => json_ok(json!({"input_tokens": req.input_tokens()})),
        Err(e) => e.into_response(),
    }
}

/// Any other route: 404 `not_found_error`.
async fn not_found_handler(uri: Uri) -> Response {
    ApiError::not_found(format!("Not found: {}", uri.path())).into_response()
}

/// Applies the configured latency.
async fn sleep_latency(state: &EmulatorState) {
    let latency = state.inner.config.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

#[cfg(test)]
mod tests;
