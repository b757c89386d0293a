//! Local Anthropic-compatible Messages API emulator for development, demos
//! and tests.
//!
//! It validates requests the way the real API does (headers, body shape, the
//! four-breakpoint `cache_control` limit), answers with the real response and
//! error shapes, emulates prompt-cache accounting (`cache_creation_*` /
//! `cache_read_*` tokens, 5 minute or 1 hour TTL) and produces a
//! deterministic coaching JSON derived from the transcript and dimension found
//! in the prompt. Faults can be injected randomly (`fail_rate`) or exactly
//! ([`EmulatorHandle::inject_failures`]), and latency can be added.
//!
//! Special input: a transcript containing `[[emulator:malformed]]` gets an
//! answer that is not valid JSON.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Default minimum prefix length (tokens) that can be cached.
pub const DEFAULT_MIN_CACHEABLE_TOKENS: u64 = 1024;
/// Marker that makes the emulator answer with invalid JSON.
pub const MALFORMED_MARKER: &str = "[[emulator:malformed]]";

/// Default cache TTL (`cache_control` without `ttl`, or `"ttl": "5m"`).
const TTL_5M: Duration = Duration::from_secs(5 * 60);
/// Extended cache TTL (`"ttl": "1h"`).
const TTL_1H: Duration = Duration::from_secs(60 * 60);
/// Most `cache_control` breakpoints one request may carry.
const MAX_BREAKPOINTS: usize = 4;
/// Request body limit, like the real Messages API (32 MB).
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Dimensions recognised when the prompt does not name one explicitly.
const DIMENSIONS: [&str; 4] = [
    "product_knowledge",
    "discovery",
    "objection_handling",
    "engagement",
];
/// Longest quote taken from the transcript, in characters.
const MAX_QUOTE_CHARS: usize = 160;
/// How long [`EmulatorHandle::shutdown`] waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Statuses picked at random when `fail_rate` triggers.
const RANDOM_FAILURES: [u16; 3] = [429, 529, 500];

/// Emulator settings.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Delay before answering each request.
    pub latency: Duration,
    /// Fraction (`0.0..=1.0`) of `/v1/messages` requests answered with a
    /// random 429, 529 or 500.
    pub fail_rate: f64,
    /// Required API key; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    /// Minimum prefix length in tokens for a breakpoint to be cached.
    pub min_cacheable_tokens: u64,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            fail_rate: 0.0,
            api_key: None,
            min_cacheable_tokens: DEFAULT_MIN_CACHEABLE_TOKENS,
        }
    }
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("latency", &self.latency)
            .field("fail_rate", &self.fail_rate)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("min_cacheable_tokens", &self.min_cacheable_tokens)
            .finish()
    }
}

/// Invalid [`EmulatorConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmulatorConfigError {
    /// `fail_rate` is not a number within `0.0..=1.0`.
    #[error("emulator fail_rate must be within 0.0..=1.0, got {0}")]
    FailRate(f64),
}

impl EmulatorConfig {
    /// Checks that the settings are usable.
    ///
    /// # Errors
    ///
    /// [`EmulatorConfigError::FailRate`] when `fail_rate` is NaN or outside
    /// `0.0..=1.0`.
    pub fn validate(&self) -> Result<(), EmulatorConfigError> {
        if (0.0..=1.0).contains(&self.fail_rate) {
            Ok(())
        } else {
            Err(EmulatorConfigError::FailRate(self.fail_rate))
        }
    }
}

/// Shared emulator state: counters, fault queue and prompt cache. Cheap to
/// clone.
#[derive(Clone)]
pub struct EmulatorState {
    inner: Arc<Inner>,
}

/// The data behind [`EmulatorState`].
struct Inner {
    config: EmulatorConfig,
    /// Prefix hash → expiry.
    cache: Mutex<HashMap<String, Instant>>,
    /// Pending injected failures: (status, remaining count).
    injected: Mutex<VecDeque<(u16, u32)>>,
    requests_total: AtomicU64,
    messages_served: AtomicU64,
    failures_served: AtomicU64,
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
    /// Creates state for `config`; an out-of-range `fail_rate` is clamped
    /// (use [`EmulatorConfig::validate`] to reject it instead).
    fn new(mut config: EmulatorConfig) -> Self {
        if let Err(e) = config.validate() {
            tracing::warn!(error = %e, "clamping emulator fail_rate");
            config.fail_rate = if config.fail_rate.is_nan() {
                0.0
            } else {
                config.fail_rate.clamp(0.0, 1.0)
            };
        }
        Self {
            inner: Arc::new(Inner {
                config,
                cache: Mutex::new(HashMap::new()),
                injected: Mutex::new(VecDeque::new()),
                requests_total: AtomicU64::new(0),
                messages_served: AtomicU64::new(0),
                failures_served: AtomicU64::new(0),
            }),
        }
    }

