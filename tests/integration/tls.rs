//! Redis over TLS: a redis-server of the test's own, listening only on a TLS port with the
//! self-signed certificate `deploy/dev.sh test` makes (`CALLCOACH_TLS_CA_FILE`,
//! `CALLCOACH_TLS_CERT_FILE`, `CALLCOACH_TLS_KEY_FILE`; `REDIS_SERVER_BIN`). Queue and cache
//! work over `rediss://` with `REDIS_TLS_CA_FILE`; without the CA the connection is refused
//! with an error. Missing binaries or certificates fail the tests.

use crate::cli::{callcoach, stderr};
use crate::helpers::{Options, TestApp, sample_call, spawn_app_with};
use callcoach::config::Settings;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A path `deploy/dev.sh test` exports; the test fails without it.
fn required(var: &str) -> String {
    let path = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} must be set: run the suite with `deploy/dev.sh test`"));
    assert!(
        std::path::Path::new(&path).is_file(),
        "{var}={path} does not exist"
    );
    path
}

/// Settings reaching `url` (the database is never contacted).
fn settings(url: &str, ca: Option<&str>) -> Settings {
    let mut env: HashMap<String, String> = [
        ("DATABASE_URL", "postgres://unused@127.0.0.1/unused"),
        ("REDIS_URL", url),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(ca) = ca {
        env.insert("REDIS_TLS_CA_FILE".into(), ca.into());
    }
    Settings::from_map(&env).unwrap()
}

/// One PING over a new connection, bounded so that a stuck handshake fails the test.
async fn ping(settings: &Settings) -> anyhow::Result<String> {
    let client = callcoach::redis_client(settings)?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    Ok(tokio::time::timeout(Duration::from_secs(10), attempt).await??)
}

/// A redis-server with TLS only (`--port 0`) on a free loopback port.
struct TlsRedis {
    port: u16,
    ca: String,
    child: Child,
}

impl TlsRedis {
    async fn start() -> TlsRedis {
        let bin = required("REDIS_SERVER_BIN");
        let (ca, cert, key) = (
            required("CALLCOACH_TLS_CA_FILE"),
            required("CALLCOACH_TLS_CERT_FILE"),
            required("CALLCOACH_TLS_KEY_FILE"),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
            .args(["--tls-ca-cert-file", &ca, "--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = TlsRedis { port, ca, child };
        redis.wait_until_up().await;
        redis
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }

    async fn wait_until_up(&self) {
        let settings = settings(&self.url(), Some(&self.ca));
        for _ in 0..200 {
            if ping(&settings).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server with TLS did not answer on port {}", self.port);
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A web front and worker whose every Redis connection goes to `redis` over TLS.
async fn app_over_tls(redis: &TlsRedis) -> TestApp {
    let mut app = spawn_app_with(Options {
        env: vec![
            ("REDIS_URL", redis.url()),
            ("REDIS_TLS_CA_FILE", redis.ca.clone()),
        ],
        ..Options::default()
    })
    .await;
    app.start_worker();
    app
}

#[tokio::test]
async fn analyses_are_queued_and_cached_over_rediss() {
    let redis = TlsRedis::start().await;
    let app = app_over_tls(&redis).await;
    let (status, ready) = app.get("/readyz").await;
    assert_eq!((status, &ready["redis"]), (200, &"ok".into()), "{ready}");

    let call_id = app.ingest(&sample_call("tls")).await;
    let first = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(first, 30).await["status"], "succeeded");
    let settings = settings(&redis.url(), Some(&redis.ca));
    let mut conn = callcoach::redis_client(&settings)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cached: Vec<String> = redis::cmd("KEYS")
        .arg("coaching:discovery:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cached.len(), 1, "{cached:?}");

    // The same analysis again is answered from the TLS Redis tier.
    let second = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(second, 30).await["status"], "succeeded");
    assert_eq!(app.run_sources(call_id).await, ["llm", "redis"]);
}

#[tokio::test]
async fn rediss_without_the_ca_fails_with_a_certificate_error() {
    let redis = TlsRedis::start().await;
    let err = ping(&settings(&redis.url(), None)).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("certificate") || message.contains("UnknownIssuer"),
        "{message}"
    );
}

#[test]
fn an_unreadable_ca_file_stops_start_up_naming_the_setting() {
    let out = callcoach(
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1/y"),
            ("REDIS_URL", "rediss://127.0.0.1:6380"),
            ("REDIS_TLS_CA_FILE", "/nonexistent/ca.pem"),
        ],
        &["migrate"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("REDIS_TLS_CA_FILE"),
        "{}",
        stderr(&out)
    );
}
