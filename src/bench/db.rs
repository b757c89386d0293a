//! `bench db`: latency of the read paths of `sql/performance/` through the project's own Rust
//! code, on a seeded database of the bench's own, against the same logical queries on the
//! same data without those objects.
//!
//! **Database.** The bench never touches the configured database's data: it connects to it
//! only to drop and create `<dbname>_bench_db` on the same server, migrates that one with
//! [`db::migrate`] (which applies `sql/performance/` too), seeds it with [`seed::seed`],
//! refreshes `mv_rep_performance` and runs `VACUUM (ANALYZE)`: the statistics, and the
//! visibility map that index-only scans need, as autovacuum would leave them, instead of
//! autovacuum working on the freshly loaded tables while the bench times. The database is
//! dropped at the end unless `--keep`, and a kept one is left complete: the baseline's drops
//! are re-applied first.
//!
//! **Optimized.** One connection, sequential calls after a warm-up of [`WARMUP`] calls, inputs
//! drawn with a fixed seed from the seeded rows:
//! - `cache_lookup`: [`cache::read_durable`] (what `CoachingCache::pg_get` runs), the durable
//!   tier's read, on keys sampled from `coaching_cache` (`cache_lookup_miss`: the same on keys
//!   that do not exist);
//! - `rep_summary_live`: [`performance::rep_performance_summary`] over 90 days;
//! - `rep_summary_view`: [`performance::rep_performance`] (one row of the view);
//! - `search_by_rep`, `search_product_type_90d`, `search_date_window_90d`:
//!   [`performance::search_calls`], first page of 50;
//! - `call_details`: [`performance::call_details`];
//! - `floor_select_1`: `SELECT 1` on the same connection.
//!
//! Each is timed twice: through a one-connection pool (the production path: every call
//! acquires the connection, which sqlx pings first, and returns it) and on a connection held
//! for the whole run (`held_connection`: the query alone, as psql or pgbench measure it). The
//! targets are judged on both.
//!
//! **Baseline.** Every index [`performance::expected`] names and the materialized views are
//! dropped, and plain SQL equivalents are timed (`--baseline-samples`, default 30, after a
//! warm-up of [`BASELINE_WARMUP`]) on the same inputs: the original system's cache lookup (the
//! latest `coaching_sessions` row by `cache_key`), the aggregates behind
//! `get_rep_performance_summary` and `mv_rep_performance` for one rep, the search's
//! WHERE / ORDER BY / LIMIT, and the statements of `get_call_with_details`. Both sides'
//! row counts on the shared inputs are compared (`rows_match`). `sql/performance/` is applied
//! again afterwards and the view refreshed.
//!
//! **Report.** Per query p50 / p99 / mean, `speedup_p50` (baseline p50 / optimized p50) and
//! `vs_floor` (optimized p50 / `SELECT 1` p50), then each target with its bound, the measured
//! value and whether it was met.

use super::{ratio, round1, summary_us};
use crate::{
    cache::{self, CacheKey},
    config::Settings,
    db,
    model::sha256_hex,
    performance::{self, CallSearch, Kind},
    seed::{self, KeyStyle, SeedOptions, SeedReport},
};
use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::{Map, Value, json};
use sqlx::{PgPool, Row};
use std::time::Instant;
use uuid::Uuid;

/// Appended to the configured database's name to name the bench's own database.
pub const DATABASE_SUFFIX: &str = "_bench_db";

/// Untimed calls before each optimized measurement.
pub const WARMUP: usize = 20;

/// Untimed calls before each baseline measurement (each takes tens of ms).
pub const BASELINE_WARMUP: usize = 2;

/// Days of the live rep summary and length of the searches' date windows.
pub const WINDOW_DAYS: i32 = 90;

/// Page size of every search.
pub const PAGE: i32 = 50;

/// Distinct cache keys sampled from `coaching_cache` to draw lookups from.
const KEY_POOL: usize = 2_000;

/// Connections of the pool that migrates and seeds (the seed loads over two at once).
const SETUP_CONNECTIONS: u32 = 4;

/// What to run.
#[derive(Clone, Debug)]
pub struct DbBench {
    /// Calls to seed.
    pub calls: u64,
    /// Coaching sessions to seed.
    pub sessions: u64,
    /// Reps to seed.
    pub reps: u32,
    /// Seed of the generator and of the bench's input draws.
    pub seed: u64,
    /// Timed calls per optimized query.
    pub samples: usize,
    /// Timed calls per baseline query.
    pub baseline_samples: usize,
    /// Keep the bench database afterwards.
    pub keep: bool,
}

impl DbBench {
    fn seed_options(&self) -> SeedOptions {
        SeedOptions::new(self.calls, self.sessions, self.reps, self.seed)
    }

    /// Input draws each query needs: enough for the longer of both sides, warm-up included.
    fn draws(&self) -> usize {
        (WARMUP + self.samples).max(BASELINE_WARMUP + self.baseline_samples)
    }
}

