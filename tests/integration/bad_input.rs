//! Bad input on every interface gets a 4xx JSON error naming the problem and stores nothing;
//! slow, stalled and surplus connections are cut off or held back by the server's limits.

use crate::{
    cli::{callcoach, stderr},
    helpers::{Options, TestApp, sample_call, spawn_app, spawn_app_with},
};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn assert_error(status: u16, body: &Value, expected: u16, code: &str, needle: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(needle),
        "message should name {needle:?}: {body}"
    );
}

/// Rows of every table an ingest writes.
async fn stored_rows(app: &TestApp) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM calls), (SELECT count(*) FROM reps),
                (SELECT count(*) FROM speakers), (SELECT count(*) FROM transcripts)",
    )
    .fetch_one(&app.app.pg)
    .await
    .unwrap()
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&app.app.pg)
        .await
        .unwrap()
}

/// A call with every optional text field filled in.
fn full_call(tag: &str) -> Value {
    let mut call = sample_call(tag);
    call["external_id"] = json!(format!("crm-{tag}"));
    call["rep_name"] = json!("Ana Rep");
    call["rep_team"] = json!("West");
    call["tags"] = json!(["q3", "expansion"]);
    call["metadata"] = json!({
        "crm": "sf-1",
        "deal": { "stages": ["intro", "demo"] },
    });
    call
}

/// Sets the value at a JSON pointer.
fn set(call: &mut Value, pointer: &str, value: Value) {
    *call
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer}")) = value;
}

/// PUT a rubric with the admin key.
async fn put_rubric(app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    let resp = app
        .http
        .put(app.url(path))
        .bearer_auth(&app.admin_key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// POST raw bytes with a content type (or none) with the producer key.
async fn post_raw(
    app: &TestApp,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = app.http.post(app.url(path)).bearer_auth(&app.key);
    if let Some(content_type) = content_type {
        req = req.header("content-type", content_type);
    }
    let resp = req.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn nul_characters_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let nul = "before\u{0}after";
    for (pointer, field) in [
        ("/title", "title"),
        ("/product", "product"),
        ("/call_type", "call_type"),
        ("/external_id", "external_id"),
        ("/rep_email", "rep_email"),
        ("/rep_name", "rep_name"),
        ("/rep_team", "rep_team"),
        ("/speakers/0/name", "speakers[0].name"),
        ("/speakers/1/email", "speakers[1].email"),
        ("/speakers/0/role", "speakers[0].role"),
        ("/speakers/1/company_side", "speakers[1].company_side"),
        ("/transcript/3/speaker", "transcript[3].speaker"),
        ("/transcript/3/text", "transcript[3].text"),
        ("/tags/1", "tags[1]"),
        ("/metadata/crm", "metadata.crm"),
        ("/metadata/deal/stages/1", "metadata.deal.stages[1]"),
    ] {
        let mut call = full_call("nul");
        set(&mut call, pointer, json!(nul));
        let (status, body) = app.post("/v1/calls", &call).await;
        assert_error(status, &body, 400, "invalid_request", field);
        if field != "speakers[1].company_side" {
            assert_error(status, &body, 400, "invalid_request", "NUL character");
        }
    }
    let mut call = full_call("nul-key");
    call["metadata"] = json!({ "deal": { "st\u{0}age": "x" } });
    let (status, body) = app.post("/v1/calls", &call).await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "metadata.deal has a key",
    );
    assert_eq!(stored_rows(&app).await, (0, 0, 0, 0), "nothing was stored");

    // Rubrics: the criteria, and the version (which fails its grammar).
    let rubrics = count(&app, "SELECT count(*) FROM coaching_rubrics").await;
    let (status, body) = put_rubric(
        &app,
        "/v1/rubrics/ae/discovery",
        &json!({ "version": "2.0.0", "criteria": "Ask\u{0}questions" }),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "criteria contains a NUL",
    );
    let (status, body) = put_rubric(
        &app,
        "/v1/rubrics/ae/discovery",
        &json!({ "version": "2.0\u{0}", "criteria": "Ask questions" }),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "not a valid rubric version",
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM coaching_rubrics").await,
        rubrics
    );
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 0);

    // The same call without the NUL is stored.
    app.ingest(&full_call("nul")).await;
    assert_eq!(stored_rows(&app).await, (1, 1, 2, 1));
}

