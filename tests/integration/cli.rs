//! The `callcoach` binary: bad input gives a clear message and a non-zero exit; the producer
//! and key tools work against a real database.

use crate::helpers::{sample_call, spawn_app};
use std::process::{Command, Output};

pub(crate) fn callcoach(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_callcoach"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run callcoach")
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_configuration_names_the_variable() {
    let out = callcoach(&[("DATABASE_URL", "mysql://x/y")], &["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("DATABASE_URL"), "{}", stderr(&out));
    let out = callcoach(
        &[("DATABASE_URL", "postgres://x/y"), ("CACHE_TTL_DAYS", "0")],
        &["migrate"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("CACHE_TTL_DAYS"), "{}", stderr(&out));
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        vec!["enqueue", "analysis", "--call-id", "nope"],
        vec![
            "enqueue",
            "analysis",
            "--call-id",
            "01a2131b-0c74-71e0-a65e-a23d3eaab713",
            "--dimension",
            "closing",
        ],
        vec!["apikey", "create", "--name", "x", "--scope", "root"],
        vec!["worker", "--concurrency", "0"],
        vec!["worker", "--lanes", "fast"],
        vec!["jobs", "list", "--status", "done"],
        vec!["no-such-command"],
    ] {
        let out = callcoach(&[], &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("error"), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn key_enqueue_and_job_tools_work_on_a_real_database() {
    let app = spawn_app().await;
    let db = app.env["DATABASE_URL"].clone();
    let redis = app.env["REDIS_URL"].clone();
    let env = [("DATABASE_URL", db.as_str()), ("REDIS_URL", redis.as_str())];
    let out = callcoach(
        &env,
        &["apikey", "create", "--name", "ops-bot", "--scope", "ops"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let resp = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth(key["key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the printed key authenticates as ops");
    let call_id = app.ingest(&sample_call("cli")).await.to_string();
    let out = callcoach(
        &env,
        &[
            "enqueue",
            "analysis",
            "--call-id",
            &call_id,
            "--dimension",
            "discovery",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let enqueued: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job_id = enqueued["job_id"].as_str().unwrap();
    let out = callcoach(&env, &["jobs", "show", job_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["kind"], "analyze_call");
    assert_eq!(job["payload"]["dimensions"][0], "discovery");
    assert_eq!(
        job["analysis_runs"],
        serde_json::json!([]),
        "no worker ran it yet"
    );
    let listed = |args: &[&str]| {
        let out = callcoach(&env, &[&["jobs", "list"], args].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).contains(job_id)
    };
    assert!(listed(&["--kind", "analyze_call"]));
    assert!(!listed(&["--kind", "maintain_tables"]));
    assert!(listed(&["--call", &call_id]));
    assert!(!listed(&["--call", &uuid::Uuid::new_v4().to_string()]));
    let out = callcoach(&env, &["jobs", "list", "--kind", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown job kind \"nope\""),
        "{}",
        stderr(&out)
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    let out = callcoach(&env, &["jobs", "show", &unknown]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let out = callcoach(&env, &["enqueue", "analysis", "--call-id", &unknown]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[tokio::test]
async fn failed_jobs_are_replayed_and_queued_jobs_cancelled() {
    let mut app = crate::helpers::spawn_app_with(crate::helpers::Options {
        env: vec![("JOB_MAX_ATTEMPTS", "1".into())],
        ..Default::default()
    })
    .await;
    let db = app.env["DATABASE_URL"].clone();
    let redis = app.env["REDIS_URL"].clone();
    let env = [("DATABASE_URL", db.as_str()), ("REDIS_URL", redis.as_str())];
    // A job cancelled before any worker runs stays cancelled.
    let call_id = app.ingest(&sample_call("cancel")).await;
    let cancelled = app.enqueue(call_id, &["engagement"]).await.to_string();
    let out = callcoach(&env, &["jobs", "cancel", &cancelled]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A job that fails for good lands in the dead-letter list and can be replayed.
    app.emulator.inject_failures(500, 1);
    app.start_worker();
    let failed = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(failed, 30).await["status"], "failed");
    let out = callcoach(&env, &["jobs", "list", "--status", "failed"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&failed.to_string()));
    let out = callcoach(&env, &["jobs", "retry", &failed.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job = app.wait_for_job(failed, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "a fresh budget: {job}");
    // Only failed or cancelled jobs replay; only unstarted jobs cancel.
    let out = callcoach(&env, &["jobs", "retry", &failed.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("succeeded"), "{}", stderr(&out));
    let out = callcoach(&env, &["jobs", "cancel", &failed.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let (_, job) = app.get(&format!("/v1/jobs/{cancelled}")).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(app.session_count(call_id, "engagement").await, 0);
}

#[tokio::test]
async fn any_registered_kind_can_be_enqueued_and_nothing_else() {
    let app = spawn_app().await;
    let env = [
        ("DATABASE_URL", app.env["DATABASE_URL"].as_str()),
        ("REDIS_URL", app.env["REDIS_URL"].as_str()),
    ];
    let kinds = callcoach(&env, &["jobs", "kinds"]);
    let listed = String::from_utf8_lossy(&kinds.stdout).into_owned();
    for kind in callcoach::jobs::registry::names() {
        assert!(listed.contains(kind), "{kind} missing from {listed}");
    }
    let out = callcoach(&env, &["jobs", "enqueue", "send_email"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown job kind"),
        "{}",
        stderr(&out)
    );
    let out = callcoach(
        &env,
        &["jobs", "enqueue", "analyze_call", "--args", r#"{"call":1}"#],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid analyze_call arguments"),
        "{}",
        stderr(&out)
    );
    let out = callcoach(&env, &["jobs", "enqueue", "noop", "--lane", "background"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let enqueued: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id: uuid::Uuid = enqueued["job_id"].as_str().unwrap().parse().unwrap();
    let job = callcoach::ledger::job(&app.app.pg, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.lane, callcoach::delivery::Lane::Background);
}
