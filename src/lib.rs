//! callcoach: queue-driven coaching analysis of sales-call transcripts, made cheap by caching.
//!
//! Architecture, from the outside in:
//! - [`http`]: the axum front. Producers ingest calls and enqueue analyses; ops read job status.
//! - [`queue`]: the producer handle: records jobs in the [`ledger`] and pushes them through
//!   [`delivery`] (apalis-redis lane queues, which know no job kinds).
//! - [`ledger`]: the `jobs` table, the source of truth: guarded transitions, relay, rescuer,
//!   pruner.
//! - [`worker`]: one apalis worker per lane under a restarting monitor, running [`jobs`];
//!   [`supervise`] restarts background tasks that fail.
//! - [`jobs`]: the job registry and kinds; `analyze_call` goes through the [`cache`] tiers
//!   before the [`llm`].
//! - [`db`]: schema (`sql/migrations`), seed data and queries; [`config`]: typed settings;
//!   [`telemetry`]: tracing and the metric names; [`rate_limit`]: fleet-wide token buckets and
//!   budget counters in Redis.
//! - [`schedule`]: `callcoach scheduler`, the recurring jobs of `jobs/schedule.toml` enqueued
//!   once per cron tick (timezone- and DST-aware) through the [`queue`].
//! - [`seed`]: `callcoach db seed`, a deterministic generator of realistic calls, reps and
//!   coaching sessions loaded with `COPY`, for tests and benchmarks.
//!
//! [`App::build`] wires it all from [`config::Settings`]; `main` and the tests share it.

pub mod bench;
pub mod cache;
pub mod config;
pub mod db;
pub mod delivery;
pub mod demo;
pub mod http;
pub mod jobs;
pub mod ledger;
pub mod llm;
pub mod model;
pub mod performance;
pub mod queue;
pub mod rate_limit;
pub mod schedule;
pub mod seed;
pub mod stats;
pub mod supervise;
pub mod telemetry;
pub mod worker;

use anyhow::Context;
use config::Settings;
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::PgPool;
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// A wired application: pools, queue, job context. Cheap to clone.
#[derive(Clone)]
pub struct App {
    /// Settings it was built from.
    pub settings: Arc<Settings>,
    /// Postgres pool (lazy: the app starts while Postgres is down).
    pub pg: PgPool,
    /// Multiplexed, auto-reconnecting Redis connection (lazy as well).
    pub redis: ConnectionManager,
    /// Producer handle.
    pub queue: queue::Queue,
    /// What jobs run with.
    pub jobs: jobs::JobContext,
    /// Prometheus renderer.
    pub metrics: PrometheusHandle,
}

/// The Redis client every connection of the process is opened from: `REDIS_URL`
/// (`redis://` or `rediss://`), trusting `REDIS_TLS_CA_FILE`'s CA when one is set.
pub fn redis_client(settings: &Settings) -> anyhow::Result<redis::Client> {
    let url = settings.redis_url.expose();
    match &settings.redis_tls_ca {
        None => redis::Client::open(url).context("REDIS_URL is not a valid Redis URL"),
        Some(ca) => {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.pem.to_vec()),
            };
            redis::Client::build_with_tls(url, certs)
                .with_context(|| format!("REDIS_TLS_CA_FILE {}: unusable CA", ca.path.display()))
        }
    }
}

/// Opens a lazy Redis connection: short connect timeout, bounded response time, and at most
/// `max_connections` commands in flight (callers beyond that wait, within the response timeout).
pub fn redis_connection(
    settings: &Settings,
    max_connections: usize,
) -> anyhow::Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200))
        .set_concurrency_limit(max_connections);
    ConnectionManager::new_lazy_with_config(redis_client(settings)?, config)
        .context("creating Redis connection")
}

/// How often web and worker processes sample gauges such as the queue depth.
pub const GAUGE_SAMPLE_EVERY: Duration = Duration::from_secs(15);

