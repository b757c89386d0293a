//! `bench ratelimit`: latency and throughput of the HTTP front's rate-limit decision, through
//! the project's limiter ([`HttpRateLimiter::check`]: tokens leased from the shared
//! token-bucket script, see [`crate::http::leases`]), with one client and with many
//! concurrent ones, beside a plain Redis `GET` round trip on the same kind of connection,
//! measured in the same run, with how many `EVALSHA`s Redis answered per decision
//! (`INFO commandstats`).
//!
//! Each client is an API key of its own (its own bucket), as distinct callers of the front
//! are. The allowed path is measured with limits no client reaches; the refused path with a
//! limit of 1; the first-request path with a new key for every decision, so each one costs
//! the `EVALSHA` of a one-token lease (what a key sending a request now and then pays). Only
//! Redis is needed; every bucket expires within a second of the run.

use super::{ratio, summary_us};
use crate::{
    config::Settings,
    http::limits::{HttpRateLimiter, RateLimitSettings, RouteClass, Verdict},
};
use anyhow::Context;
use futures::future::join_all;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Commands in flight per connection: the same as the front's limiter connection.
const IN_FLIGHT: usize = 1024;

/// Decisions before the timed ones (loads the script, opens the connection).
const WARM_UP: usize = 200;

/// Runs the benchmark: `iterations` timed decisions with one client, `iterations × 4`
/// spread over `clients` concurrent clients.
pub async fn run(settings: Settings, iterations: usize, clients: usize) -> anyhow::Result<Value> {
    let clients = clients.max(1);
    let timeout = settings.http_rate_limits.timeout;
    let roomy = RateLimitSettings {
        enabled: true,
        get_per_min: u32::MAX,
        timeout,
        ..RateLimitSettings::default()
    };
    let tight = RateLimitSettings {
        get_per_min: 1,
        ..roomy
    };
    let limiter = HttpRateLimiter::new(crate::redis_connection(&settings, IN_FLIGHT)?, &roomy);
    let refusing = HttpRateLimiter::new(crate::redis_connection(&settings, IN_FLIGHT)?, &tight);
    let raw = crate::redis_connection(&settings, IN_FLIGHT)?;
    let raw_key = format!("callcoach:bench:ratelimit:{}", Uuid::new_v4().simple());
    let mut conn = raw.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        redis::cmd("SET")
            .arg(&raw_key)
            .arg("1")
            .arg("EX")
            .arg(600)
            .query_async::<()>(&mut conn),
    )
    .await
    .context("Redis did not answer within 5 s")?
    .context("Redis refused SET")?;

    let mut tally = Tally::default();
    decisions(&limiter, Uuid::new_v4(), WARM_UP, &mut tally).await;
    let mut tally = Tally::default();
    let calls = evalsha_calls(&raw).await?;
    let started = Instant::now();
    let allowed = decisions(&limiter, Uuid::new_v4(), iterations, &mut tally).await;
    let allowed_per_sec = iterations as f64 / started.elapsed().as_secs_f64();
    let allowed_calls = evalsha_calls(&raw).await? - calls;
    let refused_key = Uuid::new_v4();
    decisions(&refusing, refused_key, 1, &mut Tally::default()).await;
    let mut refused_tally = Tally::default();
    let calls = evalsha_calls(&raw).await?;
    let refused = decisions(&refusing, refused_key, iterations, &mut refused_tally).await;
    let refused_calls = evalsha_calls(&raw).await? - calls;
    let mut first_tally = Tally::default();
    let calls = evalsha_calls(&raw).await?;
    let first = first_decisions(&limiter, iterations, &mut first_tally).await;
    let first_calls = evalsha_calls(&raw).await? - calls;
    let started = Instant::now();
    let raw_single = raw_gets(&raw, &raw_key, iterations).await?;
    let raw_per_sec = iterations as f64 / started.elapsed().as_secs_f64();

    let per_client = (iterations * 4 / clients).max(1);
    let calls = evalsha_calls(&raw).await?;
    let started = Instant::now();
    let runs = (0..clients).map(|_| {
        let limiter = limiter.clone();
        async move {
            let mut tally = Tally::default();
            let samples = decisions(&limiter, Uuid::new_v4(), per_client, &mut tally).await;
            (samples, tally)
        }
    });
    let mut concurrent_tally = Tally::default();
    let mut concurrent = Vec::with_capacity(per_client * clients);
    for (samples, tally) in join_all(runs).await {
        concurrent.extend(samples);
        concurrent_tally.add(&tally);
    }
    let concurrent_per_sec = concurrent.len() as f64 / started.elapsed().as_secs_f64();
    let per_decision = |calls: u64, n: usize| ratio(calls as f64, n as f64);
    let concurrent_calls = per_decision(evalsha_calls(&raw).await? - calls, concurrent.len());
    let started = Instant::now();
    let raw_runs = (0..clients).map(|_| raw_gets(&raw, &raw_key, per_client));
    let raw_concurrent: Vec<f64> = join_all(raw_runs)
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    let raw_concurrent_per_sec = raw_concurrent.len() as f64 / started.elapsed().as_secs_f64();
    let _: Result<(), _> = redis::cmd("DEL").arg(&raw_key).query_async(&mut conn).await;

    let compare = |decision: Vec<f64>, raw: Vec<f64>| {
        let (decision, raw) = (summary_us(decision), summary_us(raw));
        let p50 = ratio(
            decision["p50_us"].as_f64().unwrap_or(0.0),
            raw["p50_us"].as_f64().unwrap_or(1.0),
        );
        let p99 = ratio(
            decision["p99_us"].as_f64().unwrap_or(0.0),
            raw["p99_us"].as_f64().unwrap_or(1.0),
        );
        (decision, raw, p50, p99)
    };
    let (single, raw_single, p50_single, p99_single) = compare(allowed, raw_single);
    let (many, raw_many, p50_many, p99_many) = compare(concurrent, raw_concurrent);
    Ok(json!({
        "benchmark": "ratelimit",
        "decision": "HttpRateLimiter::check: tokens leased from the token-bucket script (one EVALSHA per lease)",
        "timeout_ms": timeout.as_millis() as u64,
        "single_client": {
            "allowed": single,
            "allowed_decisions_per_sec": allowed_per_sec.round(),
            "allowed_evalsha_per_decision": per_decision(allowed_calls, iterations),
            "refused_evalsha_per_decision": per_decision(refused_calls, iterations),
            "refused": summary_us(refused),
            "first_request": summary_us(first),
            "first_request_evalsha_per_decision": per_decision(first_calls, iterations),
            "first_request_verdicts": first_tally.json(),
            "raw_redis_get": raw_single,
            "raw_gets_per_sec": raw_per_sec.round(),
            "p50_ratio_vs_raw_get": p50_single,
            "p99_ratio_vs_raw_get": p99_single,
            "verdicts": tally.json(),
            "refused_verdicts": refused_tally.json(),
        },
        "concurrent": {
            "clients": clients,
            "decisions": many,
            "decisions_per_sec": concurrent_per_sec.round(),
            "evalsha_per_decision": concurrent_calls,
            "raw_redis_get": raw_many,
            "raw_gets_per_sec": raw_concurrent_per_sec.round(),
            "throughput_ratio_vs_raw_get": ratio(concurrent_per_sec, raw_concurrent_per_sec),
            "p50_ratio_vs_raw_get": p50_many,
            "p99_ratio_vs_raw_get": p99_many,
            "verdicts": concurrent_tally.json(),
        },
    }))
}

