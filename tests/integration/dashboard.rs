//! The job dashboard: login with an ops key into an HttpOnly cookie, the failed job's error
//! shown escaped, CSRF-checked actions that change the ledger, rate limits on the session's
//! key, and a headless Chromium that logs in, retries a failed job and sees it succeed.
//!
//! The browser test runs `tests/browser/dashboard_retry.py` with `CALLCOACH_SDK_PYTHON` (the
//! venv of `deploy/dev.sh test`, with websocket-client) and `CALLCOACH_CHROMIUM` (Debian's
//! chromium, installed by the same script); without either it fails, it is never skipped.

use crate::helpers::{Options, TestApp, sample_call, spawn_app, spawn_app_with};
use callcoach::{
    http::auth::{self, Scope},
    ledger::{self, JobState},
};
use reqwest::{StatusCode, header};
use std::{path::PathBuf, time::Duration};
use uuid::Uuid;

/// A client that shows redirects instead of following them.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn ops_key(app: &TestApp) -> String {
    auth::create_key(&app.app.pg, "test-ops", Scope::Ops)
        .await
        .unwrap()
        .key
}

/// Posts the login form.
async fn post_login(app: &TestApp, key: &str) -> reqwest::Response {
    browser()
        .post(app.url("/dashboard/login"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("key={key}"))
        .send()
        .await
        .unwrap()
}

/// Logs in and returns the `Cookie` header value of the session.
async fn login(app: &TestApp, key: &str) -> String {
    let resp = post_login(app, key).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set = resp.headers()[header::SET_COOKIE].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

/// The dashboard page as the session sees it.
async fn dashboard(app: &TestApp, cookie: &str) -> (StatusCode, String) {
    let resp = browser()
        .get(app.url("/dashboard"))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

/// The CSRF token in the page's forms.
fn csrf(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page.find(marker).expect("a CSRF field") + marker.len();
    page[start..start + 64].to_string()
}

/// Posts an action form with `body` and optional extra headers.
async fn act(
    app: &TestApp,
    cookie: &str,
    path: &str,
    body: &str,
    origin: Option<&str>,
) -> reqwest::Response {
    let mut req = browser()
        .post(app.url(path))
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body.to_string());
    if let Some(origin) = origin {
        req = req.header(header::ORIGIN, origin);
    }
    req.send().await.unwrap()
}

async fn job_row(app: &TestApp, id: Uuid) -> ledger::JobRow {
    ledger::job(&app.app.pg, id).await.unwrap().unwrap()
}

/// A job that failed for good with `error` (enqueued, then marked failed in the ledger).
async fn failed_job(app: &TestApp, tag: &str, error: &str) -> Uuid {
    let call_id = app.ingest(&sample_call(tag)).await;
    let id = app.enqueue(call_id, &["discovery"]).await;
    sqlx::query(
        "UPDATE jobs SET status = 'failed', attempts = max_attempts, last_error = $2,
                finished_at = now(), updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(&app.app.pg)
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn without_a_session_every_page_redirects_to_the_login_form() {
    let app = spawn_app().await;
    for (method, path) in [
        (reqwest::Method::GET, "/dashboard"),
        (reqwest::Method::POST, "/dashboard/jobs/replay-dead"),
        (reqwest::Method::POST, "/dashboard/logout"),
    ] {
        for cookie in [None, Some("callcoach_session=cc_nope_nope")] {
            let mut req = browser().request(method.clone(), app.url(path));
            if let Some(cookie) = cookie {
                req = req.header(header::COOKIE, cookie);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{method} {path}");
            assert_eq!(resp.headers()[header::LOCATION], "/dashboard/login");
        }
    }
    let form = browser()
        .get(app.url("/dashboard/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    assert!(
        form.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    assert!(form.text().await.unwrap().contains("name=\"key\""));
    // The cookie opens only read routes of the API, never its writes.
    let write = browser()
        .post(app.url("/v1/calls"))
        .header(
            header::COOKIE,
            format!("callcoach_session={}", app.admin_key),
        )
        .json(&sample_call("cookie"))
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 401);
}

#[tokio::test]
async fn login_needs_a_valid_ops_or_admin_key_and_sets_an_http_only_strict_cookie() {
    let app = spawn_app().await;
    let producer = post_login(&app, &app.key).await;
    assert_eq!(producer.status(), StatusCode::FORBIDDEN);
    assert!(producer.headers().get(header::SET_COOKIE).is_none());
    assert!(producer.text().await.unwrap().contains("scope producer"));
    let unknown = post_login(&app, "cc_unknown_key").await;
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    assert!(unknown.text().await.unwrap().contains("invalid or revoked"));
    let revoked = auth::create_key(&app.app.pg, "gone", Scope::Ops)
        .await
        .unwrap();
    auth::revoke_key(&app.app.pg, &revoked.prefix)
        .await
        .unwrap();
    assert_eq!(post_login(&app, &revoked.key).await.status(), 401);

    let key = ops_key(&app).await;
    let resp = post_login(&app, &key).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/dashboard");
    let set = resp.headers()[header::SET_COOKIE].to_str().unwrap();
    for attribute in [
        "callcoach_session=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set.contains(attribute), "{attribute} missing: {set}");
    }
    assert!(!set.contains("Secure"), "not Secure by default: {set}");
    let cookie = set.split(';').next().unwrap();
    let (status, page) = dashboard(&app, cookie).await;
    assert_eq!(status, 200);
    assert!(page.contains("test-ops") && page.contains("scheduler not configured"));
    assert!(page.contains("href=\"/docs\""));
    let docs = browser()
        .get(app.url("/docs"))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200, "the docs accept the session cookie");
    // Logging out clears the cookie.
    let out = act(
        &app,
        cookie,
        "/dashboard/logout",
        &format!("csrf={}", csrf(&page)),
        None,
    )
    .await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(
        out.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn a_secure_cookie_when_configured() {
    let app = spawn_app_with(Options {
        env: vec![("DASHBOARD_COOKIE_SECURE", "true".into())],
        ..Default::default()
    })
    .await;
    let key = ops_key(&app).await;
    let resp = post_login(&app, &key).await;
    let set = resp.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(set.contains("; Secure"), "{set}");
}

#[tokio::test]
async fn a_failed_jobs_error_is_escaped_and_actions_need_the_csrf_token() {
    let app = spawn_app().await;
    let cookie = login(&app, &ops_key(&app).await).await;
    let failed = failed_job(&app, "xss", "model said <script>alert('x')</script> & left").await;
    let (status, page) = dashboard(&app, &cookie).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("model said &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; left"),
        "the error is shown escaped"
    );
    assert!(!page.contains("<script>"), "no markup from the database");
    assert!(page.contains(&format!("data-job=\"{failed}\" data-status=\"failed\"")));
    let token = csrf(&page);
    let retry = format!("/dashboard/jobs/{failed}/retry");

    // No token, a wrong token, another site's origin: 403, nothing changes.
    for (body, origin) in [
        ("", None),
        ("csrf=0000", None),
        (&*format!("csrf={}", "a".repeat(64)), None),
        (&*format!("csrf={token}"), Some("http://evil.example")),
    ] {
        let resp = act(&app, &cookie, &retry, body, origin).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{body} {origin:?}");
        assert_eq!(status_of(&app, failed).await, JobState::Failed);
    }
    // With the token (and this origin): queued again with a fresh budget.
    let resp = act(
        &app,
        &cookie,
        &retry,
        &format!("csrf={token}"),
        Some(&app.base),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let location = resp.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(location, format!("/dashboard?flash=retried&job={failed}"));
    let job = job_row(&app, failed).await;
    assert_eq!((job.status, job.attempts), (JobState::Queued, 0));
    let flash = browser()
        .get(app.url(&location))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(flash.contains(&format!("job {failed} queued again")));
    // Retrying it again does nothing and says so.
    let resp = act(&app, &cookie, &retry, &format!("csrf={token}"), None).await;
    assert!(
        resp.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .contains("flash=not_retryable")
    );

    // Cancel the (queued) job.
    let cancel = format!("/dashboard/jobs/{failed}/cancel");
    assert_eq!(act(&app, &cookie, &cancel, "", None).await.status(), 403);
    let resp = act(&app, &cookie, &cancel, &format!("csrf={token}"), None).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(status_of(&app, failed).await, JobState::Cancelled);

    // Replay every failed job; a cancelled one stays cancelled.
    let a = failed_job(&app, "dead-a", "boom").await;
    let b = failed_job(&app, "dead-b", "boom").await;
    let replay = "/dashboard/jobs/replay-dead";
    assert_eq!(act(&app, &cookie, replay, "", None).await.status(), 403);
    let resp = act(&app, &cookie, replay, &format!("csrf={token}"), None).await;
    assert_eq!(
        resp.headers()[header::LOCATION],
        "/dashboard?flash=replayed&n=2"
    );
    assert_eq!(status_of(&app, a).await, JobState::Queued);
    assert_eq!(status_of(&app, b).await, JobState::Queued);
    assert_eq!(status_of(&app, failed).await, JobState::Cancelled);
    // A token belongs to its key.
    let other = login(&app, &app.admin_key).await;
    let resp = act(&app, &other, &retry, &format!("csrf={token}"), None).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

async fn status_of(app: &TestApp, id: Uuid) -> JobState {
    job_row(app, id).await.status
}

#[tokio::test]
async fn dashboard_requests_are_rate_limited_on_the_sessions_key() {
    let app = spawn_app_with(Options {
        env: vec![("RATE_LIMIT_GET_PER_MIN", "2".into())],
        ..Default::default()
    })
    .await;
    let cookie = login(&app, &ops_key(&app).await).await;
    for _ in 0..2 {
        assert_eq!(dashboard(&app, &cookie).await.0, 200);
    }
    assert_eq!(dashboard(&app, &cookie).await.0, 429);
    // Another key has its own bucket.
    let other = login(&app, &app.admin_key).await;
    assert_eq!(dashboard(&app, &other).await.0, 200);
}

/// A required tool from the environment: missing, the test fails.
fn required(var: &str) -> PathBuf {
    let path = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} must be set: run the tests with deploy/dev.sh test"));
    let path = PathBuf::from(path);
    assert!(path.exists(), "{var}={} does not exist", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_an_operator_logs_in_retries_a_failed_job_and_sees_it_succeed() {
    let python = required("CALLCOACH_SDK_PYTHON");
    let chromium = required("CALLCOACH_CHROMIUM");
    let mut app = spawn_app_with(Options {
        env: vec![("JOB_MAX_ATTEMPTS", "1".into())],
        ..Default::default()
    })
    .await;
    // The LLM answers the first request with a 500: with one attempt the job fails for good.
    app.emulator.inject_failures(500, 1);
    app.start_worker();
    let call_id = app.ingest(&sample_call("browser")).await;
    let job = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(job, 30).await["status"], "failed");
    let key = ops_key(&app).await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output");
    std::fs::create_dir_all(&dir).unwrap();
    let screenshot = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/dashboard_retry.py"
    );
    let run = tokio::process::Command::new(&python)
        .arg(script)
        .arg("--chromium")
        .arg(&chromium)
        .args([
            "--base",
            &app.base,
            "--key",
            &key,
            "--job",
            &job.to_string(),
        ])
        .arg("--screenshot")
        .arg(&screenshot)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .expect("the browser run finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "browser run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["flash"].as_str().unwrap().contains("queued again"),
        "{report}"
    );
    let job = job_row(&app, job).await;
    assert_eq!((job.status, job.attempts), (JobState::Succeeded, 1));
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 10_000, "a real page: {} bytes", png.len());
}
