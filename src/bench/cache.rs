//! `bench cache`: lookup latency of each tier (Redis hit, Postgres hit, miss computed through
//! the emulator at 0 ms) for a typical, a 3 KB and a 20 KB result, raw Redis GET of the same
//! bytes as the baseline, throughput with concurrent clients, and the codec's size and speed.
//! Everything it writes is keyed by a per-run rubric version and removed at the end.

use super::{ratio, round1, summary_us};
use crate::{
    App,
    cache::{self, CacheKey, Outcome, Tier},
    config::Settings,
    db,
    llm::{self, CoachingResult, PromptInputs, emulator},
    model::{Dimension, Role, sha256_hex},
};
use anyhow::bail;
use futures::future::join_all;
use indicatif::ProgressBar;
use serde_json::{Value, json};
use std::time::Instant;
use uuid::Uuid;

/// Reference figures of the original Python implementation on this kind of machine.
const PYTHON_REFERENCE: &str = r#"{"get_3kb_p50_us":59,"get_3kb_p99_us":156,"get_20kb_p50_us":119,"get_20kb_p99_us":268,"gets_per_sec_50_threads":11600}"#;

/// Runs the cache benchmark.
pub async fn run(
    mut settings: Settings,
    iterations: usize,
    clients: usize,
) -> anyhow::Result<Value> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let emulator = emulator::spawn(listener, emulator::EmulatorConfig::default()).await?;
    settings.anthropic_base_url = emulator.base_url().to_string();
    settings.redis_max_connections = settings.redis_max_connections.max(clients);
    let app = App::build(settings)?;
    db::migrate(&app.pg).await?;
    let bench = Bench {
        app,
        run: format!("bench-{}", &Uuid::new_v4().simple().to_string()[..8]),
    };
    let report = bench.measure(iterations, clients).await;
    bench.cleanup().await?;
    emulator.shutdown().await;
    report
}

struct Bench {
    app: App,
    run: String,
}

/// A coaching result whose JSON is about `bytes` long.
fn result_of_size(bytes: usize) -> CoachingResult {
    let line =
        "Asked an open question about the reporting delay and quantified its cost to the team.";
    let n = (bytes / (line.len() + 3)).max(1);
    CoachingResult {
        score: 72,
        strengths: (0..n.div_ceil(3)).map(|i| format!("{i}: {line}")).collect(),
        improvements: (0..n / 3).map(|i| format!("{i}: {line}")).collect(),
        examples: (0..n / 3).map(|i| format!("{i}: {line}")).collect(),
        summary: "Solid discovery; confirm budget and next steps earlier.".into(),
    }
}

impl Bench {
    fn key(&self, name: &str) -> CacheKey {
        CacheKey {
            dimension: Dimension::Discovery,
            transcript_hash: sha256_hex(&format!("{}:{name}", self.run)),
            role: Role::Ae,
            rubric_version: self.run.clone(),
            fingerprint: "bench".into(),
        }
    }