#[tokio::test]
async fn lengths_are_bounded_in_characters() {
    let app = spawn_app().await;
    let long = |n: usize| json!("é".repeat(n));
    for (pointer, value, field) in [
        ("/external_id", json!("x".repeat(20_000)), "external_id"),
        ("/external_id", long(201), "external_id"),
        ("/title", long(501), "title"),
        ("/product", long(101), "product"),
        ("/call_type", long(101), "call_type"),
        ("/rep_name", long(201), "rep_name"),
        ("/rep_team", long(201), "rep_team"),
        ("/speakers/0/name", long(201), "speakers[0].name"),
        ("/speakers/0/role", long(101), "speakers[0].role"),
        ("/transcript/2/speaker", long(201), "transcript[2].speaker"),
        (
            "/rep_email",
            json!(format!("{}@lumen.example", "a".repeat(310))),
            "rep_email",
        ),
        ("/tags/0", long(65), "tags[0]"),
    ] {
        let mut call = full_call("long");
        set(&mut call, pointer, value);
        let (status, body) = app.post("/v1/calls", &call).await;
        assert_error(status, &body, 400, "invalid_request", field);
    }
    // E-mail shapes.
    for email in [
        "ana",
        "ana@",
        "@lumen.example",
        "ana rep@lumen.example",
        "ana@localhost",
        "ana@@lumen.example",
        "ana@lumen..example",
        "<ana@lumen.example>",
        "ana@lumen.example\n",
    ] {
        for pointer in ["/rep_email", "/speakers/1/email"] {
            let mut call = full_call("email");
            set(&mut call, pointer, json!(email));
            let (status, body) = app.post("/v1/calls", &call).await;
            assert_error(
                status,
                &body,
                400,
                "invalid_request",
                "not an e-mail address",
            );
        }
    }
    // Counts of entries.
    let mut call = full_call("speakers");
    let speaker = call["speakers"][1].clone();
    call["speakers"] = json!(vec![speaker; 51]);
    let (status, body) = app.post("/v1/calls", &call).await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "speakers: at most 50",
    );
    let mut call = full_call("utterances");
    let utterance = json!({ "speaker": "Ana Rep", "text": "ok" });
    call["transcript"] = json!(vec![utterance; 10_001]);
    let (status, body) = app.post("/v1/calls", &call).await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "at most 10000 utterances",
    );
    let mut call = full_call("year");
    call["scheduled_at"] = json!("0099-01-01T00:00:00Z");
    let (status, body) = app.post("/v1/calls", &call).await;
    assert_error(status, &body, 400, "invalid_request", "scheduled_at");
    assert_eq!(stored_rows(&app).await, (0, 0, 0, 0), "nothing was stored");

    // At the limits, counted in characters (each 'é' is two bytes), the call is stored.
    let mut call = full_call("limits");
    call["external_id"] = long(200);
    call["title"] = long(500);
    call["product"] = long(100);
    call["rep_name"] = long(200);
    let (status, body) = app.post("/v1/calls", &call).await;
    assert_eq!(status, 201, "{body}");
    let external_id: String = sqlx::query_scalar("SELECT external_id FROM calls")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(external_id.chars().count(), 200);
}

