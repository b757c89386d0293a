//! `callcoach db seed`: a deterministic generator of realistic data for tests and benchmarks.
//!
//! From one `u64` seed it produces reps (spread over the three roles and several teams), calls
//! over the last 18 months (products, call types, the rep and one to three customer speakers,
//! transcripts of a few KB stored exactly as ingest stores them: utterance JSON, normalized
//! text and its SHA-256), coaching sessions over every dimension and a history of rubric
//! versions (created after their call, scores from a beta-like distribution around 65 shifted
//! per rep, result JSON shaped like a model's answer, cache keys in the project's format) and
//! one durable cache row per session key. Nothing depends on the wall clock except where the
//! 18 months end, so one seed always gives the same rows, counts and scores.
//!
//! Loading: a generator thread renders rows straight into `COPY … FROM STDIN` text format in
//! chunks of [`CALLS_PER_CHUNK`] calls (with their sessions), and the async side streams each
//! chunk over two connections in parallel, each inside one transaction (reps, calls,
//! speakers and transcripts on one; sessions and cache rows, which reference no table, on
//! the other), committed at the end: a seed that fails while loading leaves nothing behind.
//! Every month of the window gets its `coaching_sessions` partition first (as table upkeep
//! would give it), so sessions load straight into monthly partitions.

mod vocabulary;

use crate::{
    cache::{CacheKey, fingerprint},
    config::Settings,
    db::CallForAnalysis,
    jobs::analyze_call,
    llm::PROMPT_TEMPLATE_VERSION,
    model::{Dimension, Role, Utterance, normalized_transcript, sha256_hex},
};
use anyhow::{Context, bail};
use chrono::{
    DateTime, Datelike, Duration as ChronoDuration, DurationRound, TimeZone, Utc, Weekday,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{
    Rng, SeedableRng,
    distr::{Distribution, weighted::WeightedIndex},
    rngs::StdRng,
    seq::IndexedRandom,
};
use serde::Serialize;
use sqlx::{PgPool, Row};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    time::Instant,
};
use uuid::Uuid;
use vocabulary::*;

/// Creates the `coaching_sessions` partition of every month from `from` to the current one
/// (months that have one are skipped), committed ahead of the load.
async fn partition_window(pool: &PgPool, from: DateTime<Utc>) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT create_coaching_partition(m::date)
         FROM generate_series(date_trunc('month', $1 AT TIME ZONE 'UTC'),
                              now() AT TIME ZONE 'UTC', interval '1 month') m",
    )
    .bind(from)
    .fetch_all(&mut *tx)
    .await
    .context("creating the seeded months' partitions")?;
    tx.commit().await?;
    Ok(())
}

/// Calls (with their sessions) rendered and copied per chunk.
pub const CALLS_PER_CHUNK: usize = 500;

/// How far back the calls go.
pub const MONTHS_BACK: u32 = 18;

/// At most this many rubric versions per role and dimension are generated, which bounds
/// sessions per call at `4 * MAX_RUBRIC_VERSIONS`.
pub const MAX_RUBRIC_VERSIONS: u64 = 50;

/// What to generate.
#[derive(Clone, Debug)]
pub struct SeedOptions {
    /// Calls, each with speakers and a transcript.
    pub calls: u64,
    /// Coaching sessions, spread over the calls.
    pub sessions: u64,
    /// Reps the calls belong to.
    pub reps: u32,
    /// Seed of the pseudo-random generator.
    pub seed: u64,
    /// Model and fingerprint of the cache keys; `None` uses the default model with the
    /// current prompt template (see [`KeyStyle::for_settings`] for the ones a deployment's
    /// analyses use, so that their lookups hit the seeded cache).
    pub keys: Option<KeyStyle>,
}

impl SeedOptions {
    /// Options with the default key style.
    pub fn new(calls: u64, sessions: u64, reps: u32, seed: u64) -> SeedOptions {
        SeedOptions {
            calls,
            sessions,
            reps,
            seed,
            keys: None,
        }
    }

    /// Rejects combinations that cannot be generated, with a message naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.calls == 0 && self.sessions == 0 && self.reps == 0 {
            return Err("nothing to seed: --calls, --sessions and --reps are all 0".into());
        }
        if self.calls > 0 && self.reps == 0 {
            return Err(format!(
                "--reps must be at least 1: {} calls need reps to belong to",
                self.calls
            ));
        }
        if self.sessions > 0 && self.calls == 0 {
            return Err(format!(
                "--calls must be at least 1: {} sessions need calls to belong to",
                self.sessions
            ));
        }
        if self.calls > 10_000_000 {
            return Err("--calls may be at most 10000000".into());
        }
        if self.reps > 100_000 {
            return Err("--reps may be at most 100000".into());
        }
        let per_call = 4 * MAX_RUBRIC_VERSIONS;
        if self.sessions > self.calls.saturating_mul(per_call) {
            return Err(format!(
                "--sessions may be at most {per_call} x --calls (4 dimensions x {MAX_RUBRIC_VERSIONS} rubric versions per call); got {} sessions for {} calls",
                self.sessions, self.calls
            ));
        }
        Ok(())
    }
}

/// The model recorded in cache rows and the fingerprint part of every cache key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStyle {
    /// Model id stored in `coaching_cache.model`.
    pub model: String,
    /// The key's fingerprint ([`crate::cache::key::fingerprint`]).
    pub fingerprint: String,
}

impl KeyStyle {
    /// The model and fingerprint the analyses of a deployment with `settings` would use
    /// against this database's knowledge base.
    pub async fn for_settings(pool: &PgPool, settings: &Settings) -> anyhow::Result<KeyStyle> {
        let (_, kb_version) = crate::db::knowledge_base(pool).await?;
        let probe = CallForAnalysis {
            id: Uuid::nil(),
            rep_email: String::new(),
            rep_id: Uuid::nil(),
            rep_role: Role::Ae,
            transcript: String::new(),
            transcript_hash: String::new(),
        };
        let key = analyze_call::cache_key(settings, &probe, Dimension::Discovery, "", &kb_version);
        Ok(KeyStyle {
            model: settings.claude_model.clone(),
            fingerprint: key.fingerprint,
        })
    }

