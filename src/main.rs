//! The `callcoach` binary: a thin clap layer mapping subcommands to roles of [`callcoach::App`].

use anyhow::Context;
use callcoach::{
    App,
    config::Settings,
    db,
    delivery::Lane,
    http::auth,
    jobs::{AnalyzeCall, Job, registry, warm_cache},
    ledger::{self, JobState},
    llm,
    model::Dimension,
    schedule::{Schedule, Scheduler},
};
use clap::{Parser, Subcommand};
use std::{path::PathBuf, process::ExitCode, time::Duration};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// mimalloc instead of the system allocator: requests allocate and free many small buffers
/// from every runtime thread, and glibc's malloc was the largest single cost in profiles of
/// the HTTP front under load (`callcoach bench http`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "callcoach",
    version,
    about = "Coaching analysis of sales calls, queued and cached"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP front: ingest, enqueue, status, /metrics, /healthz, /readyz.
    Web,
    /// Consume the job lanes (and run the ledger relay, rescuer and pruner).
    Worker {
        /// Interactive jobs run at once (overrides WORKER_CONCURRENCY).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: Option<u16>,
        /// Lanes to consume, comma-separated (default: interactive,background).
        #[arg(long, value_delimiter = ',')]
        lanes: Vec<Lane>,
    },
    /// Enqueue the recurring jobs of the schedule file at their cron ticks (any number of
    /// schedulers may run: each tick is enqueued once).
    Scheduler {
        /// Schedule file (overrides SCHEDULE_FILE; default: the built-in jobs/schedule.toml).
        #[arg(long)]
        schedule: Option<PathBuf>,
    },
    /// Schedule tools.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Web, worker and scheduler in one process; any failing stops all with a non-zero exit.
    All,
    /// Apply database migrations and load seed rubrics and knowledge base.
    Migrate,
    /// Run the whole pipeline on the sample calls against the local LLM emulator.
    Demo(callcoach::demo::DemoArgs),
    /// Producer tools.
    #[command(subcommand)]
    Enqueue(EnqueueCommand),
    /// Job ledger tools.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// API key management.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// Local Anthropic Messages API emulator.
    LlmEmulator(EmulatorArgs),
    /// Benchmarks that print JSON with a baseline measured in the same run.
    #[command(subcommand)]
    Bench(callcoach::bench::BenchCommand),
    /// Database tools.
    #[command(subcommand)]
    Db(DbCommand),
    /// Put every (call, dimension) result of the recent calls in both cache tiers: refill
    /// Redis from Postgres, analyse what is missing (enqueued, or here with --inline).
    Warm(WarmArgs),
    /// Cache, cost and health report over the last days (JSON, Prometheus text or a table).
    Stats(StatsArgs),
}

#[derive(clap::Args)]
struct StatsArgs {
    /// Window in days (1-3650).
    #[arg(long, default_value_t = callcoach::stats::DEFAULT_DAYS, value_parser = clap::value_parser!(i32).range(1..=3650))]
    days: i32,
    /// Add per-dimension figures.
    #[arg(long)]
    dimension_breakdown: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = StatsFormat::Json)]
    format: StatsFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StatsFormat {
    Json,
    Prometheus,
    Table,
}

#[derive(clap::Args)]
struct WarmArgs {
    /// Calls scheduled in the last N days.
    #[arg(long, default_value_t = 30, value_parser = parse_warm_days)]
    days: u32,
    /// Only this dimension.
    #[arg(long)]
    dimension: Option<Dimension>,
    /// Only calls of reps with this role (ae, se, csm).
    #[arg(long)]
    role: Option<callcoach::model::Role>,
    /// Analyse what is missing in this process and wait, instead of enqueueing
    /// `analyze_call` jobs on the background lane.
    #[arg(long)]
    inline: bool,
}

fn parse_warm_days(s: &str) -> Result<u32, String> {
    let days: u32 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of days: {e}"))?;
    warm_cache::check_days(days)
}

