//! Tests for the emulator: validation, error shapes, auth, cache accounting,
//! fault injection and counters.

use super::cache::TokenUsage;
use super::reply::{coaching_text, find_dimension, find_transcript, malformed_text};
use super::request::{ApiVersion, Endpoint};
use super::*;
use crate::llm::{LlmClient, LlmError, PromptInputs, PromptOptions, build_request, parse_coaching};
use axum::http::StatusCode;

/// Accounts `req` at `now` and commits its writes at once.
fn account(state: &EmulatorState, req: &ParsedRequest, now: Instant) -> TokenUsage {
    let accounting = state
        .inner
        .cache
        .account(req, state.min_cacheable(req), now);
    state.inner.cache.commit(&accounting.writes, now);
    accounting.usage
}

/// Usage with 5-minute writes only.
fn usage(input: u64, creation: u64, read: u64) -> TokenUsage {
    TokenUsage {
        input,
        creation_5m: creation,
        creation_1h: 0,
        cache_read: read,
    }
}

async fn start(config: EmulatorConfig) -> EmulatorHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    spawn(listener, config).await.expect("spawn")
}

fn client(emu: &EmulatorHandle) -> LlmClient {
    LlmClient::new(emu.base_url(), "test-key", Duration::from_secs(10)).expect("client")
}

fn body(content: &str) -> Value {
    json!({
        "model": "claude-sonnet-5-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": content}]
    })
}

fn cached_block(text: &str) -> Value {
    json!({"type": "text", "text": text, "cache_control": {"type": "ephemeral"}})
}

/// Raw POST with chosen headers; returns status, headers and JSON body.
async fn raw_post(
    url: &str,
    headers: &[(&str, &str)],
    payload: String,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new().post(url).body(payload);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let json = response.json::<Value>().await.expect("json body");
    (status, headers, json)
}

fn assert_error_shape(body: &Value, kind: &str) {
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let request_id = body["request_id"].as_str().expect("request_id");
    assert!(request_id.starts_with("req_"), "{body}");
}

#[test]
fn config_validation_names_fail_rate() {
    assert!(EmulatorConfig::default().validate().is_ok());
    for rate in [-0.1, 1.5, f64::NAN] {
        let config = EmulatorConfig {
            fail_rate: rate,
            ..EmulatorConfig::default()
        };
        let err = config.validate().expect_err("invalid rate");
        assert!(err.to_string().contains("fail_rate"), "{err}");
    }
    let shown = format!(
        "{:?}",
        EmulatorConfig {
            api_key: Some("secret-k".into()),
            ..EmulatorConfig::default()
        }
    );
    assert!(!shown.contains("secret-k"));
}

#[tokio::test]
async fn spawn_rejects_invalid_config() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = EmulatorConfig {
        fail_rate: 2.0,
        ..EmulatorConfig::default()
    };
    let err = spawn(listener, config).await.expect_err("invalid");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn five_breakpoints_are_rejected() {
    let emu = start(EmulatorConfig::default()).await;
    let mut request = body("hi");
    request["system"] = json!([
        cached_block("a"),
        cached_block("b"),
        cached_block("c"),
        cached_block("d")
    ]);
    request["messages"] = json!([{"role": "user", "content": [cached_block("e")]}]);
    let err = client(&emu).messages(&request).await.expect_err("400");
    match err {
        LlmError::Rejected {
            status: 400,
            kind,
            message,
        } => {
            assert_eq!(kind, "invalid_request_error");
            assert!(
                message.starts_with(
                    "A maximum of 4 blocks with cache_control may be provided. Found 5. (request req_"
                ),
                "{message}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // Four are fine.
    request["messages"] = json!([{"role": "user", "content": "e"}]);
    assert!(client(&emu).messages(&request).await.is_ok());
    emu.shutdown().await;
}

#[tokio::test]
async fn auth_and_version_headers() {
    let emu = start(EmulatorConfig::default()).await;
    let url = format!("{}/v1/messages", emu.base_url());
    let payload = body("hello").to_string();

    let (status, _, err) = raw_post(
        &url,
        &[("anthropic-version", "2023-06-01")],
        payload.clone(),
    )
    .await;
    assert_eq!(status, 401);
    assert_error_shape(&err, "authentication_error");

    let (status, _, err) = raw_post(&url, &[("x-api-key", "k")], payload.clone()).await;
    assert_eq!(status, 400);
    assert_error_shape(&err, "invalid_request_error");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("anthropic-version"))
    );

    // Official SDK 2.x style: Bearer auth and a newer version date.
    let headers = [
        ("authorization", "Bearer k"),
        ("anthropic-version", "2026-01-01"),
        ("content-type", "application/json"),
    ];
    let (status, response_headers, ok) = raw_post(&url, &headers, payload).await;
    assert_eq!(status, 200, "{ok}");
    assert!(response_headers.contains_key("request-id"));
    assert_eq!(ok["type"], "message");
    assert_eq!(ok["role"], "assistant");
    assert_eq!(ok["model"], "claude-sonnet-5-5");
    assert_eq!(ok["content"][0]["type"], "text");
    assert_eq!(ok["stop_reason"], "end_turn");
    assert!(ok["stop_sequence"].is_null());
    assert!(ok["id"].as_str().is_some_and(|id| id.starts_with("msg_")));
    for field in [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ] {
        assert!(ok["usage"][field].is_u64(), "{field} in {ok}");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn configured_key_is_enforced() {
    let emu = start(EmulatorConfig {
        api_key: Some("expected".into()),
        ..EmulatorConfig::default()
    })
    .await;
    let url = format!("{}/v1/messages", emu.base_url());
    let version = ("anthropic-version", "2023-06-01");
    let (status, _, err) = raw_post(
        &url,
        &[("x-api-key", "other"), version],
        body("x").to_string(),
    )
    .await;
    assert_eq!(status, 401);
    assert_error_shape(&err, "authentication_error");
    let (status, _, _) = raw_post(
        &url,
        &[("authorization", "Bearer expected"), version],
        body("x").to_string(),
    )
    .await;
    assert_eq!(status, 200);
    emu.shutdown().await;
}

#[tokio::test]
async fn malformed_bodies_get_invalid_request_errors() {
    let emu = start(EmulatorConfig::default()).await;
    let url = format!("{}/v1/messages", emu.base_url());
    let headers = [("x-api-key", "k"), ("anthropic-version", "2023-06-01")];
    let cases = [
        ("{not json".to_owned(), "not valid JSON"),
        ("[]".to_owned(), "JSON object"),
        (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).to_string(), "model: Field required"),
        (json!({"model": "", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).to_string(), "model:"),
        (json!({"model": "claude-sonnet-5-5", "messages": [{"role": "user", "content": "x"}]}).to_string(), "max_tokens: Field required"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}).to_string(), "greater than or equal to 1"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 1.5, "messages": [{"role": "user", "content": "x"}]}).to_string(), "valid integer"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": []}).to_string(), "at least one message"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5}).to_string(), "messages: Field required"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]}).to_string(), "first message"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}).to_string(), "role"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}).to_string(), "content"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}).to_string(), "non-empty"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "system": [{"type": "image"}], "messages": [{"role": "user", "content": "x"}]}).to_string(), "system.0.type"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "system": 7, "messages": [{"role": "user", "content": "x"}]}).to_string(), "system:"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "2h"}}], "messages": [{"role": "user", "content": "x"}]}).to_string(), "ttl"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "system": [{"type": "text", "text": "s", "cache_control": {"type": "persistent"}}], "messages": [{"role": "user", "content": "x"}]}).to_string(), "ephemeral"),
        (json!({"model": "claude-sonnet-5-5", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "x"}]}).to_string(), "stream"),
    ];
    for (payload, needle) in cases {
        let (status, response_headers, err) = raw_post(&url, &headers, payload.clone()).await;
        assert_eq!(status, 400, "{payload}: {err}");
        assert!(response_headers.contains_key("request-id"));
        assert_error_shape(&err, "invalid_request_error");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{payload}: {message:?} lacks {needle:?}"
        );
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn injected_failures_and_counters() {
    let emu = start(EmulatorConfig::default()).await;
    let c = client(&emu);
    emu.inject_failures(429, 2);
    emu.inject_failures(529, 1);
    for _ in 0..2 {
        let err = c.messages(&body("x")).await.expect_err("429");
        assert!(matches!(err, LlmError::RateLimited { .. }), "{err:?}");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    }
    let err = c.messages(&body("x")).await.expect_err("529");
    assert!(matches!(err, LlmError::Overloaded { .. }), "{err:?}");
    assert!(c.messages(&body("x")).await.is_ok());
    assert!(
        c.messages(&json!({"model": "claude-sonnet-5-5"}))
            .await
            .is_err()
    );

    // count_tokens is neither faulted nor counted.
    emu.inject_failures(500, 1);
    let url = format!("{}/v1/messages/count_tokens", emu.base_url());
    let headers = [("x-api-key", "k"), ("anthropic-version", "2023-06-01")];
    let (status, _, _) = raw_post(&url, &headers, body("x").to_string()).await;
    assert_eq!(status, 200);
    let err = c.messages(&body("x")).await.expect_err("500");
    assert!(
        matches!(err, LlmError::Server { status: 500, .. }),
        "{err:?}"
    );

    assert_eq!(emu.requests_total(), 6);
    assert_eq!(emu.messages_served(), 1);
    assert_eq!(emu.failures_served(), 5);
    assert_eq!(emu.state().requests_total(), 6);
    emu.shutdown().await;
}