/// Runs the database benchmark: creates, seeds and measures the bench database, then drops
/// it (unless `keep`), also when the measurement failed.
pub async fn run(settings: Settings, bench: DbBench) -> anyhow::Result<Value> {
    bench
        .seed_options()
        .validate()
        .map_err(anyhow::Error::msg)?;
    ensure!(
        bench.samples > 0 && bench.baseline_samples > 0,
        "--samples and --baseline-samples must be at least 1"
    );
    let mut phases = Phases::new();
    let target = phases
        .run("create database", BenchDatabase::create(&settings))
        .await?;
    let report = measure(&settings, &bench, &target, &mut phases).await;
    let dropped = if bench.keep {
        Ok(())
    } else {
        phases.run("drop database", target.drop()).await
    };
    phases.bar.finish_and_clear();
    let mut report = report?;
    dropped?;
    report["phase_secs"] = Value::Object(phases.secs);
    Ok(report)
}

/// Everything between creating and dropping the bench database.
async fn measure(
    settings: &Settings,
    bench: &DbBench,
    target: &BenchDatabase,
    phases: &mut Phases,
) -> anyhow::Result<Value> {
    let setup = target.pool(settings, SETUP_CONNECTIONS).await?;
    let seeded = prepare(settings, bench, &setup, phases).await?;
    let timed = target.pool(settings, 1).await?;
    let work = phases
        .run("draw inputs", Workload::load(&timed, bench, &seeded))
        .await?;
    let held = <sqlx::PgConnection as sqlx::Connection>::connect(&target.url).await?;
    let runner = Runner {
        pool: timed,
        held: tokio::sync::Mutex::new(held),
        details_sql: details_body(&setup).await?,
        work,
    };
    let measured = compare(bench, &runner, &setup, phases).await?;
    runner.pool.close().await;
    setup.close().await;
    Ok(report(bench, target, &seeded, &measured))
}

/// Migrates, seeds (the seed's own progress bars replace the phase bar meanwhile), refreshes
/// the view and vacuums and analyzes.
async fn prepare(
    settings: &Settings,
    bench: &DbBench,
    setup: &PgPool,
    phases: &mut Phases,
) -> anyhow::Result<SeedReport> {
    phases.run("migrate", db::migrate(setup)).await?;
    phases.bar.set_draw_target(ProgressDrawTarget::hidden());
    let seeded = phases.run("seed", seed_data(settings, bench, setup)).await;
    phases.bar.set_draw_target(ProgressDrawTarget::stderr());
    let seeded = seeded?;
    phases
        .run("refresh view and vacuum", refresh_and_vacuum(setup))
        .await?;
    Ok(seeded)
}

/// Both sides' timings and what the baseline dropped.
struct Measured {
    optimized: Optimized,
    baseline: Vec<Timed>,
    dropped: Vec<String>,
}

/// Times the optimized side, drops `sql/performance/`'s indexes and views, times the
/// baseline, then applies them again (also after a failed baseline, so a kept database is
/// complete).
async fn compare(
    bench: &DbBench,
    runner: &Runner,
    setup: &PgPool,
    phases: &mut Phases,
) -> anyhow::Result<Measured> {
    let bar = phases.bar.clone();
    let optimized = runner.optimized_all(bench.samples, &bar);
    let optimized = phases.run("optimized", optimized).await?;
    let dropped = phases
        .run("drop performance objects", drop_performance_objects(setup))
        .await?;
    let baseline = runner.baseline_all(bench.baseline_samples, &bar);
    let baseline = phases.run("baseline", baseline).await;
    let restored = phases
        .run("reapply performance objects", restore(setup))
        .await;
    let baseline = baseline?;
    restored?;
    Ok(Measured {
        optimized,
        baseline,
        dropped,
    })
}

/// Seeds the way `callcoach db seed` does: keys as this deployment's analyses build them.
async fn seed_data(
    settings: &Settings,
    bench: &DbBench,
    pool: &PgPool,
) -> anyhow::Result<SeedReport> {
    let mut options = bench.seed_options();
    options.keys = Some(KeyStyle::for_settings(pool, settings).await?);
    seed::seed(pool, &options, true).await
}

/// Refreshes `mv_rep_performance`, then `VACUUM (ANALYZE)` of the whole database.
async fn refresh_and_vacuum(pool: &PgPool) -> anyhow::Result<()> {
    performance::refresh_rep_performance(pool).await?;
    sqlx::query("VACUUM (ANALYZE)").execute(pool).await?;
    Ok(())
}

/// Whether `name` is a plain SQL identifier (safe to splice in double quotes).
fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The bench database's name and URL: the configured URL with `DATABASE_SUFFIX` appended to
/// its database name (query parameters kept).
fn bench_database_url(url: &str) -> anyhow::Result<(String, String)> {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").context("DATABASE_URL is not a URL")? + 3;
    let slash = base[authority..]
        .find('/')
        .map(|i| authority + i)
        .context("DATABASE_URL names no database")?;
    let configured = &base[slash + 1..];
    ensure!(
        is_plain_identifier(configured),
        "bench db needs a DATABASE_URL whose database name is a plain identifier, not {configured:?}"
    );
    let name = format!("{configured}{DATABASE_SUFFIX}");
    ensure!(
        name.len() <= 63,
        "the bench database name {name} is longer than Postgres allows (63 bytes)"
    );
    let mut derived = format!("{}/{name}", &base[..slash]);
    if let Some(query) = query {
        derived = format!("{derived}?{query}");
    }
    Ok((name, derived))
}