    /// Successful `/v1/messages` responses so far.
    pub fn messages_served(&self) -> u64 {
        self.inner.messages_served.load(Ordering::Relaxed)
    }

    /// All `/v1/messages` requests received so far, including failures.
    pub fn requests_total(&self) -> u64 {
        self.inner.requests_total.load(Ordering::Relaxed)
    }

    /// `/v1/messages` requests answered with an error status (injected,
    /// random or validation failures).
    pub fn failures_served(&self) -> u64 {
        self.inner.failures_served.load(Ordering::Relaxed)
    }

    /// Makes the next `count` `/v1/messages` requests answer `status` with
    /// the matching Anthropic error body (429 carries `retry-after: 1`).
    /// Statuses below 400 or above 999 are served as 500. Calls queue up.
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
        let rate = self.inner.config.fail_rate;
        if rate > 0.0 && rand::random::<f64>() < rate {
            RANDOM_FAILURES
                .get(rand::random_range(0..RANDOM_FAILURES.len()))
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

    /// Computes cache-aware token usage for `req` at time `now`, updating the
    /// prompt cache.
    fn account(&self, req: &ParsedRequest, now: Instant) -> TokenUsage {
        let total: u64 = req.blocks.iter().map(|b| b.tokens).sum();
        let points = breakpoints(req);
        let min = self.inner.config.min_cacheable_tokens;
        let mut cache = lock(&self.inner.cache);
        cache.retain(|_, expiry| *expiry > now);
        let hit = points
            .iter()
            .rposition(|p| p.prefix_tokens >= min && cache.contains_key(&p.hash));
        let read = hit.and_then(|i| points.get(i)).map_or(0, |p| {
            remember(&mut cache, p, now);
            p.prefix_tokens
        });
        let mut written_to = read;
        for p in points.iter().skip(hit.map_or(0, |i| i + 1)) {
            if p.prefix_tokens >= min {
                remember(&mut cache, p, now);
                written_to = p.prefix_tokens;
            }
        }
        TokenUsage {
            input: total.saturating_sub(written_to),
            cache_creation: written_to.saturating_sub(read),
            cache_read: read,
        }
    }
}

/// Stores (or refreshes) a prefix in the cache, never shortening its expiry.
fn remember(cache: &mut HashMap<String, Instant>, point: &Breakpoint, now: Instant) {
    let expiry = now + point.ttl;
    let entry = cache.entry(point.hash.clone()).or_insert(expiry);
    *entry = (*entry).max(expiry);
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

    /// Makes the next `count` `/v1/messages` requests answer `status`; see
    /// [`EmulatorState::inject_failures`].
    pub fn inject_failures(&self, status: u16, count: u32) {
        self.state.inject_failures(status, count);
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
/// An out-of-range `fail_rate` is clamped here; [`spawn`] rejects it.
pub fn router(config: EmulatorConfig) -> (Router, EmulatorState) {
    let state = EmulatorState::new(config);
    let app = Router::new()
        .route("/v1/messages", post(messages_handler))
        .route("/v1/messages/count_tokens", post(count_tokens_handler))
        .fallback(not_found_handler)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone());
    (app, state)
}

// ---------------------------------------------------------------------------
// Errors

/// An Anthropic-shaped error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    /// 401 `authentication_error`.
    fn auth(message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: message.to_owned(),
        }
    }