#[tokio::test]
async fn rubric_versions_follow_one_grammar_everywhere() {
    let app = spawn_app().await;
    let rubrics = count(&app, "SELECT count(*) FROM coaching_rubrics").await;
    for version in [
        "v\n2",
        "*",
        "../../etc",
        "\u{202E}1.0",
        "1.0\u{202E}",
        "",
        " 2.0",
        "2.0 ",
        "1:2",
        "-1",
        ".1",
        "a/b",
        "ü1",
        &"1".repeat(33),
    ] {
        let (status, body) = put_rubric(
            &app,
            "/v1/rubrics/ae/discovery",
            &json!({ "version": version, "criteria": "Ask open questions." }),
        )
        .await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            "not a valid rubric version",
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains('\n') && !message.contains('\u{202E}'),
            "the message escapes the version: {message:?}"
        );
    }
    let criteria = "Ask open questions.".to_string();
    for (text, needle) in [
        (json!("é".repeat(20_001)), "criteria is 20001 characters"),
        (json!("   "), "criteria must not be empty"),
    ] {
        let body = json!({ "version": "9.9.9", "criteria": text });
        let (status, answer) = put_rubric(&app, "/v1/rubrics/ae/discovery", &body).await;
        assert_error(status, &answer, 400, "invalid_request", needle);
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM coaching_rubrics").await,
        rubrics
    );
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 0);

    // Unknown role and dimension are named.
    let body = json!({ "version": "2.0.0", "criteria": criteria });
    let (status, answer) = put_rubric(&app, "/v1/rubrics/cfo/discovery", &body).await;
    assert_error(status, &answer, 400, "invalid_request", "cfo");
    let (status, answer) = put_rubric(&app, "/v1/rubrics/ae/closing", &body).await;
    assert_error(status, &answer, 400, "invalid_request", "closing");

    // Good versions are stored; 20 000 two-byte characters of criteria are within the limit.
    for version in ["2.0.0", "2026-06", "v3", "1.0.0-rc.1"] {
        let body = json!({ "version": version, "criteria": "é".repeat(20_000) });
        let (status, answer) = put_rubric(&app, "/v1/rubrics/ae/discovery", &body).await;
        assert_eq!(status, 200, "{version}: {answer}");
    }

    // The job payload and the CLI use the same grammar.
    let kind = callcoach::jobs::registry::find("invalidate_rubric").unwrap();
    let err = kind
        .new_job(json!({ "role": "ae", "dimension": "discovery", "version": "../x" }))
        .expect_err("a bad version is refused");
    assert!(err.contains("not a valid rubric version"), "{err}");
    assert!(
        kind.new_job(json!({ "role": "ae", "dimension": "discovery", "version": "1.0.0" }))
            .is_ok()
    );
    let database_url = app.env["DATABASE_URL"].clone();
    let redis_url = app.env["REDIS_URL"].clone();
    let out = callcoach(
        &[("DATABASE_URL", &database_url), ("REDIS_URL", &redis_url)],
        &[
            "jobs",
            "enqueue",
            "invalidate_rubric",
            "--args",
            r#"{"role":"ae","dimension":"discovery","version":"*"}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a valid rubric version"),
        "{}",
        stderr(&out)
    );
    let bad_jobs = count(
        &app,
        "SELECT count(*) FROM jobs WHERE kind = 'invalidate_rubric' AND payload->>'version' = '*'",
    )
    .await;
    assert_eq!(bad_jobs, 0);
}

#[tokio::test]
async fn dimension_lists_are_bounded_and_deduplicated() {
    let app = spawn_app().await;
    let call_id = app.ingest(&sample_call("dims")).await;
    let many = vec!["discovery"; 50_000];
    let (status, body) = app
        .post(
            "/v1/analyses",
            &json!({ "call_id": call_id, "dimensions": many }),
        )
        .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "dimensions: at most 4",
    );
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 0);
    let (status, body) = app
        .post(
            "/v1/analyses",
            &json!({ "call_id": call_id, "dimensions": ["discovery", "closing"] }),
        )
        .await;
    assert_error(status, &body, 422, "invalid_request", "closing");
    assert_eq!(count(&app, "SELECT count(*) FROM jobs").await, 0);

    // Duplicates are removed before the job is stored.
    let job_id = app
        .enqueue(
            call_id,
            &["engagement", "discovery", "engagement", "discovery"],
        )
        .await;
    let payload: Value = sqlx::query_scalar("SELECT payload FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(payload["dimensions"], json!(["discovery", "engagement"]));

    // A payload given by hand is held to the same bound.
    let kind = callcoach::jobs::registry::find("analyze_call").unwrap();
    let err = kind
        .new_job(json!({ "call_id": call_id, "dimensions": vec!["engagement"; 5] }))
        .expect_err("five dimensions are refused");
    assert!(err.contains("at most 4"), "{err}");
    let dims = ["--dimension", "discovery"].repeat(5);
    let mut args = vec![
        "enqueue",
        "analysis",
        "--call-id",
        "01a2131b-0c74-71e0-a65e-a23d3eaab713",
    ];
    args.extend(dims);
    let out = callcoach(&[], &args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("at most 4"), "{}", stderr(&out));
}