/// The bench's own database on the configured server.
struct BenchDatabase {
    /// Connection to the configured database, used only to drop and create this one.
    admin: PgPool,
    name: String,
    url: String,
}

impl BenchDatabase {
    /// Drops the bench database if it exists (left by a killed or `--keep` run), then
    /// creates it empty.
    async fn create(settings: &Settings) -> anyhow::Result<BenchDatabase> {
        let (name, url) = bench_database_url(settings.database_url.expose())?;
        let admin = db::pool(
            settings.database_url.expose(),
            1,
            settings.database_acquire_timeout,
        )?;
        let target = BenchDatabase { admin, name, url };
        target.drop_if_exists().await?;
        target
            .execute(format!("CREATE DATABASE \"{}\"", target.name))
            .await?;
        Ok(target)
    }

    async fn execute(&self, statement: String) -> anyhow::Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&self.admin)
            .await
            .with_context(|| statement)?;
        Ok(())
    }

    async fn drop_if_exists(&self) -> anyhow::Result<()> {
        self.execute(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .await
    }

    /// Drops the bench database and closes the admin connection.
    async fn drop(&self) -> anyhow::Result<()> {
        self.drop_if_exists().await?;
        self.admin.close().await;
        Ok(())
    }

    /// A pool on the bench database, checked to really be connected to it.
    async fn pool(&self, settings: &Settings, connections: u32) -> anyhow::Result<PgPool> {
        let pool = db::pool(&self.url, connections, settings.database_acquire_timeout)?;
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await
            .with_context(|| format!("connecting to {}", self.name))?;
        if current != self.name {
            bail!(
                "the derived URL connected to {current}, not {}; refusing to run",
                self.name
            );
        }
        Ok(pool)
    }
}

/// The queries measured, each with its optimized path and its plain-SQL baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Query {
    CacheLookup,
    RepSummaryLive,
    RepSummaryView,
    SearchByRep,
    SearchProductType,
    SearchDateWindow,
    CallDetails,
}

impl Query {
    const ALL: [Query; 7] = [
        Query::CacheLookup,
        Query::RepSummaryLive,
        Query::RepSummaryView,
        Query::SearchByRep,
        Query::SearchProductType,
        Query::SearchDateWindow,
        Query::CallDetails,
    ];

    fn name(self) -> &'static str {
        match self {
            Query::CacheLookup => "cache_lookup",
            Query::RepSummaryLive => "rep_summary_live",
            Query::RepSummaryView => "rep_summary_view",
            Query::SearchByRep => "search_by_rep",
            Query::SearchProductType => "search_product_type_90d",
            Query::SearchDateWindow => "search_date_window_90d",
            Query::CallDetails => "call_details",
        }
    }

    /// What the optimized side calls, and what the baseline times instead.
    fn paths(self) -> (&'static str, &'static str) {
        match self {
            Query::CacheLookup => (
                "cache::read_durable, CoachingCache::pg_get's read (get_cached_coaching_session, coaching_cache primary key)",
                "the original system's lookup: latest coaching_sessions row by cache_key",
            ),
            Query::RepSummaryLive => (
                "performance::rep_performance_summary(rep, 90)",
                "get_rep_performance_summary's aggregate as plain SQL",
            ),
            Query::RepSummaryView => (
                "performance::rep_performance(rep) (mv_rep_performance)",
                "mv_rep_performance's full aggregate for one rep",
            ),
            Query::SearchByRep | Query::SearchProductType | Query::SearchDateWindow => (
                "performance::search_calls (search_calls_optimized)",
                "the same WHERE / ORDER BY / LIMIT as plain SQL",
            ),
            Query::CallDetails => (
                "performance::call_details (get_call_with_details)",
                "get_call_with_details's statements as plain SQL",
            ),
        }
    }
}

/// `search_calls_optimized` with a rep.
const BASELINE_SEARCH_BY_REP: &str = "SELECT c.id, c.title, c.product, c.call_type,
        c.scheduled_at, c.rep_id, c.rep_email
    FROM calls c WHERE c.rep_id = $1
    ORDER BY c.scheduled_at DESC, c.id DESC LIMIT $2";

/// `search_calls_optimized` with a product, a call type and dates.
const BASELINE_SEARCH_PRODUCT_TYPE: &str = "SELECT c.id, c.title, c.product, c.call_type,
        c.scheduled_at, c.rep_id, c.rep_email
    FROM calls c WHERE c.product = $1 AND c.call_type = $2
        AND c.scheduled_at >= $3 AND c.scheduled_at < $4
    ORDER BY c.scheduled_at DESC, c.id DESC LIMIT $5";

/// `search_calls_optimized` with dates only.
const BASELINE_SEARCH_WINDOW: &str = "SELECT c.id, c.title, c.product, c.call_type,
        c.scheduled_at, c.rep_id, c.rep_email
    FROM calls c WHERE c.scheduled_at >= $1 AND c.scheduled_at < $2
    ORDER BY c.scheduled_at DESC, c.id DESC LIMIT $3";

