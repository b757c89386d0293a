//! Cache warming against real Redis and Postgres: results only in Postgres are copied to
//! Redis, missing ones are analysed (inline) or enqueued (background lane), warm ones cost
//! nothing, and a rubric update enqueues a warm run for its role and dimension.

use crate::cli::{callcoach, stderr};
use crate::helpers::{TestApp, assert_enqueued, sample_call, spawn_app};
use callcoach::{
    cache::{self, CacheKey},
    jobs::{
        analyze_call::cache_key_for,
        registry,
        warm_cache::{Mode, WarmCache, WarmReport, warm},
    },
    ledger::JobState,
    model::Dimension,
};
use redis::AsyncCommands;
use serde_json::json;
use uuid::Uuid;

/// Ingests a call scheduled two days ago (inside every warm window of the tests).
async fn recent_call(app: &TestApp, tag: &str) -> Uuid {
    let mut call = sample_call(tag);
    call["scheduled_at"] = json!((chrono::Utc::now() - chrono::Duration::days(2)).to_rfc3339());
    app.ingest(&call).await
}

async fn keys_of(app: &TestApp, call_id: Uuid) -> Vec<CacheKey> {
    let mut keys = Vec::new();
    for d in Dimension::ALL {
        keys.push(cache_key_for(&app.app.jobs, call_id, d).await.unwrap());
    }
    keys
}

async fn in_redis(app: &TestApp, key: &CacheKey) -> bool {
    let mut conn = app.redis.conn().await;
    conn.exists(key.to_string()).await.unwrap()
}

async fn in_postgres(app: &TestApp, key: &CacheKey) -> bool {
    cache::read_durable(&app.app.pg, key)
        .await
        .unwrap()
        .is_some()
}

fn all_days(days: u32) -> WarmCache {
    WarmCache {
        days,
        dimension: None,
        role: None,
    }
}

#[tokio::test]
async fn warm_refills_analyses_the_missing_and_then_finds_everything_warm() {
    let app = spawn_app().await;
    let both = recent_call(&app, "warm-both").await;
    let pg_only = recent_call(&app, "warm-pg-only").await;
    let missing = recent_call(&app, "warm-missing").await;
    app.perform(&app.app, both, &[]).await;
    app.perform(&app.app, pg_only, &[]).await;
    let mut conn = app.redis.conn().await;
    for key in keys_of(&app, pg_only).await {
        let _: () = conn.del(key.to_string()).await.unwrap();
    }
    let paid = app.emulator.messages_served();
    assert_eq!(paid, 8);

    let report = warm(&app.app.jobs, &all_days(30), Mode::Inline, None)
        .await
        .unwrap();
    let expected = WarmReport {
        calls: 3,
        already_warm: 4,
        refilled: 4,
        analysed: 4,
        ..WarmReport::default()
    };
    assert_eq!(report, expected);
    assert_eq!(
        app.emulator.messages_served(),
        paid + 4,
        "only the missing call"
    );
    for call in [both, pg_only, missing] {
        for key in keys_of(&app, call).await {
            assert!(in_redis(&app, &key).await, "{key} not in Redis");
            assert!(in_postgres(&app, &key).await, "{key} not in Postgres");
        }
    }

    let again = warm(&app.app.jobs, &all_days(30), Mode::Inline, None)
        .await
        .unwrap();
    let all_warm = WarmReport {
        calls: 3,
        already_warm: 12,
        ..WarmReport::default()
    };
    assert_eq!(again, all_warm);
    assert_eq!(app.emulator.messages_served(), paid + 4, "no LLM call");
}

