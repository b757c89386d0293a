//! Typed settings read from the environment (and an optional `.env` file).
//!
//! Every variable has one parser; a bad value stops start-up with a [`ConfigError`] naming the
//! variable. Secrets are wrapped in [`Secret`], whose `Debug`/`Display` never show the value.

use crate::http::limits::RateLimitSettings;
use crate::llm::{
    limits::{FleetLimits, SpendBudgets},
    prompt::{BlockOrder, CacheTtl, Effort, PromptOptions},
};
use std::{collections::HashMap, fmt, time::Duration};

/// A value that must never be printed (passwords, API keys, URLs carrying credentials).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A configuration variable that is missing or malformed.
#[derive(Debug, thiserror::Error)]
#[error("configuration error in {var}: {message}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

/// All settings of a callcoach process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Postgres connection URL (`DATABASE_URL`).
    pub database_url: Secret,
    /// Maximum Postgres pool size (`DATABASE_MAX_CONNECTIONS`, default 20).
    pub database_max_connections: u32,
    /// Redis URL (`REDIS_URL`, or assembled from `REDIS_HOST/PORT/DB/PASSWORD`).
    pub redis_url: Secret,
    /// CA certificate(s) a `rediss://` server's certificate must chain to
    /// (`REDIS_TLS_CA_FILE`, PEM; default the system's trust store).
    pub redis_tls_ca: Option<TlsCa>,
    /// Commands in flight on each multiplexed Redis connection (`REDIS_MAX_CONNECTIONS`,
    /// default 50): the spec's pool size, for a client that needs no pool.
    pub redis_max_connections: usize,
    /// Whether analyses are served from the cache tiers (`ENABLE_CACHING`, default true).
    pub enable_caching: bool,
    /// Redis cache TTL in days (`CACHE_TTL_DAYS`, default 90, must be > 0).
    pub cache_ttl_days: u32,
    /// Timeout of one Redis cache command (`REDIS_CACHE_TIMEOUT_MS`, default 25).
    pub redis_cache_timeout: Duration,
    /// Single-flight lease lifetime (`CACHE_LEASE_MS`, default 15 s); the owner renews it
    /// while it computes, so it only runs out when the owner died.
    pub cache_lease: Duration,
    /// Anthropic API key (`ANTHROPIC_API_KEY`); the emulator accepts any key.
    pub anthropic_api_key: Secret,
    /// Messages API base URL (`ANTHROPIC_BASE_URL`, default the local emulator).
    pub anthropic_base_url: String,
    /// Model id (`CLAUDE_MODEL`, default the current Sonnet); must be in `jobs/models.toml`
    /// and not retired.
    pub claude_model: String,
    /// Output budget per analysis, thinking included (`CLAUDE_MAX_TOKENS`, default
    /// [`DEFAULT_MAX_TOKENS`]).
    pub claude_max_tokens: u32,
    /// `output_config.effort` (`CLAUDE_EFFORT`: low, medium, high, xhigh, max, or `default`
    /// to send none). Default `low`: thinking is billed as output, and scoring against a
    /// rubric gains little from long thinking.
    pub claude_effort: Option<Effort>,
    /// Prompt block order (`PROMPT_ORDER`: `transcript_cached`, the default and cheaper, or
    /// the spec's `criteria_cached`).
    pub prompt_order: BlockOrder,
    /// HTTP timeout for one LLM request (`LLM_TIMEOUT_SECS`, default 120).
    pub llm_timeout: Duration,
    /// Address `callcoach web` binds (`BIND_ADDR`, default 127.0.0.1:8080).
    pub bind_addr: String,
    /// Address the worker's standalone `/metrics` listener binds (`METRICS_ADDR`, default
    /// 127.0.0.1:9187; `off` disables it). The web role serves `/metrics` on `BIND_ADDR`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Address the scheduler's standalone `/metrics` listener binds (`SCHEDULER_METRICS_ADDR`,
    /// default 127.0.0.1:9188; `off` disables it).
    pub scheduler_metrics_addr: Option<std::net::SocketAddr>,
    /// The schedule file `callcoach scheduler` reads (`SCHEDULE_FILE`; unset: the
    /// `jobs/schedule.toml` built into the binary). `--schedule PATH` overrides it.
    pub schedule_file: Option<std::path::PathBuf>,
    /// How late a missed tick is still enqueued (`SCHEDULE_CATCH_UP_GRACE_SECS`, default
    /// 3600): a scheduler back from downtime enqueues the latest tick it missed within this
    /// window, once. Must be shorter than `JOB_RETENTION_DAYS`.
    pub schedule_catch_up_grace: Duration,
    /// Public base URL used in `status_url` links (`PUBLIC_URL`, default `http://{BIND_ADDR}`).
    pub public_url: String,
    /// Oldest `mv_rep_performance` refresh rep insights read from the view
    /// (`INSIGHTS_MAX_STALENESS_SECS`, default 900); older, they are computed live.
    pub insights_max_staleness: Duration,
    /// How long an API key lookup is cached in memory (`AUTH_CACHE_MS`, default 5000): a
    /// revoked key is refused by every process within this time.
    pub auth_cache: Duration,
    /// How long an `Idempotency-Key` is remembered (`IDEMPOTENCY_TTL_SECS`, default 86400).
    pub idempotency_ttl: Duration,
    /// Largest request body the HTTP front accepts (`HTTP_MAX_BODY_BYTES`, default 2 MiB);
    /// larger bodies get `413`.
    pub http_max_body_bytes: usize,
    /// Largest response body sent uncompressed (`COMPRESSION_MIN_BYTES`, default 1024);
    /// larger compressible bodies are gzipped for clients that accept it.
    pub compression_min_bytes: usize,
    /// Browser origins allowed to call the API (`CORS_ALLOWED_ORIGINS`, comma-separated
    /// `scheme://host[:port]`, or `*` for any; default none: no CORS headers at all).
    pub cors_allowed_origins: Vec<String>,
    /// Time a client has to send a request's headers (`HTTP_HEADER_TIMEOUT_MS`, default
    /// 10000), counted from the connection's start or the end of its previous response: it
    /// is also the keep-alive idle timeout. A client past it is disconnected.
    pub http_header_timeout: Duration,
    /// Time a client has to send a request's whole body once its headers arrived
    /// (`HTTP_BODY_TIMEOUT_MS`, default 30000); a body still incomplete then gets `408`.
    pub http_body_timeout: Duration,
    /// Most connections the HTTP front serves at once (`HTTP_MAX_CONNECTIONS`, default 1024);
    /// further clients wait in the listen backlog until one closes.
    pub http_max_connections: usize,
    /// Concurrent interactive jobs per worker process (`WORKER_CONCURRENCY`, default 8).
    pub worker_concurrency: usize,
    /// Concurrent background jobs per worker process (`WORKER_BACKGROUND_CONCURRENCY`,
    /// default 2): warming and upkeep never take the interactive lane's slots.
    pub worker_background_concurrency: usize,
    /// Lease of a running job (`JOB_LEASE_SECS`, default 20): renewed by its worker every
    /// quarter; when it runs out the rescuer re-delivers the job.
    pub job_lease: Duration,
    /// Rescuer period (`RESCUE_INTERVAL_MS`, default 5000).
    pub rescue_interval: Duration,
    /// Finished ledger rows are deleted after this (`JOB_RETENTION_DAYS`, default 30).
    pub job_retention: Duration,
    /// Pruner period (`PRUNE_INTERVAL_SECS`, default 600).
    pub prune_interval: Duration,
    /// How long a stopping worker lets running jobs finish (`WORKER_DRAIN_SECS`, default 30).
    pub worker_drain: Duration,
    /// Longest wait for a Postgres connection (`DATABASE_ACQUIRE_TIMEOUT_MS`, default 2000):
    /// with Postgres down, requests answer 503 after this.
    pub database_acquire_timeout: Duration,
    /// The fleet's LLM rate limits per minute (`LLM_REQUESTS_PER_MIN`,
    /// `LLM_INPUT_TOKENS_PER_MIN`, `LLM_OUTPUT_TOKENS_PER_MIN`; 0, the default, = unlimited).
    pub llm_limits: FleetLimits,
    /// Worker processes sharing the LLM limits (`LLM_FLEET_PROCESSES`, default 1): each keeps
    /// to its share of them while Redis is unreachable.
    pub llm_fleet_processes: u32,
    /// Longest an LLM request waits for rate-limit room before its job snoozes
    /// (`LLM_LIMIT_MAX_WAIT_SECS`, default 30).
    pub llm_limit_max_wait: Duration,
    /// The fleet's LLM budgets (`LLM_DAILY_BUDGET_USD`, `LLM_MONTHLY_BUDGET_USD`; 0, the
    /// default, = none).
    pub llm_budgets: SpendBudgets,
    /// Longest an LLM request waits for another one writing the cached prefix it needs
    /// (`LLM_FAN_OUT_WAIT_SECS`, default 30).
    pub llm_fan_out_wait: Duration,
    /// Send analyses nobody waits on through the Message Batches API at half the price
    /// (`LLM_BATCH_MODE`, default true).
    pub llm_batch_mode: bool,
    /// How long `collect_batch` waits between looks at a running batch (`BATCH_POLL_SECS`,
    /// default 60; snoozes back off from there).
    pub batch_poll: Duration,
    /// Attempts before a job is dead-lettered (`JOB_MAX_ATTEMPTS`, default 5).
    pub job_max_attempts: i32,
    /// Idle poll interval of workers (`WORKER_POLL_MS`, default 50).
    pub worker_poll: Duration,
    /// How often the outbox relay looks for undelivered jobs (`RELAY_INTERVAL_MS`, default 1000).
    pub relay_interval: Duration,
    /// A delivered job not started this long after its due time is checked against Redis and
    /// re-issued if Redis lost it (`REDELIVER_AFTER_SECS`, default 30).
    pub redeliver_after: Duration,
    /// How often the web role samples the stats report into the `/metrics` gauges
    /// (`STATS_SAMPLE_SECS`, default 30).
    pub stats_sample: Duration,
    /// HTTP rate limits per API key and route class (`RATE_LIMIT_*`, see
    /// [`crate::http::limits`]).
    pub http_rate_limits: RateLimitSettings,
    /// Whether the dashboard's session cookie is marked `Secure` (`DASHBOARD_COOKIE_SECURE`,
    /// default false for plain-HTTP loopback use; set true behind HTTPS).
    pub dashboard_cookie_secure: bool,
}

