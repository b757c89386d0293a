//! Cache statistics against real Redis and Postgres: figures checked against a controlled set
//! of analysis runs and jobs, the spec's Prometheus names, the table, bad arguments, and
//! health when a store is gone.

use crate::cli::{callcoach, stderr};
use crate::helpers::{TestApp, sample_call, spawn_app};
use callcoach::{
    jobs::{Job, Noop},
    stats::{self, HealthStatus},
};
use redis::AsyncCommands;
use serde_json::json;
use uuid::Uuid;

/// One stored run: (dimension, key, source, tokens in/out/write/read, cost, without, ms, wait, days ago).
type Run = (
    &'static str,
    &'static str,
    &'static str,
    [i64; 4],
    f64,
    f64,
    i64,
    i64,
    i32,
);

const RUNS: &[Run] = &[
    (
        "discovery",
        "k1",
        "llm",
        [1000, 200, 300, 500],
        0.01,
        0.012,
        2000,
        0,
        0,
    ),
    (
        "engagement",
        "k2",
        "llm",
        [500, 100, 0, 400],
        0.005,
        0.006,
        1000,
        0,
        0,
    ),
    ("discovery", "k1", "redis", [0; 4], 0.0, 0.012, 10, 0, 0),
    ("discovery", "k1", "redis", [0; 4], 0.0, 0.012, 10, 0, 0),
    ("discovery", "k1", "redis", [0; 4], 0.0, 0.012, 10, 0, 0),
    (
        "engagement",
        "k2",
        "postgres",
        [0; 4],
        0.0,
        0.006,
        30,
        20,
        0,
    ),
    // Outside a 7-day window.
    (
        "discovery",
        "k3",
        "llm",
        [9000, 0, 0, 0],
        1.0,
        1.0,
        9000,
        0,
        10,
    ),
];

/// Stores [`RUNS`] and four finished `analyze_call` jobs (three succeeded, one failed).
async fn controlled_runs(app: &TestApp) {
    let call = app.ingest(&sample_call("stats")).await;
    for (dim, key, source, [i, o, w, r], cost, without, ms, wait, ago) in RUNS {
        sqlx::query(
            "INSERT INTO analysis_runs (id, call_id, dimension, rubric_version, cache_key, source,
                 input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens, cost_usd,
                 cost_without_caching_usd, duration_ms, singleflight_wait_ms, created_at)
             VALUES ($1, $2, $3, '1.0.0', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                 now() - make_interval(days => $14))",
        )
        .bind(Uuid::now_v7())
        .bind(call)
        .bind(dim)
        .bind(key)
        .bind(source)
        .bind(i)
        .bind(o)
        .bind(w)
        .bind(r)
        .bind(cost)
        .bind(without)
        .bind(ms)
        .bind(wait)
        .bind(ago)
        .execute(&app.app.pg)
        .await
        .unwrap();
    }
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    for status in ["succeeded", "succeeded", "succeeded", "failed"] {
        let job = Noop::default().to_job().unwrap().run_at(later);
        let id = app.app.queue.enqueue(job).await.unwrap().job_id;
        sqlx::query(
            "UPDATE jobs SET kind = 'analyze_call', status = $2, finished_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .execute(&app.app.pg)
        .await
        .unwrap();
    }
    let mut conn = app.redis.conn().await;
    for key in ["coaching:a", "coaching:b"] {
        let _: () = conn.set(key, "{}").await.unwrap();
    }
}

