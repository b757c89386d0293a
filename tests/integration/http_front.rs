//! The HTTP front's rate limits (per API key and route class, in the shared Redis token
//! bucket) and its gzip compression, against the running app with real Redis and Postgres.

use crate::helpers::{Options, TestApp, sample_call, spawn_app_with};
use axum::{
    Router,
    body::Body,
    http::{HeaderValue, header},
    routing::get,
};
use callcoach::http::{
    auth::{self, Scope},
    compression,
    limits::{RouteClass, bucket_name},
};
use futures::future::join_all;
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    io::Read,
    time::{Duration, Instant, SystemTime},
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

/// An app with the given `RATE_LIMIT_*` overrides. The limiter's timeout is raised so a slow
/// moment of the test machine never lets a request through unchecked (the fail-open test
/// keeps the real 25 ms).
async fn limited_app(env: &[(&'static str, &str)]) -> TestApp {
    let mut vars = vec![("RATE_LIMIT_TIMEOUT_MS", "2000".to_string())];
    vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    spawn_app_with(Options {
        env: vars,
        ..Default::default()
    })
    .await
}

/// A new producer key: its id and the key itself.
async fn new_key(app: &TestApp, name: &str) -> (Uuid, String) {
    let key = auth::create_key(&app.app.pg, name, Scope::Producer)
        .await
        .unwrap();
    (key.id, key.key)
}

/// GET `path` with `key` (a limited route: `/v1/jobs/{id}` answers 404 for an unknown job).
async fn get_with(app: &TestApp, key: &str, path: &str) -> reqwest::Response {
    app.http
        .get(app.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

fn job_path() -> String {
    format!("/v1/jobs/{}", Uuid::new_v4())
}

fn header_of(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn remaining(resp: &reqwest::Response) -> Option<u32> {
    header_of(resp, "x-ratelimit-remaining").map(|v| v.parse().unwrap())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// After N requests the headers say exactly what is left: 100/min, 5 requests → 95 left, the
/// bucket full again in 3 s.
#[tokio::test]
async fn headers_are_exact_after_n_requests() {
    let app = limited_app(&[
        ("RATE_LIMIT_GET_PER_MIN", "100"),
        ("RATE_LIMIT_POST_PER_MIN", "30"),
    ])
    .await;
    let (_, key) = new_key(&app, "exact").await;
    for n in 1..=5u32 {
        let before = unix_now();
        let resp = get_with(&app, &key, &job_path()).await;
        let after = unix_now();
        assert_eq!(resp.status(), 404, "a limited route answers as usual");
        assert_eq!(header_of(&resp, "x-ratelimit-limit").unwrap(), "100");
        assert_eq!(remaining(&resp), Some(100 - n), "after {n} requests");
        assert_eq!(
            header_of(&resp, "ratelimit-policy").unwrap(),
            "\"get\";q=100;w=60"
        );
        let reset: f64 = header_of(&resp, "x-ratelimit-reset")
            .unwrap()
            .parse()
            .unwrap();
        // Full again once n requests have been regained at 100/60 a second.
        let full_in = f64::from(n) * 0.6;
        assert!(
            reset >= (before + full_in - 1.0).floor() && reset <= (after + full_in).ceil(),
            "reset {reset} vs now {before:.1} + {full_in:.1} s"
        );
        if n == 5 {
            assert_eq!(header_of(&resp, "ratelimit").unwrap(), "\"get\";r=95;t=3");
        }
        assert!(header_of(&resp, "retry-after").is_none());
    }
    // Another class has its own bucket: a write leaves the reads' count alone.
    let resp = app
        .http
        .post(app.url("/v1/calls"))
        .bearer_auth(&key)
        .json(&sample_call("exact"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(
        header_of(&resp, "ratelimit-policy").unwrap(),
        "\"post\";q=30;w=60"
    );
    assert_eq!(remaining(&resp), Some(29));
    let resp = get_with(&app, &key, &job_path()).await;
    assert_eq!(remaining(&resp), Some(94));
}

/// A minimal HTTP/1.1 client on one TCP connection, to see that a 429 keeps it open.
struct RawConnection {
    stream: BufReader<tokio::net::TcpStream>,
    host: String,
}

struct RawResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl RawConnection {
    async fn open(app: &TestApp) -> RawConnection {
        let host = app.base.trim_start_matches("http://").to_string();
        let stream = tokio::net::TcpStream::connect(&host).await.unwrap();
        RawConnection {
            stream: BufReader::new(stream),
            host,
        }
    }

    async fn send(&mut self, method: &str, path: &str, key: &str, body: &[u8]) -> RawResponse {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut status_line = String::new();
        let read = self.stream.read_line(&mut status_line).await.unwrap();
        assert!(read > 0, "the server closed the connection");
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
        }
        let length: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.unwrap();
        RawResponse {
            status,
            headers,
            body,
        }
    }
}

/// Past the limit: 429 with `Retry-After`, the headers and the JSON error; the refused
/// request's body (300 KB here) is read, so the same connection carries the next request.
#[tokio::test]
async fn a_refused_request_gets_429_and_the_connection_stays_usable() {
    let app = limited_app(&[("RATE_LIMIT_POST_PER_MIN", "3")]).await;
    let (_, key) = new_key(&app, "refused").await;
    let mut conn = RawConnection::open(&app).await;
    for i in 0..3 {
        let call = serde_json::to_vec(&sample_call(&format!("refused-{i}"))).unwrap();
        let resp = conn.send("POST", "/v1/calls", &key, &call).await;
        assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.headers["x-ratelimit-remaining"], (2 - i).to_string());
    }
    let mut big = sample_call("refused-big");
    big["title"] = json!("x".repeat(300_000));
    let resp = conn
        .send(
            "POST",
            "/v1/calls",
            &key,
            &serde_json::to_vec(&big).unwrap(),
        )
        .await;
    assert_eq!(resp.status, 429);
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("post"),
        "{body}"
    );
    // One request comes back every 20 s at 3/min.
    let retry: u64 = resp.headers["retry-after"].parse().unwrap();
    assert!((19..=20).contains(&retry), "{retry}");
    assert_eq!(resp.headers["x-ratelimit-remaining"], "0");
    assert_eq!(resp.headers["x-ratelimit-limit"], "3");
    assert_eq!(resp.headers["ratelimit-policy"], "\"post\";q=3;w=60");
    assert_eq!(resp.headers["ratelimit"], format!("\"post\";r=0;t={retry}"));
    let reset: f64 = resp.headers["x-ratelimit-reset"].parse().unwrap();
    assert!(
        (reset - (unix_now() + 60.0)).abs() <= 2.0,
        "full in 60 s: {reset}"
    );
    // The same connection: the next request is read and answered.
    let resp = conn.send("GET", &job_path(), &key, b"").await;
    assert_eq!(resp.status, 404);
    // The reads' own bucket (1,000,000/min, regaining 16 tokens a millisecond).
    let left: u32 = resp.headers["x-ratelimit-remaining"].parse().unwrap();
    assert!((999_000..=1_000_000).contains(&left), "{left}");
    let resp = conn.send("GET", "/healthz", &key, b"").await;
    assert_eq!(resp.status, 200);
    assert!(
        !resp.headers.contains_key("x-ratelimit-limit"),
        "health is not limited"
    );
    let metrics = app.scrape_metrics().await;
    let decisions = "callcoach_http_rate_limit_decisions_total";
    for (decision, count) in [("allowed", 3.0), ("denied", 1.0)] {
        let decision = format!("decision=\"{decision}\"");
        let labels = [r#"class="post""#, decision.as_str()];
        let seen = crate::metrics::sample(&metrics, decisions, &labels);
        assert_eq!(seen, Some(count), "{decisions}{labels:?}:\n{metrics}");
    }
}

/// An empty bucket refills at the configured rate: 30/min is one request every 2 s.
#[tokio::test]
async fn an_empty_bucket_refills_over_time() {
    let app = limited_app(&[("RATE_LIMIT_GET_PER_MIN", "30")]).await;
    let (_, key) = new_key(&app, "refill").await;
    let started = Instant::now();
    let mut admitted = 0;
    let refused = loop {
        let resp = get_with(&app, &key, &job_path()).await;
        if resp.status() == 429 {
            break resp;
        }
        admitted += 1;
        assert!(admitted <= 40, "never refused");
    };
    let most = 30.0 + started.elapsed().as_secs_f64() / 2.0;
    assert!(
        (30..=most as u32).contains(&admitted),
        "{admitted} admitted"
    );
    let retry: u64 = header_of(&refused, "retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=2).contains(&retry),
        "the next request within 2 s: {retry}"
    );
    let empty_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let slept = empty_at.elapsed().as_secs_f64();
    let mut regained = 0;
    loop {
        let resp = get_with(&app, &key, &job_path()).await;
        if resp.status() == 429 {
            break;
        }
        regained += 1;
        assert!(regained <= 10, "never refused");
    }
    // Less than one request's worth was left at the refusal, and 0.5 a second came back
    // since (while sleeping, and during the requests after it).
    let total = empty_at.elapsed().as_secs_f64();
    let least = (slept / 2.0).floor() as u32;
    let most = (1.0 + total / 2.0).floor() as u32;
    assert!(
        (least..=most).contains(&regained),
        "{regained} regained after {slept:.2} s (expected {least}..={most})"
    );
}

/// Two keys, two buckets: one key's exhaustion leaves the other's requests alone.
#[tokio::test]
async fn each_key_has_its_own_bucket() {
    let app = limited_app(&[("RATE_LIMIT_GET_PER_MIN", "3")]).await;
    let (_, first) = new_key(&app, "first").await;
    let (_, second) = new_key(&app, "second").await;
    for left in [2, 1, 0] {
        assert_eq!(
            remaining(&get_with(&app, &first, &job_path()).await),
            Some(left)
        );
    }
    assert_eq!(get_with(&app, &first, &job_path()).await.status(), 429);
    let resp = get_with(&app, &second, &job_path()).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(remaining(&resp), Some(2), "a full bucket of its own");
    assert_eq!(get_with(&app, &first, &job_path()).await.status(), 429);
}

/// The bucket is the key's: an identity header, other path values or another route of the
/// class change nothing, and requests without a valid key get their 401 for free.
#[tokio::test]
async fn spoofed_identities_and_varied_paths_share_the_keys_bucket() {
    let app = limited_app(&[("RATE_LIMIT_GET_PER_MIN", "4")]).await;
    let (_, key) = new_key(&app, "spoofer").await;
    for i in 0..5 {
        let resp = app
            .http
            .get(app.url(&job_path()))
            .header("x-user-email", format!("victim{i}@customer.example"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert!(header_of(&resp, "x-ratelimit-remaining").is_none());
        let wrong = get_with(&app, "cc_wrong_key", &job_path()).await;
        assert_eq!(wrong.status(), 401);
    }
    let paths = [
        job_path(),
        format!("/v1/calls/{}", Uuid::new_v4()),
        job_path(),
        format!("/v1/calls/{}", Uuid::new_v4()),
    ];
    for (i, path) in paths.iter().enumerate() {
        let resp = app
            .http
            .get(app.url(path))
            .bearer_auth(&key)
            .header("x-user-email", format!("rep{i}@lumen.example"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(remaining(&resp), Some(3 - i as u32), "{path}");
    }
    let resp = app
        .http
        .get(app.url(&job_path()))
        .bearer_auth(&key)
        .header("x-user-email", "someone-else@lumen.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
}

/// Keys not in the key cache are looked up in Postgres at most
/// `RATE_LIMIT_KEY_LOOKUPS_PER_MIN` times a minute per client address (the TCP peer): then
/// unknown and not-yet-cached keys get a 429 without a query, whatever address headers they
/// send, while a cached key goes on working.
#[tokio::test]
async fn key_lookups_are_limited_per_client_address() {
    let app = limited_app(&[
        ("RATE_LIMIT_KEY_LOOKUPS_PER_MIN", "5"),
        ("AUTH_CACHE_MS", "60000"),
    ])
    .await;
    let (_, cached) = new_key(&app, "cached").await;
    let (fresh_id, fresh) = new_key(&app, "fresh").await;
    // Lookup 1 caches the key; lookups 2-5 find nothing.
    assert_eq!(get_with(&app, &cached, &job_path()).await.status(), 404);
    for i in 0..4 {
        let resp = get_with(&app, &format!("cc_unknown_{i}"), &job_path()).await;
        assert_eq!(resp.status(), 401, "lookup {}", i + 2);
    }
    let resp = app
        .http
        .get(app.url(&job_path()))
        .bearer_auth("cc_unknown_spoofing")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-real-ip", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = header_of(&resp, "retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "one lookup every 12 s: {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("5 API key lookups a minute from 127.0.0.1"),
        "{message}"
    );
    assert_eq!(get_with(&app, &fresh, &job_path()).await.status(), 429);
    assert_eq!(get_with(&app, &cached, &job_path()).await.status(), 404);
    let used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE id = $1")
            .bind(fresh_id)
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert!(used.is_none(), "the refused key was never looked up");
}

/// Each class has its limit and bucket, picked by the matched route: every rep's insights
/// share one bucket, search and analyses have their own, other reads and writes theirs.
#[tokio::test]
async fn classes_follow_the_matched_route() {
    let app = limited_app(&[
        ("RATE_LIMIT_GET_PER_MIN", "100"),
        ("RATE_LIMIT_POST_PER_MIN", "30"),
        ("RATE_LIMIT_ANALYSIS_PER_MIN", "10"),
        ("RATE_LIMIT_INSIGHTS_PER_MIN", "20"),
        ("RATE_LIMIT_SEARCH_PER_MIN", "50"),
    ])
    .await;
    let (_, key) = new_key(&app, "classes").await;
    let call_id = app.ingest(&sample_call("classes")).await;
    let send = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut req = app.http.request(method, app.url(&path)).bearer_auth(&key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        async move { req.send().await.unwrap() }
    };
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let cases = [
        (
            get.clone(),
            "/v1/reps/ana@lumen.example/insights".to_string(),
            None,
            "insights",
            20,
            19,
        ),
        (
            get.clone(),
            "/v1/reps/nobody@lumen.example/insights".into(),
            None,
            "insights",
            20,
            18,
        ),
        (
            get.clone(),
            "/v1/reps/x%40y.example/insights?days=7".into(),
            None,
            "insights",
            20,
            17,
        ),
        (
            get.clone(),
            "/v1/calls/search?limit=5".into(),
            None,
            "search",
            50,
            49,
        ),
        (
            get.clone(),
            format!("/v1/calls/{call_id}"),
            None,
            "get",
            100,
            99,
        ),
        (get.clone(), job_path(), None, "get", 100, 98),
        (
            post.clone(),
            "/v1/analyses".into(),
            Some(json!({ "call_id": call_id, "dimensions": ["discovery"] })),
            "analysis",
            10,
            9,
        ),
        (
            post.clone(),
            "/v1/calls".into(),
            Some(sample_call("classes-2")),
            "post",
            30,
            29,
        ),
    ];
    for (method, path, body, class, limit, left) in cases {
        let resp = send(method, path.clone(), body).await;
        assert!(resp.status().as_u16() < 500, "{path}: {}", resp.status());
        assert_eq!(
            header_of(&resp, "ratelimit-policy").unwrap(),
            format!("\"{class}\";q={limit};w=60"),
            "{path}"
        );
        assert_eq!(remaining(&resp), Some(left), "{path}");
        let current = header_of(&resp, "ratelimit").unwrap();
        assert!(
            current.starts_with(&format!("\"{class}\";r={left};t=")),
            "{path}: {current}"
        );
    }
}

/// 300 requests at once against 100/min: 100 admitted (plus what refills while they run,
/// nothing when they take under 0.6 s), the rest 429, none a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_concurrent_requests_admit_the_limit() {
    let app = limited_app(&[("RATE_LIMIT_GET_PER_MIN", "100")]).await;
    let (_, key) = new_key(&app, "burst").await;
    let started = Instant::now();
    let statuses = join_all((0..300).map(|_| {
        let (http, url, key) = (app.http.clone(), app.url(&job_path()), key.clone());
        async move {
            let resp = http.get(url).bearer_auth(key).send().await.unwrap();
            resp.status().as_u16()
        }
    }))
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = statuses.iter().filter(|s| **s == 404).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(admitted + refused, 300, "{statuses:?}");
    let refilled = (elapsed * 100.0 / 60.0).floor() as usize;
    assert!(
        (100..=100 + refilled).contains(&admitted),
        "{admitted} admitted in {elapsed:.2} s"
    );
    println!("{admitted} admitted, {refused} refused in {elapsed:.3} s");
}

/// A bucket's Redis key always carries an expiry: it disappears once it would be full again.
#[tokio::test]
async fn bucket_keys_keep_an_expiry() {
    let app = limited_app(&[
        ("RATE_LIMIT_GET_PER_MIN", "60"),
        ("RATE_LIMIT_ANALYSIS_PER_MIN", "10"),
    ])
    .await;
    let (id, key) = new_key(&app, "ttl").await;
    for _ in 0..3 {
        get_with(&app, &key, &job_path()).await;
    }
    let analysis = app
        .http
        .post(app.url("/v1/analyses"))
        .bearer_auth(&key)
        .json(&json!({ "call_id": Uuid::new_v4() }))
        .send()
        .await
        .unwrap();
    assert_eq!(analysis.status(), 404, "unknown call, charged all the same");
    assert_eq!(remaining(&analysis), Some(9));
    let mut redis = app.redis.conn().await;
    let get_key = format!("callcoach:rl:{}", bucket_name(RouteClass::Get, id));
    let ttl: i64 = redis.pttl(&get_key).await.unwrap();
    // Three requests in a row make a busy key: the process may hold a few tokens leased
    // ahead, so Redis' level is at most 57; the key lives until that level is full again.
    let tokens: f64 = redis.hget(&get_key, "tokens").await.unwrap();
    assert!(tokens <= 57.0, "{tokens}");
    let refill_ms = (60.0 - tokens) * 1000.0;
    assert!(
        (ttl as f64) <= refill_ms + 1_000.0 && (ttl as f64) >= refill_ms - 1_000.0,
        "{tokens} of 60/min: {refill_ms} ms to refill + 1 s, got {ttl}"
    );
    let analysis_key = format!("callcoach:rl:{}", bucket_name(RouteClass::Analysis, id));
    let ttl: i64 = redis.pttl(&analysis_key).await.unwrap();
    assert!(
        (5_000..=7_000).contains(&ttl),
        "one of 10/min: 6 s to refill + 1 s: {ttl}"
    );
}

/// The Prometheus counter `name{class="get"}`, 0 when absent.
fn counter(app: &TestApp, name: &str) -> f64 {
    app.app
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("class=\"get\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Redis cut off or hanging: requests are served (fail open) within the 25 ms timeout, each
/// counted, with only the static headers; limiting resumes when Redis is back.
#[tokio::test]
async fn an_unreachable_redis_fails_open_and_is_counted() {
    let app = spawn_app_with(Options {
        env: vec![("RATE_LIMIT_GET_PER_MIN", "2".to_string())],
        proxy_redis: true,
        ..Default::default()
    })
    .await;
    let proxy = app.redis_proxy.as_ref().unwrap();
    let (_, key) = new_key(&app, "outage").await;
    let failed_open = "callcoach_http_rate_limit_failed_open_total";
    // The limiter's first command also opens its connection and loads the script; on a
    // loaded machine that alone can take longer than the 25 ms timeout (and a failure skips
    // Redis for a second). Another key pays for it, until Redis has answered once.
    let (_, opener) = new_key(&app, "opener").await;
    let until = Instant::now() + Duration::from_secs(10);
    while remaining(&get_with(&app, &opener, &job_path()).await).is_none() {
        assert!(Instant::now() < until, "the limiter never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = counter(&app, failed_open);
    let failed_open_since = || counter(&app, failed_open) - before;
    let resp = get_with(&app, &key, &job_path()).await;
    assert_eq!(remaining(&resp), Some(1));
    assert_eq!(failed_open_since(), 0.0);

    proxy.set_down(true);
    for _ in 0..10 {
        let started = Instant::now();
        let resp = get_with(&app, &key, &job_path()).await;
        assert_eq!(
            resp.status(),
            404,
            "served, not refused past the limit of 2"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(header_of(&resp, "x-ratelimit-limit").unwrap(), "2");
        assert!(remaining(&resp).is_none(), "nobody knows what is left");
    }
    assert_eq!(failed_open_since(), 10.0);

    proxy.set_down(false);
    proxy.set_latency(Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for _ in 0..5 {
        let started = Instant::now();
        let resp = get_with(&app, &key, &job_path()).await;
        assert_eq!(resp.status(), 404);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a hung Redis costs at most the timeout: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(failed_open_since(), 15.0);

    proxy.set_latency(Duration::ZERO);
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = get_with(&app, &key, &job_path()).await;
        if resp.status() == 429 || remaining(&resp).is_some() {
            break;
        }
        assert!(Instant::now() < until, "limits never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that sees the bytes as sent (no transparent gzip).
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder().no_gzip().build().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A call whose details are several KB of JSON (a call with many attendees).
fn long_call(tag: &str) -> Value {
    let mut call = sample_call(tag);
    let speakers = call["speakers"].as_array_mut().unwrap();
    for i in 0..30 {
        speakers.push(json!({
            "name": format!("Guest Attendee {i}"),
            "email": format!("guest.attendee{i}@customer.example"),
            "company_side": "external",
        }));
    }
    call
}

/// A JSON body over 1 KiB is gzipped when the client accepts gzip, with the headers the spec
/// asks for; q=0, identity or other codings get it as it is.
/// `COMPRESSION_MIN_BYTES` moves the threshold: a call's details (a few KiB) go out as they
/// are under a threshold above their size, and gzipped under one below it.
#[tokio::test]
async fn the_compression_threshold_is_configurable() {
    for (threshold, compressed) in [("1000000", false), ("2048", true)] {
        let app = limited_app(&[("COMPRESSION_MIN_BYTES", threshold)]).await;
        let id = app.ingest(&long_call("threshold")).await;
        let resp = raw_client()
            .get(app.url(&format!("/v1/calls/{id}")))
            .bearer_auth(&app.key)
            .header(header::ACCEPT_ENCODING, "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let encoding = header_of(&resp, "content-encoding");
        let body = resp.bytes().await.unwrap();
        assert_eq!(encoding.is_some(), compressed, "threshold {threshold}");
        if !compressed {
            assert!(
                body.len() > 2048 && body.len() < 1_000_000,
                "{} bytes",
                body.len()
            );
        }
    }
}

#[tokio::test]
async fn large_json_is_gzipped_by_accept_encoding() {
    let app = limited_app(&[]).await;
    let id = app.ingest(&long_call("gzip")).await;
    let client = raw_client();
    let fetch = |accept: Option<&'static str>| {
        let mut req = client
            .get(app.url(&format!("/v1/calls/{id}")))
            .bearer_auth(&app.key);
        if let Some(accept) = accept {
            req = req.header(header::ACCEPT_ENCODING, accept);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let headers = resp.headers().clone();
            (headers, resp.bytes().await.unwrap().to_vec())
        }
    };
    let (plain_headers, plain) = fetch(None).await;
    assert!(plain.len() > 2 * 1024, "{} bytes", plain.len());
    assert!(plain_headers.get(header::CONTENT_ENCODING).is_none());
    assert_eq!(plain_headers[header::VARY], "accept-encoding");

    for accept in ["gzip", "gzip, deflate, br", "*", "br;q=1, gzip;q=0.5"] {
        let (headers, body) = fetch(Some(accept)).await;
        assert_eq!(headers[header::CONTENT_ENCODING], "gzip", "{accept}");
        assert_eq!(headers[header::VARY], "accept-encoding");
        assert_eq!(
            headers[header::CONTENT_LENGTH].to_str().unwrap(),
            body.len().to_string()
        );
        let ratio = headers["x-compression-ratio"].to_str().unwrap();
        assert_eq!(
            ratio,
            format!("{:.2}", plain.len() as f64 / body.len() as f64)
        );
        assert!(ratio.parse::<f64>().unwrap() > 2.0, "{ratio}");
        assert_eq!(gunzip(&body), plain, "the body round-trips");
        // The rate-limit headers pass through.
        assert!(headers.contains_key("x-ratelimit-remaining"));
    }
    for accept in [
        "gzip;q=0",
        "identity",
        "br, deflate",
        "gzip;q=0, *",
        "*;q=0",
        "gzip;q=0.2, identity;q=0.8",
    ] {
        let (headers, body) = fetch(Some(accept)).await;
        assert!(headers.get(header::CONTENT_ENCODING).is_none(), "{accept}");
        assert!(headers.get("x-compression-ratio").is_none(), "{accept}");
        assert_eq!(body, plain, "{accept}");
    }
    // HEAD: untouched.
    let resp = client
        .head(app.url(&format!("/v1/calls/{id}")))
        .bearer_auth(&app.key)
        .header(header::ACCEPT_ENCODING, "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get(header::CONTENT_ENCODING).is_none());
}

/// Bodies of 1 KiB or less are sent as they are, beside a larger one of the same app that is
/// compressed.
#[tokio::test]
async fn small_bodies_are_not_compressed() {
    let app = limited_app(&[]).await;
    let id = app.ingest(&long_call("small")).await;
    let client = raw_client();
    let fetch = |path: String| {
        client
            .get(app.url(&path))
            .bearer_auth(&app.key)
            .header(header::ACCEPT_ENCODING, "gzip")
            .send()
    };
    for path in ["/healthz", "/readyz", "/v1/jobs/not-a-uuid"] {
        let resp = fetch(path.to_string()).await.unwrap();
        assert!(resp.headers().get(header::CONTENT_ENCODING).is_none());
        assert!(resp.headers().get("x-compression-ratio").is_none());
        assert!(resp.headers().get(header::VARY).is_none());
        let length = resp.content_length().unwrap();
        let body: Value = resp.json().await.unwrap();
        assert!(length <= 1024, "{path}: {length} bytes, {body}");
    }
    let resp = fetch(format!("/v1/calls/{id}")).await.unwrap();
    assert_eq!(resp.headers()[header::CONTENT_ENCODING], "gzip");
}

/// The middleware on its own router: only compressible types are compressed; streamed
/// bodies (SSE), already-encoded bodies and HEAD pass untouched; text of 1 KiB stays as it
/// is, 1 byte more is compressed.
#[tokio::test]
async fn compression_follows_content_type_length_and_encoding() {
    let text = "Thanks for joining. What prompted you to look at analytics now? ".repeat(64);
    let typed = |content_type: &'static str, body: String| {
        move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, content_type)], body) }
        }
    };
    let stream = |content_type: &'static str, body: String| {
        move || {
            let chunks: Vec<Result<String, std::io::Error>> =
                (0..4).map(|_| Ok(body.clone())).collect();
            async move {
                (
                    [(header::CONTENT_TYPE, content_type)],
                    Body::from_stream(futures::stream::iter(chunks)),
                )
            }
        }
    };
    let encoded = {
        let body = text.clone();
        move || {
            let body = body.clone();
            async move {
                (
                    [
                        (header::CONTENT_TYPE, "text/plain"),
                        (header::CONTENT_ENCODING, "br"),
                    ],
                    body,
                )
            }
        }
    };
    let router = Router::new()
        .route(
            "/text",
            get(typed("text/plain; charset=utf-8", text.clone())),
        )
        .route("/svg", get(typed("image/svg+xml", text.clone())))
        .route("/png", get(typed("image/png", text.clone())))
        .route(
            "/octets",
            get(typed("application/octet-stream", text.clone())),
        )
        .route("/small", get(typed("text/plain", "x".repeat(1024))))
        .route("/just-over", get(typed("text/plain", "x".repeat(1025))))
        .route("/sse", get(stream("text/event-stream", text.clone())))
        .route(
            "/json-stream",
            get(stream("application/json", text.clone())),
        )
        .route("/encoded", get(encoded))
        .layer(axum::middleware::from_fn_with_state(
            compression::MIN_SIZE,
            compression::gzip,
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = raw_client();
    let fetch = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{base}{path}"))
            .header(header::ACCEPT_ENCODING, "gzip")
            .send()
    };
    for path in ["/text", "/svg", "/just-over"] {
        let resp = fetch(reqwest::Method::GET, path).await.unwrap();
        let encoding = resp.headers().get(header::CONTENT_ENCODING).cloned();
        assert_eq!(encoding, Some(HeaderValue::from_static("gzip")), "{path}");
        let want = if path == "/just-over" {
            "x".repeat(1025)
        } else {
            text.clone()
        };
        assert_eq!(gunzip(&resp.bytes().await.unwrap()), want.as_bytes());
    }
    for path in [
        "/png",
        "/octets",
        "/small",
        "/sse",
        "/json-stream",
        "/encoded",
    ] {
        let resp = fetch(reqwest::Method::GET, path).await.unwrap();
        let encoding = resp.headers().get(header::CONTENT_ENCODING).cloned();
        let expected = (path == "/encoded").then(|| HeaderValue::from_static("br"));
        assert_eq!(encoding, expected, "{path}");
        assert!(
            resp.headers().get("x-compression-ratio").is_none(),
            "{path}"
        );
        let body = resp.bytes().await.unwrap();
        let want = match path {
            "/small" => 1024,
            "/sse" | "/json-stream" => text.len() * 4,
            _ => text.len(),
        };
        assert_eq!(body.len(), want, "{path}: sent as it is");
    }
    let resp = fetch(reqwest::Method::HEAD, "/text").await.unwrap();
    assert!(resp.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(
        resp.headers()[header::CONTENT_LENGTH].to_str().unwrap(),
        text.len().to_string(),
        "HEAD announces the identity length"
    );
}

/// `callcoach bench ratelimit` on a small run: decisions through the front's limiter beside
/// raw GETs, for one client and several, none failed open, nothing left in Redis but
/// expiring buckets. Timing targets are the bench's business, never asserted here.
#[tokio::test]
async fn bench_ratelimit_reports_decisions_beside_raw_gets() {
    let redis = crate::helpers::TestRedis::start().await;
    let env = [
        ("DATABASE_URL", "postgres://unused@127.0.0.1:1/unused"),
        ("REDIS_URL", &redis.url()),
        ("RATE_LIMIT_TIMEOUT_MS", "2000"),
    ];
    let args = [
        "bench",
        "ratelimit",
        "--iterations",
        "300",
        "--clients",
        "5",
    ];
    let out = crate::cli::callcoach(&env, &args);
    assert!(out.status.success(), "{}", crate::cli::stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("the report is JSON");
    assert_eq!(report["benchmark"], "ratelimit");
    let single = &report["single_client"];
    assert_eq!(single["allowed"]["samples"], 300);
    assert_eq!(single["verdicts"]["allowed"], 300);
    assert_eq!(single["refused_verdicts"]["refused"], 300);
    assert_eq!(single["first_request_verdicts"]["allowed"], 300);
    // A busy key leases: a few EVALSHAs for 300 decisions. A refused one asks Redis once,
    // learns when its next token exists and refuses here until then. A key's first request
    // costs the one EVALSHA of its lease.
    let calls = |name: &str| single[name].as_f64().unwrap();
    assert!(calls("allowed_evalsha_per_decision") < 0.2, "{single}");
    assert!(calls("refused_evalsha_per_decision") < 0.01, "{single}");
    assert_eq!(calls("first_request_evalsha_per_decision"), 1.0, "{single}");
    assert_eq!(report["concurrent"]["clients"], 5);
    assert_eq!(report["concurrent"]["decisions"]["samples"], 1200);
    assert_eq!(report["concurrent"]["verdicts"]["failed_open"], 0);
    for figure in [
        &single["allowed"]["p99_us"],
        &single["raw_redis_get"]["p50_us"],
        &report["concurrent"]["decisions_per_sec"],
        &report["concurrent"]["raw_gets_per_sec"],
    ] {
        assert!(figure.as_f64().unwrap() > 0.0, "{report}");
    }
    let mut conn = redis.conn().await;
    let keys: Vec<String> = conn.keys("callcoach:*").await.unwrap();
    for key in keys {
        // -1: no expiry. -2: the key expired between KEYS and PTTL, as it should.
        let ttl: i64 = conn.pttl(&key).await.unwrap();
        assert_ne!(ttl, -1, "{key} never expires");
    }
}

/// A keyed GET of a job that does not exist, sent by a page of `origin`.
async fn get_from_origin(app: &TestApp, origin: &str) -> reqwest::Response {
    app.http
        .get(app.url(&job_path()))
        .bearer_auth(&app.key)
        .header("origin", origin)
        .send()
        .await
        .unwrap()
}

/// `CORS_ALLOWED_ORIGINS`: a listed origin's preflight is answered without a key, and its
/// requests may read the rate-limit headers; other origins, and every origin without the
/// setting, get no CORS headers.
#[tokio::test]
async fn cors_answers_listed_origins_only() {
    let app = limited_app(&[(
        "CORS_ALLOWED_ORIGINS",
        "https://app.example, http://localhost:3000",
    )])
    .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/v1/analyses"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            )
            .send()
    };
    let resp = preflight("https://app.example").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header_of(&resp, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let allowed = header_of(&resp, "access-control-allow-headers").unwrap();
    for name in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert!(
        header_of(&resp, "access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(header_of(&other, "access-control-allow-origin").is_none());

    let resp = get_from_origin(&app, "http://localhost:3000").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        header_of(&resp, "access-control-allow-origin").as_deref(),
        Some("http://localhost:3000")
    );
    let exposed = header_of(&resp, "access-control-expose-headers").unwrap();
    assert!(
        exposed.contains("x-ratelimit-remaining") && exposed.contains("retry-after"),
        "{exposed}"
    );

    let plain = limited_app(&[]).await;
    let resp = get_from_origin(&plain, "https://app.example").await;
    assert_eq!(resp.status(), 404);
    assert!(header_of(&resp, "access-control-allow-origin").is_none());
}
