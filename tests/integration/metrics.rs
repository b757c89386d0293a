//! `/metrics` output and the Prometheus alert rules checked by `promtool` (Debian's
//! `prometheus` package). `deploy/dev.sh test` installs it and exports `CALLCOACH_PROMTOOL`;
//! without that variable `promtool` is taken from `PATH`. A missing promtool fails the tests.

use crate::helpers::{sample_call, spawn_app};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// The promtool to run: `CALLCOACH_PROMTOOL`, else `promtool` on `PATH`.
fn promtool() -> PathBuf {
    std::env::var_os("CALLCOACH_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("promtool"))
}

/// Runs promtool with `args` (and `stdin`, if any) in `dir`; panics with its output unless
/// it succeeds.
async fn run_promtool(dir: &Path, args: &[&str], stdin: Option<&str>) {
    let mut child = tokio::process::Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {:?} ({e}): run the suite with `deploy/dev.sh test`, which installs it",
                promtool()
            )
        });
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .await
        .unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool check metrics` on an exposition text.
async fn check_metrics(text: &str) {
    run_promtool(Path::new("."), &["check", "metrics"], Some(text)).await;
}

#[tokio::test]
async fn web_and_worker_metrics_pass_promtool_after_traffic() {
    let mut app = spawn_app().await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("metrics")).await;
    let job = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(job, 30).await["status"], "succeeded");

    let web = app.scrape_metrics().await;
    for name in [
        "callcoach_job_duration_seconds_bucket{",
        "callcoach_job_queue_wait_seconds_bucket{",
        "callcoach_jobs_finished_total{",
        "callcoach_queue_depth{lane=\"interactive\"}",
        "callcoach_llm_tokens_total{",
    ] {
        assert!(web.contains(name), "{name} missing from:\n{web}");
    }
    check_metrics(&web).await;

    // The worker's own listener (METRICS_ADDR) serves the same recorder without a key.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(callcoach::telemetry::serve_metrics(
        listener,
        app.app.metrics.clone(),
        shutdown.clone(),
    ));
    let worker = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(worker.status(), 200);
    let worker = worker.text().await.unwrap();
    assert!(
        worker.contains("callcoach_job_duration_seconds_bucket{"),
        "{worker}"
    );
    check_metrics(&worker).await;
    shutdown.cancel();
    served.await.unwrap().unwrap();
}

#[tokio::test]
async fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    run_promtool(&dir, &["check", "rules", "alerts.yml"], None).await;
    run_promtool(&dir, &["test", "rules", "alerts_test.yml"], None).await;
}
