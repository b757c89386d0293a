//! The `Procfile` under honcho (`CALLCOACH_HONCHO`, installed into `.dev/sdk-venv` by
//! `deploy/dev.sh test`): its processes run against the test's Redis, Postgres and LLM
//! emulator, an analysis goes through the honcho-run web front and worker, and SIGTERM stops
//! every process cleanly (exit code 0). A missing honcho fails the test.

use crate::helpers::{sample_call, spawn_app};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The Procfile processes the test runs.
const PROCESSES: &[&str] = &["web", "worker", "scheduler"];

fn honcho() -> PathBuf {
    std::env::var_os("CALLCOACH_HONCHO")
        .map(PathBuf::from)
        .expect("CALLCOACH_HONCHO must be set: run the suite with `deploy/dev.sh test`")
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `PATH` with the directory of the `callcoach` binary under test first, so that the
/// Procfile's `callcoach …` lines run it.
fn path_with_binary() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_callcoach")).parent().unwrap();
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", bin.display())
}

type Lines = Arc<Mutex<Vec<String>>>;

/// Collects the lines honcho prints; the task ends when honcho's stdout closes.
fn capture(stdout: tokio::process::ChildStdout) -> (Lines, tokio::task::JoinHandle<()>) {
    let lines = Lines::default();
    let sink = lines.clone();
    let reading = tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    (lines, reading)
}

/// Waits until `GET {base}/healthz` answers 200, or panics with honcho's output once
/// honcho has exited.
async fn wait_for_web(base: &str, honcho: &mut tokio::process::Child, output: &Mutex<Vec<String>>) {
    let http = reqwest::Client::new();
    loop {
        if let Ok(resp) = http.get(format!("{base}/healthz")).send().await
            && resp.status() == 200
        {
            return;
        }
        if let Some(status) = honcho.try_wait().unwrap() {
            panic!(
                "honcho exited ({status}):\n{}",
                output.lock().unwrap().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn honcho_runs_the_procfile_and_stops_it_cleanly() {
    let mut app = spawn_app().await;
    let (bind, metrics) = (free_addr(), free_addr());
    let base = format!("http://{bind}");
    let procfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Procfile");
    let mut honcho = tokio::process::Command::new(honcho())
        .args(["--no-colour", "start", "-e", "/dev/null", "-f"])
        .arg(&procfile)
        .args(PROCESSES)
        .envs(&app.env)
        .env("PATH", path_with_binary())
        .env("BIND_ADDR", &bind)
        .env("PUBLIC_URL", &base)
        .env("METRICS_ADDR", &metrics)
        .env("SCHEDULER_METRICS_ADDR", free_addr())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run honcho {:?}: {e}", honcho()));
    let (output, reading) = capture(honcho.stdout.take().unwrap());
    wait_for_web(&base, &mut honcho, &output).await;

    // From here on the test's requests go to the honcho-run web front; only the honcho-run
    // worker consumes the queue.
    app.base = base;
    let call_id = app.ingest(&sample_call("honcho")).await;
    let job = app.enqueue(call_id, &["engagement"]).await;
    assert_eq!(app.wait_for_job(job, 60).await["status"], "succeeded");
    let worker_metrics = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap();
    assert_eq!(worker_metrics.status(), 200);

    let pid = honcho.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(kill.unwrap().success());
    let status = honcho.wait().await.unwrap();
    reading.await.unwrap();
    let output = output.lock().unwrap().join("\n");
    // honcho exits 128 + SIGTERM once it was told to stop; the processes' own codes are in
    // its `stopped (rc=…)` lines.
    assert_eq!(
        status.code(),
        Some(143),
        "honcho exited {status}:\n{output}"
    );
    for name in PROCESSES {
        let stopped = format!("{name}.1 stopped (rc=0)");
        assert!(output.contains(&stopped), "no `{stopped}` in:\n{output}");
    }
}
