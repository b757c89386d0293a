//! Query plans on seeded data: every optimized read uses the index (or view) its comment in
//! `sql/performance/` names, and none scans calls or a non-empty coaching_sessions partition
//! sequentially.
//!
//! Statements the Rust code sends with bound parameters are explained as generic plans (what
//! a long-lived pooled connection ends up with); the statements the plpgsql functions run
//! with EXECUTE … USING are planned for their values, so they are explained as custom plans.

use crate::helpers::spawn_app;
use callcoach::{
    ledger::{self, JobState},
    performance, seed,
};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

/// One statement to explain.
struct Case {
    /// What is checked (shown on failure).
    name: &'static str,
    /// The statement, with `$n` parameters.
    statement: String,
    /// Parameter types, for PREPARE.
    types: &'static str,
    /// Parameter values as SQL literals.
    args: String,
    /// Planned for its values (plpgsql EXECUTE) rather than generically.
    custom: bool,
    /// The index (the partitioned parent for partition indexes) the plan must use, or the
    /// relation it must read (a materialized view).
    index: &'static str,
}

/// Every scan of the plan: (node type, relation, index).
fn scans(plan: &Value, out: &mut Vec<(String, String, String)>) {
    let text = |k: &str| plan[k].as_str().unwrap_or_default().to_string();
    if text("Node Type").contains("Scan") {
        out.push((text("Node Type"), text("Relation Name"), text("Index Name")));
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        scans(child, out);
    }
}

async fn explain(conn: &mut PgConnection, case: &Case) -> Value {
    let mode = if case.custom {
        "force_custom_plan"
    } else {
        "force_generic_plan"
    };
    let setup = format!(
        "SET plan_cache_mode = {mode}; PREPARE q({}) AS {}",
        case.types, case.statement
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(setup))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let explain = format!("EXPLAIN (FORMAT JSON) EXECUTE q({})", case.args);
    let plan: sqlx::types::Json<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    sqlx::raw_sql("DEALLOCATE q")
        .execute(&mut *conn)
        .await
        .unwrap();
    plan.0[0]["Plan"].clone()
}

/// The top-level index an index belongs to (itself unless it is a partition's index).
async fn root_index(pg: &PgPool, index: &str) -> String {
    sqlx::query_scalar(
        "SELECT coalesce(pg_partition_root(c.oid), c.oid)::regclass::text
         FROM pg_class c WHERE c.relname = $1",
    )
    .bind(index)
    .fetch_one(pg)
    .await
    .unwrap()
}

/// Whether a table holds rows (an empty partition is scanned sequentially, at no cost).
async fn has_rows(pg: &PgPool, relation: &str) -> bool {
    sqlx::query_scalar("SELECT relpages > 0 FROM pg_class WHERE relname = $1")
        .bind(relation)
        .fetch_one(pg)
        .await
        .unwrap()
}

async fn check(pg: &PgPool, conn: &mut PgConnection, case: &Case) {
    let plan = explain(conn, case).await;
    let mut found = Vec::new();
    scans(&plan, &mut found);
    let mut used = Vec::new();
    for (node, relation, index) in &found {
        let big = relation == "calls" || relation.starts_with("coaching_sessions");
        if node == "Seq Scan" && big && has_rows(pg, relation).await {
            panic!("{}: sequential scan of {relation}\n{plan:#}", case.name);
        }
        if !index.is_empty() {
            used.push(root_index(pg, index).await);
        }
        used.push(relation.clone());
    }
    assert!(
        used.iter().any(|i| i == case.index),
        "{}: expected {} among the indexes used, got {used:?}\n{plan:#}",
        case.name,
        case.index
    );
}