    async fn store(&self, key: &CacheKey, result: &CoachingResult) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO coaching_cache (cache_key, dimension, transcript_hash, role, rubric_version,
                 fingerprint, result, model) VALUES ($1, $2, $3, $4, $5, $6, $7, 'bench')
             ON CONFLICT (cache_key) DO NOTHING",
        )
        .bind(key.to_string())
        .bind(key.dimension.as_str())
        .bind(&key.transcript_hash)
        .bind(key.role.as_str())
        .bind(&key.rubric_version)
        .bind(&key.fingerprint)
        .bind(serde_json::to_value(result)?)
        .execute(&self.app.pg)
        .await?;
        self.app.jobs.cache.redis_put(key, result).await;
        Ok(())
    }

    async fn measure(&self, iterations: usize, clients: usize) -> anyhow::Result<Value> {
        let bar = ProgressBar::new(7).with_message("cache benchmark");
        let mut sizes = serde_json::Map::new();
        for (name, bytes) in [("typical", 700), ("3kb", 3_000), ("20kb", 20_000)] {
            let key = self.key(name);
            self.store(&key, &result_of_size(bytes)).await?;
            let raw = self.raw_gets(&key, iterations).await?;
            let hit = self.redis_hits(&key, iterations).await?;
            let p99_ratio = ratio(
                hit["p99_us"].as_f64().unwrap_or(0.0),
                raw["p99_us"].as_f64().unwrap_or(1.0),
            );
            sizes.insert(
                name.into(),
                json!({ "redis_hit": hit, "raw_redis_get": raw, "p99_ratio_vs_raw_get": p99_ratio }),
            );
            bar.inc(1);
        }
        let postgres_hit = self
            .postgres_hits(&self.key("3kb"), iterations.min(2_000))
            .await?;
        bar.inc(1);
        let miss = self.misses(iterations.min(500)).await?;
        bar.inc(1);
        let concurrent = self
            .concurrent(&self.key("3kb"), iterations * 4, clients)
            .await?;
        bar.inc(1);
        bar.finish_and_clear();
        Ok(json!({
            "benchmark": "cache",
            "iterations": iterations,
            "by_size": sizes,
            "postgres_hit_3kb": postgres_hit,
            "miss_llm_emulator_0ms": miss,
            "concurrent_3kb": concurrent,
            "codec": codec_figures(),
            "reference_python": serde_json::from_str::<Value>(PYTHON_REFERENCE)?,
        }))
    }

    async fn raw_gets(&self, key: &CacheKey, n: usize) -> anyhow::Result<Value> {
        let mut conn = self.app.redis.clone();
        let rendered = key.to_string();
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let _: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&rendered)
                .query_async(&mut conn)
                .await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(summary_us(samples))
    }

    async fn redis_hits(&self, key: &CacheKey, n: usize) -> anyhow::Result<Value> {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let hit = self.app.jobs.cache.lookup(key, false).await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            if !matches!(hit, Some((_, Tier::Redis))) {
                bail!("expected a Redis hit for {key}");
            }
        }
        Ok(summary_us(samples))
    }

    async fn postgres_hits(&self, key: &CacheKey, n: usize) -> anyhow::Result<Value> {
        let mut conn = self.app.redis.clone();
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let _: () = redis::cmd("DEL")
                .arg(key.to_string())
                .query_async(&mut conn)
                .await?;
            let t = Instant::now();
            let hit = self.app.jobs.cache.lookup(key, false).await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            if !matches!(hit, Some((_, Tier::Postgres))) {
                bail!("expected a Postgres hit for {key}");
            }
        }
        Ok(summary_us(samples))
    }

    /// Full get-or-compute on fresh keys: lookups, lease, LLM call, durable write, Redis fill.
    async fn misses(&self, n: usize) -> anyhow::Result<Value> {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            let key = self.key(&format!("miss-{i}"));
            let t = Instant::now();
            let outcome = self
                .app
                .jobs
                .cache
                .get_or_compute(
                    &key,
                    || self.compute(&key),
                    |result, _: &()| async {
                        self.store(&key, &result).await?;
                        Ok::<_, anyhow::Error>(result)
                    },
                )
                .await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            if !matches!(outcome, Outcome::Computed { .. }) {
                bail!("expected a miss for {key}");
            }
        }
        Ok(summary_us(samples))
    }

    async fn compute(&self, key: &CacheKey) -> anyhow::Result<(CoachingResult, ())> {
        let prompt = PromptInputs {
            instructions: "Coach the rep.",
            role: "ae",
            rubric: "Score discovery.",
            knowledge_base: "Lumen Analytics.",
            transcript: &format!(
                "Rep: What slows your reporting? ({})\nBuyer: Refreshes.",
                key.transcript_hash
            ),
            dimension: "discovery",
            dimension_criteria: "Open questions.",
        };
        let s = &self.app.settings;
        let request = llm::build_request(&s.prompt_options(llm::CacheTtl::FiveMinutes), &prompt);
        let response = self.app.jobs.llm.client().messages(&request.body).await?;
        Ok((llm::parse_coaching(&response.text)?, ()))
    }

    /// Redis-hit throughput with `clients` concurrent callers, against raw GETs the same way.
    async fn concurrent(
        &self,
        key: &CacheKey,
        total: usize,
        clients: usize,
    ) -> anyhow::Result<Value> {
        let per_client = total / clients.max(1);
        let cache = &self.app.jobs.cache;
        let t = Instant::now();
        let runs = (0..clients).map(|_| async move {
            let mut samples = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t = Instant::now();
                let hit = cache.lookup(key, false).await;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                if !matches!(hit, Ok(Some((_, Tier::Redis)))) {
                    return Err(anyhow::anyhow!("a concurrent lookup missed Redis"));
                }
            }
            Ok(samples)
        });
        let samples: Vec<f64> = join_all(runs)
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?
            .concat();
        let gets_per_sec = samples.len() as f64 / t.elapsed().as_secs_f64();
        let rendered = key.to_string();
        let t = Instant::now();
        let raw = (0..clients).map(|_| {
            let mut conn = self.app.redis.clone();
            let rendered = rendered.clone();
            async move {
                for _ in 0..per_client {
                    let _: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&rendered)
                        .query_async(&mut conn)
                        .await?;
                }
                Ok::<_, redis::RedisError>(())
            }
        });
        join_all(raw)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let raw_per_sec = (per_client * clients) as f64 / t.elapsed().as_secs_f64();
        Ok(json!({
            "clients": clients,
            "gets_per_sec": gets_per_sec.round(),
            "latency": summary_us(samples),
            "raw_redis_gets_per_sec": raw_per_sec.round(),
            "ratio_vs_raw": ratio(gets_per_sec, raw_per_sec),
            "ratio_vs_python_11600": ratio(gets_per_sec, 11_600.0),
        }))
    }

    async fn cleanup(&self) -> anyhow::Result<()> {
        let keys: Vec<String> = sqlx::query_scalar(
            "DELETE FROM coaching_cache WHERE rubric_version = $1 RETURNING cache_key",
        )
        .bind(&self.run)
        .fetch_all(&self.app.pg)
        .await?;
        self.app.jobs.cache.unlink(&keys).await?;
        Ok(())
    }
}