    /// The error the real API sends with `status` (for fault injection).
    fn for_status(status: u16) -> Self {
        let status = StatusCode::from_u16(status)
            .ok()
            .filter(|s| s.as_u16() >= 400)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (kind, message) = match status.as_u16() {
            400 => ("invalid_request_error", "Invalid request (emulated)"),
            401 => ("authentication_error", "invalid x-api-key (emulated)"),
            403 => ("permission_error", "Permission denied (emulated)"),
            404 => ("not_found_error", "Not found (emulated)"),
            413 => ("request_too_large", "Request too large (emulated)"),
            429 => ("rate_limit_error", "Rate limit exceeded (emulated)"),
            529 => ("overloaded_error", "Overloaded (emulated)"),
            504 => ("timeout_error", "Request timed out (emulated)"),
            s if s >= 500 => ("api_error", "Internal server error (emulated)"),
            _ => ("invalid_request_error", "Request failed (emulated)"),
        };
        Self {
            status,
            kind,
            message: message.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = new_id("req");
        let body = json!({
            "type": "error",
            "error": {"type": self.kind, "message": self.message},
            "request_id": request_id,
        });
        let mut response = (self.status, Json(body)).into_response();
        set_request_id(&mut response, &request_id);
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// `{prefix}_{uuid}` identifier.
fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Adds the `request-id` header.
fn set_request_id(response: &mut Response, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("request-id", value);
    }
}

// ---------------------------------------------------------------------------
// Handlers

/// `POST /v1/messages`.
async fn messages_handler(
    State(state): State<EmulatorState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.inner.requests_total.fetch_add(1, Ordering::Relaxed);
    match serve_messages(&state, &headers, body).await {
        Ok(response) => {
            state.inner.messages_served.fetch_add(1, Ordering::Relaxed);
            response
        }
        Err(e) => {
            state.inner.failures_served.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

/// The `/v1/messages` pipeline: latency, faults, checks, cache, reply.
async fn serve_messages(
    state: &EmulatorState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    sleep_latency(state).await;
    if let Some(status) = state.take_fault() {
        return Err(ApiError::for_status(status));
    }
    check_headers(headers, state.inner.config.api_key.as_deref())?;
    let req = parse_request(&parse_body(body)?, true)?;
    let usage = state.account(&req, Instant::now());
    let reply = reply(&req);
    Ok(success_response(&req, &reply, usage))
}

/// `POST /v1/messages/count_tokens` (no faults, not counted).
async fn count_tokens_handler(
    State(state): State<EmulatorState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    sleep_latency(&state).await;
    let counted = check_headers(&headers, state.inner.config.api_key.as_deref())
        .and_then(|()| parse_body(body))
        .and_then(|value| parse_request(&value, false));
    match counted {
        Ok(req) => {
            let total: u64 = req.blocks.iter().map(|b| b.tokens).sum();
            let mut response = Json(json!({"input_tokens": total})).into_response();
            set_request_id(&mut response, &new_id("req"));
            response
        }
        Err(e) => e.into_response(),
    }
}

/// Any other route: 404 `not_found_error`.
async fn not_found_handler(uri: Uri) -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found_error",
        message: format!("Not found: {}", uri.path()),
    }
    .into_response()
}

/// Applies the configured latency.
async fn sleep_latency(state: &EmulatorState) {
    let latency = state.inner.config.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

/// Checks the API key and the presence of `anthropic-version`.
fn check_headers(headers: &HeaderMap, expected_key: Option<&str>) -> Result<(), ApiError> {
    match (presented_key(headers), expected_key) {
        (None, _) => return Err(ApiError::auth("x-api-key header is required")),
        (Some(key), Some(expected)) if key != expected => {
            return Err(ApiError::auth("invalid x-api-key"));
        }
        _ => {}
    }
    if headers.contains_key("anthropic-version") {
        Ok(())
    } else {
        Err(ApiError::invalid("anthropic-version: header is required"))
    }
}

/// The key from `x-api-key` or `Authorization: Bearer`, if non-empty.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let non_empty = |s: &str| !s.is_empty();
    let from_x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| non_empty(s));
    from_x_api_key.or_else(|| {
        let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = auth.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && non_empty(token)).then_some(token)
    })
}

/// Reads the body as JSON.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                kind: "request_too_large",
                message: "Request exceeds the maximum allowed number of bytes.".to_owned(),
            }
        } else {
            ApiError::invalid(format!("could not read the request body: {rejection}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))
}

// ---------------------------------------------------------------------------
// Request validation

/// One unit of prompt content, in cache-prefix order.
#[derive(Debug)]
struct PromptBlock {
    /// `tools`, `system`, `user` or `assistant`.
    section: &'static str,
    /// Text of a text block, or the JSON of any other block.
    content: String,
    /// Approximate token count.
    tokens: u64,
    /// Cache TTL when the block carries a `cache_control` breakpoint.
    ttl: Option<Duration>,
}

impl PromptBlock {
    /// Builds a block, counting its tokens.
    fn new(section: &'static str, content: String, ttl: Option<Duration>) -> Self {
        Self {
            tokens: approx_tokens(&content),
            section,
            content,
            ttl,
        }
    }
}

/// A validated request.
#[derive(Debug)]
struct ParsedRequest {
    model: String,
    /// 0 for `count_tokens`.
    max_tokens: u64,
    blocks: Vec<PromptBlock>,
    /// Text of the last user message.
    last_user_text: String,
}

/// Approximate tokens: ceil(chars / 4).
fn approx_tokens(text: &str) -> u64 {
    u64::try_from(text.chars().count())
        .unwrap_or(u64::MAX)
        .div_ceil(4)
}

/// Validates a request body like the real API.
fn parse_request(value: &Value, needs_max_tokens: bool) -> Result<ParsedRequest, ApiError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::invalid("request body must be a JSON object"))?;
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid(
            "stream: streaming is not supported by the emulator",
        ));
    }
    let model = parse_model(obj)?;
    check_model(&model)?;
    let max_tokens = if needs_max_tokens {
        parse_max_tokens(obj)?
    } else {
        0
    };
    let mut blocks = Vec::new();
    parse_tools(obj.get("tools"), &mut blocks)?;
    parse_system(obj.get("system"), &mut blocks)?;
    let last_user_text = parse_messages(obj.get("messages"), &mut blocks)?;
    check_breakpoints(&blocks)?;
    Ok(ParsedRequest {
        model,
        max_tokens,
        blocks,
        last_user_text,
    })
}