#[derive(Subcommand)]
enum DbCommand {
    /// Migrate, then generate realistic reps, calls with transcripts, coaching sessions and
    /// cache rows (deterministic per seed, loaded with COPY) and print a JSON report.
    Seed(SeedArgs),
    /// Apply `sql/performance` (indexes, views, functions), then verify every object and print
    /// a table; exits non-zero when anything is missing or invalid.
    Optimize {
        /// Only verify; change nothing.
        #[arg(long)]
        verify_only: bool,
    },
}

#[derive(clap::Args)]
struct SeedArgs {
    /// Calls to generate (each with speakers and a transcript).
    #[arg(long, default_value_t = 1000)]
    calls: u64,
    /// Coaching sessions to generate, spread over the calls.
    #[arg(long, default_value_t = 10_000)]
    sessions: u64,
    /// Reps the calls belong to.
    #[arg(long, default_value_t = 50)]
    reps: u32,
    /// Seed of the generator: the same seed gives the same data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl SeedArgs {
    fn options(&self) -> callcoach::seed::SeedOptions {
        callcoach::seed::SeedOptions::new(self.calls, self.sessions, self.reps, self.seed)
    }
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Each entry with its kind, cron, timezone, last run (from the job ledger) and next run.
    List {
        /// Schedule file (overrides SCHEDULE_FILE).
        #[arg(long)]
        schedule: Option<PathBuf>,
    },
    /// Check the schedule file and print its entries; exits non-zero naming a bad entry.
    Check {
        /// Schedule file (overrides SCHEDULE_FILE).
        #[arg(long)]
        schedule: Option<PathBuf>,
    },
}

