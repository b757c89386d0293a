//! The official `anthropic` Python SDK (2.x), unmodified, against the in-process emulator:
//! `tests/sdk/check_sdk.py` exercises messages.create (system blocks, cache_control,
//! output_config), count_tokens and the batches API and exits non-zero on any mismatch.
//!
//! The Python comes from `CALLCOACH_SDK_PYTHON` (exported by `deploy/dev.sh test`, which
//! creates `.dev/sdk-venv`); when that variable is set the SDK must be usable or the test
//! fails. Without it the default venv is used; no SDK at all fails the test (it is never
//! skipped).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use callcoach::llm::emulator::{self, EmulatorConfig};
use tokio::{net::TcpListener, process::Command};

/// The key the emulator requires and the SDK sends as `Authorization: Bearer`.
const KEY: &str = "sdk-test-key";
/// Longest the script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// Whether `python` can import the SDK.
async fn has_sdk(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import anthropic"])
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// The Python to use: `CALLCOACH_SDK_PYTHON`, else the dev venv.
async fn sdk_python() -> PathBuf {
    if let Ok(required) = std::env::var("CALLCOACH_SDK_PYTHON") {
        let python = PathBuf::from(required);
        assert!(
            has_sdk(&python).await,
            "CALLCOACH_SDK_PYTHON={} cannot import the anthropic SDK",
            python.display()
        );
        return python;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/sdk-venv/bin/python");
    assert!(
        has_sdk(&venv).await,
        "no anthropic SDK: run the suite with `deploy/dev.sh test`, which creates .dev/sdk-venv"
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_works_against_the_emulator() {
    let python = sdk_python().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = EmulatorConfig {
        api_key: Some(KEY.into()),
        ..EmulatorConfig::default()
    };
    let emu = emulator::spawn(listener, config).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/check_sdk.py");
    let run = Command::new(&python)
        .arg(&script)
        .env("ANTHROPIC_BASE_URL", emu.base_url())
        .env("ANTHROPIC_API_KEY", KEY)
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .expect("SDK script timed out")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "check_sdk.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("SDK checks passed"), "{stdout}");
    assert!(emu.messages_served() >= 4, "{}", emu.messages_served());
    emu.shutdown().await;
}