/// `model`: non-empty string.
fn parse_model(obj: &Map<String, Value>) -> Result<String, ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => Err(ApiError::invalid("model: Field required")),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(ApiError::invalid(
            "model: String should have at least 1 character",
        )),
        Some(_) => Err(ApiError::invalid("model: Input should be a valid string")),
    }
}

/// Like the API: a model that is not served (unknown, or retired by today per
/// `jobs/models.toml`) is a 404 `not_found_error` naming it.
fn check_model(model: &str) -> Result<(), ApiError> {
    let today = chrono::Utc::now().date_naive();
    let served = super::ModelTable::builtin()
        .usable(today)
        .any(|id| id == model);
    if served {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found_error",
        message: format!("model: {model}"),
    })
}

/// `max_tokens`: positive integer.
fn parse_max_tokens(obj: &Map<String, Value>) -> Result<u64, ApiError> {
    let value = match obj.get("max_tokens") {
        None | Some(Value::Null) => return Err(ApiError::invalid("max_tokens: Field required")),
        Some(v) => v,
    };
    match value.as_u64() {
        Some(0) => Err(ApiError::invalid(
            "max_tokens: Input should be greater than or equal to 1",
        )),
        Some(n) => Ok(n),
        None if value.as_i64().is_some() => Err(ApiError::invalid(
            "max_tokens: Input should be greater than or equal to 1",
        )),
        None => Err(ApiError::invalid(
            "max_tokens: Input should be a valid integer",
        )),
    }
}

/// `tools`: optional list of objects (counted, cacheable).
fn parse_tools(tools: Option<&Value>, blocks: &mut Vec<PromptBlock>) -> Result<(), ApiError> {
    let items = match tools {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("tools: Input should be a valid list")),
    };
    for (i, tool) in items.iter().enumerate() {
        let obj = tool.as_object().ok_or_else(|| {
            ApiError::invalid(format!("tools.{i}: Input should be a valid dictionary"))
        })?;
        let ttl = parse_cache_control(obj, &format!("tools.{i}"))?;
        blocks.push(PromptBlock::new(
            "tools",
            json_without_cache_control(obj),
            ttl,
        ));
    }
    Ok(())
}

/// `system`: optional string or list of text blocks.
fn parse_system(system: Option<&Value>, blocks: &mut Vec<PromptBlock>) -> Result<(), ApiError> {
    match system {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(text)) => {
            if !text.is_empty() {
                blocks.push(PromptBlock::new("system", text.clone(), None));
            }
            Ok(())
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("system.{i}");
                let obj = item.as_object().ok_or_else(|| {
                    ApiError::invalid(format!("{path}: Input should be a valid dictionary"))
                })?;
                if obj.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(ApiError::invalid(format!(
                        "{path}.type: Input should be 'text'"
                    )));
                }
                let text = text_field(obj, &path)?;
                let ttl = parse_cache_control(obj, &path)?;
                blocks.push(PromptBlock::new("system", text, ttl));
            }
            Ok(())
        }
        Some(_) => Err(ApiError::invalid(
            "system: Input should be a valid string or a list of text blocks",
        )),
    }
}