#[tokio::test]
async fn malformed_requests_get_a_json_4xx() {
    let app = spawn_app_with(Options {
        env: vec![("HTTP_MAX_BODY_BYTES", (64 * 1024).to_string())],
        ..Default::default()
    })
    .await;
    let json_type = Some("application/json");
    let (status, body) = post_raw(&app, "/v1/calls", json_type, b"{\"title\": ".to_vec()).await;
    assert_error(status, &body, 400, "invalid_json", "");
    let (status, body) = post_raw(&app, "/v1/calls", json_type, Vec::new()).await;
    assert_error(status, &body, 400, "invalid_json", "");
    let mut wrong_type = sample_call("types");
    wrong_type["title"] = json!(5);
    let (status, body) = app.post("/v1/calls", &wrong_type).await;
    assert_error(status, &body, 422, "invalid_request", "title");
    let (status, body) = app
        .post("/v1/analyses", &json!({ "call_id": "not-a-uuid" }))
        .await;
    assert_error(status, &body, 422, "invalid_request", "call_id");
    let sample = serde_json::to_vec(&sample_call("ct")).unwrap();
    for content_type in [None, Some("text/plain"), Some("application/xml")] {
        let (status, body) = post_raw(&app, "/v1/calls", content_type, sample.clone()).await;
        assert_error(status, &body, 415, "unsupported_media_type", "Content-Type");
    }
    // Invalid UTF-8 inside a JSON string; a lone surrogate escape.
    let mut bytes = serde_json::to_vec(&sample_call("utf8")).unwrap();
    let at = bytes.windows(9).position(|w| w == b"Discovery").unwrap();
    bytes[at] = 0xff;
    let (status, body) = post_raw(&app, "/v1/calls", json_type, bytes).await;
    assert_error(status, &body, 400, "invalid_utf8", "not valid UTF-8");
    let body = serde_json::to_string(&sample_call("surrogate"))
        .unwrap()
        .replacen("Discovery", "\\ud800", 1);
    let (status, answer) = post_raw(&app, "/v1/calls", json_type, body.into_bytes()).await;
    assert_error(status, &answer, 400, "invalid_json", "escape");

    // Bodies over HTTP_MAX_BODY_BYTES (64 KiB here), with a length or chunked.
    let mut big = sample_call("big");
    big["transcript"][0]["text"] = json!("word ".repeat(20_000));
    let big = serde_json::to_vec(&big).unwrap();
    let (status, body) = post_raw(&app, "/v1/calls", json_type, big.clone()).await;
    assert_error(
        status,
        &body,
        413,
        "payload_too_large",
        "HTTP_MAX_BODY_BYTES",
    );
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    let head = format!(
        "POST /v1/calls HTTP/1.1\r\nHost: callcoach\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        app.key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in big.chunks(8 * 1024) {
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if stream.write_all(&frame).await.is_err() {
            break; // the server may stop reading once the limit is passed
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let answer = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut stream))
        .await
        .expect("answered");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    assert!(answer.contains("65536 bytes"), "{answer}");
    let mut fits = sample_call("fits");
    fits["transcript"][0]["text"] = json!("word ".repeat(10_000));
    let (status, body) = app.post("/v1/calls", &fits).await;
    assert_eq!(status, 201, "50 KB is under the configured limit: {body}");

    // Bad ids and segments in paths.
    for path in ["/v1/jobs/not-a-uuid", "/v1/calls/%FF%FE", "/v1/calls/1%00"] {
        let (status, body) = app.get(path).await;
        assert_error(status, &body, 400, "invalid_path", "");
    }
    let (status, body) = put_rubric(
        &app,
        "/v1/rubrics/ae/%00",
        &json!({ "version": "2.0.0", "criteria": "x" }),
    )
    .await;
    assert_error(status, &body, 400, "invalid_request", "unknown dimension");

    // Huge headers: a JSON 431 up to hyper's own limit, a bare 431 beyond it; never a 5xx.
    let resp = app
        .http
        .get(app.url("/healthz"))
        .header("x-padding", "p".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_error(status, &body, 431, "headers_too_large", "at most 32768");
    let resp = app
        .http
        .get(app.url("/healthz"))
        .header("x-padding", "p".repeat(1024 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 431);
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200, "the server still serves");

    assert_eq!(stored_rows(&app).await.0, 1, "only the call that fits");
}

/// Reads from `stream` until EOF or an error; returns what was read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn slow_headers_are_disconnected_after_the_header_timeout() {
    let app = spawn_app_with(Options {
        env: vec![("HTTP_HEADER_TIMEOUT_MS", "300".into())],
        ..Default::default()
    })
    .await;
    // Part of a request head, then nothing; and a connection that never sends a byte.
    let mut partial = TcpStream::connect(addr(&app)).await.unwrap();
    partial
        .write_all(b"POST /v1/calls HTTP/1.1\r\nHost: callcoach\r\nContent-Ty")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(addr(&app)).await.unwrap();
    let started = Instant::now();
    for stream in [&mut partial, &mut silent] {
        let read = tokio::time::timeout(Duration::from_secs(10), read_to_close(stream)).await;
        let got = read.expect("the server closes a connection whose headers stall");
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{got:?}"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed by the timeout, not at once: {:?}",
        started.elapsed()
    );
    // A request sent in time on a fresh connection is served, and the idle keep-alive
    // connection after it is closed by the same timeout.
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: callcoach\r\n\r\n")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut stream))
        .await
        .expect("the idle connection is closed");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

/// Sends the head of a `POST /v1/calls` announcing a 100 000-byte body, then one byte every
/// 100 ms (the whole body would take almost three hours); returns what the server answered
/// by the time it closed the connection, and how long that took.
async fn trickle_a_call(app: &TestApp, extra_header: &str) -> (String, Duration) {
    let stream = TcpStream::connect(addr(app)).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST /v1/calls HTTP/1.1\r\nHost: callcoach\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n{extra_header}\r\n",
        app.key
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..100_000 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("the server gives up on the body and closes");
    trickle.abort();
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn trickling_bodies_get_408_after_the_body_timeout() {
    let app = spawn_app_with(Options {
        env: vec![("HTTP_BODY_TIMEOUT_MS", "500".into())],
        ..Default::default()
    })
    .await;
    // Read by the handler, and by the idempotency layer first.
    for extra_header in ["", "Idempotency-Key: trickle-1\r\n"] {
        let (answer, elapsed) = trickle_a_call(&app, extra_header).await;
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{extra_header:?}: {answer}"
        );
        assert!(answer.contains("body_timeout"), "{answer}");
        assert!(answer.contains("HTTP_BODY_TIMEOUT_MS"), "{answer}");
        assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    }
    assert_eq!(stored_rows(&app).await, (0, 0, 0, 0));
}

/// Sends `GET /healthz` on a kept-alive connection and reads the whole response.
async fn healthz_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: callcoach\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"}") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let app = spawn_app_with(Options {
        env: vec![
            ("HTTP_MAX_CONNECTIONS", "4".into()),
            ("HTTP_HEADER_TIMEOUT_MS", "60000".into()),
        ],
        ..Default::default()
    })
    .await;
    // Four kept-alive connections, each served once: the server holds all four.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
        assert!(healthz_on(&mut stream).await.starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    // A fifth client gets through the kernel's backlog but is not served.
    let mut fifth = TcpStream::connect(addr(&app)).await.unwrap();
    let waiting = tokio::spawn(async move {
        let answer = healthz_on(&mut fifth).await;
        (answer, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!waiting.is_finished(), "the fifth connection was served");
    // One closes: the fifth is served.
    let closed_at = Instant::now();
    drop(held.pop());
    let (answer, served_at) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(served_at >= closed_at);
    // The other three still work.
    for stream in &mut held {
        assert!(healthz_on(stream).await.starts_with("HTTP/1.1 200"));
    }
}

#[tokio::test]
async fn graceful_shutdown_answers_requests_in_flight_and_closes_idle_connections() {
    let app = spawn_app().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let server = {
        let (app, token) = (app.app.clone(), token.clone());
        tokio::spawn(async move { app.serve(listener, token).await })
    };
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert!(healthz_on(&mut idle).await.starts_with("HTTP/1.1 200"));
    // A request being read when the shutdown begins: `Expect: 100-continue` makes the server
    // say when the handler starts reading the body.
    let body = serde_json::to_vec(&sample_call("shutdown")).unwrap();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/calls HTTP/1.1\r\nHost: callcoach\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        app.key,
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = busy.read(&mut buf).await.unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]);
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    let (first, rest) = body.split_at(body.len() / 2);
    busy.write_all(first).await.unwrap();
    token.cancel();
    let closed = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut idle))
        .await
        .expect("the idle connection is closed at once");
    assert!(closed.is_empty());
    busy.write_all(rest).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut busy))
        .await
        .expect("answered, then closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns once its connections are closed")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
    assert_eq!(stored_rows(&app).await.0, 1);
}
