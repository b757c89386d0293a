//! `callcoach bench db` on a small configuration through the binary: the report's shape,
//! positive optimized figures and a measured baseline for every query, and a bench database of
//! its own that is gone afterwards while the configured database stays untouched. Timing
//! targets are the bench's business, never asserted here.

use crate::{
    cli::{callcoach, stderr},
    helpers::fresh_database,
};
use serde_json::Value;

const QUERIES: [&str; 7] = [
    "cache_lookup",
    "rep_summary_live",
    "rep_summary_view",
    "search_by_rep",
    "search_product_type_90d",
    "search_date_window_90d",
    "call_details",
];

fn positive(v: &Value, what: &str) {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0, "{what} = {x}");
}

fn assert_latencies(summary: &Value, what: &str) {
    for figure in ["p50_us", "p99_us", "mean_us"] {
        positive(&summary[figure], &format!("{what}.{figure}"));
    }
}

#[tokio::test]
async fn bench_db_measures_every_query_against_a_baseline_in_its_own_database() {
    let url = fresh_database().await;
    let args = [
        "bench",
        "db",
        "--calls",
        "2000",
        "--sessions",
        "20000",
        "--reps",
        "20",
        "--samples",
        "200",
    ];
    let out = callcoach(&[("DATABASE_URL", url.as_str())], &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("the report is JSON");

    assert_eq!(report["benchmark"], "db");
    assert_eq!(report["seed"]["rows"]["calls"], 2000);
    assert_eq!(report["seed"]["rows"]["sessions"], 20000);
    positive(&report["seed"]["generation_secs"], "seed.generation_secs");
    assert_latencies(&report["floor_select_1"], "floor_select_1");
    assert_latencies(
        &report["cache_lookup_miss"]["optimized"],
        "cache_lookup_miss",
    );
    for name in QUERIES {
        let q = &report["queries"][name];
        assert_latencies(&q["optimized"], &format!("{name}.optimized"));
        assert_latencies(&q["baseline"], &format!("{name}.baseline"));
        assert_eq!(q["optimized"]["samples"], 200, "{name}");
        assert_eq!(q["baseline"]["samples"], 30, "{name}");
        positive(&q["speedup_p50"], &format!("{name}.speedup_p50"));
        positive(&q["vs_floor"], &format!("{name}.vs_floor"));
        assert_eq!(q["rows_match"], true, "{name}: {q}");
    }
    let targets = report["targets"].as_array().expect("targets");
    assert!(!targets.is_empty());
    for t in targets {
        assert!(t["met"].is_boolean(), "{t}");
        assert!(
            QUERIES.contains(&t["query"].as_str().unwrap_or_default()),
            "{t}"
        );
    }
    assert!(report["all_targets_met"].is_boolean());

    // The bench database is gone, and the configured one was never migrated or seeded.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let bench_db = report["database"].as_str().unwrap();
    assert!(bench_db.ends_with("_bench_db"), "{bench_db}");
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(bench_db)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!left, "{bench_db} was not dropped");
    let touched: bool = sqlx::query_scalar("SELECT to_regclass('calls') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!touched, "the configured database was migrated");
}

#[tokio::test]
async fn bench_http_drives_every_scenario_and_leaves_nothing_behind() {
    let app = crate::helpers::spawn_app().await;
    let db = app.env["DATABASE_URL"].clone();
    let redis = app.env["REDIS_URL"].clone();
    let env = [("DATABASE_URL", db.as_str()), ("REDIS_URL", redis.as_str())];
    let out = callcoach(
        &env,
        &["bench", "http", "--secs", "0.5", "--connections", "4"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("the report is JSON");
    for scenario in [
        "healthz",
        "job_read",
        "search",
        "search_without_limiter_or_gzip",
        "paired_job_read_with_limiter",
        "paired_job_read_without_limiter",
    ] {
        positive(&report[scenario]["requests_per_sec"], scenario);
        assert_eq!(report[scenario]["errors"], 0, "{scenario}: {report}");
        assert_latencies(&report[scenario]["latency"], scenario);
    }
    positive(&report["job_read_vs_healthz"], "job_read_vs_healthz");
    assert!(report["limiter_overhead"]["p99_us"].is_number(), "{report}");
    let gzip = &report["search_page_gzip"];
    assert!(
        gzip["gzip_bytes"].as_u64() < gzip["bytes"].as_u64(),
        "{gzip}"
    );
    assert!(gzip["x_compression_ratio"].is_string(), "{gzip}");
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM calls), (SELECT count(*) FROM api_keys WHERE name LIKE 'bench-http-%')",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(left, (0, 0));
    let out = callcoach(&env, &["bench", "http", "--secs", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--secs"), "{}", stderr(&out));
}
