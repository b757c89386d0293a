//! Logging and metrics. `init_tracing` sets up the `tracing` subscriber (RUST_LOG, optional JSON
//! via LOG_FORMAT=json); `install_metrics` installs the Prometheus recorder served at `/metrics`.
//! Every metric name is declared once, in [`names`].

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// All metric names, in one place.
pub mod names {
    /// Cache hits, labelled `tier` (redis/postgres) and `dimension`.
    pub const CACHE_HITS: &str = "callcoach_cache_hits_total";
    /// Cache misses, labelled `tier` and `dimension`.
    pub const CACHE_MISSES: &str = "callcoach_cache_misses_total";
    /// Cache tier errors (Redis unreachable, …), labelled `tier`.
    pub const CACHE_ERRORS: &str = "callcoach_cache_errors_total";
    /// Corrupt Redis entries found and deleted.
    pub const CACHE_CORRUPT: &str = "callcoach_cache_corrupt_total";
    /// Single-flight waits: analyses that reused another caller's computation, by `dimension`.
    pub const CACHE_SINGLEFLIGHT_WAITS: &str = "callcoach_cache_singleflight_waits_total";
    /// Answers paid for by an earlier run and reused instead of calling the LLM again.
    pub const CACHE_PAID_REUSED: &str = "callcoach_cache_paid_reused_total";
    /// Single-flight computations stopped because another caller took their lease.
    pub const CACHE_LEASE_LOST: &str = "callcoach_cache_lease_lost_total";
    /// Times the Redis circuit breaker opened.
    pub const CACHE_BREAKER_OPENED: &str = "callcoach_cache_breaker_opened_total";
    /// 1 while the Redis circuit breaker is open.
    pub const CACHE_BREAKER_OPEN: &str = "callcoach_cache_breaker_open";
    /// Jobs enqueued, labelled `kind`.
    pub const JOBS_ENQUEUED: &str = "callcoach_jobs_enqueued_total";
    /// Jobs finished, labelled `kind` and `outcome` (succeeded/retry/snoozed/failed/skipped).
    pub const JOBS_FINISHED: &str = "callcoach_jobs_finished_total";
    /// Job run time in seconds, labelled `kind`.
    pub const JOB_DURATION: &str = "callcoach_job_duration_seconds";
    /// Seconds from when a job was due to when a worker claimed it, labelled `kind` and `lane`.
    pub const JOB_QUEUE_WAIT: &str = "callcoach_job_queue_wait_seconds";
    /// Jobs pushed to Redis by the outbox relay.
    pub const RELAY_PUSHED: &str = "callcoach_relay_pushed_total";
    /// Jobs the rescuer re-issued, labelled `what` (requeued/failed/redelivered).
    pub const RESCUED: &str = "callcoach_jobs_rescued_total";
    /// Finished ledger rows deleted past the retention.
    pub const LEDGER_PRUNED: &str = "callcoach_ledger_pruned_total";
    /// Grouped ledger write rounds.
    pub const LEDGER_BATCHES: &str = "callcoach_ledger_batches_total";
    /// Scheduler ticks due, labelled `entry` and `outcome` (enqueued: this scheduler created
    /// the job; already_enqueued: another scheduler had; failed: retried at the next heartbeat).
    pub const SCHEDULE_TICKS: &str = "callcoach_schedule_ticks_total";
    /// Supervised background tasks restarted after a panic, labelled `task`.
    pub const TASK_RESTARTS: &str = "callcoach_task_restarts_total";
    /// LLM requests, labelled `outcome`.
    pub const LLM_REQUESTS: &str = "callcoach_llm_requests_total";
    /// LLM tokens, labelled `kind` (input/output/cache_creation/cache_read).
    pub const LLM_TOKENS: &str = "callcoach_llm_tokens_total";
    /// Analysis runs stored (the spec's `analysis_runs_total`), labelled `source`.
    pub const ANALYSIS_RUNS: &str = "analysis_runs_total";
    /// LLM requests that wrote a cold cached prefix others then waited for (fan-out leaders).
    pub const LLM_PREFIX_WRITERS: &str = "callcoach_llm_prefix_writers_total";
    /// Polls of LLM requests waiting for another request to write the prefix they need.
    pub const LLM_PREFIX_WAITS: &str = "callcoach_llm_prefix_waits_total";
    /// LLM cost in micro-USD (counters are integers), labelled `model`.
    pub const LLM_COST_MICRO_USD: &str = "callcoach_llm_cost_micro_usd_total";
    /// HTTP requests, labelled `status`.
    pub const HTTP_REQUESTS: &str = "callcoach_http_requests_total";
    /// HTTP rate-limit decisions, labelled `class` and `decision` (allowed/denied/fail_open).
    pub const HTTP_RATE_LIMIT_DECISIONS: &str = "callcoach_http_rate_limit_decisions_total";
    /// HTTP requests refused with 429 by the rate limits, labelled `class`.
    pub const HTTP_RATE_LIMITED: &str = "callcoach_http_rate_limited_total";
    /// HTTP requests let through unchecked because the rate limiter's Redis did not answer
    /// in time (fail open), labelled `class`.
    pub const HTTP_RATE_LIMIT_FAILED_OPEN: &str = "callcoach_http_rate_limit_failed_open_total";
    /// Rate-limiter calls answered by the fail mode because Redis was unreachable, labelled
    /// `mode` (open/local).
    pub const RATE_LIMIT_FALLBACKS: &str = "callcoach_rate_limit_fallbacks_total";
    /// LLM calls given up on by the fleet limiter (the wait exceeded the maximum), labelled
    /// `bucket` (requests/input_tokens/output_tokens).
    pub const LLM_THROTTLED: &str = "callcoach_llm_throttled_total";
    /// LLM spend in USD in the current window, labelled `window` (day/month).
    pub const LLM_SPEND_USD: &str = "callcoach_llm_spend_usd";
    /// Jobs waiting to run (queued or snoozed) in the ledger, labelled `lane`; sampled every
    /// 15 s by every web and worker process.
    pub const QUEUE_DEPTH: &str = "callcoach_queue_depth";
    /// LLM budget in USD per window, labelled `window` (day/month); 0 = no budget.
    pub const LLM_BUDGET_USD: &str = "callcoach_llm_budget_usd";
    /// `callcoach stats --format prometheus` (the spec's names; with [`ANALYSIS_RUNS`]):
    /// cache hit rate in percent, labelled `source` (database/redis/overall).
    pub const STATS_CACHE_HIT_RATE: &str = "cache_hit_rate";
    /// Stats: analyses answered by Redis, percent.
    pub const STATS_REDIS_HIT_RATE: &str = "redis_cache_hit_rate";
    /// Stats: Redis `used_memory` in MiB.
    pub const STATS_REDIS_MEMORY_MB: &str = "redis_memory_used_mb";
    /// Redis `used_memory` in bytes (`/metrics`' form of [`STATS_REDIS_MEMORY_MB`]).
    pub const STATS_REDIS_MEMORY_BYTES: &str = "redis_memory_used_bytes";
    /// Stats: USD saved by caching.
    pub const STATS_COST_SAVINGS_USD: &str = "cache_cost_savings_usd";
    /// Stats: tokens cache hits did not send.
    pub const STATS_TOKENS_SAVED: &str = "cache_tokens_saved";
    /// Stats: analysis jobs that succeeded, percent.
    pub const STATS_ANALYSIS_SUCCESS_RATE: &str = "analysis_success_rate";
}