#[tokio::test]
async fn injected_429_has_retry_after_header_and_error_body() {
    let emu = start(EmulatorConfig::default()).await;
    emu.inject_failures(429, 1);
    let url = format!("{}/v1/messages", emu.base_url());
    let headers = [("x-api-key", "k"), ("anthropic-version", "2023-06-01")];
    let (status, response_headers, err) = raw_post(&url, &headers, body("x").to_string()).await;
    assert_eq!(status, 429);
    assert_eq!(
        response_headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_error_shape(&err, "rate_limit_error");
    emu.shutdown().await;
}

#[tokio::test]
async fn full_fail_rate_fails_every_request() {
    let emu = start(EmulatorConfig {
        fail_rate: 1.0,
        ..EmulatorConfig::default()
    })
    .await;
    let c = client(&emu);
    for _ in 0..6 {
        let err = c.messages(&body("x")).await.expect_err("fault");
        let expected = matches!(
            err,
            LlmError::RateLimited { .. }
                | LlmError::Overloaded { .. }
                | LlmError::Server { status: 500, .. }
        );
        assert!(expected, "{err:?}");
        if let LlmError::RateLimited { retry_after, .. } = err {
            assert_eq!(retry_after, Some(Duration::from_secs(1)));
        }
    }
    assert_eq!(emu.failures_served(), 6);
    assert_eq!(emu.messages_served(), 0);
    emu.shutdown().await;
}

#[tokio::test]
async fn count_tokens_matches_messages_usage() {
    let emu = start(EmulatorConfig::default()).await;
    let mut request = body("twelve chars");
    request["system"] = json!("system prompt of some length");
    let url = format!("{}/v1/messages/count_tokens", emu.base_url());
    let headers = [("x-api-key", "k"), ("anthropic-version", "2023-06-01")];
    let (status, _, counted) = raw_post(&url, &headers, request.to_string()).await;
    assert_eq!(status, 200);
    // ceil(12/4) + ceil(28/4)
    assert_eq!(counted["input_tokens"], 3 + 7);
    let usage = client(&emu).messages(&request).await.expect("ok").usage;
    assert_eq!(usage.input_tokens, 10);
    assert_eq!(
        usage.cache_creation_input_tokens + usage.cache_read_input_tokens,
        0
    );

    let (status, _, err) = raw_post(&url, &headers, "nope".to_owned()).await;
    assert_eq!(status, 400);
    assert_error_shape(&err, "invalid_request_error");
    emu.shutdown().await;
}

#[tokio::test]
async fn unknown_route_is_not_found_error() {
    let emu = start(EmulatorConfig::default()).await;
    let url = format!("{}/v1/complete", emu.base_url());
    let (status, _, err) = raw_post(&url, &[], "{}".to_owned()).await;
    assert_eq!(status, 404);
    assert_error_shape(&err, "not_found_error");
    emu.shutdown().await;
}

#[tokio::test]
async fn tiny_max_tokens_truncates_output() {
    let emu = start(EmulatorConfig::default()).await;
    let mut request = body("Analyse for the `discovery` dimension.");
    request["max_tokens"] = json!(3);
    let response = client(&emu).messages(&request).await.expect("ok");
    assert_eq!(response.stop_reason.as_deref(), Some("max_tokens"));
    assert!(response.usage.output_tokens <= 3);
    assert!(response.text.chars().count() <= 12);
    emu.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let emu = start(EmulatorConfig::default()).await;
    let c = client(&emu);
    assert!(c.messages(&body("x")).await.is_ok());
    emu.shutdown().await;
    let fresh = LlmClient::new(c.base_url(), "k", Duration::from_secs(2)).expect("client");
    let err = fresh.messages(&body("x")).await.expect_err("stopped");
    assert!(matches!(err, LlmError::Transport(_)), "{err:?}");
}

#[tokio::test]
async fn coaching_answers_depend_on_dimension_and_transcript() {
    let emu = start(EmulatorConfig::default()).await;
    let c = client(&emu);
    let transcript = "Rep: What does your current process look like?\n\
        Prospect: Mostly spreadsheets, but the price of change worries me.\n\
        Rep: We support 3 CRMs out of the box.";
    let mut results = Vec::new();
    for dimension in ["discovery", "objection_handling", "product_knowledge"] {
        let inputs = PromptInputs {
            instructions: "Coach.",
            role: "AE",
            rubric: "Rubric.",
            knowledge_base: "KB.",
            transcript,
            dimension,
            dimension_criteria: "Criteria.",
        };
        let text = c
            .messages(&build_request(&PromptOptions::new("claude-sonnet-5-5", 1024), &inputs).body)
            .await
            .expect("ok")
            .text;
        let parsed = parse_coaching(&text).expect("valid coaching JSON");
        assert!((40..=95).contains(&parsed.score));
        assert!(parsed.summary.contains(&dimension.replace('_', " ")));
        results.push(parsed);
    }
    assert!(results[0].examples.iter().all(|e| e.contains('?')));
    assert!(results[1].examples.iter().any(|e| e.contains("price")));
    assert!(results[2].examples.iter().any(|e| e.contains('3')));
    emu.shutdown().await;
}

// --- cache accounting, driven directly with a controlled clock -------------

fn long_request(ttl: Option<&str>, tail: &str) -> ParsedRequest {
    let mut control = json!({"type": "ephemeral"});
    if let Some(ttl) = ttl {
        control["ttl"] = json!(ttl);
    }
    let request = json!({
        "model": "claude-sonnet-5-5",
        "max_tokens": 10,
        "system": [
            {"type": "text", "text": "a".repeat(2_000), "cache_control": control},
            {"type": "text", "text": "b".repeat(4_000), "cache_control": control},
        ],
        "messages": [{"role": "user", "content": tail}],
    });
    parse_request(&request, ApiVersion::Legacy, Endpoint::Create).expect("valid")
}

#[test]
fn cache_creation_then_read_then_expiry() {
    let (_, state) = router(EmulatorConfig::default());
    let t0 = Instant::now();
    let req = long_request(None, "tail text");
    let at = |now| account(&state, &req, now);
    // Prefix 1: 500 tokens (< 1024, not cacheable); prefix 2: 1500 tokens.
    let cold = usage(3, 1_500, 0);
    assert_eq!(at(t0), cold);
    let warm = usage(3, 0, 1_500);
    assert_eq!(at(t0 + Duration::from_secs(60)), warm);
    // The read refreshed the entry: still warm 4 minutes after it.
    assert_eq!(at(t0 + Duration::from_secs(300)), warm);
    // Expired after 5 minutes without use.
    assert_eq!(at(t0 + Duration::from_secs(300 + 301)), cold);
}

#[test]
fn one_hour_ttl_outlives_five_minutes() {
    let (_, state) = router(EmulatorConfig::default());
    let t0 = Instant::now();
    let req = long_request(Some("1h"), "x");
    assert_eq!(account(&state, &req, t0).creation_1h, 1_500);
    let later = account(&state, &req, t0 + Duration::from_secs(30 * 60));
    assert_eq!(later.cache_read, 1_500);
}

#[test]
fn partial_prefix_hit_writes_the_rest() {
    let config = EmulatorConfig {
        min_cacheable_tokens: Some(100),
        ..EmulatorConfig::default()
    };
    let (_, state) = router(config);
    let now = Instant::now();
    let first = long_request(None, "x");
    assert_eq!(account(&state, &first, now), usage(1, 1_500, 0));
    // Same first block, different second block: read 500, write 1000.
    let mut second = long_request(None, "x");
    if let Some(block) = second.blocks.get_mut(1) {
        block.content = "c".repeat(4_000);
    }
    assert_eq!(account(&state, &second, now), usage(1, 1_000, 500));
}

#[test]
fn different_model_does_not_share_cache() {
    let (_, state) = router(EmulatorConfig::default());
    let now = Instant::now();
    let mut req = long_request(None, "x");
    assert_eq!(account(&state, &req, now).creation_5m, 1_500);
    req.model = "other".into();
    assert_eq!(account(&state, &req, now).cache_read, 0);
}

#[test]
fn injected_queue_and_invalid_statuses() {
    let (_, state) = router(EmulatorConfig::default());
    state.inject_failures(429, 1);
    state.inject_failures(503, 0);
    state.inject_failures(200, 1);
    assert_eq!(state.take_fault(), Some(429));
    assert_eq!(state.take_fault(), Some(200));
    assert_eq!(state.take_fault(), None);
    assert_eq!(
        ApiError::for_status(200, DEFAULT_RETRY_AFTER).status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        ApiError::for_status(529, DEFAULT_RETRY_AFTER).kind,
        "overloaded_error"
    );
}

#[test]
fn router_clamps_bad_fail_rate() {
    let (_, state) = router(EmulatorConfig {
        fail_rate: f64::NAN,
        ..EmulatorConfig::default()
    });
    assert_eq!(state.take_fault(), None);
}

#[test]
fn transcript_and_dimension_detection() {
    assert_eq!(
        find_dimension("do it for the `engagement` dimension"),
        "engagement"
    );
    assert_eq!(
        find_dimension("score objection_handling please"),
        "objection_handling"
    );
    assert_eq!(find_dimension("nothing here"), "general");
    let req = parse_request(
        &json!({
            "model": "claude-sonnet-5-5", "max_tokens": 5,
            "system": [
                {"type": "text", "text": "The call is in <transcript></transcript> tags."},
                {"type": "text", "text": "intro <transcript>\nRep: hi?\n</transcript> outro"},
            ],
            "messages": [{"role": "user", "content": "x"}]
        }),
        ApiVersion::Legacy,
        Endpoint::Create,
    )
    .expect("valid");
    assert_eq!(find_transcript(&req).trim(), "Rep: hi?");
    let text = coaching_text("", "discovery");
    assert!(parse_coaching(&text).is_ok(), "{text}");
    assert!(parse_coaching(&malformed_text()).is_err());
}

#[test]
fn base_url_uses_loopback_for_unspecified() {
    let addr: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
    assert_eq!(base_url_for(addr), "http://127.0.0.1:8080");
    let addr: SocketAddr = "[::]:8080".parse().expect("addr");
    assert_eq!(base_url_for(addr), "http://[::1]:8080");
}

#[tokio::test]
async fn retired_and_unknown_models_are_not_found_and_fail_without_retry() {
    let emu = start(EmulatorConfig::default()).await;
    for model in ["claude-sonnet-4-5-20250929", "claude-nine"] {
        let mut request = body("Hello");
        request["model"] = json!(model);
        let err = client(&emu).messages(&request).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("404") && text.contains("not_found_error"),
            "{text}"
        );
        assert!(text.contains(&format!("model: {model}")), "{text}");
        assert!(!err.is_retryable(), "a 404 must fail the job at once");
    }
    assert!(client(&emu).messages(&body("Hello")).await.is_ok());
}