/// `messages`: non-empty list starting with a user message. Returns the
/// text of the last user message.
fn parse_messages(
    messages: Option<&Value>,
    blocks: &mut Vec<PromptBlock>,
) -> Result<String, ApiError> {
    let items = match messages {
        None | Some(Value::Null) => return Err(ApiError::invalid("messages: Field required")),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("messages: Input should be a valid list")),
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages: at least one message is required",
        ));
    }
    let mut last_user_text = String::new();
    for (i, message) in items.iter().enumerate() {
        let (role, text) = parse_message(message, i, blocks)?;
        if i == 0 && role != "user" {
            return Err(ApiError::invalid(
                "messages: first message must use the \"user\" role",
            ));
        }
        if role == "user" {
            last_user_text = text;
        }
    }
    Ok(last_user_text)
}

/// One message; returns its role and the concatenation of its text.
fn parse_message(
    message: &Value,
    i: usize,
    blocks: &mut Vec<PromptBlock>,
) -> Result<(&'static str, String), ApiError> {
    let path = format!("messages.{i}");
    let obj = message
        .as_object()
        .ok_or_else(|| ApiError::invalid(format!("{path}: Input should be a valid dictionary")))?;
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("user") => "user",
        Some("assistant") => "assistant",
        _ => {
            return Err(ApiError::invalid(format!(
                "{path}.role: Input should be 'user' or 'assistant'"
            )));
        }
    };
    let text = match obj.get("content") {
        Some(Value::String(text)) if !text.is_empty() => {
            blocks.push(PromptBlock::new(role, text.clone(), None));
            text.clone()
        }
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(format!(
                "{path}.content: text content blocks must be non-empty"
            )));
        }
        Some(Value::Array(items)) => parse_content_blocks(items, role, &path, blocks)?,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(format!("{path}.content: Field required")));
        }
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "{path}.content: Input should be a valid string or list of content blocks"
            )));
        }
    };
    Ok((role, text))
}

/// A message's list of content blocks; returns their text joined by `\n`.
fn parse_content_blocks(
    items: &[Value],
    role: &'static str,
    path: &str,
    blocks: &mut Vec<PromptBlock>,
) -> Result<String, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid(format!(
            "{path}.content: List should have at least 1 item"
        )));
    }
    let mut texts = Vec::new();
    for (j, item) in items.iter().enumerate() {
        let block_path = format!("{path}.content.{j}");
        let obj = item.as_object().ok_or_else(|| {
            ApiError::invalid(format!("{block_path}: Input should be a valid dictionary"))
        })?;
        let ttl = parse_cache_control(obj, &block_path)?;
        let content = match obj.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = text_field(obj, &block_path)?;
                texts.push(text.clone());
                text
            }
            Some(_) => json_without_cache_control(obj),
            None => {
                return Err(ApiError::invalid(format!(
                    "{block_path}.type: Field required"
                )));
            }
        };
        blocks.push(PromptBlock::new(role, content, ttl));
    }
    Ok(texts.join("\n"))
}

/// The non-empty `text` of a text block.
fn text_field(obj: &Map<String, Value>, path: &str) -> Result<String, ApiError> {
    match obj.get("text") {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.clone()),
        Some(Value::String(_)) => Err(ApiError::invalid(format!(
            "{path}: text content blocks must be non-empty"
        ))),
        None | Some(Value::Null) => Err(ApiError::invalid(format!("{path}.text: Field required"))),
        Some(_) => Err(ApiError::invalid(format!(
            "{path}.text: Input should be a valid string"
        ))),
    }
}

/// The block's `cache_control` TTL, if it carries one.
fn parse_cache_control(obj: &Map<String, Value>, path: &str) -> Result<Option<Duration>, ApiError> {
    let control = match obj.get("cache_control") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(control)) => control,
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "{path}.cache_control: Input should be a valid dictionary"
            )));
        }
    };
    if control.get("type").and_then(Value::as_str) != Some("ephemeral") {
        return Err(ApiError::invalid(format!(
            "{path}.cache_control.type: Input should be 'ephemeral'"
        )));
    }
    match control.get("ttl") {
        None | Some(Value::Null) => Ok(Some(TTL_5M)),
        Some(Value::String(ttl)) if ttl == "5m" => Ok(Some(TTL_5M)),
        Some(Value::String(ttl)) if ttl == "1h" => Ok(Some(TTL_1H)),
        Some(_) => Err(ApiError::invalid(format!(
            "{path}.cache_control.ttl: Input should be '5m' or '1h'"
        ))),
    }
}