/// Installs the global tracing subscriber once; later calls are no-ops.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,apalis_core=warn,apalis_redis=warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
}

/// `# HELP` texts, from the doc comments in [`names`], by metric type.
const COUNTERS: &[(&str, &str)] = &[
    (
        names::CACHE_HITS,
        "Cache hits, labelled tier (redis/postgres) and dimension.",
    ),
    (
        names::CACHE_MISSES,
        "Cache misses, labelled tier and dimension.",
    ),
    (
        names::CACHE_ERRORS,
        "Cache tier errors (Redis unreachable, …), labelled tier.",
    ),
    (
        names::CACHE_CORRUPT,
        "Corrupt Redis entries found and deleted.",
    ),
    (
        names::CACHE_SINGLEFLIGHT_WAITS,
        "Single-flight waits: analyses that reused another caller's computation, by dimension.",
    ),
    (
        names::CACHE_PAID_REUSED,
        "Answers paid for by an earlier run and reused instead of calling the LLM again.",
    ),
    (
        names::CACHE_LEASE_LOST,
        "Single-flight computations stopped because another caller took their lease.",
    ),
    (
        names::CACHE_BREAKER_OPENED,
        "Times the Redis circuit breaker opened.",
    ),
    (names::JOBS_ENQUEUED, "Jobs enqueued, labelled kind."),
    (
        names::JOBS_FINISHED,
        "Jobs finished, labelled kind and outcome (succeeded/retry/snoozed/failed/skipped).",
    ),
    (
        names::RELAY_PUSHED,
        "Jobs pushed to Redis by the outbox relay.",
    ),
    (
        names::RESCUED,
        "Jobs the rescuer re-issued, labelled what (requeued/failed/redelivered).",
    ),
    (
        names::LEDGER_PRUNED,
        "Finished ledger rows deleted past the retention.",
    ),
    (names::LEDGER_BATCHES, "Grouped ledger write rounds."),
    (
        names::SCHEDULE_TICKS,
        "Scheduler ticks due, labelled entry and outcome (enqueued: this scheduler created the job; already_enqueued: another scheduler had; failed: retried at the next heartbeat).",
    ),
    (
        names::TASK_RESTARTS,
        "Supervised background tasks restarted after a panic, labelled task.",
    ),
    (names::LLM_REQUESTS, "LLM requests, labelled outcome."),
    (
        names::LLM_TOKENS,
        "LLM tokens, labelled kind (input/output/cache_creation/cache_read).",
    ),
    (
        names::ANALYSIS_RUNS,
        "Analysis runs stored (the spec's analysis_runs_total), labelled source.",
    ),
    (
        names::LLM_PREFIX_WRITERS,
        "LLM requests that wrote a cold cached prefix others then waited for (fan-out leaders).",
    ),
    (
        names::LLM_PREFIX_WAITS,
        "Polls of LLM requests waiting for another request to write the prefix they need.",
    ),
    (
        names::LLM_COST_MICRO_USD,
        "LLM cost in micro-USD (counters are integers), labelled model.",
    ),
    (names::HTTP_REQUESTS, "HTTP requests, labelled status."),
    (
        names::HTTP_RATE_LIMIT_DECISIONS,
        "HTTP rate-limit decisions, labelled class and decision (allowed/denied/fail_open).",
    ),
    (
        names::HTTP_RATE_LIMITED,
        "HTTP requests refused with 429 by the rate limits, labelled class.",
    ),
    (
        names::HTTP_RATE_LIMIT_FAILED_OPEN,
        "HTTP requests let through unchecked because the rate limiter's Redis did not answer in time (fail open), labelled class.",
    ),
    (
        names::RATE_LIMIT_FALLBACKS,
        "Rate-limiter calls answered by the fail mode because Redis was unreachable, labelled mode (open/local).",
    ),
    (
        names::LLM_THROTTLED,
        "LLM calls given up on by the fleet limiter (the wait exceeded the maximum), labelled bucket (requests/input_tokens/output_tokens).",
    ),
];
const GAUGES: &[(&str, &str)] = &[
    (
        names::CACHE_BREAKER_OPEN,
        "1 while the Redis circuit breaker is open.",
    ),
    (
        names::LLM_SPEND_USD,
        "LLM spend in USD in the current window, labelled window (day/month).",
    ),
    (
        names::QUEUE_DEPTH,
        "Jobs waiting to run (queued or snoozed) in the ledger, labelled lane; sampled every 15 s by every web and worker process.",
    ),
    (
        names::LLM_BUDGET_USD,
        "LLM budget in USD per window, labelled window (day/month); 0 = no budget.",
    ),
    (
        names::STATS_CACHE_HIT_RATE,
        "Analyses answered by a cache tier in percent over the last 7 days, labelled source (database: of Redis' misses; redis and overall: of all analyses).",
    ),
    (
        names::STATS_REDIS_HIT_RATE,
        "Analyses answered by Redis in percent over the last 7 days.",
    ),
    (
        names::STATS_REDIS_MEMORY_BYTES,
        "Redis used_memory in bytes.",
    ),
    (
        names::STATS_COST_SAVINGS_USD,
        "USD caching saved over the last 7 days against no caching.",
    ),
    (
        names::STATS_TOKENS_SAVED,
        "Tokens cache hits did not send over the last 7 days.",
    ),
    (
        names::STATS_ANALYSIS_SUCCESS_RATE,
        "Analysis jobs that succeeded over the last 7 days, percent of those finished.",
    ),
];
const HISTOGRAMS: &[(&str, &str)] = &[
    (
        names::JOB_DURATION,
        "Job run time in seconds, labelled kind.",
    ),
    (
        names::JOB_QUEUE_WAIT,
        "Seconds from when a job was due to when a worker claimed it, labelled kind and lane.",
    ),
];