// --- API rules, usage, structured output, limits and batches ---------------

const V2023: &str = "2023-06-01";
const V2026: &str = "2026-10-21";

/// Any request with the given version header; returns status, headers and
/// the raw body text.
async fn send(
    emu: &EmulatorHandle,
    method: reqwest::Method,
    path: &str,
    version: &str,
    payload: Option<&Value>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let url = format!("{}{path}", emu.base_url());
    let mut request = reqwest::Client::new()
        .request(method, url)
        .header("authorization", "Bearer k")
        .header("anthropic-version", version);
    if let Some(payload) = payload {
        request = request.json(payload);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.expect("body"))
}

/// POST JSON to `path`; returns status, headers and the JSON answer.
async fn post_json(
    emu: &EmulatorHandle,
    path: &str,
    version: &str,
    payload: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let (status, headers, text) =
        send(emu, reqwest::Method::POST, path, version, Some(payload)).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, headers, value)
}

/// Asserts a 400 `invalid_request_error` with exactly `message`.
async fn assert_rejected(emu: &EmulatorHandle, version: &str, payload: &Value, message: &str) {
    let (status, headers, err) = post_json(emu, "/v1/messages", version, payload).await;
    assert_eq!(status, 400, "{payload}: {err}");
    assert!(headers.contains_key("request-id"));
    assert_error_shape(&err, "invalid_request_error");
    assert_eq!(err["error"]["message"], message, "{payload}");
}

/// Asserts a 200 answer and returns it.
async fn assert_ok(emu: &EmulatorHandle, version: &str, payload: &Value) -> Value {
    let (status, _, ok) = post_json(emu, "/v1/messages", version, payload).await;
    assert_eq!(status, 200, "{payload}: {ok}");
    ok
}

fn with(mut request: Value, key: &str, value: Value) -> Value {
    request[key] = value;
    request
}

