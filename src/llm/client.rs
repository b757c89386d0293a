//! Minimal Anthropic Messages API client.
//!
//! [`LlmClient`] sends exactly one `POST {base_url}/v1/messages` request per
//! call and classifies the outcome into an [`LlmError`]. It never retries on
//! its own: the job system decides whether and when to try again, using
//! [`LlmError::is_retryable`], [`LlmError::is_throttle`] and
//! [`LlmError::retry_after`].

use std::fmt;
use std::time::Duration;

use super::limits::RateLimitHeaders;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Deserializer, Serialize};

/// Value sent in the `anthropic-version` header.
pub const ANTHROPIC_VERSION: &str = "2026-10-21";

/// Header with the retry delay in milliseconds (preferred over `retry-after`).
const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Longest raw error body kept in an error message, in characters.
const MAX_ERROR_BODY_CHARS: usize = 500;

/// Everything that can go wrong when talking to the Messages API or reading
/// the model's answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// HTTP 429: the account's rate limit was hit.
    #[error("rate limited by the API (429): {message}")]
    RateLimited {
        /// Delay requested by the `retry-after` header, if any.
        retry_after: Option<Duration>,
        /// Error message from the API.
        message: String,
    },
    /// HTTP 529: the API is temporarily overloaded.
    #[error("API overloaded (529): {message}")]
    Overloaded {
        /// Delay requested by the `retry-after` header, if any.
        retry_after: Option<Duration>,
        /// Error message from the API.
        message: String,
    },
    /// HTTP 408 or 5xx (other than 529): a transient server-side failure.
    #[error("API server error ({status}): {message}")]
    Server {
        /// HTTP status code.
        status: u16,
        /// Delay requested by the `retry-after` header, if any.
        retry_after: Option<Duration>,
        /// Error message from the API.
        message: String,
    },
    /// A 4xx answer other than 408/429: the request itself is wrong and
    /// retrying it will not help.
    #[error("request rejected by the API ({status} {kind}): {message}")]
    Rejected {
        /// HTTP status code.
        status: u16,
        /// Anthropic error type, e.g. `invalid_request_error`, or `unknown`.
        kind: String,
        /// Error message from the API.
        message: String,
    },
    /// The request never got an HTTP answer (connect error, timeout, broken
    /// connection) or the client could not be built from its configuration.
    #[error("transport error: {0}")]
    Transport(String),
    /// The API answered 2xx but the body is not a Messages API response.
    #[error("unparseable API response: {0}")]
    BadResponse(String),
    /// The model's text is not the coaching JSON that was asked for.
    #[error("model output rejected: {0}")]
    BadOutput(String),
}

impl LlmError {
    /// Whether trying the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::Overloaded { .. }
                | Self::Server { .. }
                | Self::Transport(_)
        )
    }

    /// Whether this is back-pressure (429/529): the caller should postpone the
    /// job without consuming an attempt.
    pub fn is_throttle(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Overloaded { .. })
    }

    /// Delay the API asked us to wait before retrying, if it said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::Overloaded { retry_after, .. }
            | Self::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Token accounting reported by the API for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Uncached input tokens (after the last cache breakpoint hit or write).
    #[serde(deserialize_with = "u64_or_null")]
    pub input_tokens: u64,
    /// Generated tokens, thinking included.
    #[serde(deserialize_with = "u64_or_null")]
    pub output_tokens: u64,
    /// Input tokens written to the prompt cache by this request (both TTLs).
    #[serde(deserialize_with = "u64_or_null")]
    pub cache_creation_input_tokens: u64,
    /// Input tokens served from the prompt cache.
    #[serde(deserialize_with = "u64_or_null")]
    pub cache_read_input_tokens: u64,
    /// The cache writes split by TTL.
    #[serde(deserialize_with = "default_if_null")]
    pub cache_creation: CacheCreation,
    /// Details of `output_tokens`.
    #[serde(deserialize_with = "default_if_null")]
    pub output_tokens_details: OutputTokensDetails,
    /// Which capacity served the request.
    #[serde(deserialize_with = "default_if_null")]
    pub service_tier: ServiceTier,
}

