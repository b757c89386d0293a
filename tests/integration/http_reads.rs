//! The read endpoints (search with an opaque cursor, rep insights, cache stats), idempotent
//! POSTs and API key management.

use crate::{
    cli::{callcoach, stderr},
    helpers::{TestApp, sample_call, spawn_app, spawn_app_with},
};
use serde_json::{Value, json};
use uuid::Uuid;

/// A session of the call's rep for `dimension`.
async fn session(app: &TestApp, call_id: Uuid, dimension: &str, score: i32) {
    sqlx::query(
        "INSERT INTO coaching_sessions (id, call_id, rep_email, rep_id, dimension, rubric_version,
             cache_key, score, result)
         SELECT $1, c.id, c.rep_email, c.rep_id, $2, '1', 'k-' || $1::text, $3, '{}'::jsonb
         FROM calls c WHERE c.id = $4",
    )
    .bind(Uuid::now_v7())
    .bind(dimension)
    .bind(score)
    .bind(call_id)
    .execute(&app.app.pg)
    .await
    .unwrap();
}

fn ids(page: &Value) -> Vec<String> {
    page["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn search_filters_pages_with_an_opaque_cursor_and_names_bad_parameters() {
    let app = spawn_app().await;
    let mut calls = Vec::new();
    for n in 0..5 {
        let mut call = sample_call(&format!("http-search-{n}"));
        call["scheduled_at"] = json!(format!("2026-10-0{}T10:00:00Z", n + 1));
        if n >= 3 {
            call["rep_email"] = json!("sam@lumen.example");
            call["rep_role"] = json!("csm");
        }
        calls.push(app.ingest(&call).await.to_string());
    }
    session(&app, calls[1].parse().unwrap(), "discovery", 45).await;
    session(&app, calls[2].parse().unwrap(), "discovery", 85).await;

    let (status, first) = app.get("/v1/calls/search?limit=2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), [calls[4].clone(), calls[3].clone()]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = app
        .get(&format!("/v1/calls/search?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&second), [calls[2].clone(), calls[1].clone()]);
    let cursor = second["next_cursor"].as_str().unwrap();
    let (_, last) = app
        .get(&format!("/v1/calls/search?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&last), [calls[0].clone()]);
    assert_eq!(last["next_cursor"], Value::Null, "a short page is the last");

    let app = &app;
    let found = |query: &'static str| async move {
        ids(&app.get(&format!("/v1/calls/search?{query}")).await.1)
    };
    assert_eq!(
        found("rep=SAM@lumen.example").await,
        [calls[4].clone(), calls[3].clone()]
    );
    assert_eq!(
        found("rep=nobody@lumen.example").await,
        Vec::<String>::new()
    );
    assert_eq!(found("role=csm").await.len(), 2);
    assert_eq!(
        found("dimension=discovery").await,
        [calls[2].clone(), calls[1].clone()]
    );
    assert_eq!(
        found("dimension=discovery&max_score=50").await,
        [calls[1].clone()]
    );
    assert_eq!(found("min_score=80").await, [calls[2].clone()]);
    assert_eq!(
        found("from=2026-10-02T00:00:00Z&to=2026-10-04T00:00:00Z").await,
        [calls[2].clone(), calls[1].clone()]
    );

    for (query, names) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("min_score=101", "min_score"),
        ("min_score=60&max_score=50", "min_score"),
        ("from=2026-10-04T00:00:00Z&to=2026-10-02T00:00:00Z", "from"),
        ("from=yesterday", "from"),
        ("dimension=charisma", "dimension"),
        ("role=ceo", "role"),
        ("cursor=not-ours", "cursor"),
        ("colour=blue", "colour"),
        ("tags=,,", "tags"),
    ] {
        let (status, body) = app.get(&format!("/v1/calls/search?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(names),
            "{query}: {body}"
        );
    }
}

#[tokio::test]
async fn rep_insights_read_the_fresh_view_and_fall_back_to_live_figures() {
    let app = spawn_app().await;
    let call = app.ingest(&sample_call("insights")).await;
    session(&app, call, "discovery", 60).await;
    // Before any refresh the view says nothing: live.
    let (status, body) = app.get("/v1/reps/ANA@lumen.example/insights").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "live");
    assert_eq!(body["performance"]["total_sessions"], 1);
    assert_eq!(body["rep"]["email"], "ana@lumen.example");
    callcoach::performance::refresh_rep_performance(&app.app.pg)
        .await
        .unwrap();
    session(&app, call, "engagement", 80).await;
    let (_, body) = app.get("/v1/reps/ana@lumen.example/insights?days=30").await;
    assert_eq!(body["source"], "view");
    assert_eq!(
        body["performance"]["total_sessions"], 1,
        "as of the refresh"
    );
    assert_eq!(body["window_days"], 30);
    assert_eq!(
        body["dimensions"].as_array().unwrap().len(),
        2,
        "the summary is live"
    );
    // A refresh older than INSIGHTS_MAX_STALENESS_SECS: live again.
    sqlx::query("UPDATE view_refreshes SET refreshed_at = now() - interval '1 hour'")
        .execute(&app.app.pg)
        .await
        .unwrap();
    let (_, body) = app.get("/v1/reps/ana@lumen.example/insights").await;
    assert_eq!(body["source"], "live");
    assert_eq!(body["performance"]["total_sessions"], 2);
    assert_eq!(body["performance"]["avg_score"], 70.0);
    let (status, body) = app.get("/v1/reps/nobody@lumen.example/insights").await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = app.get("/v1/reps/ana@lumen.example/insights?days=0").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_live_rep_figures_equal_the_view_for_every_rep() {
    let app = spawn_app().await;
    callcoach::seed::seed(
        &app.app.pg,
        &callcoach::seed::SeedOptions::new(300, 3000, 12, 5),
        false,
    )
    .await
    .unwrap();
    callcoach::performance::refresh_rep_performance(&app.app.pg)
        .await
        .unwrap();
    let reps: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM reps")
        .fetch_all(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(reps.len(), 12);
    for rep in reps {
        let view = callcoach::performance::rep_performance(&app.app.pg, rep)
            .await
            .unwrap();
        let live = callcoach::performance::rep_performance_live(&app.app.pg, rep)
            .await
            .unwrap();
        assert_eq!(view, live, "rep {rep}");
    }
}

#[tokio::test]
async fn cache_stats_report_sources_costs_and_counters() {
    let app = spawn_app().await;
    let call = app.ingest(&sample_call("http-stats")).await;
    let dims = [callcoach::model::Dimension::Discovery];
    app.perform(&app.app, call, &dims).await;
    app.perform(&app.app, call, &dims).await;
    let (status, body) = app.get("/v1/cache/stats?days=1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["runs"], 2);
    assert_eq!(body["hit_rate"], 0.5);
    let saved = body["saved_usd"].as_f64().unwrap();
    let expected =
        body["cost_without_caching_usd"].as_f64().unwrap() - body["cost_usd"].as_f64().unwrap();
    assert!(saved > 0.0 && (saved - expected).abs() < 1e-12, "{body}");
    assert_eq!(body["sources"].as_array().unwrap().len(), 2);
    let (status, _) = app.get("/v1/cache/stats?days=99999").await;
    assert_eq!(status, 400);
}

async fn post_with_key(app: &TestApp, path: &str, key: &str, body: &Value) -> (u16, Value, bool) {
    let resp = app
        .http
        .post(app.url(path))
        .bearer_auth(&app.key)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let replayed = resp.headers().contains_key("idempotent-replayed");
    (resp.status().as_u16(), resp.json().await.unwrap(), replayed)
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_response_and_refuses_another_body() {
    let app = spawn_app().await;
    let call = sample_call("idem");
    let (status, first, replayed) = post_with_key(&app, "/v1/calls", "k-1", &call).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    let (status, again, replayed) = post_with_key(&app, "/v1/calls", "k-1", &call).await;
    assert_eq!((status, replayed), (201, true), "the original status");
    assert_eq!(again, first);
    let mut other = call.clone();
    other["title"] = json!("Another call");
    let (status, body, _) = post_with_key(&app, "/v1/calls", "k-1", &other).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_reused");

    let id = first["id"].as_str().unwrap();
    let analysis = json!({"call_id": id, "dimensions": ["discovery"]});
    let (s1, a1, _) = post_with_key(&app, "/v1/analyses", "a-1", &analysis).await;
    let (s2, a2, r2) = post_with_key(&app, "/v1/analyses", "a-1", &analysis).await;
    assert_eq!((s1, s2, r2), (202, 202, true));
    assert_eq!(a1, a2);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'analyze_call'")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(jobs, 1);

    // An expired key starts afresh; a key left in progress answers 409.
    sqlx::query(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'k-1'",
    )
    .execute(&app.app.pg)
    .await
    .unwrap();
    let (status, _, replayed) = post_with_key(&app, "/v1/calls", "k-1", &other).await;
    assert_eq!((status, replayed), (201, false), "processed as new");
    sqlx::query("UPDATE idempotency_keys SET status = NULL, body = NULL WHERE key = 'k-1'")
        .execute(&app.app.pg)
        .await
        .unwrap();
    let (status, body, _) = post_with_key(&app, "/v1/calls", "k-1", &other).await;
    assert_eq!(status, 409, "{body}");
    let (status, _, _) = post_with_key(&app, "/v1/calls", &"x".repeat(201), &call).await;
    assert_eq!(status, 400);
    let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM calls")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(calls, 2, "the replays stored nothing");
}

#[tokio::test]
async fn keys_are_listed_revoked_and_refused_within_the_cache_period() {
    let app = spawn_app_with(crate::helpers::Options {
        env: vec![("AUTH_CACHE_MS", "300".into())],
        ..Default::default()
    })
    .await;
    let db = app.env["DATABASE_URL"].clone();
    let env = [("DATABASE_URL", db.as_str())];
    let (status, _) = app.get("/v1/cache/stats").await;
    assert_eq!(status, 200);
    let out = callcoach(&env, &["apikey", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let keys: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let prefix = app.key.split('_').nth(1).unwrap();
    let mine = keys.iter().find(|k| k["prefix"] == prefix).unwrap();
    assert!(mine["last_used_at"].is_string(), "{mine}");
    assert!(
        !out.stdout
            .windows(app.key.len())
            .any(|w| w == app.key.as_bytes()),
        "never the key"
    );
    let out = callcoach(&env, &["apikey", "revoke", prefix]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = callcoach(&env, &["apikey", "revoke", prefix]);
    assert_eq!(out.status.code(), Some(1), "already revoked");
    assert!(stderr(&out).contains(prefix));
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (status, body) = app.get("/v1/cache/stats").await;
    assert_eq!(status, 401, "{body}");
}