    /// The default style: the default model and prompt template, the database's knowledge base.
    async fn default_for(pool: &PgPool) -> anyhow::Result<KeyStyle> {
        let (_, kb_version) = crate::db::knowledge_base(pool).await?;
        let model = crate::config::DEFAULT_MODEL.to_string();
        let fingerprint = fingerprint(
            &model,
            PROMPT_TEMPLATE_VERSION,
            &kb_version,
            crate::config::DEFAULT_MAX_TOKENS,
        );
        Ok(KeyStyle { model, fingerprint })
    }
}

/// What a seed run wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SeedReport {
    /// The generator's seed.
    pub seed: u64,
    /// Reps created (or matched by e-mail when they already existed).
    pub reps: u64,
    /// Calls inserted.
    pub calls: u64,
    /// Speaker rows inserted.
    pub speakers: u64,
    /// Transcripts inserted (one per call).
    pub transcripts: u64,
    /// Bytes of normalized transcript text.
    pub transcript_bytes: u64,
    /// Coaching sessions inserted.
    pub sessions: u64,
    /// Durable cache rows inserted (one per session key).
    pub cache_entries: u64,
    /// Rubric versions per role and dimension the sessions use (the active one included).
    pub rubric_versions: u64,
    /// Historical (inactive) rubric rows added for those versions.
    pub rubrics_added: u64,
    /// Earliest and latest call.
    pub first_call_at: Option<DateTime<Utc>>,
    /// Latest call.
    pub last_call_at: Option<DateTime<Utc>>,
    /// Wall time of the whole seed, in seconds.
    pub elapsed_secs: f64,
    /// Sessions per second over the whole seed.
    pub sessions_per_sec: f64,
    /// Seconds spent in each table's `COPY` statements (the rest is generation, reps,
    /// commit and `ANALYZE`).
    pub copy_secs: BTreeMap<&'static str, f64>,
}

/// Generates and loads the data described by `options` into a migrated database.
///
/// # Errors
///
/// Invalid options, a database that is not migrated (no active rubrics) or already holds
/// this seed's calls, and any database error (the load is one transaction: nothing stays).
pub async fn seed(
    pool: &PgPool,
    options: &SeedOptions,
    progress: bool,
) -> anyhow::Result<SeedReport> {
    options.validate().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let keys = match &options.keys {
        Some(k) => k.clone(),
        None => KeyStyle::default_for(pool).await?,
    };
    let active = active_versions(pool).await?;
    let versions = rubric_versions(options);
    let now = Utc::now();
    partition_window(pool, now - months(MONTHS_BACK)).await?;

    let mut tx = pool.begin().await?;
    let first_external = external_id(options.seed, 0);
    let seeded: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM calls WHERE external_id = $1)")
            .bind(&first_external)
            .fetch_one(&mut *tx)
            .await?;
    if seeded {
        bail!(
            "this database already holds the calls of seed {} (external id {first_external}); use another --seed or a fresh database",
            options.seed
        );
    }

    let mut generator = Generator::new(options, keys, active, versions, now);
    let reps = generator.reps();
    let rep_count = reps.len() as u64;
    let matched = insert_reps(&mut tx, &reps).await?;
    generator.adopt_reps(&matched);
    let rubrics_added = insert_rubric_history(&mut tx, &generator).await?;

    let bars = Bars::new(options, progress);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Chunk>(2);
    let producer = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = generator.next_chunk() {
            if sender.blocking_send(chunk).is_err() {
                break;
            }
        }
        generator.totals()
    });

    let mut report = SeedReport {
        seed: options.seed,
        reps: rep_count,
        calls: 0,
        speakers: 0,
        transcripts: 0,
        transcript_bytes: 0,
        sessions: 0,
        cache_entries: 0,
        rubric_versions: versions,
        rubrics_added,
        first_call_at: None,
        last_call_at: None,
        elapsed_secs: 0.0,
        sessions_per_sec: 0.0,
        copy_secs: BTreeMap::new(),
    };
    // Calls, speakers and transcripts on this transaction (the calls reference the reps it
    // inserted); sessions and cache rows, which reference no table, on a second one in
    // parallel, so both cores' worth of Postgres work at once.
    let mut sessions_tx = pool.begin().await?;
    let copied: anyhow::Result<()> = async {
        while let Some(chunk) = receiver.recv().await {
            let (calls, sessions) = tokio::try_join!(
                copy_tables(
                    &mut tx,
                    [
                        ("calls", CALLS_COPY, &chunk.calls),
                        ("speakers", SPEAKERS_COPY, &chunk.speakers),
                        ("transcripts", TRANSCRIPTS_COPY, &chunk.transcripts),
                    ]
                ),
                copy_tables(
                    &mut sessions_tx,
                    [
                        ("coaching_sessions", SESSIONS_COPY, &chunk.sessions),
                        ("coaching_cache", CACHE_COPY, &chunk.cache),
                    ]
                ),
            )?;
            report.calls += calls[0].1;
            report.speakers += calls[1].1;
            report.transcripts += calls[2].1;
            report.sessions += sessions[0].1;
            report.cache_entries += sessions[1].1;
            for (table, _, secs) in calls.into_iter().chain(sessions) {
                *report.copy_secs.entry(table).or_default() += secs;
            }
            bars.advance(chunk.call_rows, chunk.session_rows);
        }
        Ok(())
    }
    .await;
    // Stop the generator before returning any error (dropping the receiver ends its loop).
    drop(receiver);
    let totals = producer.await.context("seed generator panicked")?;
    copied?;
    // Calls first: should the second commit fail, the calls stand without sessions rather
    // than sessions without calls.
    tx.commit().await?;
    sessions_tx.commit().await?;
    bars.finish();

    // Fresh statistics, so the first queries against the seeded tables plan well.
    sqlx::query("ANALYZE reps, calls, speakers, transcripts, coaching_sessions, coaching_cache")
        .execute(pool)
        .await?;

    report.transcript_bytes = totals.transcript_bytes;
    report.first_call_at = totals.first_call_at;
    report.last_call_at = totals.last_call_at;
    report.elapsed_secs = round3(started.elapsed().as_secs_f64());
    for secs in report.copy_secs.values_mut() {
        *secs = round3(*secs);
    }
    report.sessions_per_sec = if report.elapsed_secs > 0.0 {
        (report.sessions as f64 / report.elapsed_secs).round()
    } else {
        0.0
    };
    Ok(report)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The external id of the `index`-th call of a seed.