#[tokio::test]
async fn warm_enqueues_background_analyses_once_per_day_and_filters() {
    let app = spawn_app().await;
    let call = recent_call(&app, "warm-enqueue").await;
    let args = WarmCache {
        days: 7,
        dimension: Some(Dimension::Discovery),
        role: None,
    };
    let report = warm(&app.app.jobs, &args, Mode::Enqueue, None)
        .await
        .unwrap();
    assert_eq!((report.calls, report.enqueued, report.failed), (1, 1, 0));
    let job = assert_enqueued(
        &app.app.pg,
        "analyze_call",
        json!({"call_id": call, "dimensions": ["discovery"], "batch": true}),
        JobState::Queued,
    )
    .await;
    assert_eq!(report.jobs, vec![job]);
    let lane: String = sqlx::query_scalar("SELECT lane FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(lane, "background");
    // The same warm run again: the same job, not a second one.
    let again = warm(&app.app.jobs, &args, Mode::Enqueue, None)
        .await
        .unwrap();
    assert_eq!(again.jobs, vec![job]);
    // Another role sees no call; the window excludes an old call.
    let se = WarmCache {
        role: Some("se".parse().unwrap()),
        ..args.clone()
    };
    let none = warm(&app.app.jobs, &se, Mode::Enqueue, None).await.unwrap();
    assert_eq!(none, WarmReport::default());
    let mut old = sample_call("warm-old");
    old["scheduled_at"] = json!((chrono::Utc::now() - chrono::Duration::days(20)).to_rfc3339());
    app.ingest(&old).await;
    let week = warm(&app.app.jobs, &args, Mode::Enqueue, None)
        .await
        .unwrap();
    assert_eq!(week.calls, 1);
    assert_eq!(app.emulator.messages_served(), 0);
}

#[tokio::test]
async fn a_rubric_update_enqueues_a_warm_run_for_its_role_and_dimension() {
    let app = spawn_app().await;
    let call = recent_call(&app, "warm-rubric").await;
    let resp = app
        .http
        .put(app.url("/v1/rubrics/ae/discovery"))
        .bearer_auth(&app.admin_key)
        .json(&json!({"version": "9.0.0", "criteria": "Ask about timelines."}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let warm_job = assert_enqueued(
        &app.app.pg,
        "warm_cache",
        json!({"days": 7, "dimension": "discovery", "role": "ae"}),
        JobState::Queued,
    )
    .await;
    assert_eq!(body["warm_job_id"], json!(warm_job));
    let args = WarmCache {
        days: 7,
        dimension: Some(Dimension::Discovery),
        role: Some("ae".parse().unwrap()),
    };
    crate::helpers::perform(&app.app, warm_job, 0, &args).await;
    let job = callcoach::ledger::job(&app.app.pg, warm_job)
        .await
        .unwrap()
        .unwrap();
    let result = serde_json::to_value(job).unwrap()["result"].clone();
    assert_eq!(result["enqueued"], 1, "{result}");
    assert_enqueued(
        &app.app.pg,
        "analyze_call",
        json!({"call_id": call, "dimensions": ["discovery"]}),
        JobState::Queued,
    )
    .await;
}

#[test]
fn bad_warm_arguments_are_refused() {
    let kind = registry::find("warm_cache").unwrap();
    assert!(
        kind.new_job(json!({"days": 30})).is_ok(),
        "the schedule's args"
    );
    let err = kind.new_job(json!({"days": 0})).unwrap_err();
    assert!(err.contains("days must be between 1"), "{err}");
    for args in [
        vec!["warm", "--days", "0"],
        vec!["warm", "--days", "x"],
        vec!["warm", "--dimension", "closing"],
        vec!["warm", "--role", "cto"],
    ] {
        let out = callcoach(&[], &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("error"), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn the_warm_command_prints_its_counts() {
    let app = spawn_app().await;
    let call = recent_call(&app, "warm-cli").await;
    app.perform(&app.app, call, &[]).await;
    let env: Vec<(&str, &str)> = app
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let out = callcoach(&env, &["warm", "--days", "7", "--inline"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: WarmReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report.calls, report.already_warm), (1, 4));
    assert!(stderr(&out).contains("already warm: 4"), "{}", stderr(&out));
}
