//! HTTP contract: authentication, every client mistake answered with the right 4xx JSON.

use crate::helpers::{sample_call, spawn_app};
use serde_json::{Value, json};

fn assert_error(status: u16, body: &Value, expected: u16, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        !body["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{body}"
    );
}

#[tokio::test]
async fn health_is_open_everything_else_needs_a_key() {
    let app = spawn_app().await;
    let resp = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    for (path, method) in [
        ("/v1/calls", "POST"),
        ("/v1/analyses", "POST"),
        ("/metrics", "GET"),
    ] {
        let req = app.http.request(method.parse().unwrap(), app.url(path));
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        assert_error(status, &resp.json().await.unwrap(), 401, "unauthorized");
    }
    let resp = app
        .http
        .get(app.url(&format!("/v1/jobs/{}", uuid::Uuid::nil())))
        .bearer_auth("cc_wrong_key")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await.unwrap(), 401, "unauthorized");
}

#[tokio::test]
async fn api_keys_are_stored_hashed() {
    let app = spawn_app().await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    for hash in stored {
        assert_eq!(hash.len(), 64);
        assert_ne!(hash, app.key);
        assert!(!app.key.contains(&hash));
    }
}

#[tokio::test]
async fn bad_input_gets_the_right_4xx() {
    let app = spawn_app().await;
    // Malformed JSON.
    let resp = app
        .http
        .post(app.url("/v1/analyses"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await.unwrap(), 400, "invalid_json");
    // Unknown dimension.
    let call_id = app.ingest(&sample_call("dims")).await;
    let (status, body) = app
        .post(
            "/v1/analyses",
            &json!({ "call_id": call_id, "dimensions": ["closing"] }),
        )
        .await;
    assert_error(status, &body, 422, "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("closing")
    );
    // Unknown call.
    let (status, body) = app
        .post("/v1/analyses", &json!({ "call_id": uuid::Uuid::new_v4() }))
        .await;
    assert_error(status, &body, 404, "call_not_found");
    // Bad id in the path.
    let (status, body) = app.get("/v1/jobs/not-a-uuid").await;
    assert_error(status, &body, 400, "invalid_path");
    // Unknown job and call.
    let (status, body) = app.get(&format!("/v1/jobs/{}", uuid::Uuid::new_v4())).await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = app
        .get(&format!("/v1/calls/{}", uuid::Uuid::new_v4()))
        .await;
    assert_error(status, &body, 404, "not_found");
    // Invalid call payloads.
    let mut empty = sample_call("empty");
    empty["transcript"] = json!([]);
    let (status, body) = app.post("/v1/calls", &empty).await;
    assert_error(status, &body, 400, "invalid_request");
    let mut role = sample_call("role");
    role["rep_role"] = json!("cfo");
    let (status, body) = app.post("/v1/calls", &role).await;
    assert_error(status, &body, 422, "invalid_request");
    // Unknown route, wrong method.
    let (status, body) = app.get("/v1/nothing").await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = app.get("/v1/analyses").await;
    assert_error(status, &body, 405, "method_not_allowed");
    // Oversize body.
    let mut huge = sample_call("huge");
    huge["title"] = json!("x".repeat(3 * 1024 * 1024));
    let (status, body) = app.post("/v1/calls", &huge).await;
    assert_error(status, &body, 413, "payload_too_large");
}

#[tokio::test]
async fn ingest_is_idempotent_by_external_id() {
    let app = spawn_app().await;
    let mut call = sample_call("ext");
    call["external_id"] = json!("crm-42");
    let (first, a) = app.post("/v1/calls", &call).await;
    let (second, b) = app.post("/v1/calls", &call).await;
    assert_eq!((first, second), (201, 200));
    assert_eq!(a["id"], b["id"]);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_job() {
    let app = spawn_app().await;
    let call_id = app.ingest(&sample_call("idem")).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = app
            .http
            .post(app.url("/v1/analyses"))
            .bearer_auth(&app.key)
            .header("Idempotency-Key", "order-7")
            .json(&json!({ "call_id": call_id }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let body: Value = resp.json().await.unwrap();
        ids.push(body["job_id"].clone());
    }
    assert_eq!(ids[0], ids[1]);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(jobs, 1);
}

#[tokio::test]
async fn coaching_sessions_have_partitions_ahead_and_a_default() {
    let app = spawn_app().await;
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'coaching_sessions'::regclass ORDER BY 1",
    )
    .fetch_all(&app.app.pg)
    .await
    .unwrap();
    assert!(partitions.contains(&"coaching_sessions_default".to_string()));
    let this_month = chrono::Utc::now()
        .format("coaching_sessions_%Y_%m")
        .to_string();
    assert!(partitions.contains(&this_month), "{partitions:?}");
    assert_eq!(
        partitions.len(),
        5,
        "current month, three ahead, default: {partitions:?}"
    );
    // A row far outside every monthly partition still lands (in the default one).
    sqlx::query(
        "INSERT INTO coaching_sessions (id, call_id, rep_email, dimension, rubric_version, cache_key,
             score, result, created_at)
         VALUES ($1, $1, 'a@b.c', 'discovery', '1', 'k', 50, '{}', '2031-06-01')",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&app.app.pg)
    .await
    .unwrap();
}

#[tokio::test]
async fn seed_data_is_loaded_once() {
    let app = spawn_app().await;
    callcoach::db::migrate(&app.app.pg).await.unwrap();
    let (rubrics, roles, dims): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT role), count(DISTINCT dimension) FROM coaching_rubrics WHERE active",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert_eq!((rubrics, roles, dims), (12, 3, 4));
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM coaching_rubrics")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(all, 12, "migrating again adds nothing");
    let kb: i64 = sqlx::query_scalar("SELECT count(*) FROM knowledge_base WHERE active")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert!(kb >= 6, "{kb}");
}
