//! The analysis path end to end: ingest → enqueue → worker → result over HTTP, idempotency,
//! the outbox relay, Redis outages and LLM failures.

use crate::helpers::{perform, sample_call, spawn_app};
use callcoach::{
    jobs::{AnalyzeCall, RunLabel},
    model::Dimension,
};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn analysis_result_is_visible_over_http() {
    let mut app = spawn_app().await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("e2e")).await;
    let job_id = app.enqueue(call_id, &[]).await;
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
    let (status, call) = app.get(&format!("/v1/calls/{call_id}")).await;
    assert_eq!(status, 200);
    let coaching = call["coaching"].as_array().unwrap();
    assert_eq!(coaching.len(), 4, "{call}");
    for session in coaching {
        let score = session["score"].as_i64().unwrap();
        assert!((0..=100).contains(&score));
        assert_eq!(session["result"]["score"].as_i64().unwrap(), score);
        assert!(
            !session["result"]["strengths"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(app.emulator.messages_served(), 4);
}

#[tokio::test]
async fn running_a_job_twice_stores_one_result() {
    let mut app = spawn_app().await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("twice")).await;
    let first = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(first, 30).await["status"], "succeeded");
    let second = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(second, 30).await["status"], "succeeded");
    app.stop_worker().await;
    // The rescuer re-issued the first job (its worker died mid-run): the new delivery runs
    // the handler again.
    sqlx::query("UPDATE jobs SET status = 'queued', delivery = 1 WHERE id = $1")
        .bind(first)
        .execute(&app.app.pg)
        .await
        .unwrap();
    let args = AnalyzeCall {
        call_id,
        dimensions: vec![Dimension::Discovery],
        batch: false,
    };
    assert_eq!(
        perform(&app.app, first, 1, &args).await,
        RunLabel::Succeeded
    );
    assert_eq!(app.session_count(call_id, "discovery").await, 1);
    assert_eq!(
        app.emulator.messages_served(),
        1,
        "later runs are cache hits"
    );
    let runs: Vec<String> = sqlx::query_scalar(
        "SELECT source FROM analysis_runs WHERE call_id = $1 ORDER BY created_at",
    )
    .bind(call_id)
    .fetch_all(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(runs, ["llm", "redis", "redis"]);
}

#[tokio::test]
async fn a_stale_delivery_is_skipped() {
    let mut app = spawn_app().await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("stale")).await;
    let job_id = app.enqueue(call_id, &["engagement"]).await;
    assert_eq!(app.wait_for_job(job_id, 30).await["status"], "succeeded");
    let args = AnalyzeCall {
        call_id,
        dimensions: vec![Dimension::Engagement],
        batch: false,
    };
    assert_eq!(perform(&app.app, job_id, 0, &args).await, RunLabel::Skipped);
    let (_, job) = app.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(job["attempts"], 1);
}

#[tokio::test]
async fn relay_delivers_a_job_that_never_reached_redis() {
    let mut app = spawn_app().await;
    let call_id = app.ingest(&sample_call("outbox")).await;
    // A producer that crashed between the ledger insert and the push left this row behind.
    let job_id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, max_attempts, enqueued_at, updated_at)
         VALUES ($1, 'analyze_call', $2, 5, now() - interval '1 minute', now() - interval '1 minute')",
    )
    .bind(job_id)
    .bind(json!({ "call_id": call_id, "dimensions": ["discovery"] }))
    .execute(&app.app.pg)
    .await
    .unwrap();
    app.start_worker();
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(!job["delivered_at"].is_null());
    assert_eq!(app.session_count(call_id, "discovery").await, 1);
}

#[tokio::test]
async fn redis_outage_loses_no_accepted_job() {
    let mut app = spawn_app().await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("outage")).await;
    app.redis.stop();
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["postgres"], "ok");
    assert!(
        ready["redis"].as_str().unwrap().starts_with("error"),
        "{ready}"
    );
    let job_id = app.enqueue(call_id, &["objection_handling"]).await;
    let (_, job) = app.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(job["status"], "queued");
    assert!(job["delivered_at"].is_null(), "{job}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.redis.restart().await;
    let job = app.wait_for_job(job_id, 60).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn malformed_model_output_fails_the_job_clearly() {
    let mut app = spawn_app().await;
    app.start_worker();
    let mut call = sample_call("bad-model");
    call["transcript"][1]["text"] = json!("[[emulator:malformed]] please");
    let call_id = app.ingest(&call).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 1, "no retry for a bad answer");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("model output rejected"), "{error}");
    assert_eq!(app.session_count(call_id, "discovery").await, 0);
}

