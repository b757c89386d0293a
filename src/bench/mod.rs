//! `callcoach bench …`: benchmarks that print JSON with absolute figures and a ratio against a
//! baseline measured in the same run. Speed goals live here, never in timed test assertions.

pub mod cache;
pub mod cost;
pub mod db;
pub mod http;
pub mod queue;
pub mod ratelimit;

use crate::config::Settings;

/// Benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// HTTP requests/s and latency: /healthz (the floor), an authenticated job read and a
    /// search, each under `--connections` concurrent clients for `--secs`.
    Http {
        /// Seconds each scenario is driven.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Concurrent keep-alive clients.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
        connections: u16,
    },
    /// Queue throughput and pick-up latency against raw Redis list operations.
    Queue {
        /// Jobs to enqueue and process.
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Jobs run at once by the worker.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Pick-up latency samples.
        #[arg(long, default_value_t = 200)]
        samples: usize,
        /// Also measure the producers' path: Postgres ledger and worker processes.
        #[arg(long)]
        ledger: bool,
        /// Back-to-back repetitions of each ledger measurement.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
        runs: u16,
        /// Also push this many jobs through the ledger path and report Redis memory and keys
        /// before, during and after (then prune the ledger).
        #[arg(long, default_value_t = 0)]
        soak: usize,
    },
    /// Cache get latency per tier and throughput against raw Redis GET; codec figures.
    Cache {
        /// Timed lookups per measurement.
        #[arg(long, default_value_t = 5_000)]
        iterations: usize,
        /// Concurrent clients for the throughput measurement.
        #[arg(long, default_value_t = 50)]
        clients: usize,
    },
    /// Monthly LLM cost of the spec's workload through the real analysis path against the
    /// emulator: no caching, session cache only, session + prompt caching (both block
    /// orders), at the spec's and the default model's prices, against the price-rule minimum.
    Cost {
        /// Calls per day, spread evenly over 24 hours.
        #[arg(long, default_value_t = 20)]
        calls_per_day: usize,
        /// Days simulated.
        #[arg(long, default_value_t = 30)]
        days: usize,
        /// Percent of calls repeating an already-analysed transcript.
        #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..100))]
        repeat_pct: u8,
        /// Keep the bench's calls, runs and cache rows afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Read-path latency of `sql/performance` through the project's code (cache lookup, rep
    /// summaries, call search, call details) on a seeded database of its own
    /// (`<dbname>_bench_db`), against the same queries without those objects.
    Db {
        /// Calls to seed.
        #[arg(long, default_value_t = 100_000)]
        calls: u64,
        /// Coaching sessions to seed.
        #[arg(long, default_value_t = 1_000_000)]
        sessions: u64,
        /// Reps to seed.
        #[arg(long, default_value_t = 200)]
        reps: u32,
        /// Seed of the generator and of the inputs drawn for the timed calls.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Timed calls per optimized query.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
        samples: u32,
        /// Timed calls per baseline query (unindexed queries take tens of ms each).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
        baseline_samples: u32,
        /// Keep the bench database afterwards (complete: sql/performance re-applied).
        #[arg(long)]
        keep: bool,
    },
    /// HTTP rate-limit decisions through the front's limiter (leased tokens; one EVALSHA
    /// per lease) with 1 and N concurrent clients, against plain Redis GET round trips.
    Ratelimit {
        /// Timed single-client decisions (and 4× that spread over the concurrent clients).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
        iterations: u32,
        /// Concurrent clients, each an API key of its own.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        clients: u32,
    },
}

/// Runs a benchmark and prints its JSON report.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let report = match cmd {
        BenchCommand::Http { secs, connections } => {
            if !(secs > 0.0 && secs <= 600.0) {
                anyhow::bail!("--secs must be more than 0 and at most 600");
            }
            let bench = http::HttpBench {
                secs,
                connections: usize::from(connections),
            };
            http::run(settings, bench).await?
        }
        BenchCommand::Queue {
            jobs,
            concurrency,
            samples,
            ledger,
            runs,
            soak,
        } => {
            let bench = queue::QueueBench {
                jobs,
                concurrency,
                samples,
                ledger,
                runs: usize::from(runs),
                soak,
            };
            queue::run(settings, bench).await?
        }
        BenchCommand::Cache {
            iterations,
            clients,
        } => cache::run(settings, iterations, clients).await?,
        BenchCommand::Cost {
            calls_per_day,
            days,
            repeat_pct,
            keep,
        } => {
            let bench = cost::CostBench {
                calls_per_day,
                days,
                repeat_pct,
                keep,
            };
            cost::run(settings, bench).await?
        }
        BenchCommand::Db {
            calls,
            sessions,
            reps,
            seed,
            samples,
            baseline_samples,
            keep,
        } => {
            let bench = db::DbBench {
                calls,
                sessions,
                reps,
                seed,
                samples: samples as usize,
                baseline_samples: baseline_samples as usize,
                keep,
            };
            db::run(settings, bench).await?
        }
        BenchCommand::Ratelimit {
            iterations,
            clients,
        } => ratelimit::run(settings, iterations as usize, clients as usize).await?,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A sales-call vocabulary for the benchmarks' synthetic transcripts.
pub const WORDS: &[&str] = &[
    "we",
    "our",
    "team",
    "dashboard",
    "refresh",
    "takes",
    "hours",
    "pipeline",
    "pricing",
    "renewal",
    "quarter",
    "budget",
    "analyst",
    "data",
    "warehouse",
    "connector",
    "Snowflake",
    "Postgres",
    "latency",
    "seats",
    "contract",
    "discount",
    "security",
    "review",
    "SSO",
    "audit",
    "export",
    "alerts",
    "forecast",
    "churn",
    "adoption",
    "onboarding",
    "trial",
    "integration",
    "Salesforce",
    "timeline",
    "decision",
    "stakeholders",
    "legal",
    "CFO",
    "numbers",
    "weekly",
    "daily",
    "board",
    "report",
    "schema",
    "migration",
    "rollout",
    "support",
    "SLA",
    "uptime",
    "the",
    "a",
    "and",
    "to",
    "of",
    "is",
    "it",
    "that",
    "for",
];

/// The p-th percentile (0.0-1.0) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// p50/p99/mean of latency samples in microseconds, as JSON.
pub fn summary_us(mut samples: Vec<f64>) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    serde_json::json!({
        "p50_us": round1(percentile(&samples, 0.5)),
        "p99_us": round1(percentile(&samples, 0.99)),
        "mean_us": round1(mean),
        "samples": samples.len(),
    })
}

/// `a / b` rounded to three decimals.
pub fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

/// Rounds to one decimal.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