impl Settings {
    /// Reads settings from the process environment, after loading `.env` if present.
    pub fn from_env() -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        Self::from_map(&std::env::vars().collect())
    }

    /// Reads settings from a map of variables (used by `from_env` and by tests).
    pub fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = Env(env);
        let get = &get;
        let database_url = get
            .get("DATABASE_URL")
            .ok_or_else(|| bad("DATABASE_URL", "is not set (e.g. postgres://user@host/db)"))?;
        if !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://") {
            return Err(bad(
                "DATABASE_URL",
                "must start with postgres:// or postgresql://",
            ));
        }
        let bind_addr = get.get("BIND_ADDR").unwrap_or("127.0.0.1:8080").to_string();
        bind_addr
            .parse::<std::net::SocketAddr>()
            .map_err(|e| bad("BIND_ADDR", format!("{bind_addr:?} is not host:port ({e})")))?;
        let metrics_addr = listen_addr(get, "METRICS_ADDR", "127.0.0.1:9187")?;
        let scheduler_metrics_addr = listen_addr(get, "SCHEDULER_METRICS_ADDR", "127.0.0.1:9188")?;
        let job_retention = Duration::from_secs(
            u64::from(positive::<u32>(get, "JOB_RETENTION_DAYS", 30)?) * 86_400,
        );
        let cache_ttl_days: i64 = parse(get, "CACHE_TTL_DAYS", 90)?;
        if cache_ttl_days <= 0 {
            return Err(bad("CACHE_TTL_DAYS", "must be a positive number of days"));
        }
        let settings = Settings {
            database_url: Secret::new(database_url),
            database_max_connections: positive(get, "DATABASE_MAX_CONNECTIONS", 20)?,
            redis_tls_ca: redis_tls_ca(get)?,
            redis_url: Secret::new(redis_url(get)?),
            redis_max_connections: positive(get, "REDIS_MAX_CONNECTIONS", 50)?,
            enable_caching: parse_bool(get, "ENABLE_CACHING", true)?,
            cache_ttl_days: u32::try_from(cache_ttl_days)
                .map_err(|_| bad("CACHE_TTL_DAYS", "is too large"))?,
            redis_cache_timeout: Duration::from_millis(positive(
                get,
                "REDIS_CACHE_TIMEOUT_MS",
                25,
            )?),
            cache_lease: Duration::from_millis(positive(get, "CACHE_LEASE_MS", 15_000)?),
            anthropic_api_key: Secret::new(get.get("ANTHROPIC_API_KEY").unwrap_or("emulator-key")),
            anthropic_base_url: url(get, "ANTHROPIC_BASE_URL", "http://127.0.0.1:4010")?,
            claude_model: claude_model(get)?,
            claude_max_tokens: positive(get, "CLAUDE_MAX_TOKENS", DEFAULT_MAX_TOKENS)?,
            claude_effort: match get.get("CLAUDE_EFFORT") {
                Some("default") => None,
                _ => Some(parse(get, "CLAUDE_EFFORT", Effort::Low)?),
            },
            prompt_order: parse(get, "PROMPT_ORDER", BlockOrder::default())?,
            llm_timeout: Duration::from_secs(positive(get, "LLM_TIMEOUT_SECS", 120)?),
            public_url: get
                .get("PUBLIC_URL")
                .map(str::to_string)
                .unwrap_or_else(|| format!("http://{bind_addr}")),
            bind_addr,
            metrics_addr,
            scheduler_metrics_addr,
            insights_max_staleness: Duration::from_secs(positive(
                get,
                "INSIGHTS_MAX_STALENESS_SECS",
                900,
            )?),
            auth_cache: Duration::from_millis(positive(get, "AUTH_CACHE_MS", 5000)?),
            idempotency_ttl: Duration::from_secs(positive(get, "IDEMPOTENCY_TTL_SECS", 86_400)?),
            http_max_body_bytes: bounded(
                get,
                "HTTP_MAX_BODY_BYTES",
                crate::http::MAX_BODY_BYTES,
                1024..=1024 * 1024 * 1024,
            )?,
            cors_allowed_origins: cors_origins(get)?,
            compression_min_bytes: bounded(
                get,
                "COMPRESSION_MIN_BYTES",
                crate::http::compression::MIN_SIZE,
                0..=1024 * 1024 * 1024,
            )?,
            http_header_timeout: Duration::from_millis(bounded(
                get,
                "HTTP_HEADER_TIMEOUT_MS",
                10_000,
                1..=3_600_000,
            )?),
            http_body_timeout: Duration::from_millis(bounded(
                get,
                "HTTP_BODY_TIMEOUT_MS",
                30_000,
                1..=3_600_000,
            )?),
            http_max_connections: bounded(get, "HTTP_MAX_CONNECTIONS", 1024, 1..=1_000_000)?,
            worker_concurrency: positive(get, "WORKER_CONCURRENCY", 8)?,
            job_max_attempts: positive(get, "JOB_MAX_ATTEMPTS", 5)?,
            worker_poll: Duration::from_millis(positive(get, "WORKER_POLL_MS", 50)?),
            relay_interval: Duration::from_millis(positive(get, "RELAY_INTERVAL_MS", 1000)?),
            redeliver_after: Duration::from_secs(positive(get, "REDELIVER_AFTER_SECS", 30)?),
            worker_background_concurrency: positive(get, "WORKER_BACKGROUND_CONCURRENCY", 2)?,
            job_lease: Duration::from_secs(positive(get, "JOB_LEASE_SECS", 20)?),
            rescue_interval: Duration::from_millis(positive(get, "RESCUE_INTERVAL_MS", 5000)?),
            schedule_file: get.get("SCHEDULE_FILE").map(std::path::PathBuf::from),
            schedule_catch_up_grace: catch_up_grace(get, job_retention)?,
            job_retention,
            prune_interval: Duration::from_secs(positive(get, "PRUNE_INTERVAL_SECS", 600)?),
            worker_drain: Duration::from_secs(positive(get, "WORKER_DRAIN_SECS", 30)?),
            database_acquire_timeout: Duration::from_millis(positive(
                get,
                "DATABASE_ACQUIRE_TIMEOUT_MS",
                2000,
            )?),
            llm_limits: FleetLimits {
                requests_per_min: parse(get, "LLM_REQUESTS_PER_MIN", 0)?,
                input_tokens_per_min: parse(get, "LLM_INPUT_TOKENS_PER_MIN", 0)?,
                output_tokens_per_min: parse(get, "LLM_OUTPUT_TOKENS_PER_MIN", 0)?,
            },
            llm_fleet_processes: positive(get, "LLM_FLEET_PROCESSES", 1)?,
            llm_limit_max_wait: Duration::from_secs(parse(get, "LLM_LIMIT_MAX_WAIT_SECS", 30)?),
            llm_budgets: SpendBudgets {
                daily_usd: usd(get, "LLM_DAILY_BUDGET_USD")?,
                monthly_usd: usd(get, "LLM_MONTHLY_BUDGET_USD")?,
            },
            llm_fan_out_wait: Duration::from_secs(parse(get, "LLM_FAN_OUT_WAIT_SECS", 30)?),
            llm_batch_mode: parse_bool(get, "LLM_BATCH_MODE", true)?,
            batch_poll: Duration::from_secs(positive(get, "BATCH_POLL_SECS", 60)?),
            stats_sample: Duration::from_secs(positive(get, "STATS_SAMPLE_SECS", 30)?),
            http_rate_limits: http_rate_limits(get)?,
            dashboard_cookie_secure: parse_bool(get, "DASHBOARD_COOKIE_SECURE", false)?,
        };
        Ok(settings)
    }

    /// How analysis prompts are built for the configured model, writing cache entries
    /// with `ttl`.
    pub fn prompt_options(&self, ttl: CacheTtl) -> PromptOptions<'_> {
        PromptOptions {
            order: self.prompt_order,
            ttl,
            effort: self.claude_effort,
            ..PromptOptions::new(&self.claude_model, self.claude_max_tokens)
        }
    }

    /// TTL of Redis cache entries.
    pub fn cache_ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.cache_ttl_days) * 86_400)
    }
}