/// The original system's durable lookup.
const BASELINE_CACHE: &str =
    "SELECT result FROM coaching_sessions WHERE cache_key = $1 ORDER BY created_at DESC LIMIT 1";

/// `get_rep_performance_summary(rep, days)`'s body.
const BASELINE_REP_SUMMARY: &str = "SELECT s.dimension, count(*), round(avg(s.score), 2),
        min(s.score), max(s.score), max(s.created_at)
    FROM coaching_sessions s
    WHERE s.rep_id = $1 AND s.created_at >= now() - make_interval(days => $2)
    GROUP BY s.dimension ORDER BY s.dimension";

/// `mv_rep_performance`'s definition, for one rep.
const BASELINE_REP_VIEW: &str = "SELECT r.id AS rep_id, r.name AS rep_name, r.email AS rep_email,
        (SELECT count(*) FROM calls c WHERE c.rep_id = r.id) AS total_calls,
        count(s.id) AS total_sessions,
        round(avg(s.score), 2) AS avg_score,
        round(avg(s.score) FILTER (WHERE s.dimension = 'product_knowledge'), 2),
        round(avg(s.score) FILTER (WHERE s.dimension = 'discovery'), 2),
        round(avg(s.score) FILTER (WHERE s.dimension = 'objection_handling'), 2),
        round(avg(s.score) FILTER (WHERE s.dimension = 'engagement'), 2),
        max(s.created_at) AS last_coached
    FROM reps r LEFT JOIN coaching_sessions s ON s.rep_id = r.id
    WHERE r.id = $1
    GROUP BY r.id, r.name, r.email";

