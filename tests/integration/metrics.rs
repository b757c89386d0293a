//! `/metrics` output and the Prometheus alert rules checked by `promtool` (Debian's
//! `prometheus` package). `deploy/dev.sh test` installs it and exports `CALLCOACH_PROMTOOL`;
//! without that variable `promtool` is taken from `PATH`. A missing promtool fails the tests.

use crate::helpers::{Options, TestApp, sample_call, spawn_app_with};
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

/// The value of the first sample of `name` whose labels contain every one of `labels`.
pub(crate) fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let metric = series.split('{').next().unwrap_or_default();
            metric == name && labels.iter().all(|label| series.contains(label))
        })
        .and_then(|(_, value)| value.parse().ok())
}

/// Scrapes the web front's `/metrics` until the sampled stats gauges show `tokens saved`
/// (the stats sampler has run since the analyses finished).
async fn scrape_after_stats_sample(app: &TestApp) -> String {
    for _ in 0..300 {
        let text = app.scrape_metrics().await;
        if sample(&text, "cache_tokens_saved", &[]).is_some_and(|t| t > 0.0) {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "the stats gauges never showed the analyses:\n{}",
        app.scrape_metrics().await
    );
}

/// `promtool check metrics` on an exposition text.
async fn check_metrics(text: &str) {
    run_promtool(Path::new("."), &["check", "metrics"], Some(text)).await;
}

#[tokio::test]
async fn web_and_worker_metrics_pass_promtool_after_traffic() {
    let mut app = spawn_app_with(Options {
        env: vec![("STATS_SAMPLE_SECS", "1".into())],
        ..Options::default()
    })
    .await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("metrics")).await;
    // The second analysis is answered by Redis.
    for _ in 0..2 {
        let job = app.enqueue(call_id, &["discovery"]).await;
        assert_eq!(app.wait_for_job(job, 30).await["status"], "succeeded");
    }

    let web = scrape_after_stats_sample(&app).await;
    for (name, labels, value) in [
        ("cache_hit_rate", &[r#"source="redis""#][..], 50.0),
        ("cache_hit_rate", &[r#"source="overall""#], 50.0),
        ("cache_hit_rate", &[r#"source="database""#], 0.0),
        ("redis_cache_hit_rate", &[], 50.0),
        ("analysis_success_rate", &[], 100.0),
    ] {
        assert_eq!(
            sample(&web, name, labels),
            Some(value),
            "{name}{labels:?}:\n{web}"
        );
    }
    for name in ["cache_cost_savings_usd", "redis_memory_used_bytes"] {
        assert!(
            sample(&web, name, &[]).is_some_and(|v| v > 0.0),
            "{name}:\n{web}"
        );
    }
    let decisions = "callcoach_http_rate_limit_decisions_total";
    let allowed = sample(
        &web,
        decisions,
        &[r#"class="analysis""#, r#"decision="allowed""#],
    );
    assert!(allowed.is_some_and(|n| n >= 2.0), "{decisions}:\n{web}");
    assert_eq!(sample(&web, "redis_memory_used_mb", &[]), None, "{web}");
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