/// Size and speed of the codec for a typical result and a 60 KB transcript-sized payload.
fn codec_figures() -> Value {
    let typical = serde_json::to_vec(&result_of_size(700)).unwrap_or_default();
    let transcript = synthetic_transcript(60_000);
    let large = serde_json::to_vec(&json!({ "transcript": transcript })).unwrap_or_default();
    let mut out = serde_json::Map::new();
    for (name, json) in [("typical_result", typical), ("payload_60kb", large)] {
        let t = Instant::now();
        let mut encoded = Vec::new();
        for _ in 0..200 {
            encoded = cache::key::encode_json(json.clone());
        }
        let encode_us = t.elapsed().as_secs_f64() * 1e6 / 200.0;
        let t = Instant::now();
        for _ in 0..200 {
            let _ = cache::key::decode_json(&encoded);
        }
        let decode_us = t.elapsed().as_secs_f64() * 1e6 / 200.0;
        out.insert(
            name.into(),
            json!({
                "json_bytes": json.len(),
                "stored_bytes": encoded.len(),
                "gzip": encoded.starts_with(&[0x1f, 0x8b]),
                "size_reduction_pct": round1(100.0 * (1.0 - encoded.len() as f64 / json.len() as f64)),
                "encode_us": (encode_us * 100.0).round() / 100.0,
                "decode_us": (decode_us * 100.0).round() / 100.0,
            }),
        );
    }
    Value::Object(out)
}

/// About `bytes` of transcript-like text: speaker turns of words drawn from a sales-call
/// vocabulary by a fixed pseudo-random sequence (so runs compare, and gzip sees realistic,
/// not repetitive, text).
fn synthetic_transcript(bytes: usize) -> String {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut out = String::with_capacity(bytes + 100);
    let mut turn = 0;
    while out.len() < bytes {
        out.push_str(if turn % 2 == 0 { "Rep: " } else { "Buyer: " });
        for _ in 0..8 + next(20) {
            out.push_str(super::WORDS[next(super::WORDS.len())]);
            out.push(' ');
        }
        out.push_str(if next(3) == 0 { "?\n" } else { ".\n" });
        turn += 1;
    }
    out
}