#[tokio::test]
async fn version_header_must_be_a_date() {
    let emu = start(EmulatorConfig::default()).await;
    for bad in ["latest", "2023-6-1", "2023-13-01", ""] {
        let (status, _, err) = post_json(&emu, "/v1/messages", bad, &body("x")).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_error_shape(&err, "invalid_request_error");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("anthropic-version")
        );
    }
    for good in [V2023, V2026, "2026-01-01", "2027-03-04"] {
        assert_ok(&emu, good, &body("x")).await;
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn sampling_parameters_follow_the_version_and_model() {
    let emu = start(EmulatorConfig::default()).await;
    for name in ["temperature", "top_p", "top_k"] {
        let request = with(body("x"), name, json!(1));
        let message = format!("{name}: Extra inputs are not permitted");
        assert_rejected(&emu, V2026, &request, &message).await;
        let request = with(body("x"), name, json!(0));
        let message = format!("`{name}` is deprecated for this model.");
        assert_rejected(&emu, V2023, &request, &message).await;
    }
    for model in ["claude-opus-5-5", "claude-haiku-5-5", "claude-sonnet-5"] {
        let request = with(
            with(body("x"), "model", json!(model)),
            "temperature",
            json!(0.2),
        );
        assert_rejected(
            &emu,
            V2023,
            &request,
            "`temperature` is deprecated for this model.",
        )
        .await;
    }
    // The default value, and older models, are fine under 2023-06-01.
    assert_ok(&emu, V2023, &with(body("x"), "temperature", json!(1.0))).await;
    for model in ["claude-sonnet-4-6", "claude-haiku-4-5"] {
        let request = with(
            with(body("x"), "model", json!(model)),
            "temperature",
            json!(0.2),
        );
        assert_ok(&emu, V2023, &request).await;
    }
    let request = with(
        with(body("x"), "model", json!("claude-sonnet-4-6")),
        "temperature",
        json!(3),
    );
    assert_rejected(
        &emu,
        V2023,
        &request,
        "temperature: Input should be between 0 and 1",
    )
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn sonnet_5_5_only_thinks_adaptively() {
    let emu = start(EmulatorConfig::default()).await;
    let disabled = with(body("x"), "thinking", json!({"type": "disabled"}));
    let budget = with(
        with(
            body("x"),
            "thinking",
            json!({"type": "enabled", "budget_tokens": 2048}),
        ),
        "max_tokens",
        json!(4096),
    );
    assert_rejected(
        &emu,
        V2026,
        &disabled,
        "thinking.type: 'disabled' is not supported on claude-sonnet-5-5; it always thinks adaptively",
    )
    .await;
    assert_rejected(
        &emu,
        V2026,
        &budget,
        "thinking.budget_tokens: thinking budgets are not supported on claude-sonnet-5-5; use output_config.effort",
    )
    .await;
    let prefill = with(
        body("x"),
        "messages",
        json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "{"}]),
    );
    assert_rejected(
        &emu,
        V2026,
        &prefill,
        "messages: assistant message prefill is not supported on claude-sonnet-5-5",
    )
    .await;
    assert_ok(
        &emu,
        V2026,
        &with(body("x"), "thinking", json!({"type": "adaptive"})),
    )
    .await;
    // Other models accept both.
    let ok = assert_ok(
        &emu,
        V2026,
        &with(disabled, "model", json!("claude-opus-5-5")),
    )
    .await;
    assert_eq!(ok["usage"]["output_tokens_details"]["thinking_tokens"], 0);
    let ok = assert_ok(
        &emu,
        V2026,
        &with(budget, "model", json!("claude-opus-5-5")),
    )
    .await;
    assert!(ok["usage"]["output_tokens_details"]["thinking_tokens"].as_u64() > Some(0));
    emu.shutdown().await;
}