impl Usage {
    /// Cache writes as (5-minute, 1-hour) tokens. An answer without the split (older API
    /// versions) counts every write as a 5-minute write.
    pub fn cache_writes(&self) -> (u64, u64) {
        let c = self.cache_creation;
        if c.ephemeral_5m_input_tokens + c.ephemeral_1h_input_tokens == 0 {
            (self.cache_creation_input_tokens, 0)
        } else {
            (c.ephemeral_5m_input_tokens, c.ephemeral_1h_input_tokens)
        }
    }

    /// Thinking tokens (part of `output_tokens`).
    pub fn thinking_tokens(&self) -> u64 {
        self.output_tokens_details.thinking_tokens
    }
}

/// `usage.cache_creation`: cache writes by TTL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheCreation {
    /// Tokens written with the 5-minute TTL.
    #[serde(deserialize_with = "u64_or_null")]
    pub ephemeral_5m_input_tokens: u64,
    /// Tokens written with the 1-hour TTL.
    #[serde(deserialize_with = "u64_or_null")]
    pub ephemeral_1h_input_tokens: u64,
}

/// `usage.output_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OutputTokensDetails {
    /// Tokens spent thinking (billed as output).
    #[serde(deserialize_with = "u64_or_null")]
    pub thinking_tokens: u64,
}

/// `usage.service_tier`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTier {
    /// Standard capacity.
    #[default]
    Standard,
    /// Priority Tier capacity.
    Priority,
    /// A Message Batches request.
    Batch,
    /// A tier this version does not know.
    #[serde(other)]
    Other,
}

impl ServiceTier {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Priority => "priority",
            Self::Batch => "batch",
            Self::Other => "other",
        }
    }
}

/// Treats an explicit JSON `null` like a missing field.
fn default_if_null<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    de: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// Treats an explicit JSON `null` like a missing field (0).
fn u64_or_null<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(de)?.unwrap_or(0))
}

/// The parts of a successful Messages API response that callers need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmResponse {
    /// Message id (`msg_...`).
    pub id: String,
    /// Model that produced the answer.
    pub model: String,
    /// All `text` content blocks concatenated in order.
    pub text: String,
    /// Why generation stopped (`end_turn`, `max_tokens`, ...).
    pub stop_reason: Option<String>,
    /// Token accounting.
    pub usage: Usage,
    /// The `anthropic-ratelimit-*` headers of the answer.
    #[serde(skip)]
    pub rate_limits: RateLimitHeaders,
}

/// Wire shape of a successful Messages API response.
#[derive(Deserialize)]
struct ApiMessage {
    id: String,
    model: String,
    content: Vec<ApiBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Usage,
}

/// Wire shape of one response content block.
#[derive(Deserialize)]
struct ApiBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// Wire shape of an Anthropic error body.
#[derive(Deserialize)]
struct ApiErrorBody {
    #[serde(rename = "type")]
    kind: String,
    error: ApiErrorDetail,
    #[serde(default)]
    request_id: Option<String>,
}

/// The `error` object inside [`ApiErrorBody`].
#[derive(Deserialize)]
struct ApiErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

/// Client for the Anthropic Messages API (cheap to clone: shares one
/// connection pool).
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    base_url: String,
    endpoint: reqwest::Url,
    api_key: String,
}

