//! Faults between callcoach and its stores, made by a [`FaultProxy`] on the network to real
//! Postgres and Redis: an outage longer than apalis' own retries, a slow Redis, and what HTTP
//! clients see meanwhile.

use crate::helpers::{Options, TestApp, sample_call, spawn_app_with};
use callcoach::{cache::BreakerState, llm::emulator::EmulatorConfig, model::Dimension};
use std::time::{Duration, Instant};

fn slow_llm(ms: u64) -> EmulatorConfig {
    EmulatorConfig {
        latency: Duration::from_millis(ms),
        ..Default::default()
    }
}

/// Waits (checking every 200 ms, up to `secs`) until no job is queued, snoozed or running.
async fn wait_until_settled(app: &TestApp, secs: u64) -> Vec<(String, i64)> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let counts: Result<Vec<(String, i64)>, _> =
            sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
                .fetch_all(&app.app.pg)
                .await;
        if let Ok(counts) = counts {
            let open = counts
                .iter()
                .any(|(s, _)| matches!(s.as_str(), "queued" | "snoozed" | "running"));
            if !open {
                return counts;
            }
            assert!(
                Instant::now() < until,
                "jobs still open after {secs}s: {counts:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_postgres_outage_longer_than_apalis_retries_strands_nothing_and_pays_nothing_twice() {
    let app = spawn_app_with(Options {
        proxy_postgres: true,
        emulator: slow_llm(1500),
        env: vec![
            ("JOB_LEASE_SECS", "4".into()),
            ("RESCUE_INTERVAL_MS", "500".into()),
            ("REDELIVER_AFTER_SECS", "2".into()),
            ("CACHE_LEASE_MS", "3000".into()),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "500".into()),
        ],
        ..Default::default()
    })
    .await;
    let worker = app.spawn_worker(&[]);
    let mut calls = Vec::new();
    for i in 0..6 {
        let call_id = app.ingest(&sample_call(&format!("outage-{i}"))).await;
        app.enqueue(call_id, &["discovery", "engagement"]).await;
        calls.push(call_id);
    }
    // Cut Postgres while answers are in flight, for longer than apalis retries a delivery
    // whose claim fails (+1 s, +2 s, +3 s).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let proxy = app.pg_proxy.as_ref().unwrap();
    proxy.set_down(true);
    tokio::time::sleep(Duration::from_secs(12)).await;
    proxy.set_down(false);
    let counts = wait_until_settled(&app, 90).await;
    assert_eq!(
        counts,
        vec![("succeeded".to_string(), 6)],
        "every job ends succeeded"
    );
    for call_id in &calls {
        for dim in ["discovery", "engagement"] {
            assert_eq!(app.session_count(*call_id, dim).await, 1, "{call_id} {dim}");
        }
    }
    assert_eq!(
        app.emulator.messages_served(),
        12,
        "LLM requests served = distinct cache keys: no answer was paid for twice"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn with_postgres_down_the_api_answers_503_and_readyz_recovers_at_once() {
    let app = spawn_app_with(Options {
        proxy_postgres: true,
        env: vec![("DATABASE_ACQUIRE_TIMEOUT_MS", "1000".into())],
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("503")).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    let proxy = app.pg_proxy.as_ref().unwrap();
    proxy.set_down(true);
    let enqueue = app
        .http
        .post(app.url("/v1/analyses"))
        .bearer_auth(&app.key)
        .json(&serde_json::json!({ "call_id": call_id }))
        .send()
        .await
        .unwrap();
    assert_eq!(enqueue.status(), 503);
    assert!(enqueue.headers().contains_key("retry-after"));
    let body: serde_json::Value = enqueue.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let status = app
        .http
        .get(app.url(&format!("/v1/jobs/{job_id}")))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 503);
    assert!(status.headers().contains_key("retry-after"));
    let (ready, _) = app.get("/readyz").await;
    assert_eq!(ready, 503);
    proxy.set_down(false);
    let (ready, body) = app.get("/readyz").await;
    assert_eq!(
        ready, 200,
        "the first readiness answer after recovery: {body}"
    );
    let (status, _) = app.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn fifty_callers_while_redis_is_slow_make_one_llm_call() {
    let app = spawn_app_with(Options {
        proxy_redis: true,
        emulator: slow_llm(800),
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("slow-redis")).await;
    // Every Redis answer now takes longer than the cache's 25 ms timeout.
    app.redis_proxy
        .as_ref()
        .unwrap()
        .set_latency(Duration::from_millis(60));
    let runs = (0..50).map(|_| app.perform(&app.app, call_id, &[Dimension::Discovery]));
    let jobs = futures::future::join_all(runs).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"), "{jobs:?}");
    assert_eq!(app.emulator.messages_served(), 1);
    assert_eq!(app.session_count(call_id, "discovery").await, 1);
}

#[tokio::test]
async fn the_breaker_stays_open_while_redis_is_slow_and_closes_when_it_is_fast() {
    let app = spawn_app_with(Options {
        proxy_redis: true,
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("breaker")).await;
    let key =
        callcoach::jobs::analyze_call::cache_key_for(&app.app.jobs, call_id, Dimension::Discovery)
            .await
            .unwrap();
    let proxy = app.redis_proxy.as_ref().unwrap();
    proxy.set_latency(Duration::from_millis(100));
    let cache = &app.app.jobs.cache;
    for _ in 0..3 {
        cache.lookup(&key, false).await.unwrap();
    }
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    // Redis answers every probe, but slower than the cache would wait: no flapping.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cache.lookup(&key, false).await.unwrap();
        assert_eq!(cache.breaker_state(), BreakerState::Open);
    }
    proxy.set_latency(Duration::ZERO);
    for _ in 0..40 {
        cache.lookup(&key, false).await.unwrap();
        if cache.breaker_state() == BreakerState::Closed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the breaker did not close once Redis was fast again");
}

#[tokio::test]
async fn a_new_fingerprint_stores_a_new_session_and_cache_rows_point_at_real_sessions() {
    let app = spawn_app_with(Options::default()).await;
    let call_id = app.ingest(&sample_call("fingerprint")).await;
    app.perform(&app.app, call_id, &[Dimension::Discovery])
        .await;
    // The knowledge base changes: a new fingerprint, so a new answer and a new session.
    sqlx::query("UPDATE knowledge_base SET version = version || '-2' WHERE id = (SELECT min(id) FROM knowledge_base)")
        .execute(&app.app.pg)
        .await
        .unwrap();
    app.perform(&app.app, call_id, &[Dimension::Discovery])
        .await;
    assert_eq!(app.session_count(call_id, "discovery").await, 2);
    assert_eq!(app.emulator.messages_served(), 2);
    let dangling: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coaching_cache c
         WHERE NOT EXISTS (SELECT 1 FROM coaching_sessions s WHERE s.id = c.session_id)",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(dangling, 0);
}