#[tokio::test]
async fn api_key_as_bearer_or_x_api_key_and_error_bodies() {
    let emu = start(EmulatorConfig {
        api_key: Some("right".into()),
        ..EmulatorConfig::default()
    })
    .await;
    let url = format!("{}/v1/messages", emu.base_url());
    let payload = body("x").to_string();
    for auth in [("authorization", "Bearer wrong"), ("x-api-key", "wrong")] {
        let (status, headers, err) =
            raw_post(&url, &[auth, ("anthropic-version", V2026)], payload.clone()).await;
        assert_eq!(status, 401);
        assert_error_shape(&err, "authentication_error");
        let header_id = headers.get("request-id").and_then(|v| v.to_str().ok());
        assert_eq!(header_id, err["request_id"].as_str());
    }
    for auth in [("authorization", "Bearer right"), ("x-api-key", "right")] {
        let (status, _, _) =
            raw_post(&url, &[auth, ("anthropic-version", V2026)], payload.clone()).await;
        assert_eq!(status, 200);
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn top_level_cache_control_is_an_automatic_breakpoint() {
    let emu = start(EmulatorConfig {
        min_cacheable_tokens: Some(1),
        ..EmulatorConfig::default()
    })
    .await;
    let auto = with(
        body(&"q".repeat(400)),
        "cache_control",
        json!({"type": "ephemeral", "ttl": "1h"}),
    );
    let first = assert_ok(&emu, V2026, &auto).await;
    assert_eq!(
        first["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
        100
    );
    assert_eq!(first["usage"]["input_tokens"], 0);
    let second = assert_ok(&emu, V2026, &auto).await;
    assert_eq!(second["usage"]["cache_read_input_tokens"], 100);
    // Four explicit breakpoints plus the automatic one make five.
    let mut five = with(
        auto,
        "messages",
        json!([{"role": "user", "content": "tail"}]),
    );
    five["system"] = json!([
        cached_block("a"),
        cached_block("b"),
        cached_block("c"),
        cached_block("d")
    ]);
    assert_rejected(
        &emu,
        V2026,
        &five,
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    )
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn usage_has_every_field() {
    let emu = start(EmulatorConfig::default()).await;
    let ok = assert_ok(&emu, V2026, &body("Analyse for the `discovery` dimension.")).await;
    let usage = &ok["usage"];
    for field in [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
    ] {
        assert!(usage[field].is_u64(), "{field} in {usage}");
    }
    assert!(
        usage["cache_creation"]["ephemeral_5m_input_tokens"].is_u64(),
        "{usage}"
    );
    assert!(
        usage["cache_creation"]["ephemeral_1h_input_tokens"].is_u64(),
        "{usage}"
    );
    let thinking = usage["output_tokens_details"]["thinking_tokens"]
        .as_u64()
        .unwrap_or_default();
    let text = ok["content"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(
        usage["output_tokens"].as_u64(),
        Some(approx_tokens_of(text) + thinking)
    );
    assert_eq!(usage["service_tier"], "standard");
    emu.shutdown().await;
}

fn approx_tokens_of(text: &str) -> u64 {
    super::request::approx_tokens(text)
}

#[test]
fn per_model_minimum_cacheable_length() {
    let (_, state) = router(EmulatorConfig::default());
    let now = Instant::now();
    // 1,500-token prefix: cached by Sonnet 5.5 (1,024) but not Haiku 5.5 (4,096).
    let sonnet = long_request(None, "x");
    assert_eq!(account(&state, &sonnet, now).creation_5m, 1_500);
    let mut haiku = long_request(None, "x");
    haiku.model = "claude-haiku-5-5".into();
    haiku.min_cacheable_tokens = 4_096;
    assert_eq!(account(&state, &haiku, now), usage(1_501, 0, 0));
}

#[test]
fn in_flight_writer_is_not_readable_until_it_answers() {
    let (_, state) = router(EmulatorConfig::default());
    let now = Instant::now();
    let req = long_request(None, "x");
    let cache = &state.inner.cache;
    let writer = cache.account(&req, 1_024, now);
    assert_eq!(writer.usage, usage(1, 1_500, 0));
    // Arrives while the writer is in flight: misses and writes too.
    let concurrent = cache.account(&req, 1_024, now);
    assert_eq!(concurrent.usage, usage(1, 1_500, 0));
    cache.commit(&writer.writes, now);
    assert_eq!(cache.account(&req, 1_024, now).usage, usage(1, 0, 1_500));
}

#[tokio::test]
async fn concurrent_requests_with_latency_both_write() {
    let emu = start(EmulatorConfig {
        latency: Duration::from_millis(300),
        ..EmulatorConfig::default()
    })
    .await;
    let mut request = body("tail");
    request["system"] = json!([cached_block(&"s".repeat(6_000))]);
    let (a, b) = tokio::join!(
        assert_ok(&emu, V2026, &request),
        assert_ok(&emu, V2026, &request)
    );
    for answer in [&a, &b] {
        assert_eq!(
            answer["usage"]["cache_creation_input_tokens"], 1_500,
            "{answer}"
        );
        assert_eq!(answer["usage"]["cache_read_input_tokens"], 0, "{answer}");
    }
    let after = assert_ok(&emu, V2026, &request).await;
    assert_eq!(after["usage"]["cache_read_input_tokens"], 1_500);
    emu.shutdown().await;
}

#[test]
fn lookback_reads_a_prefix_cached_by_an_earlier_breakpoint() {
    let (_, state) = router(EmulatorConfig {
        min_cacheable_tokens: Some(100),
        ..EmulatorConfig::default()
    });
    let now = Instant::now();
    let first = long_request(None, "x");
    assert_eq!(account(&state, &first, now), usage(1, 1_500, 0));
    // Same system blocks, a breakpoint moved to the end of the message:
    // reads the 1,500 cached tokens found looking back, writes the rest.
    let mut longer = long_request(None, "y");
    if let Some(last) = longer.blocks.last_mut() {
        last.ttl = Some(super::request::TTL_5M);
    }
    assert_eq!(account(&state, &longer, now), usage(0, 1, 1_500));
}

#[tokio::test]
async fn output_config_is_validated() {
    let emu = start(EmulatorConfig::default()).await;
    let cases = [
        (
            json!({"effort": "extreme"}),
            "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'",
        ),
        (
            json!({"format": {"type": "json"}}),
            "output_config.format.type: Input should be 'json_schema'",
        ),
        (
            json!({"format": {"type": "json_schema"}}),
            "output_config.format.schema: Field required",
        ),
        (
            json!({"format": {"type": "json_schema", "schema": {"type": "tuple"}}}),
            "output_config.format.schema.type: unsupported JSON Schema type",
        ),
        (
            json!({"verbosity": "low"}),
            "output_config.verbosity: Extra inputs are not permitted",
        ),
        (
            json!("high"),
            "output_config: Input should be a valid dictionary",
        ),
    ];
    for (config, message) in cases {
        assert_rejected(
            &emu,
            V2026,
            &with(body("x"), "output_config", config),
            message,
        )
        .await;
    }
    emu.shutdown().await;
}

fn coaching_schema() -> Value {
    let strings = json!({"type": "array", "items": {"type": "string"}});
    json!({
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "strengths": strings, "improvements": strings, "examples": strings,
            "summary": {"type": "string"},
        },
        "required": ["score", "strengths", "improvements", "examples", "summary"],
        "additionalProperties": false,
    })
}

fn other_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "verdict": {"type": "string", "enum": ["pass", "fail", "unclear"]},
            "confidence": {"type": "integer", "minimum": 3, "maximum": 7},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "minLength": 12}, "minItems": 3},
            "escalate": {"type": "boolean"},
            "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}}, "required": ["name"]},
            "note": {"type": ["string", "null"]},
        },
        "required": ["verdict", "confidence", "tags", "escalate", "owner"],
        "additionalProperties": false,
    })
}

fn schema_request(schema: &Value, transcript: &str) -> Value {
    let mut request = body("Analyse the transcript for the `discovery` dimension.");
    request["max_tokens"] = json!(8_000);
    request["system"] =
        json!([{"type": "text", "text": format!("<transcript>\n{transcript}\n</transcript>")}]);
    request["output_config"] = json!({"format": {"type": "json_schema", "schema": schema}});
    request
}

