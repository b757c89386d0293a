//! `sql/performance`: objects verified after migrate, the read functions against
//! hand-computed values, and a concurrent view refresh that does not block readers.

use crate::helpers::{TestApp, sample_call, spawn_app};
use callcoach::performance;
use uuid::Uuid;

/// A session of the call's rep, `days_ago` days old.
async fn session(app: &TestApp, call_id: Uuid, dimension: &str, score: i32, days_ago: i32) {
    sqlx::query(
        "INSERT INTO coaching_sessions (id, call_id, rep_email, rep_id, dimension, rubric_version,
             cache_key, score, result, created_at)
         SELECT $1, c.id, c.rep_email, c.rep_id, $2, '1', 'k-' || $1::text, $3, '{}'::jsonb,
                now() - make_interval(days => $4)
         FROM calls c WHERE c.id = $5",
    )
    .bind(Uuid::now_v7())
    .bind(dimension)
    .bind(score)
    .bind(days_ago)
    .bind(call_id)
    .execute(&app.app.pg)
    .await
    .unwrap();
}

async fn rep_of(app: &TestApp, call_id: Uuid) -> Uuid {
    sqlx::query_scalar("SELECT rep_id FROM calls WHERE id = $1")
        .bind(call_id)
        .fetch_one(&app.app.pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn verify_finds_every_object_and_names_a_dropped_one() {
    let app = spawn_app().await;
    let report = performance::verify(&app.app.pg).await.unwrap();
    assert_eq!(report.len(), performance::expected().len());
    assert!(report.iter().all(|o| o.ok()), "{report:?}");
    sqlx::query("DROP INDEX coaching_sessions_rep_dim_created_idx")
        .execute(&app.app.pg)
        .await
        .unwrap();
    let report = performance::verify(&app.app.pg).await.unwrap();
    let broken: Vec<_> = report.iter().filter(|o| !o.ok()).collect();
    assert_eq!(broken.len(), 1, "{report:?}");
    assert_eq!(broken[0].name, "coaching_sessions_rep_dim_created_idx");
    assert_eq!(broken[0].status, "missing");
    performance::apply(&app.app.pg).await.unwrap();
    let report = performance::verify(&app.app.pg).await.unwrap();
    assert!(report.iter().all(|o| o.ok()), "{report:?}");
}

#[tokio::test]
async fn the_rep_summary_and_view_match_hand_computed_values() {
    let app = spawn_app().await;
    let call = app.ingest(&sample_call("perf-1")).await;
    let other = app.ingest(&sample_call("perf-2")).await;
    let rep = rep_of(&app, call).await;
    for (dim, score, days) in [
        ("discovery", 60, 1),
        ("discovery", 81, 10),
        ("discovery", 30, 200),
        ("engagement", 70, 5),
    ] {
        session(&app, call, dim, score, days).await;
    }
    session(&app, other, "engagement", 90, 2).await;
    let summary = performance::rep_performance_summary(&app.app.pg, rep, 90)
        .await
        .unwrap();
    let rows: Vec<(String, i64, f64, i32, i32)> = summary
        .into_iter()
        .map(|d| {
            (
                d.dimension,
                d.sessions,
                d.avg_score,
                d.min_score,
                d.max_score,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("discovery".into(), 2, 70.5, 60, 81),
            ("engagement".into(), 2, 80.0, 70, 90)
        ],
        "the 200-day-old session is outside 90 days"
    );
    performance::refresh_rep_performance(&app.app.pg)
        .await
        .unwrap();
    type ViewRow = (i64, i64, f64, Option<f64>, Option<f64>, Option<f64>);
    let view: ViewRow = sqlx::query_as(
        "SELECT total_calls, total_sessions, avg_score::float8, avg_discovery::float8,
                avg_engagement::float8, avg_product_knowledge::float8
         FROM mv_rep_performance WHERE rep_id = $1",
    )
    .bind(rep)
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    // (60 + 81 + 30 + 70 + 90) / 5 = 66.2; discovery (60 + 81 + 30) / 3 = 57.0
    assert_eq!(view, (2, 5, 66.2, Some(57.0), Some(80.0), None));
}

#[tokio::test]
async fn a_concurrent_refresh_does_not_block_readers() {
    let app = spawn_app().await;
    app.ingest(&sample_call("perf-refresh")).await;
    let read_while = |refresh: &'static str| {
        let pg = app.app.pg.clone();
        async move {
            let mut writer = pg.begin().await.unwrap();
            sqlx::query(refresh).execute(&mut *writer).await.unwrap();
            let mut reader = pg.acquire().await.unwrap();
            sqlx::query("SET lock_timeout = '300ms'")
                .execute(&mut *reader)
                .await
                .unwrap();
            let read = sqlx::query("SELECT count(*) FROM mv_rep_performance")
                .execute(&mut *reader)
                .await;
            writer.rollback().await.unwrap();
            read.is_ok()
        }
    };
    assert!(
        read_while("SELECT refresh_rep_performance_view()").await,
        "readers go on during the concurrent refresh"
    );
    assert!(
        !read_while("REFRESH MATERIALIZED VIEW mv_rep_performance").await,
        "a plain refresh would have blocked them"
    );
}

#[tokio::test]
async fn the_upkeep_jobs_refresh_the_view_and_partition_what_the_default_holds() {
    use callcoach::jobs::{Job, MaintainTables, RefreshRepPerformance};
    let mut app = spawn_app().await;
    let call = app.ingest(&sample_call("perf-jobs")).await;
    let rep = rep_of(&app, call).await;
    session(&app, call, "discovery", 64, 0).await;
    session(&app, call, "engagement", 50, -800).await; // about 26 months ahead
    app.start_worker();
    let refresh = app
        .app
        .queue
        .enqueue(RefreshRepPerformance {}.to_job().unwrap())
        .await
        .unwrap();
    let maintain = app
        .app
        .queue
        .enqueue(MaintainTables {}.to_job().unwrap())
        .await
        .unwrap();
    for job_id in [refresh.job_id, maintain.job_id] {
        let job = app.wait_for_job(job_id, 30).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let sessions: i64 =
        sqlx::query_scalar("SELECT total_sessions FROM mv_rep_performance WHERE rep_id = $1")
            .bind(rep)
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(sessions, 2);
    let in_default: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coaching_sessions WHERE tableoid = 'coaching_sessions_default'::regclass",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(in_default, 0, "the far-future row got its own month");
}

#[tokio::test]
async fn cache_statistics_sum_the_runs_by_source() {
    let app = spawn_app().await;
    let call = app.ingest(&sample_call("perf-stats")).await;
    let dims = [
        callcoach::model::Dimension::Discovery,
        callcoach::model::Dimension::Engagement,
    ];
    app.perform(&app.app, call, &dims).await; // 2 LLM runs
    app.perform(&app.app, call, &dims).await; // 2 Redis hits
    app.perform(&app.app, call, &dims[..1]).await; // 1 more
    let expected: (f64, f64) = sqlx::query_as(
        "SELECT sum(cost_usd), sum(cost_without_caching_usd) FROM analysis_runs WHERE source = 'llm'",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    let stats = performance::cache_statistics(&app.app.pg, 30)
        .await
        .unwrap();
    let rows: Vec<(String, i64, f64)> = stats
        .iter()
        .map(|s| (s.source.clone(), s.runs, s.share))
        .collect();
    assert_eq!(rows, [("llm".into(), 2, 0.4), ("redis".into(), 3, 0.6)]);
    assert!((stats[0].cost_usd - expected.0).abs() < 1e-12 && stats[0].cost_usd > 0.0);
    assert_eq!(stats[1].cost_usd, 0.0);
    assert!(
        stats[1].cost_without_caching_usd > 0.0,
        "hits count what they saved"
    );
    let (job, runs): (Uuid, i64) = sqlx::query_as(
        "SELECT job_id, count(*) FROM analysis_runs WHERE job_id IS NOT NULL
         GROUP BY job_id ORDER BY min(created_at) LIMIT 1",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    let job_runs = performance::job_runs(&app.app.pg, job).await.unwrap();
    assert_eq!(job_runs.len() as i64, runs);
    assert_eq!(
        job_runs
            .iter()
            .map(|r| r.source.as_str())
            .collect::<Vec<_>>(),
        ["llm", "llm"],
        "the first job paid for both dimensions"
    );
    let usage: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM get_index_usage_stats() WHERE index_name = 'coaching_cache_pkey'",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(usage, 1);
}

#[tokio::test]
async fn call_search_filters_and_pages_by_keyset() {
    use performance::{CallSearch, search_calls};
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let mut call = sample_call(&format!("search-{n}"));
        call["scheduled_at"] = serde_json::json!(format!("2026-10-0{}T10:00:00Z", n + 1));
        call["product"] = serde_json::json!(if n % 2 == 0 {
            "Lumen Analytics"
        } else {
            "Lumen Pipelines"
        });
        if n == 4 {
            call["rep_email"] = serde_json::json!("zed@lumen.example");
        }
        ids.push(app.ingest(&call).await);
    }
    let page = |after, limit| CallSearch {
        after,
        limit,
        ..CallSearch::default()
    };
    let first = search_calls(&app.app.pg, &page(None, 2)).await.unwrap();
    assert_eq!(
        first.iter().map(|c| c.id).collect::<Vec<_>>(),
        [ids[4], ids[3]]
    );
    let last = first.last().unwrap();
    let second = search_calls(&app.app.pg, &page(Some((last.scheduled_at, last.id)), 2))
        .await
        .unwrap();
    assert_eq!(
        second.iter().map(|c| c.id).collect::<Vec<_>>(),
        [ids[2], ids[1]]
    );
    let analytics = CallSearch {
        product: Some("Lumen Analytics".into()),
        limit: 10,
        ..CallSearch::default()
    };
    let found = search_calls(&app.app.pg, &analytics).await.unwrap();
    assert_eq!(
        found.iter().map(|c| c.id).collect::<Vec<_>>(),
        [ids[4], ids[2], ids[0]]
    );
    let ana = rep_of(&app, ids[0]).await;
    let mixed = CallSearch {
        rep_id: Some(ana),
        product: Some("Lumen Analytics".into()),
        from: Some("2026-10-02T00:00:00Z".parse().unwrap()),
        limit: 10,
        ..CallSearch::default()
    };
    let found = search_calls(&app.app.pg, &mixed).await.unwrap();
    assert_eq!(found.iter().map(|c| c.id).collect::<Vec<_>>(), [ids[2]]);
}

#[tokio::test]
async fn call_details_hold_the_call_its_rep_and_the_latest_coaching_per_dimension() {
    let app = spawn_app().await;
    let call = app.ingest(&sample_call("details")).await;
    session(&app, call, "discovery", 40, 3).await;
    session(&app, call, "discovery", 75, 1).await;
    session(&app, call, "engagement", 66, 2).await;
    let details = performance::call_details(&app.app.pg, call)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(details["call"]["id"], call.to_string());
    assert_eq!(details["rep"]["name"], "Ana Rep");
    assert_eq!(details["speakers"].as_array().unwrap().len(), 2);
    assert_eq!(
        details["transcript"]["utterances"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    let coaching: Vec<(String, i64)> = details["coaching"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["dimension"].as_str().unwrap().to_string(),
                c["score"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        coaching,
        [("discovery".into(), 75), ("engagement".into(), 66)],
        "the newest session of each dimension"
    );
    assert_eq!(
        performance::call_details(&app.app.pg, Uuid::now_v7())
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn table_upkeep_analyzes_changed_tables_and_vacuums_dead_rows() {
    let app = spawn_app().await;
    let mut conn = app.app.pg.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO coaching_cache (cache_key, dimension, transcript_hash, role, rubric_version,
             fingerprint, result, model)
         SELECT 'k' || n, 'discovery', 'h', 'ae', '1', 'f', '{}'::jsonb, 'm'
         FROM generate_series(1, 400) n",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("DELETE FROM coaching_cache WHERE cache_key LIKE 'k%'")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let mut report = serde_json::Value::Null;
    for _ in 0..20 {
        report = performance::maintain_tables(&app.app.pg).await.unwrap();
        if !report["vacuumed"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let has = |list: &str| {
        report[list]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "coaching_cache")
    };
    assert!(has("vacuumed"), "{report}");
    let dead: i64 = sqlx::query_scalar(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'coaching_cache'",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert!(dead < 100, "vacuumed: {dead} dead rows left");
    assert!(report["partitions"].is_object(), "{report}");
}

#[tokio::test]
async fn db_optimize_verify_only_fails_after_an_index_is_dropped_and_optimize_repairs_it() {
    use crate::cli::{callcoach, stderr};
    let app = spawn_app().await;
    let env = [
        ("DATABASE_URL", app.env["DATABASE_URL"].as_str()),
        ("REDIS_URL", app.env["REDIS_URL"].as_str()),
    ];
    let out = callcoach(&env, &["db", "optimize", "--verify-only"]);
    assert!(out.status.success(), "{}", stderr(&out));
    sqlx::query("DROP INDEX calls_product_scheduled_idx")
        .execute(&app.app.pg)
        .await
        .unwrap();
    let out = callcoach(&env, &["db", "optimize", "--verify-only"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = table
        .lines()
        .find(|l| l.starts_with("calls_product_scheduled_idx"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("missing"), "{line}");
    assert!(
        stderr(&out).contains("missing or invalid"),
        "{}",
        stderr(&out)
    );
    let out = callcoach(&env, &["db", "optimize"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = callcoach(&env, &["db", "optimize", "--verify-only"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The cutoff recorded for a hot index, and the predicate of the index itself.
async fn hot_index(app: &TestApp, name: &str) -> (chrono::DateTime<chrono::Utc>, String, bool) {
    sqlx::query_as(
        "SELECT h.cutoff, pg_get_expr(i.indpred, i.indrelid), i.indisvalid
         FROM hot_indexes h JOIN pg_class c ON c.relname = h.index_name
         JOIN pg_index i ON i.indexrelid = c.oid WHERE h.index_name = $1",
    )
    .bind(name)
    .fetch_one(&app.app.pg)
    .await
    .unwrap()
}

#[tokio::test]
async fn table_upkeep_rolls_a_hot_index_whose_cutoff_fell_behind() {
    let app = spawn_app().await;
    let (cutoff, predicate, valid) = hot_index(&app, "calls_recent_idx").await;
    let window_start = chrono::Utc::now() - chrono::Duration::days(45);
    assert!(
        valid && (cutoff - window_start).num_days().abs() <= 1,
        "{cutoff}"
    );
    assert!(!predicate.contains("now()"), "{predicate}");
    // Not due yet: nothing is rebuilt.
    let report = performance::maintain_tables(&app.app.pg).await.unwrap();
    assert_eq!(report["hot_indexes_rolled"], serde_json::json!([]));

    // Built 60 days ago: 15 days behind its 45-day window, over the 7 days of slack.
    let old: chrono::DateTime<chrono::Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
    let stale = format!(
        "DROP INDEX calls_recent_idx;
         CREATE INDEX calls_recent_idx ON calls (scheduled_at DESC, id DESC)
             INCLUDE (title, product, call_type, rep_id, tags) WHERE scheduled_at >= '{old}';
         UPDATE hot_indexes SET cutoff = '{old}' WHERE index_name = 'calls_recent_idx'"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(stale))
        .execute(&app.app.pg)
        .await
        .unwrap();
    let report = performance::maintain_tables(&app.app.pg).await.unwrap();
    assert_eq!(
        report["hot_indexes_due"],
        serde_json::json!(["calls_recent_idx"])
    );
    let rolled = &report["hot_indexes_rolled"][0];
    assert_eq!(rolled["index"], "calls_recent_idx");
    let (cutoff, predicate, valid) = hot_index(&app, "calls_recent_idx").await;
    assert!(valid);
    assert!((cutoff - window_start).num_days().abs() <= 1, "{cutoff}");
    assert!(!predicate.contains("2026-01-01"), "rebuilt: {predicate}");
    let next: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('calls_recent_idx_next')::text")
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(next, None, "the temporary index was renamed");
    let verify = performance::verify(&app.app.pg).await.unwrap();
    assert!(verify.iter().all(|o| o.ok()), "{verify:?}");
}

#[tokio::test]
async fn table_upkeep_deletes_what_outlived_its_retention_and_keeps_the_rest() {
    let app = spawn_app().await;
    let call = app.ingest(&sample_call("retention")).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO analysis_runs (id, call_id, dimension, rubric_version, cache_key, source, created_at)
         VALUES (gen_random_uuid(), '{call}', 'discovery', '1', 'old', 'llm', now() - interval '401 days'),
                (gen_random_uuid(), '{call}', 'discovery', '1', 'new', 'llm', now() - interval '399 days');
         INSERT INTO cache_counters (day, name, value)
         VALUES (current_date - 401, 'hits', 1), (current_date - 10, 'hits', 2);
         INSERT INTO cache_leases (cache_key, owner, expires_at)
         VALUES ('gone', gen_random_uuid(), now() - interval '2 hours'),
                ('held', gen_random_uuid(), now() + interval '1 minute')"
    )))
    .execute(&app.app.pg)
    .await
    .unwrap();
    let report = performance::maintain_tables(&app.app.pg).await.unwrap();
    assert_eq!(
        report["deleted"],
        serde_json::json!({"analysis_runs": 1, "cache_counters": 1, "cache_leases": 1, "idempotency_keys": 0})
    );
    let left: (String, i64, String) = sqlx::query_as(
        "SELECT (SELECT string_agg(cache_key, ',') FROM analysis_runs),
                (SELECT sum(value)::bigint FROM cache_counters),
                (SELECT string_agg(cache_key, ',') FROM cache_leases)",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert_eq!(left, ("new".into(), 2, "held".into()));
}

#[tokio::test]
async fn calls_are_found_by_tags_metadata_and_participant() {
    use performance::{CallSearch, search_calls};
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for (n, tags, stage) in [
        (0, vec!["Renewal", "enterprise"], "renewal"),
        (1, vec!["enterprise", "enterprise"], "negotiation"),
        (2, vec![], "renewal"),
    ] {
        let mut call = sample_call(&format!("attr-{n}"));
        call["scheduled_at"] = serde_json::json!(format!("2026-09-0{}T10:00:00Z", n + 1));
        call["tags"] = serde_json::json!(tags);
        call["metadata"] = serde_json::json!({"stage": stage, "region": "emea"});
        if n == 2 {
            call["speakers"][1]["email"] = serde_json::json!("Dee@Other.example");
        }
        ids.push(app.ingest(&call).await);
    }
    let found = |s: CallSearch| {
        let pg = app.app.pg.clone();
        async move {
            let hits = search_calls(&pg, &CallSearch { limit: 10, ..s })
                .await
                .unwrap();
            hits.into_iter().map(|c| c.id).collect::<Vec<_>>()
        }
    };
    let stored: Vec<String> = sqlx::query_scalar("SELECT unnest(tags) FROM calls WHERE id = $1")
        .bind(ids[1])
        .fetch_all(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(stored, ["enterprise"], "deduplicated");
    let tags = |t: &[&str]| Some(t.iter().map(|t| t.to_string()).collect());
    assert_eq!(
        found(CallSearch {
            tags: tags(&["ENTERPRISE"]),
            ..Default::default()
        })
        .await,
        [ids[1], ids[0]]
    );
    assert_eq!(
        found(CallSearch {
            tags: tags(&["enterprise", "renewal"]),
            ..Default::default()
        })
        .await,
        [ids[0]]
    );
    let stage = |s: &str| Some(serde_json::json!({"stage": s}));
    assert_eq!(
        found(CallSearch {
            metadata: stage("renewal"),
            ..Default::default()
        })
        .await,
        [ids[2], ids[0]]
    );
    assert_eq!(
        found(CallSearch {
            metadata: stage("renewal"),
            tags: tags(&["enterprise"]),
            ..Default::default()
        })
        .await,
        [ids[0]]
    );
    let participant = |e: &str| Some(e.to_string());
    assert_eq!(
        found(CallSearch {
            participant: participant("dee@other.EXAMPLE"),
            ..Default::default()
        })
        .await,
        [ids[2]]
    );
    assert_eq!(
        found(CallSearch {
            participant: participant("cal@customer.example"),
            ..Default::default()
        })
        .await,
        [ids[1], ids[0]]
    );
}

#[tokio::test]
async fn ingest_rejects_bad_tags_and_metadata_by_name() {
    let app = spawn_app().await;
    let cases = [
        ("tags", serde_json::json!(vec!["x"; 21]), "tags: at most 20"),
        ("tags", serde_json::json!(["ok", " "]), "tags[1]"),
        (
            "metadata",
            serde_json::json!(["not", "an", "object"]),
            "metadata",
        ),
        (
            "metadata",
            serde_json::json!({"blob": "x".repeat(17 * 1024)}),
            "metadata exceeds",
        ),
    ];
    for (field, value, message) in cases {
        let mut call = sample_call("bad-attributes");
        call[field] = value;
        let (status, body) = app.post("/v1/calls", &call).await;
        assert!((400..500).contains(&status), "{field}: {status} {body}");
        assert!(body.to_string().contains(message), "{field}: {body}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM calls")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn rep_reads_page_history_list_opportunities_and_trends() {
    let app = spawn_app().await;
    let call = app.ingest(&sample_call("rep-reads")).await;
    let rep = rep_of(&app, call).await;
    for (dim, score, days) in [
        ("discovery", 50, 1),
        ("discovery", 70, 2),
        ("engagement", 40, 3),
        ("discovery", 90, 20),
        ("discovery", 55, 400),
    ] {
        session(&app, call, dim, score, days).await;
    }
    let pg = &app.app.pg;
    let first = performance::rep_sessions(pg, rep, None, 2).await.unwrap();
    assert_eq!(first.iter().map(|s| s.score).collect::<Vec<_>>(), [50, 70]);
    let last = first.last().map(|s| (s.created_at, s.id));
    let rest = performance::rep_sessions(pg, rep, last, 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|s| s.score).collect::<Vec<_>>(),
        [40, 90, 55]
    );

    let low = performance::coaching_opportunities(pg, rep, 10)
        .await
        .unwrap();
    assert_eq!(
        low.iter().map(|s| s.score).collect::<Vec<_>>(),
        [50, 40, 55],
        "below 60, newest first"
    );

    let weeks = performance::score_trends(pg, "discovery", 30, Some(rep))
        .await
        .unwrap();
    let sessions: i64 = weeks.iter().map(|w| w.sessions).sum();
    assert_eq!(sessions, 3, "the 400-day-old session is outside 30 days");
    let all = performance::score_trends(pg, "discovery", 30, None)
        .await
        .unwrap();
    assert_eq!(all, weeks, "one rep: the same weeks");
    let mean = weeks
        .iter()
        .map(|w| w.avg_score * w.sessions as f64)
        .sum::<f64>()
        / 3.0;
    assert!((mean - 70.0).abs() < 0.01, "(50 + 70 + 90) / 3, got {mean}");

    performance::refresh_rep_performance(pg).await.unwrap();
    let board = performance::leaderboard(pg, 5).await.unwrap();
    assert_eq!(board.len(), 1);
    assert_eq!(
        board[0].avg_score,
        Some(61.0),
        "(50 + 70 + 40 + 90 + 55) / 5"
    );
    assert_eq!(
        performance::rep_performance(pg, rep)
            .await
            .unwrap()
            .as_ref(),
        board.first()
    );

    let filter = |team: Option<&str>, prefix: Option<&str>| performance::RepFilter {
        team: team.map(str::to_string),
        role: None,
        name_prefix: prefix.map(str::to_string),
    };
    let names =
        |reps: Vec<performance::RepItem>| reps.into_iter().map(|r| r.name).collect::<Vec<_>>();
    assert_eq!(
        names(
            performance::list_reps(pg, &filter(None, Some("AN")), 10)
                .await
                .unwrap()
        ),
        ["Ana Rep"]
    );
    assert_eq!(
        names(
            performance::list_reps(pg, &filter(None, Some("an_")), 10)
                .await
                .unwrap()
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        names(
            performance::list_reps(pg, &filter(Some("Nowhere"), None), 10)
                .await
                .unwrap()
        ),
        Vec::<String>::new()
    );
}