/// Lookup of non-empty, trimmed variables.
struct Env<'a>(&'a HashMap<String, String>);

impl<'a> Env<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
    }
}

fn parse<T: std::str::FromStr>(
    get: &Env<'_>,
    var: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    match get.get(var) {
        None => Ok(default),
        Some(raw) => raw
            .parse()
            .map_err(|e| bad(var, format!("{raw:?} is not valid: {e}"))),
    }
}

fn positive<T>(get: &Env<'_>, var: &'static str, default: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + Default + Copy,
    T::Err: fmt::Display,
{
    let value = parse(get, var, default)?;
    if value <= T::default() {
        return Err(bad(var, "must be greater than zero"));
    }
    Ok(value)
}

/// A number within `range` (inclusive), `default` when unset.
fn bounded<T>(
    get: &Env<'_>,
    var: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    T::Err: fmt::Display,
{
    let value = parse(get, var, default)?;
    if !range.contains(&value) {
        return Err(bad(
            var,
            format!(
                "{value} is out of range (expected {} to {})",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(value)
}

/// A USD amount, 0 when unset.
fn usd(get: &Env<'_>, var: &'static str) -> Result<f64, ConfigError> {
    let value: f64 = parse(get, var, 0.0)?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad(var, "must be a non-negative amount of USD"));
    }
    Ok(value)
}

/// A metrics listener address (`METRICS_ADDR`, `SCHEDULER_METRICS_ADDR`): host:port, or `off`
/// for no listener.
fn listen_addr(
    get: &Env<'_>,
    var: &'static str,
    default: &str,
) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    match get.get(var).unwrap_or(default) {
        "off" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .map_err(|e| bad(var, format!("{addr:?} is not host:port or `off` ({e})"))),
    }
}

/// `SCHEDULE_CATCH_UP_GRACE_SECS`: positive and shorter than the ledger retention, so the
/// ledger row of a tick outlives the window in which that tick could be enqueued again.
fn catch_up_grace(get: &Env<'_>, retention: Duration) -> Result<Duration, ConfigError> {
    let var = "SCHEDULE_CATCH_UP_GRACE_SECS";
    let grace = Duration::from_secs(positive(get, var, 3600)?);
    if grace >= retention {
        return Err(bad(
            var,
            format!(
                "{} s is not shorter than JOB_RETENTION_DAYS ({} s): a tick's ledger row could be pruned while the tick can still be enqueued",
                grace.as_secs(),
                retention.as_secs()
            ),
        ));
    }
    Ok(grace)
}

fn parse_bool(get: &Env<'_>, var: &'static str, default: bool) -> Result<bool, ConfigError> {
    match get.get(var).map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(other) => Err(bad(var, format!("{other:?} is not a boolean (true/false)"))),
    }
}

fn url(get: &Env<'_>, var: &'static str, default: &str) -> Result<String, ConfigError> {
    let value = get.get(var).unwrap_or(default);
    if !value.starts_with("http://") && !value.starts_with("https://") {
        return Err(bad(var, "must start with http:// or https://"));
    }
    Ok(value.trim_end_matches('/').to_string())
}

/// `RATE_LIMIT_*`: every limit and the timeout must be positive.
fn http_rate_limits(get: &Env<'_>) -> Result<RateLimitSettings, ConfigError> {
    let d = RateLimitSettings::default();
    Ok(RateLimitSettings {
        enabled: parse_bool(get, "RATE_LIMIT_ENABLED", d.enabled)?,
        get_per_min: positive(get, "RATE_LIMIT_GET_PER_MIN", d.get_per_min)?,
        post_per_min: positive(get, "RATE_LIMIT_POST_PER_MIN", d.post_per_min)?,
        analysis_per_min: positive(get, "RATE_LIMIT_ANALYSIS_PER_MIN", d.analysis_per_min)?,
        insights_per_min: positive(get, "RATE_LIMIT_INSIGHTS_PER_MIN", d.insights_per_min)?,
        search_per_min: positive(get, "RATE_LIMIT_SEARCH_PER_MIN", d.search_per_min)?,
        key_lookups_per_min: positive(
            get,
            "RATE_LIMIT_KEY_LOOKUPS_PER_MIN",
            d.key_lookups_per_min,
        )?,
        timeout: Duration::from_millis(positive(get, "RATE_LIMIT_TIMEOUT_MS", 25)?),
    })
}

/// `CLAUDE_MODEL`: in the model table and still served today; a deprecated model is logged
/// with its retirement date.
fn claude_model(get: &Env<'_>) -> Result<String, ConfigError> {
    let id = get.get("CLAUDE_MODEL").unwrap_or(DEFAULT_MODEL);
    let today = chrono::Utc::now().date_naive();
    match crate::llm::ModelTable::builtin().check(id, today) {
        Ok(Some(warning)) => tracing::warn!("{warning}"),
        Ok(None) => {}
        Err(e) => return Err(bad("CLAUDE_MODEL", e.to_string())),
    }
    Ok(id.to_string())
}

/// The model used unless `CLAUDE_MODEL` says otherwise: the current Sonnet.
pub const DEFAULT_MODEL: &str = "claude-sonnet-5-5";

/// The default output budget of an analysis, thinking included: the spec's 8000. An answer
/// is a few hundred tokens; the rest leaves room for thinking, and is billed only if used.
pub const DEFAULT_MAX_TOKENS: u32 = 8000;

/// PEM certificates read from a file at start-up.
#[derive(Clone)]
pub struct TlsCa {
    /// Where they were read from.
    pub path: std::path::PathBuf,
    /// The file's content.
    pub pem: std::sync::Arc<[u8]>,
}

impl fmt::Debug for TlsCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsCa({})", self.path.display())
    }
}