#[tokio::test]
async fn structured_output_matches_the_schema() {
    let emu = start(EmulatorConfig::default()).await;
    let transcript = "Rep: What matters most to you?\nProspect: Price.";
    // The coaching schema keeps the coaching answer.
    let ok = assert_ok(&emu, V2026, &schema_request(&coaching_schema(), transcript)).await;
    let text = ok["content"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(
        text,
        coaching_text(&format!("\n{transcript}\n"), "discovery")
    );
    let value: Value = serde_json::from_str(text).expect("JSON");
    assert_eq!(super::schema::validate(&coaching_schema(), &value), Ok(()));
    // Any other schema gets a conforming, deterministic value.
    let request = schema_request(&other_schema(), transcript);
    let ok = assert_ok(&emu, V2026, &request).await;
    let text = ok["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let value: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(
        super::schema::validate(&other_schema(), &value),
        Ok(()),
        "{value}"
    );
    assert_eq!(value["tags"].as_array().map(Vec::len), Some(3));
    let again = assert_ok(&emu, V2026, &request).await;
    assert_eq!(again["content"][0]["text"], text);
    // Fault injection still wins.
    let malformed = schema_request(
        &other_schema(),
        &format!("{MALFORMED_MARKER}\n{transcript}"),
    );
    let ok = assert_ok(&emu, V2026, &malformed).await;
    let text = ok["content"][0]["text"].as_str().unwrap_or_default();
    assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");
    emu.shutdown().await;
}

#[test]
fn schema_validator_catches_violations() {
    let schema = other_schema();
    let good = super::schema::generate(&schema, "seed");
    assert_eq!(super::schema::validate(&schema, &good), Ok(()));
    let breakages = [
        ("verdict", json!("maybe")),
        ("confidence", json!(9)),
        ("tags", json!(["too short"])),
        ("escalate", json!("yes")),
        ("extra", json!(1)),
    ];
    for (key, value) in breakages {
        let mut bad = good.clone();
        bad[key] = value;
        assert!(super::schema::validate(&schema, &bad).is_err(), "{key}");
    }
    let mut missing = good;
    missing.as_object_mut().map(|o| o.remove("owner"));
    assert!(super::schema::validate(&schema, &missing).is_err());
}

#[tokio::test]
async fn thinking_grows_with_effort() {
    let emu = start(EmulatorConfig::default()).await;
    let mut last = 0;
    let mut request = body("Analyse for the `discovery` dimension.");
    request["max_tokens"] = json!(16_000);
    for effort in ["low", "medium", "high", "xhigh", "max"] {
        let ok = assert_ok(
            &emu,
            V2026,
            &with(request.clone(), "output_config", json!({"effort": effort})),
        )
        .await;
        let thinking = ok["usage"]["output_tokens_details"]["thinking_tokens"]
            .as_u64()
            .unwrap_or_default();
        assert!(thinking > last, "{effort}: {thinking} <= {last}");
        last = thinking;
    }
    let default = assert_ok(&emu, V2026, &request).await;
    let high = assert_ok(
        &emu,
        V2026,
        &with(request.clone(), "output_config", json!({"effort": "high"})),
    )
    .await;
    assert_eq!(
        default["usage"]["output_tokens"],
        high["usage"]["output_tokens"]
    );
    // Models before 5.x do not think unless asked.
    let legacy = assert_ok(
        &emu,
        V2026,
        &with(request, "model", json!("claude-sonnet-4-6")),
    )
    .await;
    assert_eq!(
        legacy["usage"]["output_tokens_details"]["thinking_tokens"],
        0
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn count_tokens_takes_the_full_create_body() {
    let emu = start(EmulatorConfig::default()).await;
    let mut request = schema_request(&coaching_schema(), "Rep: hi");
    request["tools"] = json!([{"name": "lookup", "input_schema": {"type": "object"}}]);
    request["thinking"] = json!({"type": "adaptive"});
    request["output_config"]["effort"] = json!("low");
    let (status, _, counted) = post_json(&emu, "/v1/messages/count_tokens", V2026, &request).await;
    assert_eq!(status, 200, "{counted}");
    let answered = assert_ok(&emu, V2026, &request).await;
    assert_eq!(counted["input_tokens"], answered["usage"]["input_tokens"]);
    let hot = with(request.clone(), "temperature", json!(0.5));
    let (status, _, err) = post_json(&emu, "/v1/messages/count_tokens", V2026, &hot).await;
    assert_eq!(
        (status, err["error"]["message"].as_str()),
        (400, Some("temperature: Extra inputs are not permitted"))
    );
    let retired = with(request, "model", json!("claude-sonnet-4-5-20250929"));
    let (status, _, err) = post_json(&emu, "/v1/messages/count_tokens", V2026, &retired).await;
    assert_eq!(status, 404);
    assert_error_shape(&err, "not_found_error");
    emu.shutdown().await;
}

fn header<'h>(headers: &'h reqwest::header::HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn rate_limit_headers_on_every_answer() {
    let emu = start(EmulatorConfig::default()).await;
    let (_, ok_headers, _) = post_json(&emu, "/v1/messages", V2026, &body("x")).await;
    let (_, err_headers, _) = post_json(&emu, "/v1/messages", V2026, &json!({})).await;
    for headers in [&ok_headers, &err_headers] {
        for bucket in ["requests", "input-tokens", "output-tokens", "tokens"] {
            let limit = header(headers, &format!("anthropic-ratelimit-{bucket}-limit"));
            let remaining = header(headers, &format!("anthropic-ratelimit-{bucket}-remaining"));
            assert!(
                limit.parse::<u64>().is_ok() && remaining.parse::<u64>().is_ok(),
                "{bucket}"
            );
            let reset = header(headers, &format!("anthropic-ratelimit-{bucket}-reset"));
            assert!(
                chrono::DateTime::parse_from_rfc3339(reset).is_ok(),
                "{bucket}: {reset}"
            );
        }
    }
    assert_eq!(
        header(&ok_headers, "anthropic-ratelimit-requests-remaining"),
        "3999"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn requests_per_minute_are_enforced() {
    let emu = start(EmulatorConfig {
        rate_limits: RateLimits {
            requests_per_minute: Some(2),
            ..RateLimits::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    for remaining in ["1", "0"] {
        let (status, headers, _) = post_json(&emu, "/v1/messages", V2026, &body("x")).await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "anthropic-ratelimit-requests-limit"), "2");
        assert_eq!(
            header(&headers, "anthropic-ratelimit-requests-remaining"),
            remaining
        );
    }
    let (status, headers, err) = post_json(&emu, "/v1/messages", V2026, &body("x")).await;
    assert_eq!(status, 429);
    assert_error_shape(&err, "rate_limit_error");
    let secs: u64 = header(&headers, "retry-after")
        .parse()
        .expect("retry-after");
    let ms: u64 = header(&headers, "retry-after-ms")
        .parse()
        .expect("retry-after-ms");
    assert!(
        (59..=60).contains(&secs) && ms > 58_000 && ms <= 60_000,
        "{secs} {ms}"
    );
    assert_eq!(emu.request_times().len(), 2);
    emu.shutdown().await;
}

#[test]
fn token_limits_count_input_and_cache_writes_and_slide() {
    let limiter = super::limits::Limiter::new(RateLimits {
        input_tokens_per_minute: Some(1_000),
        output_tokens_per_minute: Some(500),
        ..RateLimits::default()
    });
    let t0 = Instant::now();
    assert!(limiter.admit(t0).is_ok());
    limiter.record(t0, 600, 100);
    assert!(limiter.admit(t0).is_ok());
    limiter.record(t0 + Duration::from_secs(10), 400, 100);
    let err = limiter
        .admit(t0 + Duration::from_secs(20))
        .expect_err("input exhausted");
    assert_eq!(err.kind, "rate_limit_error");
    // Room again once the first record leaves the window.
    assert_eq!(err.retry_after, Some(Duration::from_secs(40)));
    assert!(limiter.admit(t0 + Duration::from_secs(60)).is_ok());
    let mut headers = axum::http::HeaderMap::new();
    limiter.add_headers(&mut headers, t0 + Duration::from_secs(60));
    assert_eq!(headers["anthropic-ratelimit-input-tokens-remaining"], "600");
    assert_eq!(
        headers["anthropic-ratelimit-output-tokens-remaining"],
        "400"
    );
    assert_eq!(limiter.request_times().len(), 3);
}

#[tokio::test]
async fn cache_reads_do_not_count_toward_input_tokens_per_minute() {
    let emu = start(EmulatorConfig {
        rate_limits: RateLimits {
            input_tokens_per_minute: Some(100_000),
            ..RateLimits::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let mut request = body("tail");
    request["system"] = json!([cached_block(&"s".repeat(6_000))]);
    let remaining = |h: &reqwest::header::HeaderMap| -> u64 {
        header(h, "anthropic-ratelimit-input-tokens-remaining")
            .parse()
            .unwrap_or_default()
    };
    let (_, first, _) = post_json(&emu, "/v1/messages", V2026, &request).await;
    let (_, second, _) = post_json(&emu, "/v1/messages", V2026, &request).await;
    // First: 1,500 written + 1 uncached; second: only the uncached token.
    assert_eq!(remaining(&first), 100_000 - 1_501);
    assert_eq!(remaining(&second), 100_000 - 1_502);
    emu.shutdown().await;
}

#[tokio::test]
async fn injected_faults_carry_their_types_and_retry_headers() {
    let emu = start(EmulatorConfig {
        retry_after: Duration::from_millis(2_500),
        ..EmulatorConfig::default()
    })
    .await;
    emu.inject_failures(429, 1);
    emu.inject_failures(529, 1);
    emu.inject_failures(500, 1);
    let (status, headers, err) = post_json(&emu, "/v1/messages", V2026, &body("x")).await;
    assert_eq!(status, 429);
    assert_error_shape(&err, "rate_limit_error");
    assert_eq!(
        (
            header(&headers, "retry-after"),
            header(&headers, "retry-after-ms")
        ),
        ("3", "2500")
    );
    for (want, kind) in [(529, "overloaded_error"), (500, "api_error")] {
        let (status, _, err) = post_json(&emu, "/v1/messages", V2026, &body("x")).await;
        assert_eq!(status, want);
        assert_error_shape(&err, kind);
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn malformed_rate_and_fail_statuses() {
    let emu = start(EmulatorConfig {
        malformed_rate: 1.0,
        ..EmulatorConfig::default()
    })
    .await;
    let ok = assert_ok(&emu, V2026, &body("x")).await;
    assert!(
        serde_json::from_str::<Value>(ok["content"][0]["text"].as_str().unwrap_or("")).is_err()
    );
    emu.shutdown().await;
    let emu = start(EmulatorConfig {
        fail_rate: 1.0,
        fail_statuses: vec![529],
        ..EmulatorConfig::default()
    })
    .await;
    let (status, _, _) = post_json(&emu, "/v1/messages", V2026, &body("x")).await;
    assert_eq!(status, 529);
    emu.shutdown().await;
    for bad in [
        EmulatorConfig {
            malformed_rate: 2.0,
            ..EmulatorConfig::default()
        },
        EmulatorConfig {
            fail_statuses: vec![],
            ..EmulatorConfig::default()
        },
        EmulatorConfig {
            fail_statuses: vec![200],
            ..EmulatorConfig::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

// --- Message Batches --------------------------------------------------------

fn batch_body(ids: &[&str]) -> Value {
    let requests: Vec<Value> = ids
        .iter()
        .map(|id| json!({"custom_id": id, "params": body(&format!("call {id}"))}))
        .collect();
    json!({"requests": requests})
}

async fn create_batch(emu: &EmulatorHandle, ids: &[&str]) -> Value {
    let (status, _, batch) = post_json(emu, "/v1/messages/batches", V2026, &batch_body(ids)).await;
    assert_eq!(status, 200, "{batch}");
    batch
}

async fn get_json(emu: &EmulatorHandle, path: &str) -> (u16, Value) {
    let (status, _, text) = send(emu, reqwest::Method::GET, path, V2026, None).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}")),
    )
}

/// Polls until the batch has ended.
async fn wait_ended(emu: &EmulatorHandle, id: &str) -> Value {
    for _ in 0..100 {
        let (_, batch) = get_json(emu, &format!("/v1/messages/batches/{id}")).await;
        if batch["processing_status"] == "ended" {
            return batch;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("batch {id} did not end");
}

/// The JSONL result lines of a batch.
async fn batch_results(emu: &EmulatorHandle, id: &str) -> Vec<Value> {
    let (status, _, text) = send(
        emu,
        reqwest::Method::GET,
        &format!("/v1/messages/batches/{id}/results"),
        V2026,
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[tokio::test]
async fn batch_lifecycle() {
    let emu = start(EmulatorConfig::default()).await;
    let batch = create_batch(&emu, &["a", "b-2"]).await;
    let id = batch["id"].as_str().unwrap_or_default().to_owned();
    assert!(id.starts_with("msgbatch_"), "{batch}");
    assert_eq!(batch["type"], "message_batch");
    assert_eq!(batch["processing_status"], "in_progress");
    assert_eq!(batch["request_counts"]["processing"], 2);
    assert!(batch["results_url"].is_null() && batch["ended_at"].is_null());
    let created = chrono::DateTime::parse_from_rfc3339(batch["created_at"].as_str().unwrap_or(""))
        .expect("created_at");
    let expires = chrono::DateTime::parse_from_rfc3339(batch["expires_at"].as_str().unwrap_or(""))
        .expect("expires_at");
    assert_eq!(expires - created, chrono::Duration::hours(24));
    // Not ended yet: no results, no delete.
    let path = format!("/v1/messages/batches/{id}");
    let (status, _, _) = send(
        &emu,
        reqwest::Method::GET,
        &format!("{path}/results"),
        V2026,
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, _) = send(&emu, reqwest::Method::DELETE, &path, V2026, None).await;
    assert_eq!(status, 400);

    let ended = wait_ended(&emu, &id).await;
    assert_eq!(ended["request_counts"]["succeeded"], 2);
    assert_eq!(ended["request_counts"]["processing"], 0);
    assert!(
        ended["results_url"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!("{id}/results")))
    );
    let results = batch_results(&emu, &id).await;
    let ids: Vec<&str> = results
        .iter()
        .filter_map(|r| r["custom_id"].as_str())
        .collect();
    assert_eq!(ids, ["a", "b-2"]);
    for r in &results {
        assert_eq!(r["result"]["type"], "succeeded", "{r}");
        assert_eq!(
            r["result"]["message"]["usage"]["service_tier"], "batch",
            "{r}"
        );
    }
    // Batch requests are not /v1/messages requests.
    assert_eq!(emu.requests_total(), 0);
    let (status, _, deleted) = send(&emu, reqwest::Method::DELETE, &path, V2026, None).await;
    assert_eq!(status, 200, "{deleted}");
    assert!(deleted.contains("message_batch_deleted"));
    let (status, err) = get_json(&emu, &path).await;
    assert_eq!(status, 404);
    assert_error_shape(&err, "not_found_error");
    emu.shutdown().await;
}

#[tokio::test]
async fn batch_list_pages_newest_first() {
    let emu = start(EmulatorConfig::default()).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            create_batch(&emu, &["x"]).await["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let (status, page) = get_json(&emu, "/v1/messages/batches?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], ids[2].as_str());
    assert_eq!(page["last_id"], ids[1].as_str());
    let (_, next) = get_json(
        &emu,
        &format!("/v1/messages/batches?limit=2&after_id={}", ids[1]),
    )
    .await;
    assert_eq!(next["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        (next["first_id"].as_str(), next["has_more"].as_bool()),
        (Some(ids[0].as_str()), Some(false))
    );
    let (_, before) = get_json(&emu, &format!("/v1/messages/batches?before_id={}", ids[0])).await;
    assert_eq!(before["data"].as_array().map(Vec::len), Some(2));
    let (status, _) = get_json(&emu, "/v1/messages/batches?limit=0").await;
    assert_eq!(status, 400);
    emu.shutdown().await;
}

#[tokio::test]
async fn batch_cancel_ends_with_canceled_requests() {
    let emu = start(EmulatorConfig {
        batch_delay: Duration::from_millis(300),
        ..EmulatorConfig::default()
    })
    .await;
    let id = create_batch(&emu, &["a", "b"]).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (status, _, canceling) = post_json(
        &emu,
        &format!("/v1/messages/batches/{id}/cancel"),
        V2026,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(canceling["processing_status"], "canceling");
    assert!(canceling["cancel_initiated_at"].is_string());
    let ended = wait_ended(&emu, &id).await;
    assert_eq!(ended["request_counts"]["canceled"], 2);
    let results = batch_results(&emu, &id).await;
    assert!(
        results.iter().all(|r| r["result"]["type"] == "canceled"),
        "{results:?}"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn batch_expiry_knob_expires_every_request() {
    let emu = start(EmulatorConfig {
        batch_expire: true,
        batch_delay: Duration::from_millis(10),
        ..EmulatorConfig::default()
    })
    .await;
    let id = create_batch(&emu, &["a", "b", "c"]).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ended = wait_ended(&emu, &id).await;
    assert_eq!(ended["request_counts"]["expired"], 3);
    let results = batch_results(&emu, &id).await;
    assert!(
        results.iter().all(|r| r["result"]["type"] == "expired"),
        "{results:?}"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn batch_requests_are_validated() {
    let emu = start(EmulatorConfig::default()).await;
    let path = "/v1/messages/batches";
    let hot = json!({"requests": [{"custom_id": "a", "params": with(body("x"), "temperature", json!(0.1))}]});
    let cases = [
        (
            batch_body(&["a", "a"]),
            "requests.1.custom_id: duplicate custom_id \"a\"; custom_id values must be unique",
        ),
        (
            batch_body(&["bad id"]),
            "requests.0.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
        ),
        (
            batch_body(&[&"x".repeat(65)]),
            "requests.0.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
        ),
        (
            json!({"requests": []}),
            "requests: List should have between 1 and 100000 items",
        ),
        (
            json!({"requests": [{"custom_id": "a", "params": {"model": "claude-sonnet-5-5"}}]}),
            "requests.0.params.max_tokens: Field required",
        ),
        (
            hot,
            "requests.0.params.temperature: Extra inputs are not permitted",
        ),
    ];
    for (payload, message) in cases {
        let (status, _, err) = post_json(&emu, path, V2026, &payload).await;
        assert_eq!(status, 400, "{err}");
        assert_error_shape(&err, "invalid_request_error");
        assert_eq!(err["error"]["message"], message);
    }
    // A model that is not served errors that request only.
    let mut mixed = batch_body(&["ok", "gone"]);
    mixed["requests"][1]["params"]["model"] = json!("claude-sonnet-4-5-20250929");
    let (_, _, batch) = post_json(&emu, path, V2026, &mixed).await;
    let id = batch["id"].as_str().unwrap_or_default().to_owned();
    let ended = wait_ended(&emu, &id).await;
    assert_eq!(
        (
            ended["request_counts"]["succeeded"].as_u64(),
            ended["request_counts"]["errored"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let results = batch_results(&emu, &id).await;
    let errored = results
        .iter()
        .find(|r| r["custom_id"] == "gone")
        .expect("gone");
    assert_eq!(
        errored["result"]["error"]["error"]["type"],
        "not_found_error"
    );
    assert_eq!(
        errored["result"]["error"]["error"]["message"],
        "model: claude-sonnet-4-5-20250929"
    );
    // Unknown batches are 404; auth applies.
    let (status, _) = get_json(&emu, "/v1/messages/batches/msgbatch_nope").await;
    assert_eq!(status, 404);
    emu.shutdown().await;
}

#[tokio::test]
async fn batches_share_the_prompt_cache() {
    let emu = start(EmulatorConfig {
        batch_delay: Duration::from_millis(10),
        ..EmulatorConfig::default()
    })
    .await;
    let mut request = body("tail");
    request["system"] = json!([cached_block(&"s".repeat(6_000))]);
    assert_ok(&emu, V2026, &request).await;
    let payload = json!({"requests": [{"custom_id": "a", "params": request}]});
    let (_, _, batch) = post_json(&emu, "/v1/messages/batches", V2026, &payload).await;
    let id = batch["id"].as_str().unwrap_or_default().to_owned();
    wait_ended(&emu, &id).await;
    let results = batch_results(&emu, &id).await;
    assert_eq!(
        results[0]["result"]["message"]["usage"]["cache_read_input_tokens"],
        1_500
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn the_simulated_clock_expires_cache_entries() {
    let emu = start(EmulatorConfig::default()).await;
    let mut request = body("tail");
    request["system"] = json!([cached_block(&"s".repeat(6_000))]);
    let read = |ok: &Value| ok["usage"]["cache_read_input_tokens"].as_u64();
    let first = assert_ok(&emu, V2026, &request).await;
    assert_eq!(first["usage"]["cache_creation_input_tokens"], 1_500);
    // Four minutes on: still cached, and the read refreshes the 5-minute entry.
    emu.advance(Duration::from_secs(240));
    assert_eq!(read(&assert_ok(&emu, V2026, &request).await), Some(1_500));
    emu.advance(Duration::from_secs(240));
    assert_eq!(read(&assert_ok(&emu, V2026, &request).await), Some(1_500));
    // 72 minutes later the entry is gone and is written again.
    emu.advance(Duration::from_secs(72 * 60));
    let later = assert_ok(&emu, V2026, &request).await;
    assert_eq!(read(&later), Some(0));
    assert_eq!(later["usage"]["cache_creation_input_tokens"], 1_500);
    assert_eq!(emu.state().clock_offset(), Duration::from_secs(80 * 60));
    emu.shutdown().await;
}

#[tokio::test]
async fn output_tokens_pad_answers_with_thinking_within_max_tokens() {
    let emu = start(EmulatorConfig {
        output_tokens: Some(1_500),
        ..EmulatorConfig::default()
    })
    .await;
    let mut request = body("Rep: What slows your reporting?");
    request["max_tokens"] = json!(4_096);
    let ok = assert_ok(&emu, V2026, &request).await;
    let text_tokens = crate::llm::estimate_tokens(ok["content"][0]["text"].as_str().unwrap());
    assert_eq!(ok["usage"]["output_tokens"], 1_500, "{ok}");
    assert_eq!(
        ok["usage"]["output_tokens_details"]["thinking_tokens"],
        1_500 - text_tokens
    );
    // max_tokens still caps the answer.
    request["max_tokens"] = json!(600);
    let capped = assert_ok(&emu, V2026, &request).await;
    assert_eq!(capped["usage"]["output_tokens"], 600, "{capped}");
    emu.shutdown().await;
}

#[tokio::test]
async fn recorded_requests_carry_sizes_hashes_usage_and_clock_time() {
    let emu = start(EmulatorConfig {
        record_requests: true,
        ..EmulatorConfig::default()
    })
    .await;
    let shared = "s".repeat(6_000);
    let mut first = body("tail one");
    first["system"] = json!([cached_block(&shared)]);
    let mut second = body("tail two");
    second["system"] = json!([cached_block(&shared)]);
    assert_ok(&emu, V2026, &first).await;
    emu.advance(Duration::from_secs(60));
    assert_ok(&emu, V2026, &second).await;
    let recorded = emu.state().take_recorded_requests();
    assert_eq!(recorded.len(), 2);
    let (a, b) = (&recorded[0], &recorded[1]);
    assert_eq!((a.cache_write_5m_tokens, a.cache_read_tokens), (1_500, 0));
    assert_eq!((b.cache_write_5m_tokens, b.cache_read_tokens), (0, 1_500));
    assert!(
        b.at >= a.at + Duration::from_secs(60),
        "{:?} {:?}",
        a.at,
        b.at
    );
    assert_eq!(a.blocks.len(), 2);
    assert_eq!(a.blocks[0].section, "system");
    assert_eq!(a.blocks[0].tokens, 1_500);
    assert_eq!(a.blocks[0].head, "s".repeat(40));
    assert_eq!(a.blocks[0].breakpoint, Some(Duration::from_secs(300)));
    assert_eq!(a.blocks[0].prefix_hash, b.blocks[0].prefix_hash);
    assert_eq!(a.blocks[0].content_hash, b.blocks[0].content_hash);
    assert_ne!(a.blocks[1].prefix_hash, b.blocks[1].prefix_hash);
    assert_eq!(a.service_tier, "standard");
    assert!(emu.state().recorded_requests().is_empty());
    // Off by default.
    let quiet = start(EmulatorConfig::default()).await;
    assert_ok(&quiet, V2026, &first).await;
    assert!(quiet.state().recorded_requests().is_empty());
    quiet.shutdown().await;
    emu.shutdown().await;
}