/// Waits until Redis answers PING within `within`, trying every 250 ms.
pub async fn wait_for_redis(mut conn: ConnectionManager, within: Duration) {
    let ping = redis::cmd("PING");
    loop {
        let pong = tokio::time::timeout(within, ping.query_async::<String>(&mut conn)).await;
        if let Ok(Ok(_)) = pong {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The guarded LLM path over its own Redis connection (limits, spend, fan-out gate).
fn llm_gateway(settings: &Settings, client: llm::LlmClient) -> anyhow::Result<llm::Gateway> {
    let redis = redis_connection(settings, settings.redis_max_connections)?;
    let fleet = llm::limits::FleetOptions {
        processes: settings.llm_fleet_processes,
        max_wait: settings.llm_limit_max_wait,
        ..Default::default()
    };
    let limiter = llm::limits::FleetLimiter::new(redis.clone(), settings.llm_limits, &fleet)
        .context("LLM_*_PER_MIN")?;
    let spend = llm::limits::SpendGuard::new(
        redis.clone(),
        settings.llm_budgets,
        &llm::limits::SpendOptions::default(),
    );
    let options = llm::GatewayOptions {
        fan_out_wait: settings.llm_fan_out_wait,
    };
    Ok(llm::Gateway::new(client, limiter, spend, redis, options))
}

impl App {
    /// Wires the application. Does not migrate and does not need Redis or Postgres to be up.
    /// Must be called inside a tokio runtime (it starts the ledger writer task).
    pub fn build(settings: Settings) -> anyhow::Result<App> {
        let settings = Arc::new(settings);
        let pg = db::pool(
            settings.database_url.expose(),
            settings.database_max_connections,
            settings.database_acquire_timeout,
        )?;
        let redis = redis_connection(&settings, settings.redis_max_connections)?;
        let queue = queue::Queue::new(
            pg.clone(),
            redis.clone(),
            settings.job_max_attempts,
            jobs::registry::names(),
        );
        let claims = ledger::writer::ClaimSettings {
            worker: worker::process_name(),
            lease: settings.job_lease,
        };
        let llm = llm::LlmClient::new(
            &settings.anthropic_base_url,
            settings.anthropic_api_key.expose(),
            settings.llm_timeout,
        )
        .context("building the LLM client")?;
        let llm = llm_gateway(&settings, llm)?;
        // The cache gets its own connection so queue traffic never takes its slots.
        let cache = cache::CoachingCache::new(
            redis_connection(&settings, settings.redis_max_connections)?,
            settings.redis_cache_timeout,
            pg.clone(),
            cache::CacheOptions {
                ttl: settings.cache_ttl(),
                enabled: settings.enable_caching,
                lease_ttl: settings.cache_lease,
                max_wait: settings.llm_timeout + settings.cache_lease,
            },
        );
        let jobs = jobs::JobContext {
            pg: pg.clone(),
            cache,
            llm,
            queue: queue.clone(),
            ledger: ledger::Ledger::start(pg.clone(), claims),
            inflight: jobs::InFlight::default(),
            settings: settings.clone(),
        };
        Ok(App {
            settings,
            pg,
            redis,
            queue,
            jobs,
            metrics: telemetry::install_metrics(),
        })
    }

    /// The HTTP router over this app.
    pub fn router(&self) -> axum::Router {
        http::router(http::AppState {
            pg: self.pg.clone(),
            redis: self.redis.clone(),
            queue: self.queue.clone(),
            ledger: self.jobs.ledger.clone(),
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            spend: self.jobs.llm.spend().clone(),
            keys: http::auth::KeyCache::new(self.settings.auth_cache),
            limiter: http::limits::HttpRateLimiter::from_settings(&self.settings, &self.redis),
            schedule: Some(Arc::new(schedule::DashboardSchedule::load(
                self.pg.clone(),
                self.settings.schedule_file.as_deref(),
            ))),
        })
    }

    /// Serves HTTP on `listener` until `shutdown` is cancelled, under the configured header
    /// and body timeouts and connection limit ([`http::server`]); then waits for open
    /// connections to finish their requests.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.spawn_gauge_sampler(GAUGE_SAMPLE_EVERY, shutdown.clone());
        tokio::spawn(stats::sample_gauges(
            self.pg.clone(),
            self.redis.clone(),
            self.settings.stats_sample,
            shutdown.clone(),
        ));
        let limits = http::server::ServerLimits::from_settings(&self.settings);
        http::server::serve(listener, self.router(), limits, shutdown)
            .await
            .context("HTTP server failed")
    }

    /// Samples the ledger's queue depth into [`telemetry::names::QUEUE_DEPTH`] every
    /// `every` until `shutdown` is cancelled.
    pub fn spawn_gauge_sampler(&self, every: Duration, shutdown: CancellationToken) {
        let pg = self.pg.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
                match ledger::queue_depth(&pg).await {
                    Ok(rows) => {
                        for (lane, depth) in rows {
                            metrics::gauge!(telemetry::names::QUEUE_DEPTH, "lane" => lane)
                                .set(depth as f64);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "sampling the queue depth failed"),
                }
            }
        });
    }

    /// Runs the lane workers with the ledger upkeep until `shutdown` is cancelled, then
    /// drains. `lanes` restricts which lanes this process consumes (all when empty).
    pub async fn run_worker(
        &self,
        lanes: &[delivery::Lane],
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let s = &self.settings;
        let upkeep = ledger::relay::Upkeep {
            pg: self.pg.clone(),
            redis: self.redis.clone(),
            options: ledger::relay::UpkeepOptions {
                relay_every: s.relay_interval,
                rescue_every: s.rescue_interval,
                redeliver_after: s.redeliver_after,
                retention: s.job_retention,
                prune_every: s.prune_interval,
            },
        };
        let lanes = delivery::Lane::ALL
            .into_iter()
            .filter(|l| lanes.is_empty() || lanes.contains(l))
            .map(|lane| match lane {
                delivery::Lane::Interactive => (lane, s.worker_concurrency),
                delivery::Lane::Background => (lane, s.worker_background_concurrency),
            })
            .collect();
        let options = worker::WorkerOptions {
            lanes,
            poll: s.worker_poll,
            lease: s.job_lease,
            drain: s.worker_drain,
        };
        self.spawn_gauge_sampler(GAUGE_SAMPLE_EVERY, shutdown.clone());
        worker::run(
            self.jobs.clone(),
            self.redis.clone(),
            upkeep,
            options,
            shutdown,
        )
        .await
    }
}