/// How the decisions came out (a failed-open one means Redis missed the timeout).
#[derive(Default)]
struct Tally {
    allowed: u64,
    refused: u64,
    failed_open: u64,
}

impl Tally {
    fn record(&mut self, verdict: &Verdict) {
        if verdict.failed_open() {
            self.failed_open += 1;
        } else if verdict.allowed {
            self.allowed += 1;
        } else {
            self.refused += 1;
        }
    }

    fn add(&mut self, other: &Tally) {
        self.allowed += other.allowed;
        self.refused += other.refused;
        self.failed_open += other.failed_open;
    }

    fn json(&self) -> Value {
        json!({ "allowed": self.allowed, "refused": self.refused, "failed_open": self.failed_open })
    }
}

/// `n` timed decisions for one key, in microseconds.
async fn decisions(limiter: &HttpRateLimiter, key: Uuid, n: usize, tally: &mut Tally) -> Vec<f64> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let verdict = limiter.check(key, RouteClass::Get).await;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        tally.record(&verdict);
    }
    samples
}

/// `n` timed decisions, each the first of a new key.
async fn first_decisions(limiter: &HttpRateLimiter, n: usize, tally: &mut Tally) -> Vec<f64> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.extend(decisions(limiter, Uuid::new_v4(), 1, tally).await);
    }
    samples
}

/// `n` timed GETs of `key`, in microseconds.
async fn raw_gets(conn: &ConnectionManager, key: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut conn = conn.clone();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// `EVALSHA` calls Redis has answered since it started (`INFO commandstats`).
async fn evalsha_calls(conn: &ConnectionManager) -> anyhow::Result<u64> {
    let mut conn = conn.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0))
}