/// `REDIS_TLS_CA_FILE`: a readable PEM file with at least one certificate, and only with a
/// `rediss://` URL (a plain connection would silently ignore it).
fn redis_tls_ca(get: &Env<'_>) -> Result<Option<TlsCa>, ConfigError> {
    const VAR: &str = "REDIS_TLS_CA_FILE";
    let Some(path) = get.get(VAR) else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| bad(VAR, format!("cannot read {path:?}: {e}")))?;
    let marker = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(marker.len()).any(|w| w == marker) {
        return Err(bad(VAR, format!("{path:?} holds no PEM certificate")));
    }
    if !redis_url(get)?.starts_with("rediss://") {
        return Err(bad(VAR, "is set, but the Redis URL is not rediss://"));
    }
    Ok(Some(TlsCa {
        path: path.into(),
        pem: pem.into(),
    }))
}

/// `CORS_ALLOWED_ORIGINS`: `*` alone, or origins as browsers send them (`scheme://host` with
/// an optional port, no path, no trailing slash), de-duplicated.
fn cors_origins(get: &Env<'_>) -> Result<Vec<String>, ConfigError> {
    const VAR: &str = "CORS_ALLOWED_ORIGINS";
    let Some(list) = get.get(VAR) else {
        return Ok(Vec::new());
    };
    let mut origins: Vec<String> = Vec::new();
    for origin in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let valid = origin == "*"
            || host.is_some_and(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
            });
        if !valid {
            return Err(bad(
                VAR,
                format!("{origin:?} is not an origin (scheme://host[:port], or *)"),
            ));
        }
        if !origins.iter().any(|o| o == origin) {
            origins.push(origin.to_string());
        }
    }
    if origins.len() > 1 && origins.iter().any(|o| o == "*") {
        return Err(bad(VAR, "* allows every origin; list no others with it"));
    }
    Ok(origins)
}