pub fn external_id(seed: u64, index: u64) -> String {
    format!("seed-{seed}-{index}")
}

/// Rubric versions per role and dimension: enough for every session to have its own
/// (call, dimension, version), at least three so there is history.
fn rubric_versions(options: &SeedOptions) -> u64 {
    if options.calls == 0 {
        return 0;
    }
    options
        .sessions
        .div_ceil(4 * options.calls)
        .clamp(3, MAX_RUBRIC_VERSIONS)
}

/// Active rubric version per (role, dimension).
async fn active_versions(pool: &PgPool) -> anyhow::Result<HashMap<(Role, Dimension), String>> {
    let rows = sqlx::query("SELECT role, dimension, version FROM coaching_rubrics WHERE active")
        .fetch_all(pool)
        .await?;
    let mut active = HashMap::new();
    for r in rows {
        let (role, dim, version): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if let (Ok(role), Ok(dim)) = (role.parse::<Role>(), dim.parse::<Dimension>()) {
            active.insert((role, dim), version);
        }
    }
    for role in ROLES {
        for dim in Dimension::ALL {
            if !active.contains_key(&(role, dim)) {
                bail!(
                    "no active rubric for role {} and dimension {dim}: run `callcoach migrate` first",
                    role.as_str()
                );
            }
        }
    }
    Ok(active)
}

const ROLES: [Role; 3] = [Role::Ae, Role::Se, Role::Csm];

/// One rep as generated.
#[derive(Clone, Debug)]
struct Rep {
    id: Uuid,
    name: String,
    email: String,
    role: Role,
    team: &'static str,
    /// Score offset of this rep (some reps are better than others).
    skill: f64,
    /// Per-dimension offsets on top of `skill`.
    dimension_skill: [f64; 4],
}