#[tokio::test]
async fn stats_match_hand_computed_figures() {
    let app = spawn_app().await;
    controlled_runs(&app).await;
    let s = stats::collect(&app.app.pg, &app.app.redis, 7, true).await;
    let v = serde_json::to_value(&s).unwrap();
    // 6 runs in the window: 3 from Redis, 1 from Postgres, 2 from the LLM.
    assert_eq!(v["redis"]["available"], true);
    assert_eq!(v["redis"]["hit_rate"], 50.0);
    assert_eq!(
        (v["redis"]["hits"].clone(), v["redis"]["misses"].clone()),
        (json!(3), json!(3))
    );
    assert_eq!(v["redis"]["keys"], 2);
    assert_eq!(v["redis"]["keys_exact"], true);
    assert!(s.redis.memory_used_mb > 0.0);
    assert_eq!(v["database"]["cache_hit_rate"], 33.33);
    assert_eq!(v["database"]["overall_hit_rate"], 66.67);
    assert_eq!(v["cost_savings"]["cost_usd"], 0.015);
    assert_eq!(v["cost_savings"]["cost_without_caching_usd"], 0.06);
    assert_eq!(v["cost_savings"]["cost_savings_usd"], 0.045);
    assert_eq!(v["cost_savings"]["savings_percent"], 75.0);
    // Three hits of k1 (origin 2000 tokens) and one of k2 (origin 1000).
    assert_eq!(v["cost_savings"]["tokens_saved"], 7000);
    assert_eq!(v["performance"]["avg_duration_seconds"], 0.51);
    assert_eq!(v["performance"]["avg_llm_duration_seconds"], 1.5);
    assert_eq!(v["performance"]["avg_hit_duration_seconds"], 0.015);
    assert_eq!(v["performance"]["avg_singleflight_wait_seconds"], 0.003);
    assert_eq!(v["analysis"]["runs_total"], 6);
    assert_eq!(v["analysis"]["jobs_finished"], 4);
    assert_eq!(v["analysis"]["success_rate"], 75.0);
    assert_eq!(v["health"], json!({"status": "healthy", "reasons": []}));
    let discovery = &v["dimensions"]["discovery"];
    assert_eq!(
        discovery,
        &json!({"runs": 4, "redis_hits": 3, "postgres_hits": 0, "llm": 1, "hit_rate": 75.0,
                "cost_usd": 0.01, "cost_savings_usd": 0.038})
    );
    assert_eq!(v["dimensions"]["engagement"]["cost_savings_usd"], 0.007);
    assert_eq!(v["dimensions"]["product_knowledge"]["runs"], 0);
    // The whole window, with the older run.
    let month = stats::collect(&app.app.pg, &app.app.redis, 30, false).await;
    assert_eq!(month.analysis.runs_total, 7);
    assert!(month.dimensions.is_none());

    // The HTTP route: the earlier report's fields and the spec's sections.
    let (status, body) = app.get("/v1/cache/stats?days=7").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["runs"], 6);
    assert_eq!(body["redis"]["hit_rate"], 50.0);
    assert_eq!(body["cost_savings"]["tokens_saved"], 7000);
    assert_eq!(body["dimensions"]["discovery"]["runs"], 4);
}

#[tokio::test]
async fn prometheus_uses_the_spec_names_and_the_table_reads() {
    let app = spawn_app().await;
    controlled_runs(&app).await;
    let s = stats::collect(&app.app.pg, &app.app.redis, 7, false).await;
    let text = s.to_prometheus();
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let names: Vec<&str> = samples
        .iter()
        .map(|l| l.split([' ', '{']).next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "cache_hit_rate",
            "cache_hit_rate",
            "cache_hit_rate",
            "redis_cache_hit_rate",
            "redis_memory_used_mb",
            "cache_cost_savings_usd",
            "cache_tokens_saved",
            "analysis_runs_total",
            "analysis_success_rate"
        ]
    );
    for line in [
        r#"cache_hit_rate{source="database"} 33.33"#,
        "redis_cache_hit_rate 50",
        "cache_cost_savings_usd 0.045",
        "cache_tokens_saved 7000",
        "analysis_runs_total 6",
        "analysis_success_rate 75",
        "# TYPE analysis_runs_total counter",
        "# TYPE redis_memory_used_mb gauge",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    for name in [
        "cache_hit_rate",
        "redis_memory_used_mb",
        "analysis_success_rate",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
    }
    let table = s.to_table();
    for row in [
        "redis hit rate         50.00 %",
        "saved                  $0.0450 (75.00 %)",
        "health                 healthy",
    ] {
        assert!(table.contains(row), "missing {row:?} in\n{table}");
    }
    // The CLI prints the same exposition.
    let env: Vec<(&str, &str)> = app
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let out = callcoach(&env, &["stats", "--format", "prometheus", "--days", "7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("analysis_runs_total 6"), "{printed}");
    let out = callcoach(
        &env,
        &["stats", "--format", "table", "--dimension-breakdown"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("objection_handling"));
}

#[test]
fn bad_stats_arguments_name_the_problem() {
    for (args, named) in [
        (vec!["stats", "--format", "xml"], "--format"),
        (vec!["stats", "--days", "0"], "--days"),
        (vec!["stats", "--days", "many"], "--days"),
    ] {
        let out = callcoach(&[], &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn health_is_degraded_without_redis_and_unhealthy_without_postgres() {
    let mut app = spawn_app().await;
    controlled_runs(&app).await;
    app.redis.stop();
    let s = stats::collect(&app.app.pg, &app.app.redis, 7, false).await;
    assert!(!s.redis.available);
    assert_eq!(s.health.status, HealthStatus::Degraded);
    assert!(s.health.reasons[0].contains("Redis"), "{:?}", s.health);
    // Figures still come from Postgres.
    assert_eq!(s.redis.hit_rate, 50.0);
    let (status, body) = app.get("/v1/cache/stats").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["health"]["status"], "degraded");

    let out = callcoach(
        &[
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"),
            ("REDIS_URL", "redis://127.0.0.1:1/0"),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "300"),
        ],
        &["stats"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["health"]["status"], "unhealthy", "{v}");
    assert_eq!(v["database"]["available"], false);
}
