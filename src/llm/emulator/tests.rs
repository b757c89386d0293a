//! Tests for the emulator: validation, error shapes, auth, cache accounting,
//! fault injection and counters.

use super::cache::TokenUsage;
use super::reply::{coaching_text, find_dimension, find_transcript, malformed_text};
use super::request::{ApiVersion, Endpoint};
use super::*;
use crate::llm::{LlmClient, LlmError, PromptInputs, build_request, parse_coaching};
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
            assert_eq!(
                message,
                "A maximum of 4 blocks with cache_control may be provided. Found 5."
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
            .messages(&build_request("claude-sonnet-5-5", 1024, &inputs))
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