/// `get_call_with_details(id)`'s body as plain SQL, read from the installed function (so it
/// is always the body being compared): its parameter becomes `$1`.
async fn details_body(pool: &PgPool) -> anyhow::Result<String> {
    let body: String = sqlx::query_scalar(
        "SELECT prosrc FROM pg_proc WHERE proname = 'get_call_with_details' LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .context("reading get_call_with_details")?;
    ensure!(
        body.contains("p_call_id"),
        "get_call_with_details has no p_call_id"
    );
    Ok(body.replace("p_call_id", "$1"))
}

/// The inputs of every timed call, drawn once with a fixed seed so both sides see the same
/// sequence (the baseline a prefix of it).
struct Workload {
    reps: Vec<Uuid>,
    calls: Vec<Uuid>,
    keys: Vec<CacheKey>,
    missing: Vec<CacheKey>,
    product_type: Vec<CallSearch>,
    windows: Vec<CallSearch>,
}

impl Workload {
    async fn load(pool: &PgPool, bench: &DbBench, seeded: &SeedReport) -> anyhow::Result<Self> {
        let mut rng = StdRng::seed_from_u64(bench.seed);
        let n = bench.draws();
        let reps: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM reps ORDER BY id")
            .fetch_all(pool)
            .await?;
        let calls: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM calls ORDER BY id")
            .fetch_all(pool)
            .await?;
        let keys = sample_keys(pool, bench.seed, seeded.cache_entries).await?;
        ensure!(
            !reps.is_empty() && !calls.is_empty() && !keys.is_empty(),
            "the seed left no reps, calls or cache rows to query"
        );
        let missing = (0..n).map(|i| missing_key(&keys[0], i)).collect();
        Ok(Workload {
            reps: draw(&mut rng, &reps, n),
            calls: draw(&mut rng, &calls, n),
            keys: draw(&mut rng, &keys, n),
            missing,
            product_type: product_type_searches(pool, &mut rng, n).await?,
            windows: window_searches(pool, &mut rng, n).await?,
        })
    }

    fn rep(&self, i: usize) -> Uuid {
        self.reps[i % self.reps.len()]
    }

    fn call(&self, i: usize) -> Uuid {
        self.calls[i % self.calls.len()]
    }

    fn key(&self, i: usize) -> &CacheKey {
        &self.keys[i % self.keys.len()]
    }

    fn missing(&self, i: usize) -> &CacheKey {
        &self.missing[i % self.missing.len()]
    }

    fn product_type(&self, i: usize) -> &CallSearch {
        &self.product_type[i % self.product_type.len()]
    }

    fn window(&self, i: usize) -> &CallSearch {
        &self.windows[i % self.windows.len()]
    }
}

/// `n` elements of `pool` drawn uniformly (with repeats).
fn draw<T: Clone>(rng: &mut StdRng, pool: &[T], n: usize) -> Vec<T> {
    (0..n).filter_map(|_| pool.choose(rng).cloned()).collect()
}

/// About [`KEY_POOL`] keys of `coaching_cache`, a repeatable Bernoulli sample, each parsed
/// back into a [`CacheKey`] and checked to render to the stored key.
async fn sample_keys(pool: &PgPool, seed: u64, rows: u64) -> anyhow::Result<Vec<CacheKey>> {
    let percent = (200.0 * KEY_POOL as f64 / rows.max(1) as f64).min(100.0);
    let sampled = sqlx::query(
        "SELECT cache_key, dimension, transcript_hash, role, rubric_version, fingerprint
         FROM coaching_cache TABLESAMPLE BERNOULLI ($1::float4) REPEATABLE ($2::float8)
         LIMIT $3",
    )
    .bind(percent)
    .bind((seed % 1_000_000) as f64)
    .bind(KEY_POOL as i64)
    .fetch_all(pool)
    .await?;
    sampled.iter().map(cache_key_of).collect()
}

fn cache_key_of(row: &sqlx::postgres::PgRow) -> anyhow::Result<CacheKey> {
    let stored: String = row.get("cache_key");
    let key = CacheKey {
        dimension: row
            .get::<String, _>("dimension")
            .parse()
            .map_err(anyhow::Error::msg)?,
        transcript_hash: row.get("transcript_hash"),
        role: row
            .get::<String, _>("role")
            .parse()
            .map_err(anyhow::Error::msg)?,
        rubric_version: row.get("rubric_version"),
        fingerprint: row.get("fingerprint"),
    };
    ensure!(
        key.to_string() == stored,
        "cache row {stored} does not match its columns ({key})"
    );
    Ok(key)
}

/// A key shaped like `like` for a transcript nobody analysed.
fn missing_key(like: &CacheKey, i: usize) -> CacheKey {
    CacheKey {
        transcript_hash: sha256_hex(&format!("bench-db-missing-{i}")),
        ..like.clone()
    }
}

/// Product + call type pairs that exist, each over a 90-day window within the calls' span.
async fn product_type_searches(
    pool: &PgPool,
    rng: &mut StdRng,
    n: usize,
) -> anyhow::Result<Vec<CallSearch>> {
    let pairs: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT product, call_type FROM calls
         WHERE product IS NOT NULL AND call_type IS NOT NULL ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    ensure!(
        !pairs.is_empty(),
        "the seeded calls have no product and call type"
    );
    let mut windows = window_searches(pool, rng, n).await?;
    for search in &mut windows {
        let (product, call_type) = pairs.choose(rng).cloned().unwrap_or_default();
        (search.product, search.call_type) = (Some(product), Some(call_type));
    }
    Ok(windows)
}

/// Date windows of [`WINDOW_DAYS`] ending at a random moment of the calls' span.
async fn window_searches(
    pool: &PgPool,
    rng: &mut StdRng,
    n: usize,
) -> anyhow::Result<Vec<CallSearch>> {
    let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT min(scheduled_at), max(scheduled_at) FROM calls")
            .fetch_one(pool)
            .await?;
    let (first, last) = first.zip(last).context("no calls were seeded")?;
    let window = ChronoDuration::days(i64::from(WINDOW_DAYS));
    let earliest_end = (first + window).min(last);
    let span = (last - earliest_end).num_seconds().max(0);
    Ok((0..n)
        .map(|_| {
            let to = earliest_end + ChronoDuration::seconds(rng.random_range(0..=span));
            CallSearch {
                from: Some(to - window),
                to: Some(to),
                limit: PAGE,
                ..CallSearch::default()
            }
        })
        .collect())
}

/// Latencies in microseconds of the timed calls, and the rows every call returned (warm-up
/// included, by input index).
struct Timed {
    samples: Vec<f64>,
    rows: Vec<usize>,
}

/// Runs `f(0..warmup)` untimed, then times `f(warmup..warmup + n)` one after the other; `f`
/// returns how many rows the call got.
async fn time<F, Fut>(warmup: usize, n: usize, mut f: F) -> anyhow::Result<Timed>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<usize>>,
{
    let mut rows = Vec::with_capacity(warmup + n);
    for i in 0..warmup {
        rows.push(f(i).await?);
    }
    let mut samples = Vec::with_capacity(n);
    for i in warmup..warmup + n {
        let t = Instant::now();
        rows.push(f(i).await?);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(Timed { samples, rows })
}

/// The optimized side's figures: one per query, the miss and the floor, through the pool and
/// on the held connection.
struct Optimized {
    queries: Vec<Timed>,
    miss: Timed,
    floor: Timed,
    held: Vec<Timed>,
    held_floor: Timed,
}

/// Runs the timed calls: through a one-connection pool (the production path: each call
/// acquires, pings and returns the connection) and on a connection held for the whole run
/// (the query alone, as psql or pgbench measure it).
struct Runner {
    pool: PgPool,
    held: tokio::sync::Mutex<sqlx::PgConnection>,
    /// The baseline of call details: the function's body as plain SQL.
    details_sql: String,
    work: Workload,
}

/// Where a timed call runs.
#[derive(Clone, Copy)]
enum On {
    Pool,
    Held,
}

impl Runner {
    async fn optimized_all(&self, n: usize, bar: &ProgressBar) -> anyhow::Result<Optimized> {
        bar.set_message("optimized: floor_select_1");
        let floor = time(WARMUP, n, move |_| self.select_1(On::Pool)).await?;
        let held_floor = time(WARMUP, n, move |_| self.select_1(On::Held)).await?;
        let (mut queries, mut held) = (Vec::new(), Vec::new());
        for q in Query::ALL {
            bar.set_message(format!("optimized: {}", q.name()));
            queries.push(time(WARMUP, n, move |i| self.optimized(q, i, On::Pool)).await?);
            held.push(time(WARMUP, n, move |i| self.optimized(q, i, On::Held)).await?);
        }
        bar.set_message("optimized: cache_lookup_miss");
        let miss = time(WARMUP, n, move |i| self.miss(i)).await?;
        Ok(Optimized {
            queries,
            miss,
            floor,
            held,
            held_floor,
        })
    }

    async fn baseline_all(&self, n: usize, bar: &ProgressBar) -> anyhow::Result<Vec<Timed>> {
        let mut out = Vec::new();
        for q in Query::ALL {
            bar.set_message(format!("baseline: {}", q.name()));
            out.push(time(BASELINE_WARMUP, n, move |i| self.baseline(q, i)).await?);
        }
        Ok(out)
    }

    async fn select_1(&self, on: On) -> anyhow::Result<usize> {
        let one = sqlx::query_scalar::<_, i32>("SELECT 1");
        let one = match on {
            On::Pool => one.fetch_one(&self.pool).await?,
            On::Held => one.fetch_one(&mut *self.held.lock().await).await?,
        };
        Ok(one as usize)
    }

    async fn miss(&self, i: usize) -> anyhow::Result<usize> {
        let key = self.work.missing(i);
        if cache::read_durable(&self.pool, key).await?.is_some() {
            bail!("{key} was expected to miss");
        }
        Ok(0)
    }

    /// One call through the project's code; returns the rows it got.
    async fn optimized(&self, q: Query, i: usize, on: On) -> anyhow::Result<usize> {
        match on {
            On::Pool => read(&self.pool, &self.work, q, i).await,
            On::Held => read(&mut *self.held.lock().await, &self.work, q, i).await,
        }
    }

    /// The same logical query as plain SQL, on the same input; returns the rows it got.
    async fn baseline(&self, q: Query, i: usize) -> anyhow::Result<usize> {
        let w = &self.work;
        let query = match q {
            Query::CacheLookup => sqlx::query(BASELINE_CACHE).bind(w.key(i).to_string()),
            Query::RepSummaryLive => sqlx::query(BASELINE_REP_SUMMARY)
                .bind(w.rep(i))
                .bind(WINDOW_DAYS),
            Query::RepSummaryView => sqlx::query(BASELINE_REP_VIEW).bind(w.rep(i)),
            Query::SearchByRep => sqlx::query(BASELINE_SEARCH_BY_REP)
                .bind(w.rep(i))
                .bind(PAGE),
            Query::SearchProductType => {
                let s = w.product_type(i);
                sqlx::query(BASELINE_SEARCH_PRODUCT_TYPE)
                    .bind(s.product.as_deref())
                    .bind(s.call_type.as_deref())
                    .bind(s.from)
                    .bind(s.to)
                    .bind(s.limit)
            }
            Query::SearchDateWindow => {
                let s = w.window(i);
                sqlx::query(BASELINE_SEARCH_WINDOW)
                    .bind(s.from)
                    .bind(s.to)
                    .bind(s.limit)
            }
            Query::CallDetails => {
                sqlx::query(sqlx::AssertSqlSafe(self.details_sql.clone())).bind(w.call(i))
            }
        };
        Ok(query.fetch_all(&self.pool).await?.len())
    }
}

/// One optimized read on `db`; returns the rows it got.
async fn read(
    db: impl sqlx::PgExecutor<'_>,
    w: &Workload,
    q: Query,
    i: usize,
) -> anyhow::Result<usize> {
    let rows = match q {
        Query::CacheLookup => {
            let key = w.key(i);
            cache::read_durable(db, key)
                .await?
                .with_context(|| format!("sampled key {key} missed"))?;
            1
        }
        Query::RepSummaryLive => performance::rep_performance_summary(db, w.rep(i), WINDOW_DAYS)
            .await?
            .len(),
        Query::RepSummaryView => performance::rep_performance(db, w.rep(i))
            .await?
            .map_or(0, |_| 1),
        Query::SearchByRep => performance::search_calls(db, &by_rep(w.rep(i)))
            .await?
            .len(),
        Query::SearchProductType => performance::search_calls(db, w.product_type(i))
            .await?
            .len(),
        Query::SearchDateWindow => performance::search_calls(db, w.window(i)).await?.len(),
        Query::CallDetails => performance::call_details(db, w.call(i))
            .await?
            .map_or(0, |_| 1),
    };
    Ok(rows)
}

/// The first page of one rep's calls.
fn by_rep(rep: Uuid) -> CallSearch {
    CallSearch {
        rep_id: Some(rep),
        limit: PAGE,
        ..CallSearch::default()
    }
}

/// Drops every index `sql/performance/` creates and its materialized views (CASCADE);
/// returns the names of those that existed.
async fn drop_performance_objects(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    let mut dropped = Vec::new();
    let mut expected = performance::expected();
    // Views first: their indexes go with them.
    expected.sort_by_key(|e| e.kind != Kind::MaterializedView);
    for e in expected.into_iter().filter(|e| e.kind != Kind::Function) {
        ensure!(
            is_plain_identifier(&e.name),
            "unexpected object name {:?}",
            e.name
        );
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("\"{}\"", e.name))
            .fetch_one(pool)
            .await?;
        let statement = match e.kind {
            Kind::MaterializedView => {
                format!("DROP MATERIALIZED VIEW IF EXISTS \"{}\" CASCADE", e.name)
            }
            _ => format!("DROP INDEX IF EXISTS \"{}\"", e.name),
        };
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await?;
        if exists {
            dropped.push(e.name);
        }
    }
    Ok(dropped)
}

/// Applies `sql/performance/` again, refreshes the view and checks every object.
async fn restore(pool: &PgPool) -> anyhow::Result<()> {
    performance::apply(pool).await?;
    refresh_and_vacuum(pool).await?;
    let broken: Vec<String> = performance::verify(pool)
        .await?
        .into_iter()
        .filter(|o| !o.ok())
        .map(|o| format!("{} ({})", o.name, o.status))
        .collect();
    ensure!(
        broken.is_empty(),
        "after re-applying: {}",
        broken.join(", ")
    );
    Ok(())
}

/// A bound on one figure of one query.
struct Target {
    query: Query,
    figure: Figure,
    bound: f64,
}

#[derive(Clone, Copy)]
enum Figure {
    /// The optimized p99 in microseconds, at most the bound.
    P99AtMost,
    /// `speedup_p50`, at least the bound.
    SpeedupAtLeast,
}

const fn p99(query: Query, bound: f64) -> Target {
    Target {
        query,
        figure: Figure::P99AtMost,
        bound,
    }
}

const fn speedup(query: Query, bound: f64) -> Target {
    Target {
        query,
        figure: Figure::SpeedupAtLeast,
        bound,
    }
}

/// The targets: lookup and view p99 ≤ 300 µs, live summary ≤ 2 ms, searches and details
/// ≤ 1 ms; at least 100× the baseline for the lookup and both rep summaries, 20× for search.
const TARGETS: &[Target] = &[
    p99(Query::CacheLookup, 300.0),
    p99(Query::RepSummaryView, 300.0),
    p99(Query::RepSummaryLive, 2_000.0),
    p99(Query::SearchByRep, 1_000.0),
    p99(Query::SearchProductType, 1_000.0),
    p99(Query::SearchDateWindow, 1_000.0),
    p99(Query::CallDetails, 1_000.0),
    speedup(Query::CacheLookup, 100.0),
    speedup(Query::RepSummaryLive, 100.0),
    speedup(Query::RepSummaryView, 100.0),
    speedup(Query::SearchByRep, 20.0),
    speedup(Query::SearchProductType, 20.0),
    speedup(Query::SearchDateWindow, 20.0),
];

impl Target {
    fn judge(&self, queries: &Map<String, Value>) -> Value {
        let entry = &queries[self.query.name()];
        let (figure, bound_name, value) = match self.figure {
            Figure::P99AtMost => ("p99_us", "at_most", &entry["optimized"]["p99_us"]),
            Figure::SpeedupAtLeast => ("speedup_p50", "at_least", &entry["speedup_p50"]),
        };
        let value = value.as_f64().unwrap_or(f64::NAN);
        let met = match self.figure {
            Figure::P99AtMost => value <= self.bound,
            Figure::SpeedupAtLeast => value >= self.bound,
        };
        json!({
            "query": self.query.name(),
            "figure": figure,
            bound_name: self.bound,
            "value": value,
            "met": met,
        })
    }
}

fn p50_of(summary: &Value) -> f64 {
    summary["p50_us"].as_f64().unwrap_or(f64::NAN)
}

/// One query's entry: both sides, their ratio and the ratio to the floor.
fn entry(q: Query, optimized: &Timed, baseline: &Timed, floor_p50: f64) -> Value {
    let (optimized_via, baseline_via) = q.paths();
    let o = summary_us(optimized.samples.clone());
    let b = summary_us(baseline.samples.clone());
    let shared = optimized.rows.len().min(baseline.rows.len());
    json!({
        "optimized_via": optimized_via,
        "baseline_via": baseline_via,
        "speedup_p50": ratio(p50_of(&b), p50_of(&o)),
        "vs_floor": ratio(p50_of(&o), floor_p50),
        "rows_match": optimized.rows[..shared] == baseline.rows[..shared],
        "rows_per_call": round1(mean_rows(&optimized.rows)),
        "optimized": o,
        "baseline": b,
    })
}

fn mean_rows(rows: &[usize]) -> f64 {
    rows.iter().sum::<usize>() as f64 / rows.len().max(1) as f64
}

fn report(bench: &DbBench, target: &BenchDatabase, seeded: &SeedReport, m: &Measured) -> Value {
    let (optimized, baseline) = (&m.optimized, &m.baseline);
    let floor = summary_us(optimized.floor.samples.clone());
    let floor_p50 = p50_of(&floor);
    let queries: Map<String, Value> = Query::ALL
        .iter()
        .zip(optimized.queries.iter().zip(baseline))
        .map(|(q, (o, b))| (q.name().to_string(), entry(*q, o, b, floor_p50)))
        .collect();
    let miss = summary_us(optimized.miss.samples.clone());
    let targets: Vec<Value> = TARGETS.iter().map(|t| t.judge(&queries)).collect();
    let all_met = targets.iter().all(|t| t["met"] == true);

    json!({
        "benchmark": "db",
        "database": target.name,
        "kept": bench.keep,
        "config": {
            "calls": bench.calls,
            "sessions": bench.sessions,
            "reps": bench.reps,
            "seed": bench.seed,
            "samples": bench.samples,
            "baseline_samples": bench.baseline_samples,
            "warmup": WARMUP,
            "baseline_warmup": BASELINE_WARMUP,
            "pool_connections": 1,
            "window_days": WINDOW_DAYS,
            "page": PAGE,
        },
        "seed": {
            "generation_secs": seeded.elapsed_secs,
            "sessions_per_sec": seeded.sessions_per_sec,
            "rows": {
                "reps": seeded.reps,
                "calls": seeded.calls,
                "speakers": seeded.speakers,
                "transcripts": seeded.transcripts,
                "sessions": seeded.sessions,
                "cache_entries": seeded.cache_entries,
            },
        },
        "floor_select_1": floor,
        "queries": queries,
        "cache_lookup_miss": {
            "optimized": miss,
            "vs_floor": ratio(p50_of(&miss), floor_p50),
        },
        "baseline_dropped": m.dropped,
        "targets": targets,
        "all_targets_met": all_met,
        "held_connection": held_connection(optimized, baseline),
    })
}

/// The figures on the held connection: floor, queries (against the same baseline) and the
/// targets judged on them.
fn held_connection(optimized: &Optimized, baseline: &[Timed]) -> Value {
    let held_floor = summary_us(optimized.held_floor.samples.clone());
    let held_queries: Map<String, Value> = Query::ALL
        .iter()
        .zip(optimized.held.iter().zip(baseline))
        .map(|(q, (o, b))| (q.name().to_string(), entry(*q, o, b, p50_of(&held_floor))))
        .collect();
    let held_targets: Vec<Value> = TARGETS.iter().map(|t| t.judge(&held_queries)).collect();
    let held_summary: Map<String, Value> = held_queries
        .iter()
        .map(|(name, e)| {
            let figures = json!({
                "optimized": e["optimized"],
                "speedup_p50": e["speedup_p50"],
                "vs_floor": e["vs_floor"],
                "rows_match": e["rows_match"],
            });
            (name.clone(), figures)
        })
        .collect();
    json!({
        "about": "the same Rust read functions on one connection held for the run: the query \
                  without the pool's acquire (a ping round trip) and release",
        "floor_select_1": held_floor,
        "queries": held_summary,
        "all_targets_met": held_targets.iter().all(|t| t["met"] == true),
        "targets": held_targets,
    })
}

/// Phase progress on stderr (drawn only on a terminal) and each phase's wall time.
struct Phases {
    bar: ProgressBar,
    secs: Map<String, Value>,
}

impl Phases {
    /// Create, migrate, seed, refresh, draw, optimized, drop, baseline, re-apply, drop.
    const COUNT: u64 = 10;

    fn new() -> Phases {
        let style = ProgressStyle::with_template("bench db [{bar:20}] {pos}/{len} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        Phases {
            bar: ProgressBar::new(Self::COUNT).with_style(style),
            secs: Map::new(),
        }
    }

    /// Runs one phase, showing its name and recording its duration.
    async fn run<T>(
        &mut self,
        name: &str,
        phase: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.bar.set_message(name.to_string());
        let started = Instant::now();
        let out = phase.await.with_context(|| format!("bench db: {name}"))?;
        self.secs.insert(
            name.replace(' ', "_"),
            json!((started.elapsed().as_secs_f64() * 100.0).round() / 100.0),
        );
        self.bar.inc(1);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_database_is_named_after_the_configured_one() {
        let (name, url) =
            bench_database_url("postgres://u:p@127.0.0.1:5432/callcoach?sslmode=disable").unwrap();
        assert_eq!(name, "callcoach_bench_db");
        assert_eq!(
            url,
            "postgres://u:p@127.0.0.1:5432/callcoach_bench_db?sslmode=disable"
        );
        let (_, url) = bench_database_url("postgres:///cc?host=/tmp").unwrap();
        assert_eq!(url, "postgres:///cc_bench_db?host=/tmp");
    }

    #[test]
    fn unusable_database_names_are_refused() {
        for url in [
            "postgres://127.0.0.1:5432",
            "postgres://127.0.0.1:5432/",
            "postgres://h/we\"ird",
            "not a url",
            &format!("postgres://h/{}", "x".repeat(60)),
        ] {
            assert!(bench_database_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn every_target_names_a_measured_query() {
        let queries: Map<String, Value> = Query::ALL
            .iter()
            .map(|q| {
                let figures = json!({"optimized": {"p99_us": 100.0}, "speedup_p50": 50.0});
                (q.name().to_string(), figures)
            })
            .collect();
        for t in TARGETS {
            let judged = t.judge(&queries);
            let expected = match t.figure {
                Figure::P99AtMost => 100.0 <= t.bound,
                Figure::SpeedupAtLeast => 50.0 >= t.bound,
            };
            assert_eq!(judged["met"], expected, "{judged}");
        }
    }
}