impl Command {
    /// The `--schedule` path given to a scheduler command.
    fn schedule_path(&self) -> Option<&std::path::Path> {
        match self {
            Command::Scheduler { schedule }
            | Command::Schedule(
                ScheduleCommand::List { schedule } | ScheduleCommand::Check { schedule },
            ) => schedule.as_deref(),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
enum EnqueueCommand {
    /// Enqueue the analysis of one call.
    Analysis {
        /// Call id.
        #[arg(long)]
        call_id: Uuid,
        /// Dimension to analyse (repeatable; all four when omitted).
        #[arg(long = "dimension")]
        dimensions: Vec<Dimension>,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Print one job's ledger row as JSON.
    Show {
        /// Job id.
        id: Uuid,
    },
    /// List the newest jobs, one line each.
    List {
        /// Only jobs with this status (queued, running, succeeded, failed, cancelled, snoozed).
        #[arg(long)]
        status: Option<JobState>,
        /// Only jobs of this kind (see `jobs kinds`).
        #[arg(long)]
        kind: Option<String>,
        /// Only jobs about this call.
        #[arg(long)]
        call: Option<Uuid>,
        /// How many.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// Replay a failed or cancelled job with a fresh attempt budget.
    Retry {
        /// Job id.
        id: Uuid,
    },
    /// Cancel a job that has not started.
    Cancel {
        /// Job id.
        id: Uuid,
    },
    /// List the registered job kinds with their lane, budget and timeout.
    Kinds,
    /// Enqueue a job of any registered kind.
    Enqueue {
        /// Job kind (see `jobs kinds`).
        kind: String,
        /// Arguments as JSON (default `{}`).
        #[arg(long, default_value = "{}")]
        args: String,
        /// Lane (default: the kind's).
        #[arg(long)]
        lane: Option<Lane>,
    },
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Create a key; it is printed once and only its hash is stored.
    Create {
        /// Who the key is for.
        #[arg(long)]
        name: String,
        /// producer, ops or admin.
        #[arg(long)]
        scope: auth::Scope,
    },
    /// List every key: id, prefix, name, scope, created, last used, revoked.
    List,
    /// Revoke a key by id or prefix; every process refuses it within AUTH_CACHE_MS.
    Revoke {
        /// Key id or prefix.
        key: String,
    },
}

#[derive(clap::Args)]
struct EmulatorArgs {
    /// Port to listen on (127.0.0.1).
    #[arg(long, env = "CALLCOACH_EMULATOR_PORT", default_value_t = 4010)]
    port: u16,
    /// Delay before each answer, in milliseconds.
    #[arg(long, env = "CALLCOACH_EMULATOR_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of requests answered with a fault from --fail-statuses (0.0-1.0).
    #[arg(long, env = "CALLCOACH_EMULATOR_FAIL_RATE", default_value_t = 0.0)]
    fail_rate: f64,
    /// Statuses random faults draw from, comma-separated (429 carries retry-after, 529 is
    /// overloaded_error, 500 api_error).
    #[arg(
        long,
        env = "CALLCOACH_EMULATOR_FAIL_STATUSES",
        value_delimiter = ',',
        default_value = "429,529,500"
    )]
    fail_statuses: Vec<u16>,
    /// Wait asked for by emulated 429s (retry-after / retry-after-ms), in milliseconds.
    #[arg(
        long,
        env = "CALLCOACH_EMULATOR_RETRY_AFTER_MS",
        default_value_t = 1000
    )]
    retry_after_ms: u64,
    /// Fraction of successful answers whose text is not valid JSON (0.0-1.0).
    #[arg(long, env = "CALLCOACH_EMULATOR_MALFORMED_RATE", default_value_t = 0.0)]
    malformed_rate: f64,
    /// API key to require (x-api-key or Authorization: Bearer); any non-empty key if unset.
    #[arg(long, env = "CALLCOACH_EMULATOR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Override every model's minimum cacheable prefix, in tokens.
    #[arg(long, env = "CALLCOACH_EMULATOR_MIN_CACHEABLE_TOKENS")]
    min_cacheable_tokens: Option<u64>,
    /// Enforced requests per minute.
    #[arg(long, env = "CALLCOACH_EMULATOR_RPM")]
    requests_per_minute: Option<u64>,
    /// Enforced input tokens per minute (uncached input + cache writes).
    #[arg(long, env = "CALLCOACH_EMULATOR_ITPM")]
    input_tokens_per_minute: Option<u64>,
    /// Enforced output tokens per minute.
    #[arg(long, env = "CALLCOACH_EMULATOR_OTPM")]
    output_tokens_per_minute: Option<u64>,
    /// Delay before a message batch is processed, in milliseconds.
    #[arg(long, env = "CALLCOACH_EMULATOR_BATCH_DELAY_MS", default_value_t = 200)]
    batch_delay_ms: u64,
    /// Make every message batch expire instead of processing it.
    #[arg(long, env = "CALLCOACH_EMULATOR_BATCH_EXPIRE")]
    batch_expire: bool,
    /// Pad every answer with thinking tokens up to this many output tokens.
    #[arg(long, env = "CALLCOACH_EMULATOR_OUTPUT_TOKENS")]
    output_tokens: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    callcoach::telemetry::init_tracing();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels the token on Ctrl-C or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::LlmEmulator(args) => return run_emulator(args).await,
        Command::Bench(cmd) => return callcoach::bench::run(cmd).await,
        Command::Demo(args) => return callcoach::demo::run(args).await,
        // Bad arguments fail before any configuration or connection is needed.
        Command::Db(DbCommand::Seed(ref args)) => {
            args.options().validate().map_err(anyhow::Error::msg)?
        }
        Command::Enqueue(EnqueueCommand::Analysis { ref dimensions, .. }) => {
            callcoach::model::dimension_set(dimensions).map_err(anyhow::Error::msg)?;
        }
        Command::Schedule(ScheduleCommand::Check {
            schedule: Some(ref path),
        }) => return check_schedule(&Schedule::load(Some(path))?),
        // A bad schedule file is reported before connecting anywhere.
        Command::Scheduler {
            schedule: Some(ref path),
        }
        | Command::Schedule(ScheduleCommand::List {
            schedule: Some(ref path),
        }) => {
            Schedule::load(Some(path))?;
        }
        _ => {}
    }
    let mut settings = Settings::from_env()?;
    if let Command::Worker {
        concurrency: Some(n),
        ..
    } = cli.command
    {
        settings.worker_concurrency = usize::from(n);
    }
    let schedule_file = cli
        .command
        .schedule_path()
        .or(settings.schedule_file.as_deref())
        .map(std::path::Path::to_path_buf);
    let load_schedule = || Schedule::load(schedule_file.as_deref());
    let app = App::build(settings)?;
    match cli.command {
        Command::Web => {
            let listener = bind(&app.settings.bind_addr).await?;
            app.serve(listener, shutdown_on_signal()).await
        }
        Command::Worker { lanes, .. } => {
            let shutdown = shutdown_on_signal();
            serve_metrics(&app, app.settings.metrics_addr, "METRICS_ADDR", &shutdown).await?;
            app.run_worker(&lanes, shutdown).await
        }
        Command::Scheduler { .. } => {
            let schedule = load_schedule()?;
            let shutdown = shutdown_on_signal();
            let addr = app.settings.scheduler_metrics_addr;
            serve_metrics(&app, addr, "SCHEDULER_METRICS_ADDR", &shutdown).await?;
            Scheduler::for_app(&app, schedule).run(shutdown).await
        }
        Command::Schedule(ScheduleCommand::Check { .. }) => check_schedule(&load_schedule()?),
        Command::Schedule(ScheduleCommand::List { .. }) => {
            let schedule = load_schedule()?;
            let rows = callcoach::schedule::list(&app.pg, &schedule, chrono::Utc::now())
                .await
                .context("reading last runs from the job ledger")?;
            print!("{}", callcoach::schedule::table(&schedule, &rows));
            Ok(())
        }
        Command::All => run_all(&app, load_schedule()?).await,
        Command::Migrate => {
            db::migrate(&app.pg).await?;
            println!("migrations applied, seed data loaded");
            Ok(())
        }
        Command::Enqueue(EnqueueCommand::Analysis {
            call_id,
            dimensions,
        }) => {
            if !db::call_exists(&app.pg, call_id).await? {
                anyhow::bail!("call {call_id} does not exist");
            }
            let job = AnalyzeCall {
                call_id,
                dimensions: callcoach::model::dimension_set(&dimensions)
                    .map_err(anyhow::Error::msg)?,
                batch: false,
            };
            let enqueued = app.queue.enqueue(job.to_job()?).await?;
            println!("{}", serde_json::to_string_pretty(&enqueued)?);
            Ok(())
        }
        Command::Jobs(cmd) => run_jobs_command(&app, cmd).await,
        Command::Db(cmd) => run_db_command(&app, cmd).await,
        Command::Warm(args) => run_warm(&app, args).await,
        Command::Stats(args) => {
            let stats =
                callcoach::stats::collect(&app.pg, &app.redis, args.days, args.dimension_breakdown)
                    .await;
            match args.format {
                StatsFormat::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
                StatsFormat::Prometheus => print!("{}", stats.to_prometheus()),
                StatsFormat::Table => print!("{}", stats.to_table()),
            }
            Ok(())
        }
        Command::Apikey(ApikeyCommand::Create { name, scope }) => {
            let key = auth::create_key(&app.pg, &name, scope).await?;
            println!("{}", serde_json::to_string_pretty(&key)?);
            eprintln!("store this key now: it is not shown again");
            Ok(())
        }
        Command::Apikey(ApikeyCommand::List) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&auth::list_keys(&app.pg).await?)?
            );
            Ok(())
        }
        Command::Apikey(ApikeyCommand::Revoke { key }) => {
            match auth::revoke_key(&app.pg, &key).await? {
                Some(revoked) => {
                    println!("{}", serde_json::to_string_pretty(&revoked)?);
                    Ok(())
                }
                None => anyhow::bail!("no unrevoked API key has the id or prefix {key:?}"),
            }
        }
        Command::LlmEmulator(_) | Command::Bench(_) | Command::Demo(_) => unreachable!(),
    }
}

