//! The tiered coaching cache: single-flight, tier order, codec, degradation, invalidation.

use crate::helpers::{Options, TestApp, sample_call, spawn_app, spawn_app_with};
use callcoach::{
    cache::{self, CacheKey, Tier},
    jobs::analyze_call::cache_key_for,
    llm::{CoachingResult, emulator::EmulatorConfig},
    model::Dimension,
};
use futures::future::join_all;
use redis::AsyncCommands;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

const DISC: Dimension = Dimension::Discovery;

async fn key_for(app: &TestApp, call_id: Uuid, dim: Dimension) -> CacheKey {
    cache_key_for(&app.app.jobs, call_id, dim).await.unwrap()
}

async fn raw_redis_value(app: &TestApp, key: &CacheKey) -> Option<Vec<u8>> {
    let mut conn = app.redis.conn().await;
    conn.get(key.to_string()).await.unwrap()
}

/// The breaker's background probe half-opens it once Redis answers again; the next call is
/// the trial that closes it.
async fn wait_for_breaker_to_close(app: &callcoach::App) {
    let probe_key = cache::CacheKey {
        dimension: DISC,
        transcript_hash: "probe".into(),
        role: callcoach::model::Role::Ae,
        rubric_version: "probe".into(),
        fingerprint: "probe".into(),
    };
    for _ in 0..100 {
        if app.jobs.cache.breaker_state() != cache::BreakerState::Open {
            let _ = app.jobs.cache.lookup(&probe_key, false).await;
        }
        if app.jobs.cache.breaker_state() == cache::BreakerState::Closed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the breaker did not close after Redis came back");
}

#[tokio::test]
async fn fifty_concurrent_analyses_make_one_llm_call() {
    let app = spawn_app_with(Options {
        emulator: EmulatorConfig {
            latency: Duration::from_millis(400),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("flight")).await;
    // Two apps stand for two worker processes sharing Redis and Postgres.
    let other = app.another_app(&[]);
    let runs = (0..50).map(|i| {
        let target = if i % 2 == 0 { &app.app } else { &other };
        app.perform(target, call_id, &[DISC])
    });
    let jobs = join_all(runs).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"), "{jobs:?}");
    assert_eq!(app.emulator.messages_served(), 1);
    let scores: Vec<i32> = sqlx::query_scalar(
        "SELECT (result->>'score')::int FROM coaching_sessions WHERE call_id = $1
         UNION ALL SELECT (j.result->'dimensions'->0->>'score')::int FROM jobs j",
    )
    .bind(call_id)
    .fetch_all(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(scores.len(), 51, "one session plus fifty job results");
    assert!(scores.windows(2).all(|w| w[0] == w[1]), "{scores:?}");
    let sources = app.run_sources(call_id).await;
    assert_eq!(sources.iter().filter(|s| *s == "llm").count(), 1);
    let waited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM analysis_runs WHERE call_id = $1 AND singleflight_wait_ms > 0",
    )
    .bind(call_id)
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert!(
        waited >= 40,
        "most callers waited for the one computation: {waited}"
    );
}

#[tokio::test]
async fn identical_transcripts_share_results_until_model_or_kb_change() {
    let app = spawn_app().await;
    let first = app.ingest(&sample_call("shared")).await;
    app.perform(&app.app, first, &[DISC]).await;
    app.perform(&app.app, first, &[DISC]).await;
    assert_eq!(
        app.emulator.messages_served(),
        1,
        "second analysis is a hit"
    );
    // A different call with the same conversation (other title, other timing).
    let mut twin = sample_call("shared");
    twin["title"] = json!("Same words, different meeting");
    for (i, u) in twin["transcript"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        u["start_seconds"] = json!(i * 100);
    }
    let second = app.ingest(&twin).await;
    assert_ne!(first, second);
    app.perform(&app.app, second, &[DISC]).await;
    assert_eq!(
        app.emulator.messages_served(),
        1,
        "identical transcript is a hit"
    );
    assert_eq!(app.run_sources(second).await, ["redis"]);
    // Another model: a miss.
    let upgraded = app.another_app(&[("CLAUDE_MODEL", "claude-sonnet-5")]);
    app.perform(&upgraded, first, &[DISC]).await;
    assert_eq!(app.emulator.messages_served(), 2);
    // A knowledge-base update: a miss.
    sqlx::query("UPDATE knowledge_base SET version = '2099.01' WHERE id = (SELECT min(id) FROM knowledge_base)")
        .execute(&app.app.pg)
        .await
        .unwrap();
    app.perform(&app.app, first, &[DISC]).await;
    assert_eq!(app.emulator.messages_served(), 3);
}

#[tokio::test]
async fn a_postgres_hit_refills_redis() {
    let app = spawn_app().await;
    let call_id = app.ingest(&sample_call("refill")).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    let key = key_for(&app, call_id, DISC).await;
    let mut conn = app.redis.conn().await;
    let _: () = conn.del(key.to_string()).await.unwrap();
    app.perform(&app.app, call_id, &[DISC]).await;
    assert_eq!(app.run_sources(call_id).await, ["llm", "postgres"]);
    assert!(raw_redis_value(&app, &key).await.is_some(), "refilled");
    app.perform(&app.app, call_id, &[DISC]).await;
    assert_eq!(app.run_sources(call_id).await, ["llm", "postgres", "redis"]);
    assert_eq!(app.emulator.messages_served(), 1);
}

#[tokio::test]
async fn values_are_json_or_gzip_and_corrupt_ones_are_replaced() {
    let app = spawn_app().await;
    let call_id = app.ingest(&sample_call("codec")).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    let key = key_for(&app, call_id, DISC).await;
    let raw = raw_redis_value(&app, &key).await.unwrap();
    assert!(
        raw.len() <= cache::GZIP_THRESHOLD,
        "a typical result is small"
    );
    assert_eq!(raw[0], b'{', "small values are plain JSON");
    // A large value goes in gzipped.
    let big = CoachingResult {
        score: 50,
        strengths: (0..80)
            .map(|i| format!("strength number {i} with detail"))
            .collect(),
        improvements: vec![],
        examples: vec![],
        summary: "long".into(),
    };
    let mut big_key = key.clone();
    big_key.transcript_hash = "f".repeat(64);
    app.app.jobs.cache.redis_put(&big_key, &big).await;
    let raw = raw_redis_value(&app, &big_key).await.unwrap();
    assert_eq!(&raw[..2], &[0x1f, 0x8b]);
    assert!(raw.len() < serde_json::to_vec(&big).unwrap().len() / 3);
    assert_eq!(cache::decode(&raw).unwrap(), big);
    // A corrupt value is deleted, counted and replaced from Postgres.
    let mut conn = app.redis.conn().await;
    let _: () = conn.set(key.to_string(), b"\x00garbage").await.unwrap();
    app.perform(&app.app, call_id, &[DISC]).await;
    assert_eq!(app.run_sources(call_id).await, ["llm", "postgres"]);
    let raw = raw_redis_value(&app, &key).await.unwrap();
    assert!(cache::decode(&raw).is_ok());
    let corrupt: i64 =
        sqlx::query_scalar("SELECT value FROM cache_counters WHERE name = 'corrupt'")
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(corrupt, 1);
}

#[tokio::test]
async fn redis_down_at_start_up_then_back() {
    let mut app = spawn_app().await;
    app.redis.stop();
    // A process that starts while Redis is down.
    let cold = app.another_app(&[]);
    let call_id = app.ingest(&sample_call("cold")).await;
    let job = app.perform(&cold, call_id, &[DISC]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let job = app.perform(&cold, call_id, &[DISC]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.run_sources(call_id).await, ["llm", "postgres"]);
    assert_eq!(app.emulator.messages_served(), 1);
    assert_eq!(cold.jobs.cache.breaker_state(), cache::BreakerState::Open);
    let mut opened: Option<i64> = None;
    for _ in 0..40 {
        opened = sqlx::query_scalar("SELECT value FROM cache_counters WHERE name = 'breaker_open'")
            .fetch_optional(&app.app.pg)
            .await
            .unwrap();
        if opened.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(opened, Some(1), "the opening is counted once");
    app.redis.restart().await;
    // Once the breaker's open period ends, the next call probes Redis and uses it again.
    wait_for_breaker_to_close(&cold).await;
    app.perform(&cold, call_id, &[DISC]).await;
    app.perform(&cold, call_id, &[DISC]).await;
    assert_eq!(
        app.run_sources(call_id).await,
        ["llm", "postgres", "postgres", "redis"]
    );
    assert_eq!(cold.jobs.cache.breaker_state(), cache::BreakerState::Closed);
}

#[tokio::test]
async fn redis_down_mid_run_then_restarted() {
    let mut app = spawn_app().await;
    let call_id = app.ingest(&sample_call("midrun")).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    app.redis.stop();
    for _ in 0..3 {
        let job = app.perform(&app.app, call_id, &[DISC]).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // A new transcript while Redis is down: computed once, single-flight through Postgres.
    let fresh = app.ingest(&sample_call("midrun-new")).await;
    let runs = (0..4).map(|_| app.perform(&app.app, fresh, &[DISC]));
    assert!(
        join_all(runs)
            .await
            .iter()
            .all(|j| j["status"] == "succeeded")
    );
    assert_eq!(app.emulator.messages_served(), 2);
    app.redis.restart().await;
    wait_for_breaker_to_close(&app.app).await;
    app.perform(&app.app, fresh, &[DISC]).await;
    app.perform(&app.app, fresh, &[DISC]).await;
    let sources = app.run_sources(fresh).await;
    assert_eq!(sources.last().unwrap(), "redis", "{sources:?}");
    assert_eq!(app.emulator.messages_served(), 2);
}

#[tokio::test]
async fn a_crashed_owners_lease_expires_and_a_waiter_computes() {
    let mut app = spawn_app_with(Options {
        env: vec![("CACHE_LEASE_MS", "800".into())],
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("crashed")).await;
    let key = key_for(&app, call_id, DISC).await;
    // An owner that died right after taking the lease.
    dead_owner_lease(&app, &key).await;
    let job = app.perform(&app.app, call_id, &[DISC]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.emulator.messages_served(), 1);
    // The same with Redis down: the lease lives in Postgres either way.
    app.redis.stop();
    let other = app.ingest(&sample_call("crashed-pg")).await;
    let key = key_for(&app, other, DISC).await;
    dead_owner_lease(&app, &key).await;
    let job = app.perform(&app.app, other, &[DISC]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.emulator.messages_served(), 2);
    let wait: i64 =
        sqlx::query_scalar("SELECT singleflight_wait_ms FROM analysis_runs WHERE call_id = $1")
            .bind(other)
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(wait, 0, "the computing caller records no wait");
}

#[tokio::test]
async fn a_live_owner_renews_its_lease_past_its_lifetime() {
    let app = spawn_app_with(Options {
        env: vec![("CACHE_LEASE_MS", "300".into())],
        emulator: EmulatorConfig {
            latency: Duration::from_millis(1200),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("renewed")).await;
    let runs = (0..3).map(|_| app.perform(&app.app, call_id, &[DISC]));
    let jobs = join_all(runs).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"), "{jobs:?}");
    assert_eq!(
        app.emulator.messages_served(),
        1,
        "a computation four times longer than the lease still runs once"
    );
}

#[tokio::test]
async fn caching_disabled_always_computes_but_records() {
    let app = spawn_app_with(Options {
        env: vec![("ENABLE_CACHING", "false".into())],
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("nocache")).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    assert_eq!(app.emulator.messages_served(), 2);
    assert_eq!(app.run_sources(call_id).await, ["llm", "llm"]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM coaching_cache")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 1, "results are still recorded");
    assert_eq!(app.session_count(call_id, "discovery").await, 1);
}

#[tokio::test]
async fn rubric_update_invalidates_exactly_the_old_versions_keys() {
    let mut app = spawn_app().await;
    let ae_call = app.ingest(&sample_call("rubric")).await;
    let mut se = sample_call("rubric-se");
    se["rep_role"] = json!("se");
    let se_call = app.ingest(&se).await;
    for call in [ae_call, se_call] {
        app.perform(&app.app, call, &[DISC, Dimension::Engagement])
            .await;
    }
    let old_disc = key_for(&app, ae_call, DISC).await;
    let ae_engagement = key_for(&app, ae_call, Dimension::Engagement).await;
    let se_disc = key_for(&app, se_call, DISC).await;
    app.start_worker();
    let resp = app
        .http
        .put(app.url("/v1/rubrics/ae/discovery"))
        .bearer_auth(&app.admin_key)
        .json(
            &json!({ "version": "2.0.0", "criteria": "Score open questions and quantified pain." }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["previous_version"], old_disc.rubric_version);
    let job_id: Uuid = body["invalidation_job_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["removed"], 1, "{job}");
    assert!(raw_redis_value(&app, &old_disc).await.is_none());
    assert!(raw_redis_value(&app, &ae_engagement).await.is_some());
    assert!(
        raw_redis_value(&app, &se_disc).await.is_some(),
        "other roles untouched"
    );
    // The next analysis is a miss under the new rubric; the old result stays in history.
    app.perform(&app.app, ae_call, &[DISC]).await;
    assert_eq!(app.emulator.messages_served(), 5);
    let versions: Vec<String> = sqlx::query_scalar(
        "SELECT rubric_version FROM coaching_sessions WHERE call_id = $1 AND dimension = 'discovery' ORDER BY created_at",
    )
    .bind(ae_call)
    .fetch_all(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(
        versions,
        [old_disc.rubric_version.clone(), "2.0.0".to_string()]
    );
}

#[tokio::test]
async fn rubric_updates_need_admin_and_valid_input() {
    let app = spawn_app().await;
    let put = |key: String, path: &'static str, body: serde_json::Value| {
        let req = app.http.put(app.url(path)).bearer_auth(key).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let body = json!({ "version": "3.0", "criteria": "x" });
    let (status, _) = put(app.key.clone(), "/v1/rubrics/ae/discovery", body.clone()).await;
    assert_eq!(status, 403);
    let (status, err) = put(
        app.admin_key.clone(),
        "/v1/rubrics/cfo/discovery",
        body.clone(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("cfo"));
    let (status, _) = put(
        app.admin_key.clone(),
        "/v1/rubrics/ae/closing",
        body.clone(),
    )
    .await;
    assert_eq!(status, 400);
    let bad = json!({ "version": "a:b", "criteria": "x" });
    let (status, _) = put(app.admin_key.clone(), "/v1/rubrics/ae/discovery", bad).await;
    assert_eq!(status, 400);
    let (status, _) = put(
        app.admin_key.clone(),
        "/v1/rubrics/ae/discovery",
        body.clone(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, err) = put(app.admin_key.clone(), "/v1/rubrics/ae/discovery", body).await;
    assert_eq!(status, 409, "{err}");
}

/// 200 concurrent reads through 50 command slots all get their answer from Redis: callers
/// beyond the 50 queue for a slot. The command timeout (which the queueing counts against)
/// is raised so that a slow moment of the test machine cannot open the breaker; with the
/// default 25 ms, four waves of a debug build sharing two cores with the rest of the suite
/// sometimes did not fit.
#[tokio::test]
async fn two_hundred_concurrent_reads_share_a_pool_of_fifty() {
    let app = spawn_app_with(Options {
        env: vec![
            ("REDIS_MAX_CONNECTIONS", "50".into()),
            ("REDIS_CACHE_TIMEOUT_MS", "2000".into()),
        ],
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("pool")).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    let key = key_for(&app, call_id, DISC).await;
    let cache = &app.app.jobs.cache;
    let reads = (0..200).map(|_| cache.lookup(&key, true));
    let results = join_all(reads).await;
    let redis_hits = results
        .iter()
        .filter(|r| matches!(r, Ok(Some((_, Tier::Redis)))))
        .count();
    assert_eq!(redis_hits, 200);
}

#[tokio::test]
async fn redis_entries_carry_the_configured_ttl() {
    let app = spawn_app_with(Options {
        env: vec![("CACHE_TTL_DAYS", "7".into())],
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("ttl")).await;
    app.perform(&app.app, call_id, &[DISC]).await;
    let key = key_for(&app, call_id, DISC).await;
    let mut conn = app.redis.conn().await;
    let ttl: i64 = conn.ttl(key.to_string()).await.unwrap();
    assert!((7 * 86_400 - 60..=7 * 86_400).contains(&ttl), "{ttl}");
}

/// A `cache_leases` row of an owner that died: it expires in 800 ms.
async fn dead_owner_lease(app: &crate::helpers::TestApp, key: &callcoach::cache::CacheKey) {
    sqlx::query(
        "INSERT INTO cache_leases (cache_key, owner, expires_at) VALUES ($1, $2, now() + interval '800 milliseconds')",
    )
    .bind(key.to_string())
    .bind(Uuid::new_v4())
    .execute(&app.app.pg)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_computation_whose_lease_was_taken_over_stops() {
    let app = spawn_app_with(Options {
        env: vec![("CACHE_LEASE_MS", "300".into())],
        emulator: EmulatorConfig {
            latency: Duration::from_millis(2000),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("taken-over")).await;
    let pg = app.app.pg.clone();
    // While the owner waits for the LLM, another caller takes the lease over (as after the
    // owner stalled past its lease): the owner's next renewal finds it gone and stops.
    let thief = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        sqlx::query("UPDATE cache_leases SET owner = $1")
            .bind(Uuid::new_v4())
            .execute(&pg)
            .await
            .unwrap()
            .rows_affected()
    });
    let job = app.perform(&app.app, call_id, &[DISC]).await;
    assert_eq!(thief.await.unwrap(), 1, "the lease row existed");
    assert_eq!(job["status"], "queued", "retried later: {job}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("taken over"), "{error}");
    assert_eq!(app.session_count(call_id, "discovery").await, 0);
}