impl fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmClient")
            .field("base_url", &self.base_url)
            .field("api_key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl LlmClient {
    /// Builds a client for `base_url` (with or without a trailing `/`).
    ///
    /// `timeout` bounds each whole request.
    ///
    /// # Errors
    ///
    /// [`LlmError::Transport`] when the URL or key is unusable or the HTTP
    /// client cannot be built.
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> Result<Self, LlmError> {
        let base_url = base_url.trim().trim_end_matches('/').to_owned();
        let endpoint = reqwest::Url::parse(&format!("{base_url}/v1/messages"))
            .map_err(|e| LlmError::Transport(format!("invalid base URL {base_url:?}: {e}")))?;
        if reqwest::header::HeaderValue::from_str(api_key).is_err() {
            return Err(LlmError::Transport(
                "API key contains characters not allowed in an HTTP header".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| LlmError::Transport(format!("building HTTP client: {}", chain(&e))))?;
        Ok(Self {
            http,
            base_url,
            endpoint,
            api_key: api_key.to_owned(),
        })
    }

    /// Base URL this client talks to (without a trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends one Messages API request with `body` as the JSON payload.
    ///
    /// # Errors
    ///
    /// The [`LlmError`] variant matching the HTTP status (see its docs),
    /// [`LlmError::Transport`] when no answer arrived in time, or
    /// [`LlmError::BadResponse`] when a 2xx body is not a message.
    pub async fn messages(&self, body: &serde_json::Value) -> Result<LlmResponse, LlmError> {
        let request = self.http.post(self.endpoint.clone()).json(body);
        let (rate_limits, bytes) = self.send(request).await?;
        parse_success(&bytes).map(|r| LlmResponse { rate_limits, ..r })
    }

    /// A request to `{base_url}{path}` (`path` starts with `/`).
    pub(super) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base_url))
    }

    /// Sends `request` with the API headers; the body of a 2xx answer, or the classified
    /// error.
    pub(super) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(RateLimitHeaders, Vec<u8>), LlmError> {
        let response = request
            .header("x-api-key", &self.api_key)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .send()
            .await
            .map_err(|e| LlmError::Transport(chain(&e)))?;
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(response.headers());
        let rate_limits = RateLimitHeaders::parse(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| LlmError::Transport(format!("reading response body: {}", chain(&e))))?;
        if (200..300).contains(&status) {
            Ok((rate_limits, bytes.to_vec()))
        } else {
            let err = classify_error(status, retry_after, &bytes);
            tracing::debug!(status, error = %err, "API call failed");
            Err(err)
        }
    }
}

/// Formats an error with its whole `source()` chain.
pub(super) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// The delay the API asked for: `retry-after-ms` (milliseconds) when present, else
/// `retry-after` in (possibly fractional) seconds.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name| -> Option<f64> {
        let value: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (value.is_finite() && value >= 0.0).then_some(value)
    };
    let secs = number(RETRY_AFTER_MS)
        .map(|ms| ms / 1000.0)
        .or_else(|| number(RETRY_AFTER.as_str()))?;
    Duration::try_from_secs_f64(secs).ok()
}

/// Parses a 2xx body into an [`LlmResponse`].
pub(super) fn parse_success(bytes: &[u8]) -> Result<LlmResponse, LlmError> {
    let msg: ApiMessage = serde_json::from_slice(bytes)
        .map_err(|e| LlmError::BadResponse(format!("{e}; body: {}", truncated(bytes))))?;
    let text = msg
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect::<String>();
    Ok(LlmResponse {
        id: msg.id,
        model: msg.model,
        text,
        stop_reason: msg.stop_reason,
        usage: msg.usage,
        rate_limits: RateLimitHeaders::default(),
    })
}

/// Maps a non-2xx answer to the matching [`LlmError`] variant.
fn classify_error(status: u16, retry_after: Option<Duration>, body: &[u8]) -> LlmError {
    let (kind, message) = error_kind_and_message(status, body);
    match status {
        429 => LlmError::RateLimited {
            retry_after,
            message,
        },
        529 => LlmError::Overloaded {
            retry_after,
            message,
        },
        408 | 500..=599 => LlmError::Server {
            status,
            retry_after,
            message,
        },
        _ => LlmError::Rejected {
            status,
            kind,
            message,
        },
    }
}

/// Extracts `(error.type, error.message)` from an Anthropic error body, or
/// falls back to `("unknown", <truncated raw body>)`.
fn error_kind_and_message(status: u16, body: &[u8]) -> (String, String) {
    match serde_json::from_slice::<ApiErrorBody>(body) {
        Ok(parsed) if parsed.kind == "error" => {
            let message = match parsed.request_id {
                Some(id) => format!("{} (request {id})", parsed.error.message),
                None => parsed.error.message,
            };
            (parsed.error.kind, message)
        }
        _ => {
            let raw = truncated(body);
            let message = if raw.trim().is_empty() {
                format!("HTTP {status} with an empty body")
            } else {
                raw
            };
            ("unknown".to_owned(), message)
        }
    }
}