/// `REDIS_URL` wins; otherwise the URL is assembled from the spec's `REDIS_HOST/PORT/DB/PASSWORD`.
fn redis_url(get: &Env<'_>) -> Result<String, ConfigError> {
    if let Some(url) = get.get("REDIS_URL") {
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Err(bad("REDIS_URL", "must start with redis:// or rediss://"));
        }
        return Ok(url.to_string());
    }
    let host = get.get("REDIS_HOST").unwrap_or("127.0.0.1");
    let port: u16 = parse(get, "REDIS_PORT", 6379)?;
    let db: u32 = parse(get, "REDIS_DB", 0)?;
    // Percent-encoded, so `/`, `?`, `#`, `@` or `%` in the password stay in the password.
    let auth = get
        .get("REDIS_PASSWORD")
        .map(|p| {
            let p = percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC);
            format!(":{p}@")
        })
        .unwrap_or_default();
    Ok(format!("redis://{auth}{host}:{port}/{db}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = [("DATABASE_URL", "postgres://u@h/db")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        map
    }

    #[test]
    fn redis_tls_ca_file_must_hold_a_certificate_and_go_with_rediss() {
        let dir = std::env::temp_dir().join(format!("callcoach-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, junk) = (dir.join("ca.pem"), dir.join("junk.pem"));
        std::fs::write(
            &good,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(&junk, "not a certificate").unwrap();
        let (good, junk) = (good.to_str().unwrap(), junk.to_str().unwrap());
        let tls = ("REDIS_URL", "rediss://127.0.0.1:6380");
        let s = Settings::from_map(&env(&[tls, ("REDIS_TLS_CA_FILE", good)])).unwrap();
        assert!(s.redis_tls_ca.unwrap().pem.starts_with(b"-----BEGIN"));
        for case in [
            vec![tls, ("REDIS_TLS_CA_FILE", junk)],
            vec![tls, ("REDIS_TLS_CA_FILE", "/nonexistent/ca.pem")],
            vec![("REDIS_TLS_CA_FILE", good)],
        ] {
            let err = Settings::from_map(&env(&case)).unwrap_err();
            assert_eq!(err.var, "REDIS_TLS_CA_FILE", "{err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn llm_limits_and_budgets_are_configurable() {
        let s = Settings::from_map(&env(&[])).unwrap();
        assert_eq!(s.llm_limits, FleetLimits::default());
        assert_eq!(s.llm_budgets, SpendBudgets::default());
        let s = Settings::from_map(&env(&[
            ("LLM_REQUESTS_PER_MIN", "50"),
            ("LLM_INPUT_TOKENS_PER_MIN", "30000"),
            ("LLM_DAILY_BUDGET_USD", "12.5"),
        ]))
        .unwrap();
        assert_eq!(s.llm_limits.requests_per_min, 50);
        assert_eq!(s.llm_limits.input_tokens_per_min, 30_000);
        assert_eq!(s.llm_budgets.daily_usd, 12.5);
        for (var, value) in [
            ("LLM_DAILY_BUDGET_USD", "-1"),
            ("LLM_MONTHLY_BUDGET_USD", "lots"),
            ("LLM_REQUESTS_PER_MIN", "-5"),
            ("LLM_FLEET_PROCESSES", "0"),
        ] {
            let err = Settings::from_map(&env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn effort_and_prompt_order_are_configurable() {
        let s = Settings::from_map(&env(&[])).unwrap();
        assert_eq!(s.claude_effort, Some(Effort::Low));
        assert_eq!(s.prompt_order, BlockOrder::TranscriptCached);
        let o = s.prompt_options(CacheTtl::OneHour);
        assert_eq!((o.min_cacheable_tokens, o.ttl), (1024, CacheTtl::OneHour));
        let s = Settings::from_map(&env(&[
            ("CLAUDE_EFFORT", "default"),
            ("PROMPT_ORDER", "criteria_cached"),
            ("CLAUDE_MODEL", "claude-haiku-5-5"),
        ]))
        .unwrap();
        assert_eq!(s.claude_effort, None);
        assert_eq!(s.prompt_order, BlockOrder::CriteriaCached);
        assert_eq!(
            s.prompt_options(CacheTtl::FiveMinutes).min_cacheable_tokens,
            4096
        );
        let err = Settings::from_map(&env(&[("CLAUDE_EFFORT", "huge")])).unwrap_err();
        assert!(err.message.contains("huge"), "{}", err.message);
        assert!(Settings::from_map(&env(&[("PROMPT_ORDER", "x")])).is_err());
    }

    #[test]
    fn defaults_follow_the_spec() {
        let s = Settings::from_map(&env(&[])).unwrap();
        assert_eq!(s.redis_max_connections, 50);
        assert_eq!(s.cache_ttl_days, 90);
        assert!(s.enable_caching);
        assert_eq!(s.redis_url.expose(), "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn cors_origins_are_checked_and_deduplicated() {
        let origins = |v: &str| {
            Settings::from_map(&env(&[("CORS_ALLOWED_ORIGINS", v)])).map(|s| s.cors_allowed_origins)
        };
        assert_eq!(
            origins("https://a.example, http://localhost:3000,https://a.example").unwrap(),
            ["https://a.example", "http://localhost:3000"]
        );
        assert_eq!(origins("*").unwrap(), ["*"]);
        assert!(origins(" ").unwrap().is_empty());
        for bad in [
            "a.example",
            "https://a.example/",
            "ftp://a",
            "https://",
            "*,https://a.example",
        ] {
            let err = origins(bad).unwrap_err().to_string();
            assert!(err.contains("CORS_ALLOWED_ORIGINS"), "{bad}: {err}");
        }
    }

    #[test]
    fn redis_parts_assemble_a_url() {
        let s = Settings::from_map(&env(&[
            ("REDIS_HOST", "cache"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "2"),
            ("REDIS_PASSWORD", "pw"),
        ]))
        .unwrap();
        assert_eq!(s.redis_url.expose(), "redis://:pw@cache:6380/2");
        let s = Settings::from_map(&env(&[("REDIS_PASSWORD", "a/b?c#d@e%f g")])).unwrap();
        let url = s.redis_url.expose();
        assert_eq!(url, "redis://:a%2Fb%3Fc%23d%40e%25f%20g@127.0.0.1:6379/0");
        let info = redis::IntoConnectionInfo::into_connection_info(url).unwrap();
        assert_eq!(info.redis_settings().password(), Some("a/b?c#d@e%f g"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("CACHE_TTL_DAYS", "0"),
            ("CACHE_TTL_DAYS", "-3"),
            ("REDIS_MAX_CONNECTIONS", "lots"),
            ("ENABLE_CACHING", "maybe"),
            ("REDIS_PORT", "99999"),
            ("ANTHROPIC_BASE_URL", "ftp://x"),
            ("DASHBOARD_COOKIE_SECURE", "https"),
        ] {
            let err = Settings::from_map(&env(&[(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{value}");
            assert!(err.to_string().contains(var));
        }
        let err = Settings::from_map(&HashMap::new()).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
    }

    #[test]
    fn http_limits_are_configurable_and_checked() {
        let s = Settings::from_map(&env(&[])).unwrap();
        assert_eq!(s.http_max_body_bytes, 2 * 1024 * 1024);
        assert_eq!(s.http_header_timeout, Duration::from_secs(10));
        assert_eq!(s.http_body_timeout, Duration::from_secs(30));
        assert_eq!(s.http_max_connections, 1024);
        let s = Settings::from_map(&env(&[
            ("HTTP_MAX_BODY_BYTES", "65536"),
            ("HTTP_HEADER_TIMEOUT_MS", "300"),
            ("HTTP_BODY_TIMEOUT_MS", "500"),
            ("HTTP_MAX_CONNECTIONS", "4"),
        ]))
        .unwrap();
        assert_eq!(s.http_max_body_bytes, 65_536);
        assert_eq!(s.http_header_timeout, Duration::from_millis(300));
        assert_eq!(s.http_body_timeout, Duration::from_millis(500));
        assert_eq!(s.http_max_connections, 4);
        for (var, value) in [
            ("HTTP_MAX_BODY_BYTES", "0"),
            ("HTTP_MAX_BODY_BYTES", "2GiB"),
            ("HTTP_HEADER_TIMEOUT_MS", "0"),
            ("HTTP_HEADER_TIMEOUT_MS", "-1"),
            ("HTTP_BODY_TIMEOUT_MS", "soon"),
            ("HTTP_MAX_CONNECTIONS", "0"),
            ("HTTP_MAX_CONNECTIONS", "99999999"),
        ] {
            let err = Settings::from_map(&env(&[(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{value}: {err}");
        }
    }

    #[test]
    fn the_model_must_be_known_and_still_served() {
        let s = Settings::from_map(&env(&[])).unwrap();
        assert_eq!(s.claude_model, "claude-sonnet-5-5");
        let err = Settings::from_map(&env(&[("CLAUDE_MODEL", "claude-sonnet-4-5-20250929")]))
            .unwrap_err();
        assert_eq!(err.var, "CLAUDE_MODEL");
        assert!(err.message.contains("retired") && err.message.contains("claude-sonnet-5-5"));
        let err = Settings::from_map(&env(&[("CLAUDE_MODEL", "claude-9")])).unwrap_err();
        assert!(err.message.contains("unknown model"), "{err}");
    }

    #[test]
    fn scheduler_settings_are_checked() {
        let s = Settings::from_map(&env(&[])).unwrap();
        assert_eq!(s.schedule_catch_up_grace, Duration::from_secs(3600));
        assert_eq!(s.schedule_file, None);
        assert_eq!(
            s.scheduler_metrics_addr,
            Some("127.0.0.1:9188".parse().unwrap())
        );
        let s = Settings::from_map(&env(&[
            ("SCHEDULE_FILE", "/etc/callcoach/schedule.toml"),
            ("SCHEDULER_METRICS_ADDR", "off"),
        ]))
        .unwrap();
        assert_eq!(s.scheduler_metrics_addr, None);
        assert!(s.schedule_file.is_some());
        for (var, value) in [
            ("SCHEDULE_CATCH_UP_GRACE_SECS", "0"),
            ("SCHEDULE_CATCH_UP_GRACE_SECS", "2592000"),
            ("SCHEDULER_METRICS_ADDR", "9188"),
        ] {
            let err = Settings::from_map(&env(&[(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{value}: {err}");
        }
        let err = Settings::from_map(&env(&[
            ("JOB_RETENTION_DAYS", "1"),
            ("SCHEDULE_CATCH_UP_GRACE_SECS", "86400"),
        ]))
        .unwrap_err();
        assert!(err.message.contains("JOB_RETENTION_DAYS"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Settings::from_map(&env(&[("ANTHROPIC_API_KEY", "sk-ant-very-secret")])).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("sk-ant-very-secret"));
        assert!(!printed.contains("postgres://u@h/db"));
    }
}