#[tokio::test]
async fn llm_throttling_snoozes_without_using_attempts() {
    let mut app = spawn_app().await;
    app.emulator.inject_failures(429, 1);
    app.emulator.inject_failures(529, 1);
    app.start_worker();
    let call_id = app.ingest(&sample_call("throttled")).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(app.emulator.failures_served(), 2);
}

#[tokio::test]
async fn server_errors_are_retried_then_dead_lettered() {
    let mut app = spawn_app_with_attempts(2).await;
    app.emulator.inject_failures(500, 10);
    app.start_worker();
    let call_id = app.ingest(&sample_call("flaky")).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    let job = app.wait_for_job(job_id, 60).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(app.emulator.failures_served(), 2);
}

async fn spawn_app_with_attempts(n: i32) -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(crate::helpers::Options {
        env: vec![("JOB_MAX_ATTEMPTS", n.to_string())],
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_model_the_api_does_not_know_fails_the_job_at_once_with_its_message() {
    let mut app = spawn_app().await;
    app.emulator.inject_failures(404, 1);
    app.start_worker();
    let call_id = app.ingest(&sample_call("not-found")).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "no retry: {job}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("404 not_found_error"), "{error}");
    assert!(
        error.contains("Not found (emulated)"),
        "the API's message: {error}"
    );
}

#[tokio::test]
async fn each_run_stores_its_usage_cost_and_counterfactuals() {
    let app = spawn_app().await;
    let call_id = app.ingest(&sample_call("costed")).await;
    let dims = [Dimension::Discovery, Dimension::Engagement];
    app.perform(&app.app, call_id, &dims).await;
    app.perform(&app.app, call_id, &dims[..1]).await;
    type Row = (
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        Option<String>,
        f64,
        f64,
        f64,
        f64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT source, input_tokens, cache_write_5m_tokens, cache_write_1h_tokens,
                cache_read_tokens, output_tokens, service_tier, cost_usd,
                cost_without_prompt_cache_usd, cost_without_session_cache_usd,
                cost_without_caching_usd
         FROM analysis_runs WHERE call_id = $1
         -- The two LLM runs (discovery first: the hit is discovery's), then the hit; the two
         -- dimensions of the first analysis run concurrently, so time does not order them.
         ORDER BY source = 'llm' DESC, dimension = 'discovery' DESC, created_at",
    )
    .bind(call_id)
    .fetch_all(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3);
    // Sonnet 5.5 per MTok: $2 input, $2.50 5-minute write, $4 1-hour write, $0.20 read, $10 out.
    let mtok = |n: i64, price: f64| n as f64 * price / 1e6;
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    for (source, input, w5, w1, read, output, tier, usd, no_prompt, no_session, none) in &rows[..2]
    {
        assert_eq!(source, "llm");
        assert_eq!(tier.as_deref(), Some("standard"));
        let paid = mtok(*input, 2.0)
            + mtok(*w5, 2.5)
            + mtok(*w1, 4.0)
            + mtok(*read, 0.2)
            + mtok(*output, 10.0);
        assert!(*usd > 0.0 && close(*usd, paid), "{usd} vs {paid}");
        let uncached = mtok(input + w5 + w1 + read, 2.0) + mtok(*output, 10.0);
        assert!(close(*no_prompt, uncached) && close(*none, uncached));
        assert!(close(*no_session, *usd));
    }
    let first = &rows[0]; // discovery's LLM run
    let hit = &rows[2];
    assert_eq!(hit.0, "redis");
    assert_eq!(
        (hit.6.as_deref(), hit.7, hit.8),
        (None, 0.0, 0.0),
        "a hit pays nothing"
    );
    assert!(
        close(hit.9, first.7),
        "without the session cache it would pay the origin's cost"
    );
    assert!(close(hit.10, first.8));
}
