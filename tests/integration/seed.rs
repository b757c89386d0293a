//! `callcoach db seed`: exact counts, consistent rows (reps, transcripts and hashes, sessions
//! and cache keys), realistic spread (roles, 18 months, scores), determinism per seed, and the
//! CLI's handling of bad arguments.

use crate::{
    cli::{callcoach, stderr},
    helpers::{TestApp, spawn_app},
};
use callcoach::{
    jobs::analyze_call,
    model::{Dimension, Utterance, normalized_transcript, sha256_hex},
    seed::{self, KeyStyle, SeedOptions, SeedReport},
};
use std::collections::BTreeMap;

async fn seeded(calls: u64, sessions: u64, reps: u32, seed_value: u64) -> (TestApp, SeedReport) {
    let app = spawn_app().await;
    let mut options = SeedOptions::new(calls, sessions, reps, seed_value);
    options.keys = Some(
        KeyStyle::for_settings(&app.app.pg, &app.app.settings)
            .await
            .unwrap(),
    );
    let report = seed::seed(&app.app.pg, &options, false).await.unwrap();
    (app, report)
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&app.app.pg)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Sessions per dimension and the sum of their scores: what two runs of one seed must share.
async fn fingerprint_of(app: &TestApp) -> BTreeMap<String, (i64, i64)> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT dimension, count(*), sum(score)::bigint FROM coaching_sessions GROUP BY dimension",
    )
    .fetch_all(&app.app.pg)
    .await
    .unwrap();
    rows.into_iter().map(|(d, n, s)| (d, (n, s))).collect()
}

#[tokio::test]
async fn a_small_seed_is_exact_consistent_and_realistic() {
    let (app, report) = seeded(200, 2000, 12, 7).await;
    assert_eq!(
        (report.calls, report.sessions, report.reps),
        (200, 2000, 12)
    );
    assert_eq!(report.cache_entries, 2000);
    assert_eq!(count(&app, "SELECT count(*) FROM calls").await, 200);
    assert_eq!(count(&app, "SELECT count(*) FROM transcripts").await, 200);
    assert_eq!(count(&app, "SELECT count(*) FROM reps").await, 12);
    assert_eq!(
        count(&app, "SELECT count(*) FROM coaching_sessions").await,
        2000
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM coaching_cache").await,
        2000
    );

    // Every call has its rep (as the internal speaker too), 1-3 external speakers and a
    // transcript of a few KB.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM calls c JOIN reps r ON r.id = c.rep_id
             WHERE r.email = c.rep_email AND r.role = c.rep_role
               AND EXISTS (SELECT 1 FROM speakers s WHERE s.call_id = c.id
                           AND s.company_side = 'internal' AND s.email = c.rep_email)
               AND (SELECT count(*) FROM speakers s WHERE s.call_id = c.id
                    AND s.company_side = 'external') BETWEEN 1 AND 3"
        )
        .await,
        200
    );
    let transcripts: Vec<(String, String, sqlx::types::Json<Vec<Utterance>>)> =
        sqlx::query_as("SELECT transcript_hash, full_text, utterances FROM transcripts")
            .fetch_all(&app.app.pg)
            .await
            .unwrap();
    for (hash, text, utterances) in &transcripts {
        assert_eq!(
            *hash,
            sha256_hex(text),
            "the hash is the text's, as at ingest"
        );
        assert_eq!(
            *text,
            normalized_transcript(utterances),
            "text is the normalized utterances"
        );
        assert!(
            (1_500..40_000).contains(&text.len()),
            "{} bytes",
            text.len()
        );
    }
    let distinct_hashes = count(
        &app,
        "SELECT count(DISTINCT transcript_hash) FROM transcripts",
    )
    .await;
    assert_eq!(distinct_hashes, 200);

    // Sessions: of existing calls and their reps, after the call, scores in range and spread.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM coaching_sessions s
             JOIN calls c ON c.id = s.call_id
             JOIN reps r ON r.id = s.rep_id
             WHERE s.rep_id = c.rep_id AND s.rep_email = c.rep_email
               AND s.created_at > c.scheduled_at AND s.score BETWEEN 0 AND 100"
        )
        .await,
        2000
    );
    assert!(count(&app, "SELECT count(DISTINCT score) FROM coaching_sessions").await > 20);
    let mean: f64 = sqlx::query_scalar("SELECT avg(score)::float8 FROM coaching_sessions")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert!((55.0..75.0).contains(&mean), "mean score {mean}");
    assert_eq!(
        count(
            &app,
            "SELECT count(DISTINCT dimension) FROM coaching_sessions"
        )
        .await,
        4
    );
    assert!(
        count(
            &app,
            "SELECT count(DISTINCT rubric_version) FROM coaching_sessions"
        )
        .await
            >= 3
    );
    // One session per call, dimension and rubric version, as the analysis path stores them.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM (SELECT DISTINCT call_id, dimension, rubric_version
                                   FROM coaching_sessions) d"
        )
        .await,
        2000
    );

    // Calls over more than 12 months, all three roles.
    let span_days: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(scheduled_at) - min(scheduled_at))::float8 / 86400
         FROM calls",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    assert!(span_days > 365.0, "calls span {span_days} days");
    assert_eq!(
        count(&app, "SELECT count(DISTINCT rep_role) FROM calls").await,
        3
    );
    assert!(count(&app, "SELECT count(DISTINCT team) FROM reps").await >= 3);
    assert!(count(&app, "SELECT count(DISTINCT product) FROM calls").await >= 2);
    assert!(count(&app, "SELECT count(DISTINCT call_type) FROM calls").await >= 5);

    // The cache: one row per session key, pointing at its session with the same result, and
    // keys in the analysis path's format: its lookup for a seeded call finds the seeded row.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM coaching_cache k
             JOIN coaching_sessions s ON s.id = k.session_id AND s.cache_key = k.cache_key
             JOIN transcripts t ON t.call_id = s.call_id AND t.transcript_hash = k.transcript_hash
             WHERE k.result = s.result AND k.dimension = s.dimension
               AND k.rubric_version = s.rubric_version"
        )
        .await,
        2000
    );
    let (call_id, dimension, key): (uuid::Uuid, String, String) = sqlx::query_as(
        "SELECT s.call_id, s.dimension, s.cache_key FROM coaching_sessions s
         JOIN calls c ON c.id = s.call_id
         JOIN coaching_rubrics r ON r.role = c.rep_role AND r.dimension = s.dimension
              AND r.version = s.rubric_version AND r.active
         LIMIT 1",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    let dimension: Dimension = dimension.parse().unwrap();
    let expected = analyze_call::cache_key_for(&app.app.jobs, call_id, dimension)
        .await
        .unwrap();
    assert_eq!(key, expected.to_string());
    let parsed: callcoach::llm::CoachingResult = serde_json::from_value(
        sqlx::query_scalar("SELECT result FROM coaching_cache WHERE cache_key = $1")
            .bind(&key)
            .fetch_one(&app.app.pg)
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(!parsed.strengths.is_empty() && !parsed.improvements.is_empty());
    assert!(!parsed.examples.is_empty() && !parsed.summary.is_empty());

    // The same seed again on this database is refused, and nothing is added.
    let again = seed::seed(&app.app.pg, &SeedOptions::new(200, 2000, 12, 7), false)
        .await
        .unwrap_err();
    assert!(format!("{again:#}").contains("already"), "{again:#}");
    assert_eq!(count(&app, "SELECT count(*) FROM calls").await, 200);
}

#[tokio::test]
async fn one_seed_gives_the_same_data_and_another_seed_different_data() {
    let (a, _) = seeded(60, 500, 6, 11).await;
    let (b, _) = seeded(60, 500, 6, 11).await;
    let (c, _) = seeded(60, 500, 6, 12).await;
    let fa = fingerprint_of(&a).await;
    assert_eq!(fa, fingerprint_of(&b).await);
    assert_ne!(fa, fingerprint_of(&c).await);
    let texts = |app: &TestApp| {
        let pg = app.app.pg.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT t.transcript_hash FROM transcripts t JOIN calls c ON c.id = t.call_id
                 ORDER BY c.external_id",
            )
            .fetch_all(&pg)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        texts(&a).await,
        texts(&b).await,
        "same transcripts, call by call"
    );
}

