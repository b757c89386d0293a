//! The guarded LLM path end to end: the cache-aware fan-out, the fleet rate limit under a
//! 429 storm, the spend guard.

use crate::helpers::{Options, TestApp, sample_call, spawn_app_with};
use callcoach::{llm::emulator::EmulatorConfig, model::Dimension};
use std::time::Duration;

fn slow_llm(ms: u64) -> EmulatorConfig {
    EmulatorConfig {
        latency: Duration::from_millis(ms),
        ..Default::default()
    }
}

/// (cache write tokens, cache read tokens) of each LLM run of a call.
async fn cache_use(app: &TestApp, call_id: uuid::Uuid) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT cache_write_5m_tokens + cache_write_1h_tokens, cache_read_tokens
         FROM analysis_runs WHERE call_id = $1 AND source = 'llm' ORDER BY created_at",
    )
    .bind(call_id)
    .fetch_all(&app.app.pg)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_dimensions_of_a_call_pay_one_cache_write_for_their_shared_prefix() {
    let app = spawn_app_with(Options {
        emulator: slow_llm(300),
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("fan-out")).await;
    let started = std::time::Instant::now();
    app.perform(&app.app, call_id, &Dimension::ALL).await;
    let elapsed = started.elapsed();
    let runs = cache_use(&app, call_id).await;
    assert_eq!(runs.len(), 4);
    let writers = runs.iter().filter(|(w, _)| *w > 0).count();
    assert_eq!(writers, 1, "one request writes the shared prefix: {runs:?}");
    let written = runs.iter().map(|(w, _)| *w).max().unwrap();
    assert!(
        runs.iter()
            .filter(|(w, _)| *w == 0)
            .all(|(_, r)| *r == written),
        "the others read all of it: {runs:?}"
    );
    // First alone, then the other three together: about two LLM latencies, not four.
    assert!(elapsed < Duration::from_millis(1100), "{elapsed:?}");
}

#[tokio::test]
async fn without_the_fan_out_gate_concurrent_dimensions_each_write_the_prefix() {
    let app = spawn_app_with(Options {
        emulator: slow_llm(300),
        env: vec![("LLM_FAN_OUT_WAIT_SECS", "0".into())],
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("no-gate")).await;
    app.perform(&app.app, call_id, &Dimension::ALL).await;
    let runs = cache_use(&app, call_id).await;
    assert_eq!(runs.iter().filter(|(w, _)| *w > 0).count(), 4, "{runs:?}");
}

#[tokio::test]
async fn a_429_storm_under_a_fleet_limit_ends_with_every_job_done_and_no_attempt_used() {
    const PER_MIN: usize = 30;
    let app = spawn_app_with(Options {
        env: vec![("LLM_REQUESTS_PER_MIN", PER_MIN.to_string())],
        ..Default::default()
    })
    .await;
    app.emulator.inject_failures(429, 12);
    let workers = [app.spawn_worker(&[]), app.spawn_worker(&[])];
    let mut jobs = Vec::new();
    for n in 0..24 {
        let call_id = app.ingest(&sample_call(&format!("storm-{n}"))).await;
        jobs.push(app.enqueue(call_id, &["discovery"]).await);
    }
    for job_id in &jobs {
        let job = app.wait_for_job(*job_id, 90).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "a throttle uses no attempt: {job}");
    }
    assert_eq!(app.emulator.failures_served(), 12);
    // 36 requests in all against a bucket of 30 refilling at 0.5/s: the k-th answered
    // request (0-based) came no earlier than (k + 1 - 30) / 0.5 s after the first.
    let times = app.emulator.request_times();
    assert_eq!(times.len(), 24);
    let refill_per_sec = PER_MIN as f64 / 60.0;
    for (k, t) in times.iter().enumerate() {
        let earliest = (k as f64 + 1.0 - PER_MIN as f64) / refill_per_sec;
        let at = t.duration_since(times[0]).as_secs_f64();
        assert!(
            at + 0.5 >= earliest,
            "request {k} at {at:.2}s, limit allows {earliest:.2}s"
        );
    }
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn over_budget_background_work_snoozes_and_interactive_work_is_refused() {
    let app = spawn_app_with(Options {
        env: vec![("LLM_DAILY_BUDGET_USD", "0.000001".into())],
        ..Default::default()
    })
    .await;
    let first = app.ingest(&sample_call("budget-1")).await;
    let job = app.perform(&app.app, first, &[Dimension::Discovery]).await;
    assert_eq!(
        job["status"], "succeeded",
        "the budget was not spent yet: {job}"
    );

    let second = app.ingest(&sample_call("budget-2")).await;
    let job = app.perform(&app.app, second, &[Dimension::Discovery]).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("daily LLM budget spent"), "{error}");

    let (status, body) = app
        .post("/v1/analyses", &serde_json::json!({"call_id": second}))
        .await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "budget_exhausted");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("resets at"),
        "{body}"
    );

    let args = callcoach::jobs::AnalyzeCall {
        call_id: second,
        dimensions: vec![Dimension::Discovery],
        batch: true,
    };
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let new_job = callcoach::jobs::Job::to_job(&args)
        .unwrap()
        .on_lane(callcoach::delivery::Lane::Background)
        .run_at(later);
    let job_id = app.app.queue.enqueue(new_job).await.unwrap().job_id;
    let label = crate::helpers::perform(&app.app, job_id, 0, &args).await;
    assert_eq!(label, callcoach::jobs::RunLabel::Snoozed);
    let (status, attempts, due): (String, i32, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT status, attempts, run_at FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("snoozed", 0));
    let midnight = (chrono::Utc::now().date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    assert!(due >= midnight, "snoozed to the budget's reset: {due}");
    assert_eq!(
        app.emulator.messages_served(),
        1,
        "nothing sent over budget"
    );
}