fn quoted(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

async fn one(pg: &PgPool, sql: &str) -> String {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT ({sql})::text")))
        .fetch_one(pg)
        .await
        .unwrap()
}

/// The statement search_calls_optimized runs for a filter mix (NULL = filter absent).
async fn search_statement(pg: &PgPool, mix: &str, recent: bool) -> String {
    one(pg, &format!("search_calls_query({mix}, {recent})")).await
}

/// The statement performance::list_reps sends for a filter mix.
fn reps_sql(team: Option<&str>, prefix: Option<&str>) -> String {
    let filter = performance::RepFilter {
        team: team.map(str::to_string),
        role: None,
        name_prefix: prefix.map(str::to_string),
    };
    performance::list_reps_query(&filter, 50)
        .sql()
        .as_str()
        .to_string()
}

/// The statement ledger::jobs sends for a filter mix.
fn jobs_sql(state: Option<JobState>, kind: Option<&str>, call_id: Option<uuid::Uuid>) -> String {
    let filter = ledger::JobFilter {
        state,
        kind: kind.map(str::to_string),
        call_id,
    };
    ledger::jobs_query(&filter, 20).sql().as_str().to_string()
}

const SEARCH_TYPES: &str = "uuid, text, text, timestamptz, timestamptz, text[], jsonb, text, timestamptz, uuid, int, timestamptz";

#[tokio::test]
async fn every_optimized_query_uses_its_index_on_seeded_data() {
    let app = spawn_app().await;
    let pg = &app.app.pg;
    let options = seed::SeedOptions::new(4_000, 32_000, 600, 11);
    seed::seed(pg, &options, false).await.unwrap();
    // Runs over 200 days, for the cache statistics; jobs for the ledger's lists.
    sqlx::raw_sql(
        "INSERT INTO analysis_runs (id, call_id, dimension, rubric_version, cache_key, source,
                                    job_id, created_at)
         SELECT gen_random_uuid(), c.id, 'discovery', '1', 'k' || g, (ARRAY['llm','redis','postgres'])[1 + g % 3],
                CASE WHEN g % 4 = 0 THEN gen_random_uuid() END, now() - make_interval(mins => g * 5)
         FROM generate_series(1, 60000) g, LATERAL (SELECT id FROM calls LIMIT 1) c;
         INSERT INTO jobs (id, kind, lane, payload, status, max_attempts, enqueued_at, finished_at, delivered_at)
         SELECT gen_random_uuid(), CASE WHEN g % 100 = 0 THEN 'maintain_tables' ELSE 'analyze_call' END,
                'background', jsonb_build_object('call_id', gen_random_uuid()),
                CASE WHEN g % 50 = 0 THEN 'queued' ELSE 'succeeded' END, 3,
                now() - make_interval(secs => g),
                CASE WHEN g % 50 = 0 THEN NULL ELSE now() END,
                CASE WHEN g % 50 = 0 THEN NULL ELSE now() END
         FROM generate_series(1, 30000) g",
    )
    .execute(pg)
    .await
    .unwrap();
    sqlx::raw_sql("VACUUM ANALYZE").execute(pg).await.unwrap();
    performance::refresh_rep_performance(pg).await.unwrap();
    sqlx::raw_sql("VACUUM ANALYZE mv_rep_performance")
        .execute(pg)
        .await
        .unwrap();

    let rep = quoted(
        &one(
            pg,
            "SELECT rep_id FROM calls GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
        )
        .await,
    );
    let call = quoted(&one(pg, "SELECT call_id FROM coaching_sessions LIMIT 1").await);
    let key = quoted(&one(pg, "SELECT cache_key FROM coaching_cache LIMIT 1").await);
    let contact = quoted(
        &one(
            pg,
            "SELECT email FROM speakers WHERE company_side = 'external' LIMIT 1",
        )
        .await,
    );
    let team = quoted(&one(pg, "SELECT team FROM reps WHERE team IS NOT NULL LIMIT 1").await);
    let job = quoted(
        &one(
            pg,
            "SELECT job_id FROM analysis_runs WHERE job_id IS NOT NULL LIMIT 1",
        )
        .await,
    );
    let calls_cutoff = quoted(
        &one(
            pg,
            "SELECT cutoff FROM hot_indexes WHERE index_name = 'calls_recent_idx'",
        )
        .await,
    );
    let runs_cutoff = quoted(
        &one(
            pg,
            "SELECT cutoff FROM hot_indexes WHERE index_name = 'analysis_runs_recent_idx'",
        )
        .await,
    );
    let search = |name, statement: String, args: String, index| Case {
        name,
        statement,
        types: SEARCH_TYPES,
        args: format!("{args}, NULL, NULL, 50, {calls_cutoff}"),
        custom: true,
        index,
    };
    let generic = |name, statement: &str, types, args: String, index| Case {
        name,
        statement: statement.to_string(),
        types,
        args,
        custom: false,
        index,
    };
    // Statements sent unprepared (planned for their values, like EXECUTE … USING).
    let unprepared = |name, statement: &str, types, args: String, index| Case {
        custom: true,
        ..generic(name, statement, types, args, index)
    };
    let n = "NULL";
    let cases = vec![
        generic(
            "cache lookup",
            "SELECT result FROM get_cached_coaching_session($1)",
            "text",
            key,
            "coaching_cache_pkey",
        ),
        generic(
            "rep summary (live)",
            "SELECT * FROM get_rep_performance_summary($1, $2)",
            "uuid, int",
            format!("{rep}, 90"),
            "coaching_sessions_rep_created_idx",
        ),
        generic(
            "rep summary (view)",
            "SELECT * FROM mv_rep_performance WHERE rep_id = $1",
            "uuid",
            rep.clone(),
            "mv_rep_performance_rep_idx",
        ),
        generic(
            "leaderboard",
            &performance::leaderboard_sql(),
            "bigint",
            "10".into(),
            "mv_rep_performance",
        ),
        generic(
            "rep score trends",
            "SELECT * FROM get_rep_score_trends($1, $2, $3)",
            "uuid, text, int",
            format!("{rep}, 'discovery', 180"),
            "coaching_sessions_rep_dim_created_idx",
        ),
        generic(
            "score trends",
            "SELECT * FROM get_score_trends($1, $2)",
            "text, int",
            "'discovery', 30".into(),
            "coaching_sessions_dim_created_idx",
        ),
        generic(
            "call details: sessions",
            performance::CALL_DETAILS_SQL,
            "uuid",
            call.clone(),
            "coaching_sessions_call_dim_created_idx",
        ),
        generic(
            "call details: call",
            performance::CALL_DETAILS_SQL,
            "uuid",
            call.clone(),
            "calls_pkey",
        ),
        generic(
            "rep sessions",
            performance::REP_SESSIONS_SQL,
            "uuid, timestamptz, uuid, bigint",
            format!("{rep}, 'infinity', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 50"),
            "coaching_sessions_rep_created_idx",
        ),
        generic(
            "coaching opportunities",
            performance::COACHING_OPPORTUNITIES_SQL,
            "uuid, bigint",
            format!("{rep}, 20"),
            "coaching_sessions_needs_work_idx",
        ),
        unprepared(
            "reps of a team",
            &reps_sql(Some("t"), None),
            "text, bigint",
            format!("{team}, 50"),
            "reps_team_name_idx",
        ),
        unprepared(
            "reps by name prefix",
            &reps_sql(None, Some("a")),
            "text, text, bigint",
            "'al', 'am', 50".into(),
            "reps_name_prefix_idx",
        ),
        generic(
            "job runs",
            performance::JOB_RUNS_SQL,
            "uuid",
            job,
            "analysis_runs_job_idx",
        ),
        unprepared(
            "jobs by kind",
            &jobs_sql(None, Some("k"), None),
            "text, bigint",
            "'maintain_tables', 20".into(),
            "jobs_kind_enqueued_idx",
        ),
        unprepared(
            "jobs by state",
            &jobs_sql(Some(JobState::Queued), None, None),
            "text, bigint",
            "'queued', 20".into(),
            "jobs_status_enqueued_idx",
        ),
        unprepared(
            "jobs of a call",
            &jobs_sql(None, None, Some(uuid::Uuid::nil())),
            "text, bigint",
            "'00000000-0000-0000-0000-000000000000', 20".into(),
            "jobs_call_idx",
        ),
        Case {
            name: "cache statistics, 7 days",
            statement: one(pg, "cache_statistics_query(true)").await,
            types: "timestamptz, timestamptz",
            args: format!("now() - interval '7 days', {runs_cutoff}"),
            custom: true,
            index: "analysis_runs_recent_idx",
        },
        Case {
            name: "cache statistics, 90 days",
            statement: one(pg, "cache_statistics_query(false)").await,
            types: "timestamptz",
            args: "now() - interval '90 days'".into(),
            custom: true,
            index: "analysis_runs_created_source_idx",
        },
        search(
            "search by rep",
            search_statement(
                pg,
                &format!("{rep}::uuid, {n}, {n}, {n}, {n}, {n}, {n}, {n}, {n}"),
                false,
            )
            .await,
            format!("{rep}, {n}, {n}, {n}, {n}, {n}, {n}, {n}"),
            "calls_rep_scheduled_idx",
        ),
        search(
            "search by product, type and 90 days",
            search_statement(
                pg,
                &format!("{n}, 'p', 't', now(), now(), {n}, {n}, {n}, {n}"),
                false,
            )
            .await,
            format!(
                "{n}, 'Lumen Analytics', 'discovery', now() - interval '90 days', now(), {n}, {n}, {n}"
            ),
            "calls_product_type_scheduled_idx",
        ),
        search(
            "search by product",
            search_statement(
                pg,
                &format!("{n}, 'p', {n}, {n}, {n}, {n}, {n}, {n}, {n}"),
                false,
            )
            .await,
            format!("{n}, 'Lumen Pipelines', {n}, {n}, {n}, {n}, {n}, {n}"),
            "calls_product_scheduled_idx",
        ),
        search(
            "search by call type",
            search_statement(
                pg,
                &format!("{n}, {n}, 't', {n}, {n}, {n}, {n}, {n}, {n}"),
                false,
            )
            .await,
            format!("{n}, {n}, 'qbr', {n}, {n}, {n}, {n}, {n}"),
            "calls_type_scheduled_idx",
        ),
        search(
            "search by tags",
            search_statement(
                pg,
                &format!("{n}, {n}, {n}, {n}, {n}, '{{t}}', {n}, {n}, {n}"),
                false,
            )
            .await,
            format!("{n}, {n}, {n}, {n}, {n}, '{{churn-risk}}', {n}, {n}"),
            "calls_tags_idx",
        ),
        search(
            "search by metadata",
            search_statement(
                pg,
                &format!("{n}, {n}, {n}, {n}, {n}, {n}, '{{}}', {n}, {n}"),
                false,
            )
            .await,
            format!(
                "{n}, {n}, {n}, {n}, {n}, {n}, '{{\"stage\": \"negotiation\", \"region\": \"apac\"}}', {n}"
            ),
            "calls_metadata_idx",
        ),
        search(
            "search by participant",
            search_statement(
                pg,
                &format!("{n}, {n}, {n}, {n}, {n}, {n}, {n}, 'e', {n}"),
                false,
            )
            .await,
            format!("{n}, {n}, {n}, {n}, {n}, {n}, {n}, {contact}"),
            "speakers_email_idx",
        ),
        search(
            "search of the last 7 days",
            search_statement(
                pg,
                &format!("{n}, {n}, {n}, now(), {n}, {n}, {n}, {n}, {n}"),
                true,
            )
            .await,
            format!("{n}, {n}, {n}, now() - interval '7 days', {n}, {n}, {n}, {n}"),
            "calls_recent_idx",
        ),
        search(
            "search of an old window",
            search_statement(
                pg,
                &format!("{n}, {n}, {n}, now(), now(), {n}, {n}, {n}, {n}"),
                false,
            )
            .await,
            format!(
                "{n}, {n}, {n}, now() - interval '400 days', now() - interval '300 days', {n}, {n}, {n}"
            ),
            "calls_scheduled_id_idx",
        ),
    ];
    let mut conn = pg.acquire().await.unwrap();
    for case in &cases {
        check(pg, &mut conn, case).await;
    }
}