#[tokio::test]
async fn reps_only_and_calls_without_sessions_are_valid_seeds() {
    let (app, report) = seeded(0, 0, 5, 1).await;
    assert_eq!((report.reps, report.calls), (5, 0));
    assert_eq!(count(&app, "SELECT count(*) FROM reps").await, 5);
    let (app, report) = seeded(25, 0, 3, 1).await;
    assert_eq!((report.calls, report.sessions), (25, 0));
    assert_eq!(
        count(&app, "SELECT count(*) FROM coaching_sessions").await,
        0
    );
}

#[test]
fn bad_seed_arguments_fail_with_a_message() {
    for (args, needle, code) in [
        (
            vec!["db", "seed", "--calls", "10", "--reps", "0"],
            "--reps",
            1,
        ),
        (
            vec!["db", "seed", "--calls", "0", "--sessions", "5"],
            "--calls",
            1,
        ),
        (
            vec![
                "db",
                "seed",
                "--calls",
                "0",
                "--sessions",
                "0",
                "--reps",
                "0",
            ],
            "nothing to seed",
            1,
        ),
        (
            vec!["db", "seed", "--calls", "1", "--sessions", "1000"],
            "--sessions",
            1,
        ),
        (vec!["db", "seed", "--calls", "many"], "--calls", 2),
        (vec!["db", "seed", "--reps=-3"], "--reps", 2),
        (vec!["db", "sow"], "error", 2),
    ] {
        // No configuration at all: argument errors come first.
        let out = callcoach(&[], &args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn the_cli_seeds_and_prints_a_json_report() {
    let app = spawn_app().await;
    let env = [
        ("DATABASE_URL", app.env["DATABASE_URL"].as_str()),
        ("REDIS_URL", app.env["REDIS_URL"].as_str()),
    ];
    let args = [
        "db",
        "seed",
        "--calls",
        "30",
        "--sessions",
        "200",
        "--reps",
        "4",
        "--quiet",
    ];
    let out = callcoach(&env, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["calls"], 30);
    assert_eq!(report["sessions"], 200);
    assert_eq!(report["reps"], 4);
    assert_eq!(
        count(&app, "SELECT count(*) FROM coaching_sessions").await,
        200
    );
}