/// Enqueues a batch analysis of every dimension of `call_id` on the background lane.
async fn enqueue_batch(app: &TestApp, call_id: uuid::Uuid) -> uuid::Uuid {
    let args = callcoach::jobs::AnalyzeCall {
        call_id,
        dimensions: vec![],
        batch: true,
    };
    let job = callcoach::jobs::Job::to_job(&args)
        .unwrap()
        .on_lane(callcoach::delivery::Lane::Background);
    app.app.queue.enqueue(job).await.unwrap().job_id
}

/// Waits for the (only) job of `kind` and returns it once finished.
async fn finished_job_of_kind(app: &TestApp, kind: &str) -> serde_json::Value {
    for _ in 0..150 {
        let id: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE kind = $1 ORDER BY enqueued_at LIMIT 1")
                .bind(kind)
                .fetch_optional(&app.app.pg)
                .await
                .unwrap();
        if let Some(id) = id {
            return app.wait_for_job(id, 30).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no {kind} job was enqueued");
}

fn batch_app_env() -> Vec<(&'static str, String)> {
    vec![
        ("LLM_BATCH_MODE", "true".into()),
        ("BATCH_POLL_SECS", "1".into()),
    ]
}

#[tokio::test]
async fn a_batch_analysis_is_collected_and_stored_at_half_the_price() {
    let mut app = spawn_app_with(Options {
        env: batch_app_env(),
        ..Default::default()
    })
    .await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("batched")).await;
    let job = app
        .wait_for_job(enqueue_batch(&app, call_id).await, 30)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["pending"].as_array().unwrap().len(),
        4,
        "{job}"
    );
    let collected = finished_job_of_kind(&app, "collect_batch").await;
    assert_eq!(collected["status"], "succeeded", "{collected}");
    assert_eq!(collected["result"]["stored"].as_array().unwrap().len(), 4);
    assert_eq!(
        app.emulator.messages_served(),
        0,
        "nothing went through /v1/messages"
    );
    type Row = (Option<String>, i64, i64, i64, i64, f64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT service_tier, input_tokens, cache_write_1h_tokens, cache_read_tokens,
                output_tokens, cost_usd
         FROM analysis_runs WHERE call_id = $1",
    )
    .bind(call_id)
    .fetch_all(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(rows.len(), 4);
    let mtok = |n: i64, price: f64| n as f64 * price / 1e6;
    for (tier, input, w1h, read, output, usd) in &rows {
        assert_eq!(tier.as_deref(), Some("batch"));
        // Sonnet 5.5 at half price: $1 input, $2 1-hour write, $0.10 read, $5 output.
        let half = mtok(*input, 1.0) + mtok(*w1h, 2.0) + mtok(*read, 0.1) + mtok(*output, 5.0);
        assert!((usd - half).abs() < 1e-9, "{usd} vs {half}");
    }
    assert!(
        rows.iter().any(|r| r.2 > 0),
        "1-hour cache writes: {rows:?}"
    );
    let (status, call) = app.get(&format!("/v1/calls/{call_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(call["coaching"].as_array().unwrap().len(), 4, "{call}");
}

#[tokio::test]
async fn a_batch_of_cached_dimensions_counts_each_hit_once() {
    let mut app = spawn_app_with(Options {
        env: batch_app_env(),
        ..Default::default()
    })
    .await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("batched-twice")).await;
    app.wait_for_job(enqueue_batch(&app, call_id).await, 30)
        .await;
    let collected = finished_job_of_kind(&app, "collect_batch").await;
    assert_eq!(collected["status"], "succeeded", "{collected}");
    let hits = || async {
        let text = app.scrape_metrics().await;
        text.lines()
            .filter(|l| l.starts_with("callcoach_cache_hits_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = hits().await;
    let again = app
        .wait_for_job(enqueue_batch(&app, call_id).await, 30)
        .await;
    assert_eq!(again["status"], "succeeded", "{again}");
    let sources: Vec<&str> = again["result"]["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["redis"; 4], "{again}");
    assert_eq!(hits().await - before, 4.0, "one hit per dimension");
    let runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM analysis_runs WHERE call_id = $1 AND source = 'redis'",
    )
    .bind(call_id)
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(runs, 4);
}

#[tokio::test]
async fn an_expired_batch_is_analysed_directly() {
    let mut app = spawn_app_with(Options {
        env: batch_app_env(),
        emulator: EmulatorConfig {
            batch_expire: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("expired-batch")).await;
    enqueue_batch(&app, call_id).await;
    let collected = finished_job_of_kind(&app, "collect_batch").await;
    assert_eq!(collected["status"], "succeeded", "{collected}");
    assert_eq!(collected["result"]["requeued"].as_array().unwrap().len(), 4);
    for _ in 0..150 {
        if app.run_sources(call_id).await.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.run_sources(call_id).await, ["llm"; 4]);
    assert_eq!(app.emulator.messages_served(), 4, "answered directly");
}

#[tokio::test]
async fn a_wrong_api_key_fails_the_job_at_once_with_the_apis_message() {
    let mut app = spawn_app_with(Options {
        emulator: EmulatorConfig {
            api_key: Some("the-right-key".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("bad-key")).await;
    let job = app
        .wait_for_job(app.enqueue(call_id, &["discovery"]).await, 30)
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "no retry: {job}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("401 authentication_error"), "{error}");
}
