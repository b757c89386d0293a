//! `/openapi.json` and `/docs`: the document describes every route with its errors and
//! security, and schemathesis (PyPI), run against it with a bounded number of examples, finds
//! no 5xx, no undocumented status, no response that violates its schema.
//!
//! schemathesis comes from `CALLCOACH_SCHEMATHESIS` (exported by `deploy/dev.sh test`, which
//! installs it into `.dev/sdk-venv`), else from that venv; missing, the test fails (it is never
//! skipped).

use crate::helpers::{Options, spawn_app_with};
use std::path::{Path, PathBuf};

/// Every route the router serves.
const ROUTES: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/v1/calls",
    "/v1/calls/search",
    "/v1/calls/{id}",
    "/v1/reps/{email}/insights",
    "/v1/cache/stats",
    "/v1/analyses",
    "/v1/jobs/{id}",
    "/v1/rubrics/{role}/{dimension}",
];

/// Limits high enough that the fuzzer reaches the handlers instead of the 429s.
fn generous_limits() -> Vec<(&'static str, String)> {
    [
        "RATE_LIMIT_GET_PER_MIN",
        "RATE_LIMIT_POST_PER_MIN",
        "RATE_LIMIT_ANALYSIS_PER_MIN",
        "RATE_LIMIT_INSIGHTS_PER_MIN",
        "RATE_LIMIT_SEARCH_PER_MIN",
    ]
    .into_iter()
    .map(|k| (k, "1000000".to_string()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_covers_every_route_with_its_errors_and_security() {
    let app = spawn_app_with(Options::default()).await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let mut listed: Vec<&str> = paths.keys().map(String::as_str).collect();
    listed.sort_unstable();
    let mut expected = ROUTES.to_vec();
    expected.sort_unstable();
    assert_eq!(listed, expected);
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            let public = path == "/healthz" || path == "/readyz";
            for status in ["401", "429"] {
                assert_eq!(
                    responses.contains_key(status),
                    !public,
                    "{method} {path}: {status}"
                );
            }
            assert!(
                public || responses.contains_key("503"),
                "{method} {path}: 503"
            );
            assert_eq!(
                operation.get("security").is_some(),
                !public,
                "{method} {path}"
            );
            if operation.get("requestBody").is_some() {
                for status in ["400", "408", "413", "415", "422"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
            }
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "CallInput",
        "JobRow",
        "ErrorBody",
        "SearchPage",
        "RepInsights",
        "CallDetails",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema}");
    }
    let unauthenticated = reqwest::get(app.url("/openapi.json")).await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let docs = reqwest::Client::new()
        .get(app.url("/docs"))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    for path in ROUTES {
        assert!(html.contains(&format!("<code>{path}</code>")), "{path}");
    }
}

/// The schemathesis executable: `CALLCOACH_SCHEMATHESIS`, else the dev venv's.
fn schemathesis() -> PathBuf {
    let path = std::env::var("CALLCOACH_SCHEMATHESIS").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/sdk-venv/bin/schemathesis"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no schemathesis at {}: run the suite with `deploy/dev.sh test`, which installs it",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let schemathesis = schemathesis();
    let app = spawn_app_with(Options {
        env: generous_limits(),
        ..Options::default()
    })
    .await;
    let output = tokio::process::Command::new(schemathesis)
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args(["-H", &format!("Authorization: Bearer {}", app.admin_key)])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--max-examples",
            "15",
            "--seed",
            "20261202",
            "--no-color",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("Tested: 12"),
        "every operation tested:\n{stdout}"
    );
}