/// Serialises a block without its `cache_control`, so the breakpoint itself
/// does not change the cached content.
fn json_without_cache_control(obj: &Map<String, Value>) -> String {
    let mut copy = obj.clone();
    copy.remove("cache_control");
    Value::Object(copy).to_string()
}

/// Enforces the four-breakpoint limit.
fn check_breakpoints(blocks: &[PromptBlock]) -> Result<(), ApiError> {
    let found = blocks.iter().filter(|b| b.ttl.is_some()).count();
    if found > MAX_BREAKPOINTS {
        Err(ApiError::invalid(format!(
            "A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {found}."
        )))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Prompt cache

/// A cache breakpoint: the hash and size of the prefix ending at it.
#[derive(Debug)]
struct Breakpoint {
    hash: String,
    prefix_tokens: u64,
    ttl: Duration,
}

/// Token usage split by cache status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenUsage {
    input: u64,
    cache_creation: u64,
    cache_read: u64,
}

/// Hashes the prefix (model, then blocks in order) ending at each
/// breakpoint.
fn breakpoints(req: &ParsedRequest) -> Vec<Breakpoint> {
    let mut hasher = Sha256::new();
    feed(&mut hasher, req.model.as_bytes());
    let mut prefix_tokens = 0;
    let mut points = Vec::new();
    for block in &req.blocks {
        feed(&mut hasher, block.section.as_bytes());
        feed(&mut hasher, block.content.as_bytes());
        prefix_tokens += block.tokens;
        if let Some(ttl) = block.ttl {
            points.push(Breakpoint {
                hash: hex::encode(hasher.clone().finalize()),
                prefix_tokens,
                ttl,
            });
        }
    }
    points
}

/// Length-prefixed hash input, so block boundaries are unambiguous.
fn feed(hasher: &mut Sha256, bytes: &[u8]) {
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    hasher.update(len.to_le_bytes());
    hasher.update(bytes);
}

// ---------------------------------------------------------------------------
// Replies

/// The generated answer.
#[derive(Debug)]
struct Reply {
    text: String,
    stop_reason: &'static str,
    output_tokens: u64,
}

/// Builds the 200 response body.
fn success_response(req: &ParsedRequest, reply: &Reply, usage: TokenUsage) -> Response {
    let body = json!({
        "id": new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": reply.stop_reason,
        "stop_sequence": null,
        "usage": {
            "input_tokens": usage.input,
            "output_tokens": reply.output_tokens,
            "cache_creation_input_tokens": usage.cache_creation,
            "cache_read_input_tokens": usage.cache_read,
        },
    });
    let mut response = Json(body).into_response();
    set_request_id(&mut response, &new_id("req"));
    response
}

/// Generates the deterministic answer, cut to `max_tokens`.
fn reply(req: &ParsedRequest) -> Reply {
    let dimension = find_dimension(&req.last_user_text);
    let transcript = find_transcript(req);
    let text = if transcript.contains(MALFORMED_MARKER) {
        malformed_text()
    } else {
        coaching_text(&transcript, &dimension)
    };
    let limit = req.max_tokens.saturating_mul(4);
    let too_long = u64::try_from(text.chars().count()).unwrap_or(u64::MAX) > limit;
    let (text, stop_reason) = if too_long {
        let keep = usize::try_from(limit).unwrap_or(usize::MAX);
        (text.chars().take(keep).collect(), "max_tokens")
    } else {
        (text, "end_turn")
    };
    Reply {
        output_tokens: approx_tokens(&text),
        text,
        stop_reason,
    }
}

/// The dimension quoted in backticks right after "for the", else a known
/// dimension name found in the text, else `general`.
fn find_dimension(text: &str) -> String {
    if let Some((_, rest)) = text.split_once("for the `")
        && let Some((name, _)) = rest.split_once('`')
        && !name.trim().is_empty()
        && name.len() <= 64
    {
        return name.trim().to_owned();
    }
    DIMENSIONS
        .iter()
        .find(|d| text.contains(*d))
        .map_or_else(|| "general".to_owned(), |d| (*d).to_owned())
}

/// The text inside `<transcript>` tags (searching system blocks from the
/// last one, then message blocks, so instructions that merely mention the tag
/// do not win), else the last system block, else the whole prompt.
fn find_transcript(req: &ParsedRequest) -> String {
    let system_first = req
        .blocks
        .iter()
        .rev()
        .filter(|b| b.section == "system")
        .chain(req.blocks.iter().filter(|b| b.section != "system"));
    let tagged = system_first
        .filter_map(|b| b.content.split_once("<transcript>").map(|(_, rest)| rest))
        .find_map(|rest| rest.split_once("</transcript>").map(|(inner, _)| inner));
    if let Some(inner) = tagged {
        return inner.to_owned();
    }
    if let Some(last_system) = req.blocks.iter().rev().find(|b| b.section == "system") {
        return last_system.content.clone();
    }
    req.blocks
        .iter()
        .map(|b| b.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// An answer that looks like the start of the JSON but never closes it.
fn malformed_text() -> String {
    "Sure! Here is the analysis: {\"score\": 61, \"strengths\": [\"Clear agenda\", \
     \"improvements\": [\"Ask more"
        .to_owned()
}

/// Deterministic coaching JSON derived from the transcript and dimension.
fn coaching_text(transcript: &str, dimension: &str) -> String {
    let seed = Sha256::digest(format!("{transcript}\u{0}{dimension}").as_bytes());
    let byte = |i: usize| seed.get(i).copied().unwrap_or(0);
    let score = 40 + u16::from_be_bytes([byte(0), byte(1)]) % 56;
    let lines: Vec<&str> = transcript
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('<') && !l.starts_with("[[emulator"))
        .collect();
    let focus = focus_lines(&lines, dimension);
    let others: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !focus.contains(l))
        .collect();
    let others = if others.is_empty() {
        focus.clone()
    } else {
        others
    };
    let [f1, f2] = pick_two(&focus, byte(2), byte(3));
    let [o1, o2] = pick_two(&others, byte(4), byte(5));
    let label = dimension.replace('_', " ");
    json!({
        "score": score,
        "strengths": [
            format!("Strong {label} moment: \"{f1}\""),
            format!("Kept the conversation moving with \"{f2}\""),
        ],
        "improvements": [
            format!("After \"{o1}\", dig deeper into the buyer's goals before moving on."),
            format!("Tie \"{o2}\" back to a concrete next step."),
        ],
        "examples": [f1, f2],
        "summary": format!(
            "Emulated {label} review of {} transcript lines: {score}/100.",
            lines.len()
        ),
    })
    .to_string()
}

/// Transcript lines relevant to `dimension` (all lines if none match).
fn focus_lines<'t>(lines: &[&'t str], dimension: &str) -> Vec<&'t str> {
    let matches = |line: &str| {
        let lower = line.to_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| lower.contains(w));
        match dimension {
            "discovery" => line.contains('?'),
            "objection_handling" => any(&[
                "but",
                "concern",
                "expensive",
                "price",
                "budget",
                "not sure",
                "however",
                "worried",
            ]),
            "product_knowledge" => {
                line.chars().any(|c| c.is_ascii_digit())
                    || any(&["feature", "integrat", "support", "plan", "report"])
            }
            "engagement" => any(&["you", "we", "let's"]),
            _ => true,
        }
    };
    let focused: Vec<&str> = lines.iter().copied().filter(|l| matches(l)).collect();
    if focused.is_empty() {
        lines.to_vec()
    } else {
        focused
    }
}

/// Two (distinct when possible) quotes from `pool`, chosen by seed bytes.
fn pick_two(pool: &[&str], a: u8, b: u8) -> [String; 2] {
    let n = pool.len();
    if n == 0 {
        let none = "(no transcript lines to quote)".to_owned();
        return [none.clone(), none];
    }
    let i = usize::from(a) % n;
    let j = if n > 1 {
        (i + 1 + usize::from(b) % (n - 1)) % n
    } else {
        i
    };
    [quote(pool, i), quote(pool, j)]
}

/// The line at `i`, cut to [`MAX_QUOTE_CHARS`].
fn quote(pool: &[&str], i: usize) -> String {
    let line = pool.get(i).copied().unwrap_or_default();
    let mut out: String = line.chars().take(MAX_QUOTE_CHARS).collect();
    if line.chars().nth(MAX_QUOTE_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests;