async fn insert_reps(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    reps: &[Rep],
) -> anyhow::Result<HashMap<String, (Uuid, Role)>> {
    let mut matched = HashMap::with_capacity(reps.len());
    for batch in reps.chunks(5_000) {
        let ids: Vec<Uuid> = batch.iter().map(|r| r.id).collect();
        let names: Vec<&str> = batch.iter().map(|r| r.name.as_str()).collect();
        let emails: Vec<&str> = batch.iter().map(|r| r.email.as_str()).collect();
        let roles: Vec<&str> = batch.iter().map(|r| r.role.as_str()).collect();
        let teams: Vec<&str> = batch.iter().map(|r| r.team).collect();
        let rows = sqlx::query(
            "INSERT INTO reps (id, name, email, role, team)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
             ON CONFLICT ((lower(email))) DO UPDATE SET team = coalesce(reps.team, EXCLUDED.team)
             RETURNING id, lower(email), role",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&emails)
        .bind(&roles)
        .bind(&teams)
        .fetch_all(&mut **tx)
        .await
        .context("inserting reps")?;
        for r in rows {
            let role: String = r.get(2);
            let role = role.parse::<Role>().map_err(anyhow::Error::msg)?;
            matched.insert(r.get::<String, _>(1), (r.get::<Uuid, _>(0), role));
        }
    }
    Ok(matched)
}

/// Inactive rows for the historical rubric versions the sessions use (kept for history, as
/// `replace_rubric` keeps superseded versions).
async fn insert_rubric_history(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    generator: &Generator,
) -> anyhow::Result<u64> {
    let mut roles = Vec::new();
    let mut dims = Vec::new();
    let mut versions = Vec::new();
    let mut criteria = Vec::new();
    let mut created = Vec::new();
    for role in ROLES {
        for dim in Dimension::ALL {
            let active = &generator.active[&(role, dim)];
            for (j, version) in generator.version_names(role, dim).iter().enumerate() {
                if version == active {
                    continue;
                }
                roles.push(role.as_str());
                dims.push(dim.as_str());
                versions.push(version.clone());
                criteria.push(format!(
                    "Superseded {} rubric for {dim} (seeded history; replaced by {active}).",
                    role.as_str()
                ));
                created.push(generator.version_released[j]);
            }
        }
    }
    let added = sqlx::query(
        "INSERT INTO coaching_rubrics (role, dimension, version, criteria, active, created_at)
         SELECT r, d, v, c, false, t
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
              AS s(r, d, v, c, t)
         ON CONFLICT (role, dimension, version) DO NOTHING",
    )
    .bind(&roles)
    .bind(&dims)
    .bind(&versions)
    .bind(&criteria)
    .bind(&created)
    .execute(&mut **tx)
    .await
    .context("inserting rubric history")?;
    Ok(added.rows_affected())
}

const CALLS_COPY: &str = "COPY calls (id, external_id, title, product, call_type, scheduled_at, \
     duration_seconds, rep_email, rep_role, rep_id, tags, metadata, created_at) FROM STDIN";
const SPEAKERS_COPY: &str = "COPY speakers (call_id, name, email, role, company_side) FROM STDIN";
const TRANSCRIPTS_COPY: &str =
    "COPY transcripts (call_id, transcript_hash, full_text, utterances, created_at) FROM STDIN";
const SESSIONS_COPY: &str = "COPY coaching_sessions (id, call_id, rep_email, rep_id, dimension, \
     rubric_version, cache_key, score, result, created_at) FROM STDIN";
const CACHE_COPY: &str = "COPY coaching_cache (cache_key, dimension, transcript_hash, role, \
     rubric_version, fingerprint, result, session_id, model, created_at) FROM STDIN";

/// Copies each `(table, statement, data)` in turn; returns `(table, rows, seconds)` each.
async fn copy_tables<const N: usize>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tables: [(&'static str, &str, &Vec<u8>); N],
) -> anyhow::Result<Vec<(&'static str, u64, f64)>> {
    let mut done = Vec::with_capacity(N);
    for (table, statement, data) in tables {
        let at = Instant::now();
        let rows = copy(tx, statement, data).await?;
        done.push((table, rows, at.elapsed().as_secs_f64()));
    }
    Ok(done)
}

/// Streams `data` (COPY text format) with `statement`; returns the rows copied.
async fn copy(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    statement: &str,
    data: &[u8],
) -> anyhow::Result<u64> {
    if data.is_empty() {
        return Ok(0);
    }
    let mut copy_in = tx
        .copy_in_raw(statement)
        .await
        .with_context(|| format!("starting {statement}"))?;
    if let Err(e) = copy_in.send(data).await {
        let _ = copy_in.abort(e.to_string()).await;
        return Err(e).with_context(|| format!("streaming {statement}"));
    }
    copy_in
        .finish()
        .await
        .with_context(|| format!("finishing {statement}"))
}

/// The progress bars (hidden unless asked for).
struct Bars {
    calls: ProgressBar,
    sessions: ProgressBar,
    _multi: MultiProgress,
}

impl Bars {
    fn new(options: &SeedOptions, visible: bool) -> Bars {
        let multi = if visible {
            MultiProgress::new()
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        };
        let style = |unit: &str| {
            ProgressStyle::with_template(&format!(
                "seed {{msg:>8}} {{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
        };
        let calls = multi.add(
            ProgressBar::new(options.calls)
                .with_style(style("calls"))
                .with_message("calls"),
        );
        let sessions = multi.add(
            ProgressBar::new(options.sessions)
                .with_style(style("sessions"))
                .with_message("sessions"),
        );
        Bars {
            calls,
            sessions,
            _multi: multi,
        }
    }

    fn advance(&self, calls: u64, sessions: u64) {
        self.calls.inc(calls);
        self.sessions.inc(sessions);
    }

    fn finish(&self) {
        self.calls.finish();
        self.sessions.finish();
    }
}

/// One chunk of rows in COPY text format.
#[derive(Default)]
struct Chunk {
    calls: Vec<u8>,
    speakers: Vec<u8>,
    transcripts: Vec<u8>,
    sessions: Vec<u8>,
    cache: Vec<u8>,
    call_rows: u64,
    session_rows: u64,
}

/// Totals only the generator knows.
#[derive(Default)]
struct Totals {
    transcript_bytes: u64,
    first_call_at: Option<DateTime<Utc>>,
    last_call_at: Option<DateTime<Utc>>,
}

/// The deterministic generator: every value comes from `rng` (or from `now`, which only
/// places the 18-month window).
struct Generator {
    rng: StdRng,
    seed: u64,
    calls: u64,
    reps_wanted: u32,
    keys: KeyStyle,
    active: HashMap<(Role, Dimension), String>,
    /// Rubric versions per role and dimension (the last one is the active one).
    versions: u64,
    /// When version `j` (0 = oldest) became active.
    version_released: Vec<DateTime<Utc>>,
    now: DateTime<Utc>,
    start: DateTime<Utc>,
    reps: Vec<Rep>,
    rep_pick: Option<WeightedIndex<f64>>,
    /// Sessions per call, drawn up front so the total is exact.
    sessions_per_call: Vec<u16>,
    next_call: u64,
    hashes: HashSet<String>,
    totals: Totals,
}

impl Generator {
    fn new(
        options: &SeedOptions,
        keys: KeyStyle,
        active: HashMap<(Role, Dimension), String>,
        versions: u64,
        now: DateTime<Utc>,
    ) -> Generator {
        let start = now - months(MONTHS_BACK);
        let span = (now - start).num_seconds();
        // Version j was released at the start of the j-th of `versions` equal periods (the
        // oldest before the window), so older calls have seen more rubric changes.
        let version_released = (0..versions)
            .map(|j| start + ChronoDuration::seconds(span * j as i64 / versions.max(1) as i64))
            .collect();
        Generator {
            rng: StdRng::seed_from_u64(options.seed),
            seed: options.seed,
            calls: options.calls,
            reps_wanted: options.reps,
            keys,
            active,
            versions,
            version_released,
            now,
            start,
            reps: Vec::new(),
            rep_pick: None,
            sessions_per_call: Vec::new(),
            next_call: 0,
            hashes: HashSet::new(),
            totals: Totals::default(),
        }
        .with_session_counts(options.sessions)
    }

    /// Spreads `sessions` over the calls: each session picks a call at random (a call has at
    /// most `4 * versions` sessions, one per dimension and rubric version).
    fn with_session_counts(mut self, sessions: u64) -> Generator {
        self.sessions_per_call = vec![0; self.calls as usize];
        let cap = (4 * self.versions) as u16;
        let n = self.calls as usize;
        let full_share = sessions == self.calls * u64::from(cap);
        if full_share {
            self.sessions_per_call.fill(cap);
            return self;
        }
        for _ in 0..sessions {
            loop {
                let i = self.rng.random_range(0..n);
                if self.sessions_per_call[i] < cap {
                    self.sessions_per_call[i] += 1;
                    break;
                }
            }
        }
        self
    }

    /// The reps: roles in the pattern AE, SE, CSM, AE (half AEs, every role present from three
    /// reps on), a team per role, a unique e-mail each.
    fn reps(&mut self) -> Vec<Rep> {
        let mut used = HashSet::new();
        let mut reps = Vec::with_capacity(self.reps_wanted as usize);
        for i in 0..self.reps_wanted {
            let role = [Role::Ae, Role::Se, Role::Csm, Role::Ae][i as usize % 4];
            let first = *FIRST_NAMES.choose(&mut self.rng).unwrap_or(&"Alex");
            let last = *LAST_NAMES.choose(&mut self.rng).unwrap_or(&"Smith");
            let base = format!("{}.{}", first.to_lowercase(), last.to_lowercase());
            let mut local = base.clone();
            let mut n = 2;
            while !used.insert(local.clone()) {
                local = format!("{base}{n}");
                n += 1;
            }
            let team = *teams(role).choose(&mut self.rng).unwrap_or(&"Sales");
            let skill = normalish(&mut self.rng) * 7.0;
            let mut dimension_skill = [0.0; 4];
            for d in &mut dimension_skill {
                *d = normalish(&mut self.rng) * 5.0;
            }
            let mut bytes = [0u8; 16];
            self.rng.fill(&mut bytes);
            reps.push(Rep {
                id: uuid::Builder::from_random_bytes(bytes).into_uuid(),
                name: format!("{first} {last}"),
                email: format!("{local}@lumen.example"),
                role,
                team,
                skill,
                dimension_skill,
            });
        }
        // Some reps take many more calls than others.
        let weights: Vec<f64> = reps
            .iter()
            .map(|_| 0.4 + 1.6 * self.rng.random::<f64>())
            .collect();
        self.rep_pick = WeightedIndex::new(&weights).ok();
        self.reps = reps.clone();
        reps
    }

    /// Takes the ids (and roles) the database returned: a rep that already existed keeps its
    /// row.
    fn adopt_reps(&mut self, matched: &HashMap<String, (Uuid, Role)>) {
        for rep in &mut self.reps {
            if let Some((id, role)) = matched.get(&rep.email.to_lowercase()) {
                rep.id = *id;
                rep.role = *role;
            }
        }
    }

    /// Version names of a role and dimension, oldest first; the last is the active one.
    fn version_names(&self, role: Role, dim: Dimension) -> Vec<String> {
        let active = &self.active[&(role, dim)];
        let older = self.versions.saturating_sub(1);
        (1..=older)
            .map(|k| format!("0.{k}.0"))
            .chain(std::iter::once(active.clone()))
            .collect()
    }

    fn totals(self) -> Totals {
        self.totals
    }

    fn next_chunk(&mut self) -> Option<Chunk> {
        if self.next_call >= self.calls {
            return None;
        }
        let mut chunk = Chunk::default();
        let end = (self.next_call + CALLS_PER_CHUNK as u64).min(self.calls);
        let mut names: HashMap<(Role, Dimension), Vec<String>> = HashMap::new();
        for role in ROLES {
            for dim in Dimension::ALL {
                names.insert((role, dim), self.version_names(role, dim));
            }
        }
        while self.next_call < end {
            let index = self.next_call;
            self.next_call += 1;
            let call = self.call(index);
            call.write(&mut chunk);
            let count = self.sessions_per_call[index as usize];
            self.sessions(&call, count, &names, &mut chunk);
            chunk.call_rows += 1;
            chunk.session_rows += u64::from(count);
        }
        Some(chunk)
    }

    /// One call with its speakers and transcript.
    fn call(&mut self, index: u64) -> Call {
        let rep_index = match &self.rep_pick {
            Some(pick) => pick.sample(&mut self.rng),
            None => 0,
        };
        let rep = self.reps[rep_index].clone();
        let kind: &'static CallType = call_types(rep.role)
            .choose(&mut self.rng)
            .unwrap_or(&CALL_TYPES[0]);
        let product = match self.rng.random_range(0..100) {
            0..55 => Product::Analytics,
            55..90 => Product::Pipelines,
            _ => Product::Bundle,
        };
        let company = format!(
            "{} {}",
            COMPANY_NAMES.choose(&mut self.rng).unwrap_or(&"Northwind"),
            COMPANY_SUFFIXES.choose(&mut self.rng).unwrap_or(&"Group")
        );
        let domain = format!(
            "{}.example",
            company
                .to_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        );
        let externals = self.rng.random_range(1..=3);
        let mut customers: Vec<(String, String)> = Vec::new();
        while customers.len() < externals {
            let first = *FIRST_NAMES.choose(&mut self.rng).unwrap_or(&"Sam");
            let last = *LAST_NAMES.choose(&mut self.rng).unwrap_or(&"Lee");
            let name = format!("{first} {last}");
            if name == rep.name || customers.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let email = format!("{}.{}@{domain}", first.to_lowercase(), last.to_lowercase());
            customers.push((name, email));
        }
        let scheduled_at = self.call_time();
        let minutes = kind.minutes + self.rng.random_range(-10..=15);
        let duration: i32 = minutes.max(10) * 60 + self.rng.random_range(0..60);
        let ctx = TalkContext {
            rep_first: first_name(&rep.name).to_string(),
            customer_first: first_name(&customers[0].0).to_string(),
            company: company.clone(),
            product,
        };
        let mut utterances = self.transcript(&rep, &customers, kind, &ctx, duration);
        let mut text = normalized_transcript(&utterances);
        let mut hash = sha256_hex(&text);
        // Identical transcripts would share cache keys; a repeat (vanishingly rare) gets one
        // more line.
        while !self.hashes.insert(hash.clone()) {
            utterances.push(Utterance {
                speaker: rep.name.clone(),
                start_seconds: f64::from(duration),
                text: format!(
                    "One more thing before we go, reference {}.",
                    self.rng.random::<u32>()
                ),
            });
            text = normalized_transcript(&utterances);
            hash = sha256_hex(&text);
        }
        self.totals.transcript_bytes += text.len() as u64;
        let first = self.totals.first_call_at.get_or_insert(scheduled_at);
        *first = (*first).min(scheduled_at);
        let last = self.totals.last_call_at.get_or_insert(scheduled_at);
        *last = (*last).max(scheduled_at);
        let ended = scheduled_at + ChronoDuration::seconds(i64::from(duration));
        let created_at = ended + ChronoDuration::seconds(self.rng.random_range(30..1800));
        let created_at = created_at.min(self.now);
        let (tags, metadata) = self.attributes(kind);
        let mut random = [0u8; 10];
        self.rng.fill(&mut random);
        let id = uuid::Builder::from_unix_timestamp_millis(
            created_at.timestamp_millis().max(0) as u64,
            &random,
        )
        .into_uuid();
        Call {
            id,
            external_id: external_id(self.seed, index),
            title: format!("{company} - {} for {}", kind.label, product.name()),
            product,
            kind,
            scheduled_at,
            ended,
            duration,
            rep,
            customers,
            utterances,
            text,
            hash,
            created_at,
            difficulty: normalish(&mut self.rng) * 4.0,
            tags,
            metadata,
        }
    }

    /// A call's tags and CRM metadata: the account's segment and region, the deal stage the
    /// call type implies, and a few rarer labels (competitive deals, security reviews,
    /// expansions, churn risks).
    fn attributes(&mut self, kind: &CallType) -> (Vec<&'static str>, String) {
        let segment = match self.rng.random_range(0..100) {
            0..30 => "enterprise",
            30..75 => "mid-market",
            _ => "smb",
        };
        let region = match self.rng.random_range(0..100) {
            0..50 => "na",
            50..85 => "emea",
            _ => "apac",
        };
        let mut tags = vec![segment];
        for (tag, pct) in RARE_TAGS {
            if self.rng.random_range(0..100) < *pct {
                tags.push(tag);
            }
        }
        tags.sort_unstable();
        let metadata = serde_json::json!({
            "crm_opportunity_id": format!("006{:012x}", self.rng.random::<u64>() >> 16),
            "stage": deal_stage(kind.name),
            "region": region,
            "segment": segment,
        });
        (tags, metadata.to_string())
    }

    /// A weekday business-hours start within the window, denser towards the present (the
    /// team grew): half uniform, half triangular towards now.
    fn call_time(&mut self) -> DateTime<Utc> {
        let span = (self.now - self.start).num_seconds() as f64;
        let u: f64 = self.rng.random();
        let x = if self.rng.random_bool(0.5) {
            u
        } else {
            u.sqrt()
        };
        let day = self.start + ChronoDuration::seconds((x * span) as i64);
        let day = match day.weekday() {
            Weekday::Sat => day - ChronoDuration::days(1),
            Weekday::Sun => day + ChronoDuration::days(1),
            _ => day,
        };
        let hour = self.rng.random_range(13..22);
        let minute = [0, 15, 30, 45][self.rng.random_range(0..4)];
        let at = Utc
            .with_ymd_and_hms(day.year(), day.month(), day.day(), hour, minute, 0)
            .single()
            .unwrap_or(day);
        let latest = self.now - ChronoDuration::hours(3);
        let latest = latest
            .duration_trunc(ChronoDuration::minutes(15))
            .unwrap_or(latest);
        let earliest = self.start;
        at.clamp(earliest, latest)
    }

    fn transcript(
        &mut self,
        rep: &Rep,
        customers: &[(String, String)],
        kind: &CallType,
        ctx: &TalkContext,
        duration: i32,
    ) -> Vec<Utterance> {
        // About one turn every 90 seconds: 3-8 KB of text for a 20-60 minute call.
        let turns = (duration / 90 + self.rng.random_range(6..14)).clamp(12, 60) as usize;
        let mut lines: Vec<(bool, String)> = Vec::with_capacity(turns + 4);
        lines.push((true, self.fill(OPENINGS, ctx)));
        lines.push((false, self.fill(CUSTOMER_OPENINGS, ctx)));
        let body = turns.saturating_sub(4);
        for i in 0..body {
            let rep_turn = i % 2 == 0;
            let bank = if rep_turn {
                kind.rep_lines
            } else {
                kind.customer_lines
            };
            let sentences = [1, 1, 2, 2, 3][self.rng.random_range(0..5)];
            let mut text = String::new();
            for s in 0..sentences {
                if s > 0 {
                    text.push(' ');
                }
                let pool: &[&str] = match self.rng.random_range(0..10) {
                    0..6 => bank,
                    6..8 if rep_turn => ctx.product.rep_lines(),
                    6..8 => ctx.product.customer_lines(),
                    _ if rep_turn => REP_GENERAL,
                    _ => CUSTOMER_GENERAL,
                };
                text.push_str(&self.fill(pool, ctx));
            }
            lines.push((rep_turn, text));
        }
        lines.push((true, self.fill(CLOSINGS, ctx)));
        lines.push((false, self.fill(CUSTOMER_CLOSINGS, ctx)));
        let step = f64::from(duration) / lines.len() as f64;
        let mut at = 0.0;
        lines
            .into_iter()
            .map(|(rep_turn, text)| {
                let speaker = if rep_turn {
                    rep.name.clone()
                } else {
                    customers
                        .choose(&mut self.rng)
                        .map(|c| c.0.clone())
                        .unwrap_or_default()
                };
                let start_seconds = (at * 10.0_f64).round() / 10.0;
                at += step * (0.5 + self.rng.random::<f64>());
                at = at.min(f64::from(duration));
                Utterance {
                    speaker,
                    start_seconds,
                    text,
                }
            })
            .collect()
    }

    /// A random template from `bank` with its placeholders filled in.
    fn fill(&mut self, bank: &[&str], ctx: &TalkContext) -> String {
        let template = *bank.choose(&mut self.rng).unwrap_or(&"Okay.");
        let mut out = String::with_capacity(template.len() + 32);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let name = &rest[open + 1..open + close];
            match name {
                "rep" => out.push_str(&ctx.rep_first),
                "cust" => out.push_str(&ctx.customer_first),
                "company" => out.push_str(&ctx.company),
                "product" => out.push_str(ctx.product.name()),
                "competitor" => out.push_str(
                    ctx.product
                        .competitors()
                        .choose(&mut self.rng)
                        .unwrap_or(&"Fivetide"),
                ),
                "feature" => out.push_str(
                    ctx.product
                        .features()
                        .choose(&mut self.rng)
                        .unwrap_or(&"alerts"),
                ),
                "source" => out.push_str(SOURCES.choose(&mut self.rng).unwrap_or(&"Salesforce")),
                "warehouse" => {
                    out.push_str(WAREHOUSES.choose(&mut self.rng).unwrap_or(&"Snowflake"))
                }
                "n" => {
                    let _ = write!(out, "{}", self.rng.random_range(3..40));
                }
                "big" => {
                    let _ = write!(out, "{}", self.rng.random_range(2..60) * 10);
                }
                "weeks" => {
                    let _ = write!(out, "{}", self.rng.random_range(2..9));
                }
                "quarter" => out.push_str(["Q1", "Q2", "Q3", "Q4"][self.rng.random_range(0..4)]),
                other => {
                    out.push('{');
                    out.push_str(other);
                    out.push('}');
                }
            }
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        out
    }

    /// `count` sessions of a call: the rubric versions active since the call first (the
    /// analysis at ingest, then re-analyses after each rubric change), older ones after.
    fn sessions(
        &mut self,
        call: &Call,
        count: u16,
        names: &HashMap<(Role, Dimension), Vec<String>>,
        chunk: &mut Chunk,
    ) {
        let role = call.rep.role;
        let versions = self.versions as usize;
        let current = self
            .version_released
            .iter()
            .rposition(|released| *released <= call.scheduled_at)
            .unwrap_or(0);
        let order: Vec<usize> = (current..versions).chain((0..current).rev()).collect();
        let mut slots: Vec<(usize, Dimension)> = Vec::with_capacity(count as usize);
        'versions: for j in order {
            let mut dims = Dimension::ALL;
            // A per-version random order of the dimensions, so partially analysed calls do
            // not all miss the same one.
            for i in (1..dims.len()).rev() {
                let k = self.rng.random_range(0..=i);
                dims.swap(i, k);
            }
            for dim in dims {
                if slots.len() == count as usize {
                    break 'versions;
                }
                slots.push((j, dim));
            }
        }
        for (j, dim) in slots {
            let version = &names[&(role, dim)][j];
            let released = self.version_released[j];
            let delay = ChronoDuration::seconds(self.rng.random_range(20..3 * 86_400));
            let base = if j >= current {
                call.ended.max(released)
            } else {
                call.ended
            };
            let created_at = (base + delay)
                .min(self.now - ChronoDuration::seconds(1))
                .max(call.ended + ChronoDuration::seconds(1));
            let score = self.score(call, dim, j);
            let result = self.result(call, dim, score);
            let key = CacheKey {
                dimension: dim,
                transcript_hash: call.hash.clone(),
                role,
                rubric_version: version.clone(),
                fingerprint: self.keys.fingerprint.clone(),
            }
            .to_string();
            let mut random = [0u8; 10];
            self.rng.fill(&mut random);
            let id = uuid::Builder::from_unix_timestamp_millis(
                created_at.timestamp_millis().max(0) as u64,
                &random,
            )
            .into_uuid();
            let at = timestamp(created_at);
            let s = &mut chunk.sessions;
            field(s, &id.to_string());
            field(s, &call.id.to_string());
            field(s, &call.rep.email);
            field(s, &call.rep.id.to_string());
            field(s, dim.as_str());
            field(s, version);
            field(s, &key);
            field(s, &score.to_string());
            field(s, &result);
            last_field(s, &at);
            let c = &mut chunk.cache;
            field(c, &key);
            field(c, dim.as_str());
            field(c, &call.hash);
            field(c, role.as_str());
            field(c, version);
            field(c, &self.keys.fingerprint);
            field(c, &result);
            field(c, &id.to_string());
            field(c, &self.keys.model);
            last_field(c, &at);
        }
    }

    /// A score: the 7th smallest of 10 uniforms (Beta(7, 4), mean 64) on 0-100, shifted by the
    /// rep's skill, their skill in the dimension and the call's difficulty; newer rubrics are a
    /// little stricter.
    fn score(&mut self, call: &Call, dim: Dimension, version: usize) -> u8 {
        let mut u = [0.0f64; 10];
        for x in &mut u {
            *x = self.rng.random();
        }
        u.sort_by(f64::total_cmp);
        let dim_index = Dimension::ALL.iter().position(|d| *d == dim).unwrap_or(0);
        let raw = 100.0 * u[6] + 1.5 + call.rep.skill + call.rep.dimension_skill[dim_index]
            - call.difficulty
            - 0.4 * version as f64;
        raw.round().clamp(0.0, 100.0) as u8
    }

    /// The result JSON, shaped like [`crate::llm::CoachingResult`].
    fn result(&mut self, call: &Call, dim: Dimension, score: u8) -> String {
        let bank = feedback(dim);
        let strengths = match score {
            0..50 => 1,
            50..75 => 2,
            75..90 => 3,
            _ => 4,
        };
        let improvements = match score {
            0..50 => 4,
            50..75 => 3,
            75..90 => 2,
            _ => 1,
        };
        let ctx = TalkContext {
            rep_first: first_name(&call.rep.name).to_string(),
            customer_first: first_name(&call.customers[0].0).to_string(),
            company: call
                .title
                .split(" - ")
                .next()
                .unwrap_or_default()
                .to_string(),
            product: call.product,
        };
        let strengths: Vec<String> = self.pick(bank.strengths, strengths, &ctx);
        let improvements: Vec<String> = self.pick(bank.improvements, improvements, &ctx);
        let quotes = self.rng.random_range(1..=3);
        let examples: Vec<String> = (0..quotes)
            .map(|_| {
                let u = call
                    .utterances
                    .choose(&mut self.rng)
                    .expect("a transcript has utterances");
                format!("{}: \"{}\"", u.speaker, truncate(&u.text, 180))
            })
            .collect();
        let verdict = match score {
            0..40 => "struggled with",
            40..60 => "was uneven on",
            60..75 => "was solid on",
            75..90 => "was strong on",
            _ => "was excellent on",
        };
        let summary = format!(
            "{} {verdict} {} in this {} with {}. {} {}",
            ctx.rep_first,
            dim.as_str().replace('_', " "),
            call.kind.label,
            ctx.company,
            strengths.first().map(String::as_str).unwrap_or_default(),
            improvements
                .first()
                .map(|s| format!("Focus next: {}", lowercase_first(s)))
                .unwrap_or_default()
        );
        serde_json::json!({
            "score": score,
            "strengths": strengths,
            "improvements": improvements,
            "examples": examples,
            "summary": summary,
        })
        .to_string()
    }

    /// `n` distinct entries of `bank` (fewer if it is shorter), filled in.
    fn pick(&mut self, bank: &[&str], n: usize, ctx: &TalkContext) -> Vec<String> {
        let chosen: Vec<&str> = bank.choose_multiple(&mut self.rng, n).copied().collect();
        chosen.into_iter().map(|t| self.fill(&[t], ctx)).collect()
    }
}

fn first_name(name: &str) -> &str {
    name.split(' ').next().unwrap_or(name)
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s[..end].trim_end())
}

/// Roughly standard normal (sum of four uniforms, rescaled), cheap and deterministic.
fn normalish(rng: &mut StdRng) -> f64 {
    let sum: f64 = (0..4).map(|_| rng.random::<f64>()).sum();
    (sum - 2.0) / (4.0f64 / 12.0).sqrt()
}

fn months(n: u32) -> ChronoDuration {
    ChronoDuration::days(i64::from(n) * 365 / 12)
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// Appends a COPY text-format value and a tab.
fn field(buf: &mut Vec<u8>, value: &str) {
    escape(buf, value);
    buf.push(b'\t');
}

/// Appends a COPY text-format value and the row's newline.
fn last_field(buf: &mut Vec<u8>, value: &str) {
    escape(buf, value);
    buf.push(b'\n');
}

/// NULL in COPY text format.
fn null_field(buf: &mut Vec<u8>) {
    buf.extend_from_slice(b"\\N\t");
}

fn escape(buf: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    let mut from = 0;
    for (i, b) in bytes.iter().enumerate() {
        let replacement: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[from..i]);
        buf.extend_from_slice(replacement);
        from = i + 1;
    }
    buf.extend_from_slice(&bytes[from..]);
}

/// One generated call.
struct Call {
    id: Uuid,
    external_id: String,
    title: String,
    product: Product,
    kind: &'static CallType,
    scheduled_at: DateTime<Utc>,
    ended: DateTime<Utc>,
    duration: i32,
    rep: Rep,
    customers: Vec<(String, String)>,
    utterances: Vec<Utterance>,
    text: String,
    hash: String,
    created_at: DateTime<Utc>,
    /// Score offset of the call (a hostile buyer makes every dimension harder).
    difficulty: f64,
    /// Sorted tags.
    tags: Vec<&'static str>,
    /// CRM metadata, JSON.
    metadata: String,
}

impl Call {
    fn write(&self, chunk: &mut Chunk) {
        let id = self.id.to_string();
        let c = &mut chunk.calls;
        field(c, &id);
        field(c, &self.external_id);
        field(c, &self.title);
        field(c, self.product.name());
        field(c, self.kind.name);
        field(c, &timestamp(self.scheduled_at));
        field(c, &self.duration.to_string());
        field(c, &self.rep.email);
        field(c, self.rep.role.as_str());
        field(c, &self.rep.id.to_string());
        field(c, &format!("{{{}}}", self.tags.join(",")));
        field(c, &self.metadata);
        last_field(c, &timestamp(self.created_at));
        let s = &mut chunk.speakers;
        field(s, &id);
        field(s, &self.rep.name);
        field(s, &self.rep.email);
        field(s, self.rep.role.as_str());
        last_field(s, "internal");
        for (name, email) in &self.customers {
            field(s, &id);
            field(s, name);
            field(s, email);
            null_field(s);
            last_field(s, "external");
        }
        let t = &mut chunk.transcripts;
        field(t, &id);
        field(t, &self.hash);
        field(t, &self.text);
        field(
            t,
            &serde_json::to_string(&self.utterances).unwrap_or_else(|_| "[]".into()),
        );
        last_field(t, &timestamp(self.created_at));
    }
}

/// What transcript templates are filled in with.
struct TalkContext {
    rep_first: String,
    customer_first: String,
    company: String,
    product: Product,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(options: &SeedOptions) -> Generator {
        let active = ROLES
            .into_iter()
            .flat_map(|r| Dimension::ALL.map(|d| ((r, d), "1.0.0".to_string())))
            .collect();
        let keys = KeyStyle {
            model: "m".into(),
            fingerprint: "f".repeat(12),
        };
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        let mut g = Generator::new(options, keys, active, rubric_versions(options), now);
        g.reps();
        g
    }

    #[test]
    fn validation_names_the_flag() {
        assert!(
            SeedOptions::new(10, 10, 0, 1)
                .validate()
                .unwrap_err()
                .contains("--reps")
        );
        assert!(
            SeedOptions::new(0, 10, 5, 1)
                .validate()
                .unwrap_err()
                .contains("--calls")
        );
        assert!(SeedOptions::new(0, 0, 0, 1).validate().is_err());
        assert!(
            SeedOptions::new(1, 201, 1, 1)
                .validate()
                .unwrap_err()
                .contains("--sessions")
        );
        assert!(SeedOptions::new(0, 0, 3, 1).validate().is_ok());
        assert!(SeedOptions::new(10, 0, 1, 1).validate().is_ok());
    }

    #[test]
    fn session_counts_are_exact_and_capped() {
        for (calls, sessions) in [(10, 0), (10, 37), (10, 120), (7, 7 * 200), (100, 1000)] {
            let g = generator(&SeedOptions::new(calls, sessions, 3, 9));
            let total: u64 = g.sessions_per_call.iter().map(|&n| u64::from(n)).sum();
            assert_eq!(total, sessions);
            let cap = 4 * g.versions as u16;
            assert!(g.sessions_per_call.iter().all(|&n| n <= cap));
        }
    }

    #[test]
    fn chunks_are_deterministic_and_well_formed() {
        let options = SeedOptions::new(30, 300, 5, 7);
        let render = || {
            let mut g = generator(&options);
            let mut all = Chunk::default();
            while let Some(c) = g.next_chunk() {
                all.calls.extend(c.calls);
                all.sessions.extend(c.sessions);
                all.transcripts.extend(c.transcripts);
                all.call_rows += c.call_rows;
                all.session_rows += c.session_rows;
            }
            all
        };
        let (a, b) = (render(), render());
        assert_eq!(a.calls, b.calls);
        assert_eq!(a.sessions, b.sessions);
        assert_eq!(a.call_rows, 30);
        assert_eq!(a.session_rows, 300);
        let sessions = String::from_utf8(a.sessions).unwrap();
        assert_eq!(sessions.lines().count(), 300);
        for line in sessions.lines() {
            assert_eq!(line.split('\t').count(), 10, "{line}");
        }
        let transcripts = String::from_utf8(a.transcripts).unwrap();
        for line in transcripts.lines() {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 5);
            // The text column holds escaped newlines only.
            assert!(cols[2].len() > 1500, "transcripts are a few KB");
        }
    }

    #[test]
    fn escaping_covers_the_copy_specials() {
        let mut buf = Vec::new();
        escape(&mut buf, "a\\b\nc\td\re");
        assert_eq!(buf, b"a\\\\b\\nc\\td\\re");
    }
}
