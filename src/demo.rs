//! `callcoach demo`: the whole pipeline end to end on the sample calls.
//!
//! Migrates, starts the LLM emulator (unless a real API is configured), the web front and a
//! worker in this process, ingests every `jobs/samples/*.json` over HTTP, enqueues their
//! analyses over HTTP, waits for the jobs, then enqueues them all once more to show the cache
//! answering, and prints a summary table. Exits non-zero if any job did not succeed.

use crate::{
    App, config::Settings, db, http::auth, ledger::JobState, llm::emulator, model::CallInput,
};
use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sqlx::Row;
use std::{path::PathBuf, time::Duration};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Options of `callcoach demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Folder of sample calls.
    #[arg(long, default_value = "jobs/samples")]
    pub samples: PathBuf,
    /// Give up waiting for jobs after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let calls = load_samples(&args.samples)?;
    let mut settings = Settings::from_env()?;
    let emulator = if uses_local_llm(&settings) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let handle = emulator::spawn(listener, emulator::EmulatorConfig::default()).await?;
        settings.anthropic_base_url = handle.base_url().to_string();
        Some(handle)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    settings.public_url = format!("http://{}", listener.local_addr()?);
    // The demo's client is its own front's only user and sends its 12 analyses and job
    // polls within a second, more than one key's HTTP rate limits allow.
    settings.http_rate_limits.enabled = false;
    let app = App::build(settings)?;
    db::migrate(&app.pg)
        .await
        .context("migrating the database")?;
    let shutdown = CancellationToken::new();
    let web = tokio::spawn({
        let (app, token) = (app.clone(), shutdown.clone());
        async move { app.serve(listener, token).await }
    });
    let worker = tokio::spawn({
        let (app, token) = (app.clone(), shutdown.clone());
        async move { app.run_worker(&[], token).await }
    });
    let key = auth::create_key(&app.pg, "demo", auth::Scope::Producer).await?;
    let client = DemoClient {
        http: reqwest::Client::new(),
        base: app.settings.public_url.clone(),
        key: key.key,
    };
    let started = std::time::Instant::now();
    let started_at = chrono::Utc::now();
    let mut call_ids = Vec::new();
    for call in &calls {
        call_ids.push(client.ingest(call).await?);
    }
    let deadline = Duration::from_secs(args.timeout_secs);
    let first = client
        .analyse_all(&call_ids, "first pass", deadline)
        .await?;
    let second = client
        .analyse_all(&call_ids, "second pass (cached)", deadline)
        .await?;
    let llm_calls = emulator.as_ref().map(|e| e.messages_served());
    let summary = Summary {
        calls: &call_ids,
        passes: &[first, second],
        llm_calls,
        since: started_at,
        elapsed: started.elapsed(),
    };
    let printed = print_summary(&app, &summary).await;
    shutdown.cancel();
    let _ = tokio::join!(web, worker);
    if let Some(handle) = emulator {
        handle.shutdown().await;
    }
    printed
}

/// The local emulator is used unless a real key and a non-local base URL are configured.
fn uses_local_llm(settings: &Settings) -> bool {
    let key = settings.anthropic_api_key.expose();
    let url = &settings.anthropic_base_url;
    !key.starts_with("sk-ant-") || url.contains("127.0.0.1") || url.contains("localhost")
}

fn load_samples(dir: &PathBuf) -> anyhow::Result<Vec<CallInput>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading sample folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no sample calls (*.json) in {}", dir.display());
    }
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        })
        .collect()
}

/// Tally of one pass over every call.
struct Pass {
    name: &'static str,
    succeeded: usize,
    failed: usize,
}

struct DemoClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl DemoClient {
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req.bearer_auth(&self.key).send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("HTTP {status}: {body}");
        }
        Ok(body)
    }

    async fn ingest(&self, call: &CallInput) -> anyhow::Result<Uuid> {
        let body = self
            .send(self.http.post(format!("{}/v1/calls", self.base)).json(call))
            .await
            .with_context(|| format!("ingesting {:?}", call.title))?;
        Ok(serde_json::from_value(body["id"].clone())?)
    }

    async fn analyse_all(
        &self,
        calls: &[Uuid],
        name: &'static str,
        deadline: Duration,
    ) -> anyhow::Result<Pass> {
        let mut jobs = Vec::new();
        for id in calls {
            let body = self
                .send(
                    self.http
                        .post(format!("{}/v1/analyses", self.base))
                        .json(&json!({ "call_id": id })),
                )
                .await?;
            jobs.push(body["status_url"].as_str().unwrap_or_default().to_string());
        }
        let bar = ProgressBar::new(jobs.len() as u64).with_message(name);
        bar.set_style(
            ProgressStyle::with_template("{msg:>22} [{bar:30}] {pos}/{len} jobs {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut pass = Pass {
            name,
            succeeded: 0,
            failed: 0,
        };
        let until = tokio::time::Instant::now() + deadline;
        for url in jobs {
            let status = self.wait_for(&url, until).await?;
            if status == JobState::Succeeded {
                pass.succeeded += 1;
            } else {
                pass.failed += 1;
            }
            bar.inc(1);
        }
        bar.finish();
        Ok(pass)
    }

    async fn wait_for(&self, url: &str, until: tokio::time::Instant) -> anyhow::Result<JobState> {
        loop {
            let job = self.send(self.http.get(url)).await?;
            let status: JobState = serde_json::from_value(job["status"].clone())
                .map_err(|e| anyhow::anyhow!("job status in {job}: {e}"))?;
            if status.is_terminal() {
                return Ok(status);
            }
            if tokio::time::Instant::now() > until {
                bail!("timed out waiting for {url} (status {status})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The LLM cost of the runs since `since`, against what each cache saved (from the stored
/// usage and counterfactuals, never estimated).
async fn print_cost(app: &App, since: chrono::DateTime<chrono::Utc>) -> anyhow::Result<()> {
    let (paid, no_prompt, no_session, none): (f64, f64, f64, f64) = sqlx::query_as(
        "SELECT coalesce(sum(cost_usd), 0), coalesce(sum(cost_without_prompt_cache_usd), 0),
                coalesce(sum(cost_without_session_cache_usd), 0),
                coalesce(sum(cost_without_caching_usd), 0)
         FROM analysis_runs WHERE created_at >= $1",
    )
    .bind(since)
    .fetch_one(&app.pg)
    .await?;
    let saved = |base: f64| {
        if base > 0.0 {
            format!("{:.0}%", (1.0 - paid / base) * 100.0)
        } else {
            "-".into()
        }
    };
    println!(
        "LLM cost: ${paid:.4}   without caching: ${none:.4} (saved {})   \
         session cache only: ${no_prompt:.4}   prompt cache only: ${no_session:.4}",
        saved(none)
    );
    Ok(())
}

/// What the summary table reports.
struct Summary<'a> {
    calls: &'a [Uuid],
    passes: &'a [Pass],
    llm_calls: Option<u64>,
    since: chrono::DateTime<chrono::Utc>,
    elapsed: Duration,
}

async fn print_summary(app: &App, s: &Summary<'_>) -> anyhow::Result<()> {
    println!(
        "\n{:<44} {:>5} {:>6} {:>6} {:>6} {:>6}",
        "call", "role", "prod", "disc", "objn", "engm"
    );
    for id in s.calls {
        let row = sqlx::query(
            "SELECT c.title, c.rep_role,
                    max(s.score) FILTER (WHERE s.dimension = 'product_knowledge') AS pk,
                    max(s.score) FILTER (WHERE s.dimension = 'discovery') AS di,
                    max(s.score) FILTER (WHERE s.dimension = 'objection_handling') AS ob,
                    max(s.score) FILTER (WHERE s.dimension = 'engagement') AS en
             FROM calls c LEFT JOIN coaching_sessions s ON s.call_id = c.id
             WHERE c.id = $1 GROUP BY c.title, c.rep_role",
        )
        .bind(id)
        .fetch_one(&app.pg)
        .await?;
        let score = |col: &str| {
            row.get::<Option<i32>, _>(col)
                .map_or("-".to_string(), |s| s.to_string())
        };
        let title: String = row.get("title");
        let title: String = title.chars().take(44).collect();
        println!(
            "{:<44} {:>5} {:>6} {:>6} {:>6} {:>6}",
            title,
            row.get::<String, _>("rep_role"),
            score("pk"),
            score("di"),
            score("ob"),
            score("en")
        );
    }
    let sources = sqlx::query(
        "SELECT source, count(*) AS n FROM analysis_runs WHERE created_at >= $1 GROUP BY source",
    )
    .bind(s.since)
    .fetch_all(&app.pg)
    .await?;
    let count = |name: &str| {
        sources
            .iter()
            .find(|r| r.get::<String, _>("source") == name)
            .map_or(0, |r| r.get::<i64, _>("n"))
    };
    println!();
    for p in s.passes {
        println!(
            "{:<22} jobs succeeded: {} failed: {}",
            p.name, p.succeeded, p.failed
        );
    }
    let llm = s
        .llm_calls
        .map_or("n/a (real API)".to_string(), |n| n.to_string());
    println!(
        "analyses: {}   LLM calls: {}   cache hits: {} (redis {}, postgres {})   time: {:.1}s",
        count("llm") + count("redis") + count("postgres"),
        llm,
        count("redis") + count("postgres"),
        count("redis"),
        count("postgres"),
        s.elapsed.as_secs_f64()
    );
    print_cost(app, s.since).await?;
    let failed: usize = s.passes.iter().map(|p| p.failed).sum();
    if failed > 0 {
        bail!("{failed} demo job(s) did not succeed");
    }
    Ok(())
}