/// Registers the `# HELP` text of every metric with the installed recorder.
fn describe_metrics() {
    for &(name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for &(name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
    }
    for &(name, help) in HISTOGRAMS {
        metrics::describe_histogram!(name, help);
    }
}

/// Histogram buckets in seconds for job run time and queue wait: 5 ms to 10 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// A recorder builder whose duration metrics render as Prometheus histograms (with buckets)
/// rather than summaries.
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            SECONDS_BUCKETS,
        )
        .expect("bucket list is not empty")
}

/// Installs the Prometheus recorder. If one is already installed in this process (several
/// apps in one test process), returns a handle to a private recorder instead.
pub fn install_metrics() -> PrometheusHandle {
    let handle = match builder().install_recorder() {
        Ok(handle) => handle,
        Err(_) => builder().build_recorder().handle(),
    };
    describe_metrics();
    handle
}

/// Serves `GET /metrics` (Prometheus text, no authentication: bind it to a private address)
/// on `listener` until `shutdown` fires. Used by processes without the web front (worker,
/// scheduler).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds `addr` and spawns [`serve_metrics`] on it; `None` leaves metrics unserved.
pub async fn spawn_metrics_listener(
    addr: Option<std::net::SocketAddr>,
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    tokio::spawn(async move {
        if let Err(e) = serve_metrics(listener, handle, shutdown).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok(())
}