/// `callcoach warm`: a progress bar on an interactive stderr, the report as JSON on stdout;
/// exits non-zero when any (call, dimension) failed.
async fn run_warm(app: &App, args: WarmArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let job = warm_cache::WarmCache {
        days: args.days,
        dimension: args.dimension,
        role: args.role,
    };
    let mode = if args.inline {
        warm_cache::Mode::Inline
    } else {
        warm_cache::Mode::Enqueue
    };
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| indicatif::ProgressBar::new(0).with_message("warming"));
    let report = warm_cache::warm(&app.jobs, &job, mode, bar.as_ref()).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "calls: {}  already warm: {}  refilled: {}  analysed: {}  enqueued: {}  failed: {}",
        report.calls,
        report.already_warm,
        report.refilled,
        report.analysed,
        report.enqueued,
        report.failed
    );
    if report.failed > 0 {
        anyhow::bail!(
            "{} (call, dimension) results could not be warmed",
            report.failed
        );
    }
    Ok(())
}

async fn run_db_command(app: &App, cmd: DbCommand) -> anyhow::Result<()> {
    match cmd {
        DbCommand::Seed(args) => {
            db::migrate(&app.pg).await?;
            let mut options = args.options();
            // Keys as this deployment's analyses build them, so their lookups hit the seed.
            options.keys =
                Some(callcoach::seed::KeyStyle::for_settings(&app.pg, &app.settings).await?);
            let report = callcoach::seed::seed(&app.pg, &options, !args.quiet).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        DbCommand::Optimize { verify_only } => {
            let (table, all_ok) = callcoach::performance::optimize(&app.pg, verify_only).await?;
            print!("{table}");
            if !all_ok {
                anyhow::bail!("database objects missing or invalid (see the table above)");
            }
        }
    }
    Ok(())
}

async fn run_jobs_command(app: &App, cmd: JobsCommand) -> anyhow::Result<()> {
    let existing = |id: Uuid| async move {
        ledger::job(&app.pg, id)
            .await?
            .with_context(|| format!("job {id} does not exist"))
    };
    match cmd {
        JobsCommand::Show { id } => {
            let mut shown = serde_json::to_value(existing(id).await?)?;
            shown["analysis_runs"] =
                serde_json::to_value(callcoach::performance::job_runs(&app.pg, id).await?)?;
            println!("{}", serde_json::to_string_pretty(&shown)?);
        }
        JobsCommand::List {
            status,
            kind,
            call,
            limit,
        } => {
            if let Some(kind) = kind.as_deref().filter(|k| registry::find(k).is_none()) {
                anyhow::bail!(
                    "unknown job kind {kind:?}; registered kinds: {}",
                    registry::names().join(", ")
                );
            }
            let filter = ledger::JobFilter {
                state: status,
                kind,
                call_id: call,
            };
            for job in ledger::jobs(&app.pg, &filter, limit).await? {
                let error = job.last_error.unwrap_or_default();
                let error: String = error.chars().take(60).collect();
                println!(
                    "{}  {:<18} {:<10} attempts {}/{}  {}  {error}",
                    job.id, job.kind, job.status, job.attempts, job.max_attempts, job.enqueued_at
                );
            }
        }
        JobsCommand::Retry { id } => {
            let job = existing(id).await?;
            if !ledger::retry(&app.pg, id).await? {
                anyhow::bail!(
                    "job {id} is {}; only failed or cancelled jobs can be retried",
                    job.status
                );
            }
            println!("job {id} queued again");
        }
        JobsCommand::Cancel { id } => {
            let job = existing(id).await?;
            if !ledger::cancel(&app.pg, id).await? {
                anyhow::bail!(
                    "job {id} is {}; only queued or snoozed jobs can be cancelled",
                    job.status
                );
            }
            println!("job {id} cancelled");
        }
        JobsCommand::Kinds => {
            for kind in registry::REGISTRY {
                let o = &kind.options;
                let budget = o.max_attempts.unwrap_or(app.settings.job_max_attempts);
                println!(
                    "{:<20} lane {:<12} attempts {budget:<3} timeout {:?}",
                    kind.name,
                    o.lane.as_str(),
                    o.timeout
                );
            }
        }
        JobsCommand::Enqueue { kind, args, lane } => {
            let Some(entry) = registry::find(&kind) else {
                anyhow::bail!(
                    "unknown job kind {kind:?}; registered kinds: {}",
                    registry::names().join(", ")
                );
            };
            let args: serde_json::Value =
                serde_json::from_str(&args).context("--args is not valid JSON")?;
            let mut job = entry.new_job(args).map_err(anyhow::Error::msg)?;
            if let Some(lane) = lane {
                job = job.on_lane(lane);
            }
            let enqueued = app.queue.enqueue(job).await?;
            println!("{}", serde_json::to_string_pretty(&enqueued)?);
        }
    }
    Ok(())
}

/// The standalone `/metrics` listener of a role without the web front, on `addr` (set by
/// the variable `var`) until `shutdown`.
async fn serve_metrics(
    app: &App,
    addr: Option<std::net::SocketAddr>,
    var: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    callcoach::telemetry::spawn_metrics_listener(addr, app.metrics.clone(), shutdown.clone())
        .await
        .with_context(|| format!("binding {var}"))
}

/// `callcoach schedule check`: the entries of a valid schedule.
fn check_schedule(schedule: &Schedule) -> anyhow::Result<()> {
    println!(
        "schedule {} is valid: timezone {}, {} entries ({} enabled)",
        schedule.origin,
        schedule.timezone,
        schedule.entries.len(),
        schedule.enabled().count()
    );
    Ok(())
}

/// Web, worker and scheduler in one process: the first role to stop (with an error, or
/// unexpectedly) stops the others, and an error makes the exit status non-zero.
async fn run_all(app: &App, schedule: Schedule) -> anyhow::Result<()> {
    use futures::FutureExt;
    let token = shutdown_on_signal();
    let listener = bind(&app.settings.bind_addr).await?;
    let roles = [
        ("web", app.serve(listener, token.clone()).boxed()),
        ("worker", app.run_worker(&[], token.clone()).boxed()),
        (
            "scheduler",
            Scheduler::for_app(app, schedule).run(token.clone()).boxed(),
        ),
    ];
    let (names, futures): (Vec<_>, Vec<_>) = roles.into_iter().unzip();
    let (first, index, rest) = futures::future::select_all(futures).await;
    let role = names[index];
    let unexpected = !token.is_cancelled();
    if unexpected {
        tracing::error!(role, "role stopped; stopping the process");
        token.cancel();
    }
    let others = futures::future::join_all(rest).await;
    first.with_context(|| format!("{role} role failed"))?;
    if unexpected {
        anyhow::bail!("{role} role stopped unexpectedly");
    }
    others.into_iter().collect()
}

async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding BIND_ADDR {addr}"))?;
    tracing::info!(%addr, "listening");
    Ok(listener)
}

async fn run_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
    let config = llm::emulator::EmulatorConfig {
        latency: Duration::from_millis(args.latency_ms),
        fail_rate: args.fail_rate,
        fail_statuses: args.fail_statuses,
        retry_after: Duration::from_millis(args.retry_after_ms),
        malformed_rate: args.malformed_rate,
        api_key: args.api_key,
        min_cacheable_tokens: args.min_cacheable_tokens,
        rate_limits: llm::emulator::RateLimits {
            requests_per_minute: args.requests_per_minute,
            input_tokens_per_minute: args.input_tokens_per_minute,
            output_tokens_per_minute: args.output_tokens_per_minute,
        },
        batch_delay: Duration::from_millis(args.batch_delay_ms),
        batch_expire: args.batch_expire,
        output_tokens: args.output_tokens,
        record_requests: false,
    };
    config.validate()?;
    let listener = bind(&format!("127.0.0.1:{}", args.port)).await?;
    let handle = llm::emulator::spawn(listener, config).await?;
    println!("LLM emulator listening on {}", handle.base_url());
    shutdown_on_signal().cancelled().await;
    handle.shutdown().await;
    Ok(())
}