/// Body text (lossy UTF-8) cut to [`MAX_ERROR_BODY_CHARS`] characters.
pub(super) fn truncated(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.chars().take(MAX_ERROR_BODY_CHARS).collect();
    if text.chars().nth(MAX_ERROR_BODY_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::emulator::{self, EmulatorConfig, EmulatorHandle};
    use serde_json::json;

    async fn start(config: EmulatorConfig) -> EmulatorHandle {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        emulator::spawn(listener, config).await.expect("spawn")
    }

    fn client(base: &str, key: &str) -> LlmClient {
        LlmClient::new(base, key, Duration::from_secs(10)).expect("client")
    }

    fn simple_body() -> serde_json::Value {
        json!({
            "model": "claude-sonnet-5-5",
            "max_tokens": 512,
            "messages": [{"role": "user", "content": "Analyse the transcript for the `discovery` dimension."}]
        })
    }

    #[test]
    fn debug_redacts_key() {
        let c = client("http://127.0.0.1:1/", "sk-secret-value");
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-secret-value"));
        assert!(shown.contains("[redacted]"));
        assert_eq!(c.base_url(), "http://127.0.0.1:1");
    }

    #[test]
    fn new_rejects_bad_url_and_key() {
        let t = Duration::from_secs(1);
        assert!(matches!(
            LlmClient::new("not a url", "k", t),
            Err(LlmError::Transport(_))
        ));
        assert!(matches!(
            LlmClient::new("http://localhost", "bad\nkey", t),
            Err(LlmError::Transport(_))
        ));
    }

    #[test]
    fn classifies_statuses() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        let e = classify_error(429, Some(Duration::from_secs(3)), body);
        assert_eq!(
            e,
            LlmError::RateLimited {
                retry_after: Some(Duration::from_secs(3)),
                message: "slow down".into()
            }
        );
        assert!(e.is_retryable() && e.is_throttle());
        let e = classify_error(529, None, b"");
        assert!(matches!(e, LlmError::Overloaded { .. }) && e.is_throttle());
        for status in [500, 502, 503, 504, 408] {
            let e = classify_error(status, None, b"oops");
            assert_eq!(
                e,
                LlmError::Server {
                    status,
                    retry_after: None,
                    message: "oops".into()
                }
            );
            assert!(e.is_retryable() && !e.is_throttle());
        }
        for status in [400, 401, 403, 404, 413, 422] {
            let e = classify_error(status, None, b"<html>nope</html>");
            assert!(matches!(&e, LlmError::Rejected { kind, .. } if kind == "unknown"));
            assert!(!e.is_retryable() && !e.is_throttle());
            assert_eq!(e.retry_after(), None);
        }
    }

    #[test]
    fn the_request_id_is_kept_and_retry_after_ms_wins() {
        let body = br#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-x"},"request_id":"req_42"}"#;
        let e = classify_error(404, None, body);
        assert_eq!(
            e.to_string(),
            "request rejected by the API (404 not_found_error): model: claude-x (request req_42)"
        );
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER_MS, "1250.5".parse().unwrap());
        assert_eq!(
            parse_retry_after(&headers),
            Some(Duration::from_micros(1_250_500))
        );
        headers.insert(RETRY_AFTER_MS, "-3".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn usage_reads_the_cache_split_thinking_and_tier() {
        let u: Usage = serde_json::from_value(json!({
            "input_tokens": 50, "output_tokens": 900, "cache_creation_input_tokens": 3000,
            "cache_read_input_tokens": 10000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
            "output_tokens_details": {"thinking_tokens": 400}, "service_tier": "batch",
            "server_tool_use": null, "inference_geo": "us"
        }))
        .expect("usage");
        assert_eq!(u.cache_writes(), (1000, 2000));
        assert_eq!(u.thinking_tokens(), 400);
        assert_eq!(u.service_tier, ServiceTier::Batch);
        let old: Usage = serde_json::from_value(json!({
            "input_tokens": 1, "cache_creation_input_tokens": 30, "cache_creation": null,
            "service_tier": "something-new"
        }))
        .expect("usage");
        assert_eq!(old.cache_writes(), (30, 0));
        assert_eq!(old.service_tier, ServiceTier::Other);
    }

    #[test]
    fn raw_error_body_is_truncated() {
        let body = "x".repeat(2_000);
        let (kind, message) = error_kind_and_message(400, body.as_bytes());
        assert_eq!(kind, "unknown");
        assert_eq!(message.chars().count(), MAX_ERROR_BODY_CHARS + 1);
    }

    #[test]
    fn usage_defaults_missing_and_null_cache_fields() {
        let u: Usage = serde_json::from_value(json!({
            "input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": null
        }))
        .expect("usage");
        assert_eq!(
            u,
            Usage {
                input_tokens: 5,
                output_tokens: 7,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn success_body_concatenates_text_blocks() {
        let body = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5-5",
            "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t"}, {"type": "text", "text": "b"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 2}
        });
        let r = parse_success(body.to_string().as_bytes()).expect("parse");
        assert_eq!(r.text, "ab");
        assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
        assert!(matches!(
            parse_success(b"{}"),
            Err(LlmError::BadResponse(_))
        ));
    }

    #[tokio::test]
    async fn round_trip_against_emulator_with_trailing_slash() {
        let emu = start(EmulatorConfig::default()).await;
        let c = client(&format!("{}/", emu.base_url()), "any-key");
        let r = c.messages(&simple_body()).await.expect("response");
        assert!(r.id.starts_with("msg_"));
        assert_eq!(r.model, "claude-sonnet-5-5");
        assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
        assert!(r.usage.input_tokens > 0 && r.usage.output_tokens > 0);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn missing_or_wrong_key_is_rejected_401() {
        let config = EmulatorConfig {
            api_key: Some("right".into()),
            ..EmulatorConfig::default()
        };
        let emu = start(config).await;
        for key in ["", "wrong"] {
            let err = client(emu.base_url(), key)
                .messages(&simple_body())
                .await
                .expect_err("must fail");
            assert!(
                matches!(&err, LlmError::Rejected { status: 401, kind, .. } if kind == "authentication_error"),
                "{err:?}"
            );
            assert!(!err.is_retryable());
        }
        let ok = client(emu.base_url(), "right")
            .messages(&simple_body())
            .await;
        assert!(ok.is_ok());
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn injected_throttles_then_success() {
        let emu = start(EmulatorConfig::default()).await;
        let c = client(emu.base_url(), "k");
        emu.inject_failures(429, 1);
        let err = c.messages(&simple_body()).await.expect_err("429");
        assert!(matches!(err, LlmError::RateLimited { .. }), "{err:?}");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
        assert!(err.is_throttle() && err.is_retryable());

        emu.inject_failures(529, 1);
        let err = c.messages(&simple_body()).await.expect_err("529");
        assert!(matches!(err, LlmError::Overloaded { .. }), "{err:?}");
        assert!(err.is_throttle());

        emu.inject_failures(500, 1);
        let err = c.messages(&simple_body()).await.expect_err("500");
        assert!(
            matches!(err, LlmError::Server { status: 500, .. }),
            "{err:?}"
        );
        assert!(!err.is_throttle() && err.is_retryable());

        assert!(c.messages(&simple_body()).await.is_ok());
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn invalid_request_is_rejected_400() {
        let emu = start(EmulatorConfig::default()).await;
        let body = json!({"model": "claude-sonnet-5-5", "max_tokens": 0, "messages": []});
        let err = client(emu.base_url(), "k")
            .messages(&body)
            .await
            .expect_err("400");
        assert!(
            matches!(&err, LlmError::Rejected { status: 400, kind, .. } if kind == "invalid_request_error"),
            "{err:?}"
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn unreachable_server_is_transport_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = client(&format!("http://{addr}"), "k")
            .messages(&simple_body())
            .await
            .expect_err("no server");
        assert!(matches!(err, LlmError::Transport(_)), "{err:?}");
        assert!(err.is_retryable() && !err.is_throttle());
    }

    #[tokio::test]
    async fn slow_server_times_out_as_transport_error() {
        let config = EmulatorConfig {
            latency: Duration::from_millis(800),
            ..EmulatorConfig::default()
        };
        let emu = start(config).await;
        let c = LlmClient::new(emu.base_url(), "k", Duration::from_millis(100)).expect("client");
        let err = c.messages(&simple_body()).await.expect_err("timeout");
        assert!(matches!(err, LlmError::Transport(_)), "{err:?}");
        emu.shutdown().await;
    }
}
