//! `bench cost`: the spec's workload run through the real analysis path against the emulator,
//! priced from what was stored, next to the price-rule minimum for the same requests.
//!
//! **Workload.** `calls_per_day` × `days` calls (20 × 30), four dimensions each; 70 % of the
//! calls repeat a transcript analysed earlier (a new call ingested with the same transcript,
//! so the session cache answers by transcript hash). Texts are seeded at the spec's sizes
//! where the data lives in Postgres: the role's four rubrics (~3k tokens together), the
//! knowledge base (~5k tokens, the existing entries included) and every transcript (~8k). The
//! instructions (`jobs/prompts/instructions.md`) and the dimension criteria
//! (`jobs/prompts/dimensions.json`) are compiled into the analysis job and smaller than the
//! spec's ~2k / ~1k: the report gives their real sizes. The emulator pads every answer to
//! ~1.5k output tokens (`EmulatorConfig::output_tokens`).
//!
//! **Time.** Calls are `24 h / calls_per_day` apart (72 minutes). The emulator's simulated
//! clock is moved on by that much after each call, so its prompt-cache entries expire as they
//! would; the gateway's Redis prefix-gate keys of the call (`callcoach:prefix:*`, warm for
//! 4.5 minutes of real time) are deleted at the same moment.
//!
//! **Scenarios.** One run per code path: `PROMPT_ORDER=transcript_cached` and
//! `criteria_cached`, each with fresh texts (a per-scenario tag in every text), each call an
//! `AnalyzeCall` recorded in the ledger and run in-process with `jobs::perform_job`. "No
//! caching" and "session cache only" are the sums of the stored counterfactual columns of
//! the scenario's `analysis_runs`, "session + prompt caching" the sum of `cost_usd`. The spec's
//! prices (Sonnet 4.5, $3 / $15, retired, so the emulator refuses it) are applied by re-pricing
//! the stored token columns with [`Cost::of`]. The batch scenario ("+ batch mode for scheduled
//! work") treats each day's analyses as scheduled work run at the day's end with `AnalyzeCall {
//! batch: true }` and `LLM_BATCH_MODE` on: the calls with a new transcript first, each one
//! Message Batch of its four dimensions, submitted together; their `collect_batch` jobs run
//! once the emulator has ended the batches; then the day's repeats, answered from the session
//! cache.
//!
//! **Minimum.** From the requests the emulator recorded (distinct prompts only; session-cache
//! hits cost nothing): every token sequence sent more than once is written once at the 5-minute
//! write price and read afterwards, one sent once pays the input price, every output token is
//! paid ([`minimum`]); the batch minimum is the same at the batch discount. Sequences are identified by content ([`Identity::Content`], ignoring where
//! in the prompt they sit: the bound for the workload) or by prefix ([`Identity::Prefix`], what
//! the prompt cache can reuse: the bound for one block order). Under the TTL constraint, an
//! entry only serves uses that follow each other within its TTL (5 minutes or 1 hour, the
//! cheaper per sequence).
//!
//! **The dev database.** The bench needs the role's rubrics and the global knowledge base to
//! be its own while it runs: it deactivates the active rubrics of [`BENCH_ROLE`] and activates
//! its own, adds its knowledge-base entries (product `bench-cost`) next to the existing active
//! ones, and at the end restores the original rubrics and deactivates its entries. Unless
//! `--keep` is given it then deletes everything it created (calls, runs, sessions, cache rows
//! and Redis entries, ledger rows, its rubric and knowledge-base rows). A run that was killed
//! leaves its rubrics active: the next run repairs that first. Analyses of other calls made
//! while the bench runs would see the bench's texts. Spend is charged to bench-only Redis
//! counters (deleted at the end), never to the fleet's budget. The jobs are recorded in the
//! ledger without a Redis delivery (no worker takes them); the `collect_batch` deliveries the
//! batch path pushes are withdrawn once the bench has run those jobs itself.

use super::ratio;
use crate::{
    App,
    config::Settings,
    db,
    jobs::{self, Job, RunLabel, analyze_call::AnalyzeCall},
    llm::{
        self, BlockOrder, CacheTtl, Gateway, GatewayOptions, LlmClient, ModelTable, PromptInputs,
        ServiceTier, Usage,
        client::{CacheCreation, OutputTokensDetails},
        cost::{Cost, RunCost},
        emulator::{self, EmulatorHandle, RecordedRequest},
        limits::{FleetLimiter, FleetOptions, SpendBudgets, SpendGuard, SpendOptions},
        models::ModelInfo,
    },
    model::{CallInput, Dimension, Role, Utterance, normalized_transcript},
};
use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};
use uuid::Uuid;

/// The role whose rubrics the bench replaces while it runs.
pub const BENCH_ROLE: Role = Role::Csm;

/// Product name of the bench's knowledge-base entries.
const KB_PRODUCT: &str = "bench-cost";

/// Tag prefix of everything the bench writes (rubric versions, call ids, KB versions).
const TAG_PREFIX: &str = "bench-cost-";

/// The spec's prices: Claude Sonnet 4.5 ($3 / $15), retired, so only used to re-price.
pub const SPEC_MODEL: &str = "claude-sonnet-4-5-20250929";

/// The spec's token sizes per analysis.
const SPEC_INSTRUCTIONS: u64 = 2_000;
const SPEC_RUBRIC: u64 = 3_000;
const SPEC_KNOWLEDGE_BASE: u64 = 5_000;
const SPEC_CRITERIA: u64 = 1_000;
const SPEC_TRANSCRIPT: u64 = 8_000;
const SPEC_OUTPUT: u64 = 1_500;

/// The spec's reduction ($216 → $19).
const SPEC_REDUCTION_PCT: f64 = 91.0;

/// Target: measured cost at most this multiple of the price-rule minimum.
const MINIMUM_TARGET: f64 = 1.05;

const FIVE_MINUTES: Duration = Duration::from_secs(300);
const ONE_HOUR: Duration = Duration::from_secs(3_600);

/// What to run.
#[derive(Clone, Debug)]
pub struct CostBench {
    /// Calls ingested per day (spread evenly over the day).
    pub calls_per_day: usize,
    /// Days simulated.
    pub days: usize,
    /// Share of calls (percent) repeating an earlier transcript.
    pub repeat_pct: u8,
    /// Keep the bench's calls, runs and cache rows (its rubrics and KB entries stay, inactive).
    pub keep: bool,
}

impl Default for CostBench {
    fn default() -> Self {
        Self {
            calls_per_day: 20,
            days: 30,
            repeat_pct: 70,
            keep: false,
        }
    }
}

/// Runs the cost benchmark.
pub async fn run(mut settings: Settings, bench: CostBench) -> anyhow::Result<Value> {
    if bench.calls_per_day == 0 || bench.days == 0 || bench.repeat_pct >= 100 {
        bail!("bench cost needs calls per day and days > 0 and a repeat share below 100 %");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let config = emulator::EmulatorConfig {
        output_tokens: Some(SPEC_OUTPUT),
        record_requests: true,
        batch_delay: Duration::from_millis(20),
        ..emulator::EmulatorConfig::default()
    };
    let emulator = emulator::spawn(listener, config).await?;
    settings.anthropic_base_url = emulator.base_url().to_string();
    // The session cache is one of the measured caches; budgets and fleet limits would make
    // the run depend on the dev fleet's state (the gateway path runs all the same).
    settings.enable_caching = true;
    settings.llm_budgets = SpendBudgets::default();
    settings.llm_limits = llm::limits::FleetLimits::default();
    let base = App::build(settings.clone())?;
    db::migrate(&base.pg).await?;
    let run = format!("{TAG_PREFIX}{}", &Uuid::new_v4().simple().to_string()[..8]);
    let repaired = repair_leftovers(&base.pg).await?;
    let originals: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM coaching_rubrics WHERE role = $1 AND active")
            .bind(BENCH_ROLE.as_str())
            .fetch_all(&base.pg)
            .await?;
    let ctx = BenchRun {
        bench,
        run,
        settings,
        emulator,
        redis: base.redis.clone(),
        pg: base.pg.clone(),
    };
    let measured = ctx.measure().await;
    let cleaned = ctx.cleanup(&base, &originals).await;
    let BenchRun { emulator, .. } = ctx;
    emulator.shutdown().await;
    let mut report = measured?;
    cleaned?;
    report["dev_database"] = json!({
        "role_rubrics_replaced_then_restored": BENCH_ROLE.as_str(),
        "knowledge_base_entries": "added active, deactivated at the end",
        "bench_data": if report["keep"].as_bool() == Some(true) { "kept" } else { "deleted" },
        "leftovers_of_a_killed_run_repaired": repaired,
    });
    Ok(report)
}

struct BenchRun {
    bench: CostBench,
    run: String,
    settings: Settings,
    emulator: EmulatorHandle,
    redis: redis::aio::ConnectionManager,
    pg: PgPool,
}

/// A configuration that changes the code path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Every call analysed when it arrives, with this block order.
    Direct(BlockOrder),
    /// Scheduled work: a day's calls analysed together at the day's end with
    /// `AnalyzeCall { batch: true }` and `LLM_BATCH_MODE` on (transcript_cached order).
    Batch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Direct(BlockOrder::TranscriptCached) => "transcript_cached",
            Self::Direct(BlockOrder::CriteriaCached) => "criteria_cached",
            Self::Batch => "batch",
        }
    }

    fn order(self) -> BlockOrder {
        match self {
            Self::Direct(order) => order,
            Self::Batch => BlockOrder::TranscriptCached,
        }
    }
}

/// What one scenario measured.
struct Scenario {
    mode: Mode,
    runs: Vec<StoredRunRow>,
    requests: Vec<RecordedRequest>,
}

/// The columns of one `analysis_runs` row the report needs.
#[derive(Clone, Debug)]
struct StoredRunRow {
    source: String,
    cache_key: String,
    usage: Usage,
    stored: RunCost,
}

impl BenchRun {
    fn calls(&self) -> usize {
        self.bench.calls_per_day * self.bench.days
    }

    fn gap(&self) -> Duration {
        Duration::from_secs(86_400 / self.bench.calls_per_day as u64)
    }

    async fn measure(&self) -> anyhow::Result<Value> {
        let modes = [
            Mode::Direct(BlockOrder::TranscriptCached),
            Mode::Direct(BlockOrder::CriteriaCached),
            Mode::Batch,
        ];
        let bar = ProgressBar::new((self.calls() * modes.len()) as u64);
        bar.set_style(
            ProgressStyle::with_template("bench cost {msg} {bar:40} {pos}/{len} calls ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut scenarios = Vec::new();
        for mode in modes {
            bar.set_message(mode.name());
            scenarios.push(self.scenario(mode, &bar).await?);
        }
        bar.finish_and_clear();
        self.report(&scenarios)
    }

    /// Runs the workload once in `mode`, with texts of its own.
    async fn scenario(&self, mode: Mode, bar: &ProgressBar) -> anyhow::Result<Scenario> {
        let tag = format!("{}-{}", self.run, mode.name());
        let mut settings = self.settings.clone();
        settings.prompt_order = mode.order();
        settings.llm_batch_mode = mode == Mode::Batch;
        let mut app = App::build(settings)?;
        app.jobs.llm = bench_gateway(&app.settings, &self.run)?;
        seed_texts(&app.pg, &tag).await?;
        let texts = PromptTexts::load(&app.pg).await?;
        self.emulator.state().take_recorded_requests();
        let schedule = schedule(self.calls(), self.bench.repeat_pct);
        let mut transcripts: Vec<Vec<Utterance>> = Vec::new();
        let mut day: Vec<(Uuid, bool)> = Vec::new();
        for (i, &t) in schedule.iter().enumerate() {
            let fresh = t == transcripts.len();
            if fresh {
                transcripts.push(transcript(&tag, t, SPEC_TRANSCRIPT as usize * 4));
            }
            let call = call_input(&tag, i, transcripts[t].clone());
            let (call_id, _) = db::insert_call(&app.pg, &call).await?;
            if mode == Mode::Batch {
                day.push((call_id, fresh));
                if day.len() == self.bench.calls_per_day || i + 1 == schedule.len() {
                    self.emulator.advance(self.gap() * day.len() as u32);
                    self.scheduled_day(&app, &day).await?;
                    bar.inc(day.len() as u64);
                    day.clear();
                }
                continue;
            }
            expect_success(perform(&app, call_id, false).await?, i)?;
            let deleted = self
                .forget_prefixes(&app.settings, &texts, &transcripts[t])
                .await?;
            if fresh && deleted == 0 {
                bail!(
                    "no prefix-gate key of call {i} found: the bench's copy of the prompt \
                     layout no longer matches analyze_call"
                );
            }
            self.emulator.advance(self.gap());
            bar.inc(1);
        }
        let requests = self.emulator.state().take_recorded_requests();
        let runs = stored_runs(&app.pg, &tag).await?;
        let expected = self.calls() * Dimension::ALL.len();
        if runs.len() != expected {
            bail!(
                "{}: {} analysis runs stored, {expected} expected",
                mode.name(),
                runs.len()
            );
        }
        Ok(Scenario {
            mode,
            runs,
            requests,
        })
    }

    /// One day of scheduled work: the calls with a transcript not analysed before go first,
    /// each an `AnalyzeCall { batch: true }` (one Message Batch of its four dimensions),
    /// submitted together; once the batches have ended their `collect_batch` jobs store the
    /// answers; then the calls repeating a transcript, answered from the session cache.
    async fn scheduled_day(&self, app: &App, day: &[(Uuid, bool)]) -> anyhow::Result<()> {
        for (i, &(call_id, _)) in day.iter().enumerate().filter(|(_, (_, fresh))| *fresh) {
            expect_success(perform(app, call_id, true).await?, i)?;
        }
        for &(call_id, _) in day.iter().filter(|(_, fresh)| *fresh) {
            let (job_id, args): (Uuid, Value) = sqlx::query_as(
                "SELECT id, payload FROM jobs
                 WHERE kind = 'collect_batch' AND payload->>'call_id' = $1 AND finished_at IS NULL",
            )
            .bind(call_id.to_string())
            .fetch_one(&app.pg)
            .await
            .context("the batch analysis enqueued no collect_batch job")?;
            let batch_id = args["batch_id"].as_str().unwrap_or_default().to_string();
            wait_for_batch(app, &batch_id).await?;
            let envelope = crate::delivery::Envelope {
                job_id,
                delivery: 0,
                kind: "collect_batch".into(),
                args,
            };
            let label = jobs::perform_job(envelope, &app.jobs).await?;
            withdraw_delivery(&self.redis, job_id).await?;
            if label != RunLabel::Succeeded {
                bail!("collect_batch of batch {batch_id} ended {label:?}");
            }
        }
        for (i, &(call_id, _)) in day.iter().enumerate().filter(|(_, (_, fresh))| !*fresh) {
            expect_success(perform(app, call_id, true).await?, i)?;
        }
        Ok(())
    }

    /// Deletes the gateway's prefix-gate keys of a call's four requests (they say "warm" for
    /// 4.5 minutes of real time; on the simulated clock the entries are gone). Returns how many
    /// existed.
    async fn forget_prefixes(
        &self,
        settings: &Settings,
        texts: &PromptTexts,
        utterances: &[Utterance],
    ) -> anyhow::Result<u64> {
        let transcript = normalized_transcript(utterances);
        let mut keys = HashSet::new();
        for d in Dimension::ALL {
            let inputs = PromptInputs {
                instructions: INSTRUCTIONS,
                role: BENCH_ROLE.as_str(),
                rubric: &texts.rubric,
                knowledge_base: &texts.knowledge_base,
                transcript: &transcript,
                dimension: d.as_str(),
                dimension_criteria: texts.criteria.get(d.as_str()).map_or("", String::as_str),
            };
            let request =
                llm::build_request(&settings.prompt_options(CacheTtl::FiveMinutes), &inputs);
            keys.extend(
                request
                    .prefixes
                    .iter()
                    .map(|p| format!("callcoach:prefix:{p}")),
            );
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let mut conn = self.redis.clone();
        let deleted: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        Ok(deleted)
    }

    /// Restores the role's rubrics and deactivates the bench's KB entries; without `--keep`
    /// deletes what the bench created.
    async fn cleanup(&self, base: &App, originals: &[i64]) -> anyhow::Result<()> {
        let like = format!("{}%", self.run);
        let mut tx = self.pg.begin().await?;
        sqlx::query("UPDATE coaching_rubrics SET active = false WHERE version LIKE $1 AND active")
            .bind(&like)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE coaching_rubrics SET active = true WHERE id = ANY($1)")
            .bind(originals)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE knowledge_base SET active = false WHERE product = $1 AND version LIKE $2",
        )
        .bind(KB_PRODUCT)
        .bind(&like)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut conn = self.redis.clone();
        let spend: Vec<String> = redis::cmd("KEYS")
            .arg(format!("callcoach:bench:{}:*", self.run))
            .query_async(&mut conn)
            .await?;
        if !spend.is_empty() {
            let _: () = redis::cmd("DEL").arg(&spend).query_async(&mut conn).await?;
        }
        if self.bench.keep {
            return Ok(());
        }
        let keys: Vec<String> = sqlx::query_scalar(
            "DELETE FROM coaching_cache WHERE rubric_version LIKE $1 RETURNING cache_key",
        )
        .bind(&like)
        .fetch_all(&self.pg)
        .await?;
        base.jobs.cache.unlink(&keys).await?;
        sqlx::query("DELETE FROM coaching_sessions WHERE rubric_version LIKE $1")
            .bind(&like)
            .execute(&self.pg)
            .await?;
        sqlx::query(
            "DELETE FROM jobs WHERE kind IN ($1, 'collect_batch') AND payload->>'call_id' IN
                 (SELECT id::text FROM calls WHERE external_id LIKE $2)",
        )
        .bind(AnalyzeCall::JOB_NAME)
        .bind(&like)
        .execute(&self.pg)
        .await?;
        // Transcripts, speakers and analysis runs go with their calls.
        sqlx::query("DELETE FROM calls WHERE external_id LIKE $1")
            .bind(&like)
            .execute(&self.pg)
            .await?;
        sqlx::query(
            "DELETE FROM reps r WHERE lower(email) = $1
             AND NOT EXISTS (SELECT 1 FROM calls c WHERE c.rep_id = r.id)",
        )
        .bind(BENCH_REP_EMAIL)
        .execute(&self.pg)
        .await?;
        sqlx::query("DELETE FROM coaching_rubrics WHERE version LIKE $1")
            .bind(&like)
            .execute(&self.pg)
            .await?;
        sqlx::query("DELETE FROM knowledge_base WHERE product = $1 AND version LIKE $2")
            .bind(KB_PRODUCT)
            .bind(&like)
            .execute(&self.pg)
            .await?;
        Ok(())
    }

    fn report(&self, scenarios: &[Scenario]) -> anyhow::Result<Value> {
        let table = ModelTable::builtin();
        let spec = table
            .get(SPEC_MODEL)
            .with_context(|| format!("{SPEC_MODEL} is missing from jobs/models.toml"))?;
        let default_id = self.settings.claude_model.as_str();
        let default = table
            .get(default_id)
            .with_context(|| format!("{default_id} is missing from jobs/models.toml"))?;
        let tc = scenario_of(scenarios, Mode::Direct(BlockOrder::TranscriptCached))?;
        let cc = scenario_of(scenarios, Mode::Direct(BlockOrder::CriteriaCached))?;
        let bt = scenario_of(scenarios, Mode::Batch)?;
        for s in scenarios {
            check_consistency(s, default)?;
        }
        let spec_prices = self.price_set(SPEC_MODEL, spec, scenarios, false)?;
        let default_prices = self.price_set(default_id, default, scenarios, true)?;
        let explanation = explanation(tc, bt, spec, &spec_prices, self.gap());
        let schedule = schedule(self.calls(), self.bench.repeat_pct);
        let distinct = schedule.iter().copied().max().map_or(0, |m| m + 1);
        Ok(json!({
            "benchmark": "cost",
            "keep": self.bench.keep,
            "workload": {
                "calls_per_day": self.bench.calls_per_day,
                "days": self.bench.days,
                "calls": self.calls(),
                "dimensions": Dimension::ALL.len(),
                "analyses": self.calls() * Dimension::ALL.len(),
                "repeat_pct": self.bench.repeat_pct,
                "distinct_transcripts": distinct,
                "minutes_between_calls": self.gap().as_secs_f64() / 60.0,
                "role": BENCH_ROLE.as_str(),
                "spec_tokens": {
                    "instructions": SPEC_INSTRUCTIONS,
                    "role_rubric": SPEC_RUBRIC,
                    "knowledge_base": SPEC_KNOWLEDGE_BASE,
                    "dimension_criteria": SPEC_CRITERIA,
                    "transcript": SPEC_TRANSCRIPT,
                    "output": SPEC_OUTPUT,
                },
                "measured_tokens": measured_sizes(tc, cc),
                "notes": "Token counts are the emulator's (characters / 4, as llm::estimate_tokens). \
                          The instructions and dimension criteria are compiled into analyze_call \
                          and smaller than the spec's: their real sizes are used and shown. The \
                          output size is the emulator's padded answer (text + thinking).",
            },
            "scenarios": {
                "transcript_cached": scenario_figures(tc),
                "criteria_cached": scenario_figures(cc),
                "batch": scenario_figures(bt),
            },
            "prices": {
                "spec_sonnet_4_5": spec_prices,
                "default_model": default_prices,
            },
            "explanation": explanation,
        }))
    }

    /// Every figure at one model's prices. `stored` says whether the stored cost columns are
    /// at these prices (the configured model) or the token columns are re-priced.
    fn price_set(
        &self,
        id: &str,
        model: &ModelInfo,
        scenarios: &[Scenario],
        stored: bool,
    ) -> anyhow::Result<Value> {
        let tc = scenario_of(scenarios, Mode::Direct(BlockOrder::TranscriptCached))?;
        let cc = scenario_of(scenarios, Mode::Direct(BlockOrder::CriteriaCached))?;
        let bt = scenario_of(scenarios, Mode::Batch)?;
        let cost = |s: &Scenario| {
            if stored {
                stored_sums(&s.runs)
            } else {
                repriced(&s.runs, model)
            }
        };
        let (tc_cost, cc_cost, bt_cost) = (cost(tc), cost(cc), cost(bt));
        let rates = Rates::of(model);
        let sent = |s: &Scenario, identity| sent_requests(&s.requests, identity);
        let workload_min = [tc, cc]
            .iter()
            .map(|s| minimum(&sent(s, Identity::Content), &rates, TtlRule::Unlimited))
            .min_by(|a, b| a.usd.total_cmp(&b.usd))
            .unwrap_or_default();
        let workload_min_ttl = [tc, cc]
            .iter()
            .map(|s| minimum(&sent(s, Identity::Content), &rates, TtlRule::Expiring))
            .min_by(|a, b| a.usd.total_cmp(&b.usd))
            .unwrap_or_default();
        let layout_min =
            |s: &Scenario| minimum(&sent(s, Identity::Prefix), &rates, TtlRule::Expiring);
        let (tc_layout, cc_layout) = (layout_min(tc), layout_min(cc));
        // Everything at the batch price; under the TTL with the batch scenario's timing.
        let discount = model.batch_discount;
        let batch_min = workload_min.discounted(discount);
        let batch_min_ttl =
            minimum(&sent(bt, Identity::Content), &rates, TtlRule::Expiring).discounted(discount);
        let no_caching = tc_cost.without_caching_usd;
        let session_only = tc_cost.without_prompt_cache_usd;
        let best_direct = tc_cost.usd.min(cc_cost.usd);
        let best = best_direct.min(bt_cost.usd);
        let pct = |x: f64| reduction_pct(no_caching, x);
        Ok(json!({
            "model": id,
            "name": model.name,
            "usd_per_mtok": {
                "input": model.input, "cache_write_5m": model.cache_write_5m,
                "cache_write_1h": model.cache_write_1h, "cache_read": model.cache_read,
                "output": model.output, "batch_discount": model.batch_discount,
            },
            "from": if stored { "stored cost columns" } else { "stored token columns re-priced" },
            "no_caching": usd(no_caching),
            "no_caching_criteria_cached_run": usd(cc_cost.without_caching_usd),
            "session_only": usd(session_only),
            "prompt_only_transcript_cached": usd(tc_cost.without_session_cache_usd),
            "session_and_prompt_transcript_cached": usd(tc_cost.usd),
            "session_and_prompt_criteria_cached": usd(cc_cost.usd),
            "with_batch": usd(bt_cost.usd),
            "with_batch_stored_counterfactuals": {
                "no_caching_at_batch_price": usd(bt_cost.without_caching_usd),
                "session_only_at_batch_price": usd(bt_cost.without_prompt_cache_usd),
            },
            "reductions_pct": {
                "session_only": pct(session_only),
                "session_and_prompt_transcript_cached": pct(tc_cost.usd),
                "session_and_prompt_criteria_cached": pct(cc_cost.usd),
                "with_batch": pct(bt_cost.usd),
                "best_without_batch": pct(best_direct),
                "best": pct(best),
                "spec_target": SPEC_REDUCTION_PCT,
                "spec_target_met": pct(best) >= SPEC_REDUCTION_PCT,
                "at_minimum": pct(workload_min.usd),
                "at_minimum_under_ttl": pct(workload_min_ttl.usd),
                "at_batch_minimum": pct(batch_min.usd),
                "at_batch_minimum_under_ttl": pct(batch_min_ttl.usd),
            },
            "minimum": workload_min.to_json(),
            "minimum_under_ttl": workload_min_ttl.to_json(),
            "batch_minimum": batch_min.to_json(),
            "batch_minimum_under_ttl": batch_min_ttl.to_json(),
            "layout_minimum_under_ttl": {
                "transcript_cached": tc_layout.to_json(),
                "criteria_cached": cc_layout.to_json(),
            },
            "ratio_to_minimum": {
                "transcript_cached": ratio(tc_cost.usd, workload_min.usd),
                "criteria_cached": ratio(cc_cost.usd, workload_min.usd),
                "with_batch_to_batch_minimum": ratio(bt_cost.usd, batch_min.usd),
                "target": MINIMUM_TARGET,
                "target_met": best_direct <= MINIMUM_TARGET * workload_min.usd,
                "batch_target_met": bt_cost.usd <= MINIMUM_TARGET * batch_min.usd,
            },
            "ratio_to_minimum_under_ttl": {
                "transcript_cached": ratio(tc_cost.usd, workload_min_ttl.usd),
                "criteria_cached": ratio(cc_cost.usd, workload_min_ttl.usd),
                "with_batch_to_batch_minimum_under_ttl": ratio(bt_cost.usd, batch_min_ttl.usd),
            },
            "ratio_to_layout_minimum_under_ttl": {
                "transcript_cached": ratio(tc_cost.usd, tc_layout.usd),
                "criteria_cached": ratio(cc_cost.usd, cc_layout.usd),
            },
        }))
    }
}

fn scenario_of(scenarios: &[Scenario], mode: Mode) -> anyhow::Result<&Scenario> {
    scenarios
        .iter()
        .find(|s| s.mode == mode)
        .with_context(|| format!("scenario {} did not run", mode.name()))
}

/// USD rounded to cents' hundredths.
fn usd(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Percent saved going from `from` to `to`, one decimal.
fn reduction_pct(from: f64, to: f64) -> f64 {
    if from <= 0.0 {
        return 0.0;
    }
    super::round1(100.0 * (1.0 - to / from))
}

/// The gateway `App::build` wires, with the spend counters under a bench-only Redis prefix.
fn bench_gateway(settings: &Settings, run: &str) -> anyhow::Result<Gateway> {
    let client = LlmClient::new(
        &settings.anthropic_base_url,
        settings.anthropic_api_key.expose(),
        settings.llm_timeout,
    )?;
    let redis = crate::redis_connection(settings, settings.redis_max_connections)?;
    let fleet = FleetOptions {
        processes: settings.llm_fleet_processes,
        max_wait: settings.llm_limit_max_wait,
        ..FleetOptions::default()
    };
    let limiter = FleetLimiter::new(redis.clone(), settings.llm_limits, &fleet)?;
    let spend = SpendGuard::new(
        redis.clone(),
        settings.llm_budgets,
        &SpendOptions {
            key_prefix: format!("callcoach:bench:{run}:spend"),
            ..SpendOptions::default()
        },
    );
    let options = GatewayOptions {
        fan_out_wait: settings.llm_fan_out_wait,
    };
    Ok(Gateway::new(client, limiter, spend, redis, options))
}

fn expect_success(label: RunLabel, call: usize) -> anyhow::Result<()> {
    if label != RunLabel::Succeeded {
        bail!("analysis of bench call {call} ended {label:?}");
    }
    Ok(())
}

/// Waits (up to a minute) until the emulator has processed a batch.
async fn wait_for_batch(app: &App, id: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !app.jobs.llm.client().batch(id).await?.ended() {
        if tokio::time::Instant::now() > deadline {
            bail!("batch {id} did not end within a minute");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Removes the Redis delivery of a `collect_batch` job the bench ran itself (the batch path
/// enqueues it with a delay; a worker would find it finished and skip it, but a dev Redis
/// without workers would keep it).
async fn withdraw_delivery(
    redis: &redis::aio::ConnectionManager,
    job_id: Uuid,
) -> anyhow::Result<()> {
    let config = crate::delivery::queue_config(crate::delivery::Lane::Background);
    let task = crate::delivery::task_id(job_id, 0);
    let mut conn = redis.clone();
    let _: () = redis::pipe()
        .cmd("ZREM")
        .arg(config.scheduled_jobs_set())
        .arg(&task)
        .ignore()
        .cmd("HDEL")
        .arg(config.job_data_hash())
        .arg(&task)
        .ignore()
        .cmd("DEL")
        .arg(format!("{}:{task}", config.job_meta_hash()))
        .ignore()
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// Records an `AnalyzeCall` of all four dimensions in the ledger (due in an hour, and not
/// pushed to Redis, so no worker takes it) and runs it here as a worker would.
async fn perform(app: &App, call_id: Uuid, batch: bool) -> anyhow::Result<RunLabel> {
    let args = AnalyzeCall {
        call_id,
        dimensions: vec![],
        batch,
    };
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut tx = app.pg.begin().await?;
    let job_id = app
        .queue
        .enqueue_tx(&mut tx, args.to_job()?.run_at(later))
        .await?
        .job_id;
    tx.commit().await?;
    let envelope = crate::delivery::Envelope {
        job_id,
        delivery: 0,
        kind: AnalyzeCall::JOB_NAME.to_string(),
        args: serde_json::to_value(&args)?,
    };
    jobs::perform_job(envelope, &app.jobs).await
}

/// Deactivates what a killed run left active (its rubrics, re-activating the newest other
/// version of each, and its KB entries). Returns how many rows it changed.
async fn repair_leftovers(pg: &PgPool) -> anyhow::Result<u64> {
    let like = format!("{TAG_PREFIX}%");
    let mut tx = pg.begin().await?;
    let stale = sqlx::query(
        "UPDATE coaching_rubrics SET active = false WHERE active AND version LIKE $1 \
         RETURNING role, dimension",
    )
    .bind(&like)
    .fetch_all(&mut *tx)
    .await?;
    let mut changed = stale.len() as u64;
    for row in &stale {
        let (role, dimension): (String, String) = (row.get(0), row.get(1));
        changed += sqlx::query(
            "UPDATE coaching_rubrics SET active = true WHERE id = (
                 SELECT id FROM coaching_rubrics
                 WHERE role = $1 AND dimension = $2 AND version NOT LIKE $3
                 ORDER BY created_at DESC, id DESC LIMIT 1)",
        )
        .bind(&role)
        .bind(&dimension)
        .bind(&like)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    changed +=
        sqlx::query("UPDATE knowledge_base SET active = false WHERE product = $1 AND active")
            .bind(KB_PRODUCT)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    tx.commit().await?;
    Ok(changed)
}

/// Makes the bench's rubrics (four, ~3k tokens together) the role's active ones and its KB
/// entry active, so the knowledge base totals ~5k tokens with the existing entries.
async fn seed_texts(pg: &PgPool, tag: &str) -> anyhow::Result<()> {
    let mut tx = pg.begin().await?;
    sqlx::query("UPDATE coaching_rubrics SET active = false WHERE role = $1 AND active")
        .bind(BENCH_ROLE.as_str())
        .execute(&mut *tx)
        .await?;
    let per_rubric = SPEC_RUBRIC as usize * 4 / Dimension::ALL.len();
    for (i, d) in Dimension::ALL.iter().enumerate() {
        // The role block adds a heading per rubric ("## dimension (rubric version)").
        let heading = format!("## {d} (rubric {tag})\n\n").len();
        let criteria = prose(
            &format!("Rubric {tag} for {d}."),
            per_rubric.saturating_sub(heading),
            seed_of(tag, 100 + i as u64),
        );
        sqlx::query(
            "INSERT INTO coaching_rubrics (role, dimension, version, criteria, active)
             VALUES ($1, $2, $3, $4, true)",
        )
        .bind(BENCH_ROLE.as_str())
        .bind(d.as_str())
        .bind(tag)
        .bind(criteria)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE knowledge_base SET active = false WHERE product = $1 AND active")
        .bind(KB_PRODUCT)
        .execute(&mut *tx)
        .await?;
    let existing: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(length(content) + length(product) + length(category) + 8), 0)
         FROM knowledge_base WHERE active",
    )
    .fetch_one(&mut *tx)
    .await?;
    let target = SPEC_KNOWLEDGE_BASE as usize * 4;
    let heading = KB_PRODUCT.len() + tag.len() + 8;
    let size = target
        .saturating_sub(usize::try_from(existing).unwrap_or(0) + heading)
        .max(400);
    sqlx::query(
        "INSERT INTO knowledge_base (product, category, version, content, active)
         VALUES ($1, $2, $2, $3, true)",
    )
    .bind(KB_PRODUCT)
    .bind(tag)
    .bind(prose(
        &format!("Knowledge base {tag}."),
        size,
        seed_of(tag, 7),
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The prompt texts of the bench role as the analysis job assembles them (to find the
/// gateway's prefix ids).
struct PromptTexts {
    rubric: String,
    knowledge_base: String,
    criteria: HashMap<String, String>,
}

/// The analysis job's compiled-in instructions.
const INSTRUCTIONS: &str = include_str!("../../jobs/prompts/instructions.md");

impl PromptTexts {
    async fn load(pg: &PgPool) -> anyhow::Result<Self> {
        let rubrics = db::role_rubrics(pg, BENCH_ROLE).await?;
        // Same layout as analyze_call's role rubric block; a drift is caught by the prefix
        // keys no longer being found.
        let rubric = rubrics
            .iter()
            .map(|(d, r)| format!("## {d} (rubric {})\n{}\n", r.version, r.criteria))
            .collect::<Vec<_>>()
            .join("\n");
        let (knowledge_base, _) = db::knowledge_base(pg).await?;
        let criteria = serde_json::from_str(include_str!("../../jobs/prompts/dimensions.json"))?;
        Ok(Self {
            rubric,
            knowledge_base,
            criteria,
        })
    }
}

/// The rep of every bench call (its row is deleted with the bench's calls).
const BENCH_REP_EMAIL: &str = "bench-rep@example.com";

/// A call of the workload carrying `utterances`.
fn call_input(tag: &str, i: usize, utterances: Vec<Utterance>) -> CallInput {
    CallInput {
        external_id: Some(format!("{tag}-call-{i}")),
        title: format!("Bench call {i}"),
        product: Some("Lumen Analytics".into()),
        call_type: Some("discovery".into()),
        scheduled_at: chrono::Utc::now(),
        duration_seconds: Some(1_800),
        speakers: vec![],
        rep_email: BENCH_REP_EMAIL.into(),
        rep_name: None,
        rep_team: None,
        rep_role: BENCH_ROLE,
        transcript: utterances,
        tags: vec![],
        metadata: None,
    }
}

/// Which transcript each call carries: `100 - repeat_pct` percent of the calls bring a new
/// one, evenly spread and the first call included (transcripts are numbered in order of
/// appearance); the others repeat an earlier one chosen by a fixed pseudo-random sequence.
pub fn schedule(calls: usize, repeat_pct: u8) -> Vec<usize> {
    let new_pct = 100 - usize::from(repeat_pct.min(99));
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut distinct = 0;
    (0..calls)
        .map(|i| {
            if ((i + 1) * new_pct).div_ceil(100) > (i * new_pct).div_ceil(100) || distinct == 0 {
                distinct += 1;
                distinct - 1
            } else {
                rng.below(distinct)
            }
        })
        .collect()
}

/// A small deterministic generator (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seed_of(tag: &str, n: u64) -> u64 {
    let digest = crate::model::sha256_hex(&format!("{tag}:{n}"));
    u64::from_str_radix(&digest[..16], 16).unwrap_or(1) | 1
}

/// About `chars` characters of sentences starting with `head`.
fn prose(head: &str, chars: usize, seed: u64) -> String {
    let mut rng = XorShift(seed);
    let mut out = String::with_capacity(chars + 80);
    out.push_str(head);
    while out.len() < chars {
        out.push(' ');
        for _ in 0..6 + rng.below(12) {
            out.push_str(super::WORDS[rng.below(super::WORDS.len())]);
            out.push(' ');
        }
        out.pop();
        out.push('.');
    }
    out
}

/// Transcript `n` of a scenario: about `chars` characters of alternating turns, the first
/// naming the scenario and the transcript so no two are alike.
fn transcript(tag: &str, n: usize, chars: usize) -> Vec<Utterance> {
    let mut rng = XorShift(seed_of(tag, 1_000 + n as u64));
    let mut turns = vec![Utterance {
        speaker: "Rep".into(),
        start_seconds: 0.0,
        text: format!("Thanks for joining, this is call {n} of {tag}."),
    }];
    let mut total = turns[0].text.len();
    while total < chars {
        let mut text = String::new();
        for _ in 0..8 + rng.below(20) {
            text.push_str(super::WORDS[rng.below(super::WORDS.len())]);
            text.push(' ');
        }
        text.push(if rng.below(3) == 0 { '?' } else { '.' });
        let speaker = if turns.len() % 2 == 0 { "Rep" } else { "Buyer" };
        total += text.len() + speaker.len() + 3;
        turns.push(Utterance {
            speaker: speaker.into(),
            start_seconds: turns.len() as f64 * 12.0,
            text,
        });
    }
    turns
}

/// The scenario's stored runs.
async fn stored_runs(pg: &PgPool, tag: &str) -> anyhow::Result<Vec<StoredRunRow>> {
    let rows = sqlx::query(
        "SELECT r.source, r.cache_key, r.input_tokens, r.output_tokens, r.cache_write_5m_tokens,
             r.cache_write_1h_tokens, r.cache_read_tokens, r.thinking_tokens, r.service_tier,
             r.cost_usd, r.cost_without_prompt_cache_usd, r.cost_without_session_cache_usd,
             r.cost_without_caching_usd
         FROM analysis_runs r JOIN calls c ON c.id = r.call_id
         WHERE c.external_id LIKE $1 ORDER BY r.created_at, r.id",
    )
    .bind(format!("{tag}-call-%"))
    .fetch_all(pg)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let n = |i: usize| u64::try_from(r.get::<i64, _>(i)).unwrap_or(0);
            let tier: Option<String> = r.get(8);
            let usage = Usage {
                input_tokens: n(2),
                output_tokens: n(3),
                cache_creation_input_tokens: n(4) + n(5),
                cache_read_input_tokens: n(6),
                cache_creation: CacheCreation {
                    ephemeral_5m_input_tokens: n(4),
                    ephemeral_1h_input_tokens: n(5),
                },
                output_tokens_details: OutputTokensDetails {
                    thinking_tokens: n(7),
                },
                service_tier: match tier.as_deref() {
                    Some("batch") => ServiceTier::Batch,
                    Some("priority") => ServiceTier::Priority,
                    _ => ServiceTier::Standard,
                },
            };
            StoredRunRow {
                source: r.get(0),
                cache_key: r.get(1),
                usage,
                stored: RunCost {
                    usd: r.get(9),
                    without_prompt_cache_usd: r.get(10),
                    without_session_cache_usd: r.get(11),
                    without_caching_usd: r.get(12),
                },
            }
        })
        .collect())
}

/// Sums of the stored cost columns.
fn stored_sums(runs: &[StoredRunRow]) -> RunCost {
    runs.iter()
        .fold(RunCost::default(), |acc, r| add(acc, r.stored))
}

fn add(a: RunCost, b: RunCost) -> RunCost {
    RunCost {
        usd: a.usd + b.usd,
        without_prompt_cache_usd: a.without_prompt_cache_usd + b.without_prompt_cache_usd,
        without_session_cache_usd: a.without_session_cache_usd + b.without_session_cache_usd,
        without_caching_usd: a.without_caching_usd + b.without_caching_usd,
    }
}

/// The runs' costs at `model`'s prices, from their token columns, the way analyze_call
/// prices them: an LLM run by its usage, a session-cache hit by the LLM run of its key.
fn repriced(runs: &[StoredRunRow], model: &ModelInfo) -> RunCost {
    let origins: HashMap<&str, Cost> = runs
        .iter()
        .filter(|r| r.source == "llm")
        .map(|r| (r.cache_key.as_str(), Cost::of(model, &r.usage)))
        .collect();
    runs.iter().fold(RunCost::default(), |acc, r| {
        let cost = if r.source == "llm" {
            RunCost::computed(Cost::of(model, &r.usage))
        } else {
            RunCost::hit(
                origins
                    .get(r.cache_key.as_str())
                    .copied()
                    .unwrap_or_default(),
            )
        };
        add(acc, cost)
    })
}

/// The stored columns must be what re-pricing the token columns gives, and the LLM runs must
/// be the requests the emulator answered.
fn check_consistency(s: &Scenario, model: &ModelInfo) -> anyhow::Result<()> {
    let stored = stored_sums(&s.runs);
    let again = repriced(&s.runs, model);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(1.0);
    if !(close(stored.usd, again.usd)
        && close(stored.without_caching_usd, again.without_caching_usd))
    {
        bail!("stored costs {stored:?} differ from the re-priced token columns {again:?}");
    }
    let llm_runs = s.runs.iter().filter(|r| r.source == "llm").count();
    if llm_runs != s.requests.len() {
        bail!(
            "{} LLM runs stored but the emulator answered {} requests",
            llm_runs,
            s.requests.len()
        );
    }
    Ok(())
}

/// Runs and token totals of a scenario.
fn scenario_figures(s: &Scenario) -> Value {
    let mut sources: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &s.runs {
        *sources.entry(r.source.as_str()).or_default() += 1;
    }
    let sum = |f: fn(&RecordedRequest) -> u64| s.requests.iter().map(f).sum::<u64>();
    json!({
        "scenario": s.mode.name(),
        "prompt_order": match s.mode.order() {
            BlockOrder::TranscriptCached => "transcript_cached",
            BlockOrder::CriteriaCached => "criteria_cached",
        },
        "analysis_runs": s.runs.len(),
        "by_source": sources,
        "llm_requests": s.requests.len(),
        "tokens": {
            "input": sum(|r| r.input_tokens),
            "cache_write_5m": sum(|r| r.cache_write_5m_tokens),
            "cache_write_1h": sum(|r| r.cache_write_1h_tokens),
            "cache_read": sum(|r| r.cache_read_tokens),
            "output": sum(|r| r.output_tokens),
            "thinking": sum(|r| r.thinking_tokens),
        },
        "blocks": block_sizes(&s.requests),
    })
}

/// What a prompt block is, from its opening tag.
fn block_kind(head: &str, section: &str) -> &'static str {
    let tags = [
        ("<instructions>", "instructions"),
        ("<role_rubric", "role_rubric"),
        ("<knowledge_base>", "knowledge_base"),
        ("<transcript>", "transcript"),
        ("<dimension", "dimension_criteria"),
    ];
    let kind = tags
        .iter()
        .find(|(tag, _)| head.starts_with(tag))
        .map_or("other", |(_, kind)| *kind);
    match (section, kind) {
        ("user", "transcript") => "transcript_and_task",
        ("user", "dimension_criteria") => "dimension_criteria_and_task",
        _ => kind,
    }
}

/// Mean tokens of each kind of block over the scenario's requests, in prompt order.
fn block_sizes(requests: &[RecordedRequest]) -> Value {
    let mut order: Vec<&'static str> = Vec::new();
    let mut sums: HashMap<&'static str, (u64, u64, u64, u64)> = HashMap::new();
    for b in requests.iter().flat_map(|r| &r.blocks) {
        let kind = block_kind(&b.head, b.section);
        if !order.contains(&kind) {
            order.push(kind);
        }
        let e = sums.entry(kind).or_insert((0, 0, u64::MAX, 0));
        *e = (
            e.0 + b.tokens,
            e.1 + 1,
            e.2.min(b.tokens),
            e.3.max(b.tokens),
        );
    }
    let blocks: Vec<Value> = order
        .iter()
        .map(|kind| {
            let (sum, n, min, max) = sums[kind];
            json!({"block": kind, "mean_tokens": sum / n.max(1), "min": min, "max": max})
        })
        .collect();
    Value::Array(blocks)
}

/// Mean tokens of one kind of block in `s`.
fn mean_block(s: &Scenario, kind: &str) -> u64 {
    let sizes: Vec<u64> = s
        .requests
        .iter()
        .flat_map(|r| &r.blocks)
        .filter(|b| block_kind(&b.head, b.section) == kind)
        .map(|b| b.tokens)
        .collect();
    sizes.iter().sum::<u64>() / (sizes.len().max(1) as u64)
}

/// The workload's sizes as measured from the requests.
fn measured_sizes(tc: &Scenario, cc: &Scenario) -> Value {
    let n = tc.requests.len().max(1) as u64;
    let output = tc.requests.iter().map(|r| r.output_tokens).sum::<u64>() / n;
    let thinking = tc.requests.iter().map(|r| r.thinking_tokens).sum::<u64>() / n;
    let input = tc
        .requests
        .iter()
        .map(|r| r.blocks.iter().map(|b| b.tokens).sum::<u64>())
        .sum::<u64>()
        / n;
    json!({
        "instructions": mean_block(tc, "instructions"),
        "role_rubric": mean_block(tc, "role_rubric"),
        "knowledge_base": mean_block(tc, "knowledge_base"),
        "transcript": mean_block(tc, "transcript"),
        "dimension_criteria": mean_block(cc, "dimension_criteria"),
        "dimension_criteria_and_task": mean_block(tc, "dimension_criteria_and_task"),
        "input_per_analysis": input,
        "output_per_analysis": output,
        "of_which_thinking": thinking,
    })
}

/// The explanation of the figures against the targets, with the numbers (spec prices).
fn explanation(
    tc: &Scenario,
    bt: &Scenario,
    spec: &ModelInfo,
    figures: &Value,
    gap: Duration,
) -> String {
    let static_prefix = mean_block(tc, "instructions")
        + mean_block(tc, "role_rubric")
        + mean_block(tc, "knowledge_base");
    let distinct_calls = tc
        .requests
        .iter()
        .filter_map(|r| {
            r.blocks
                .iter()
                .find(|b| block_kind(&b.head, b.section) == "transcript")
                .map(|b| b.content_hash.clone())
        })
        .collect::<HashSet<_>>()
        .len();
    let output: u64 = tc.requests.iter().map(|r| r.output_tokens).sum();
    let f = |path: &[&str]| {
        path.iter()
            .fold(figures, |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let rewrites = distinct_calls.saturating_sub(1) as f64
        * static_prefix as f64
        * (spec.cache_write_5m - spec.cache_read)
        / 1e6;
    let output_usd = output as f64 * spec.output / 1e6;
    let none = f(&["no_caching"]);
    let with_batch = f(&["reductions_pct", "with_batch"]);
    let written_1h: u64 = bt.requests.iter().map(|r| r.cache_write_1h_tokens).sum();
    let extra_1h =
        written_1h as f64 * (spec.cache_write_1h - spec.cache_write_5m) / 1e6 * spec.batch_discount;
    let mut text = format!(
        "Interactive (no batch): the minimum (${min:.2} at Sonnet 4.5 prices) writes every \
         distinct sequence once, as if cache entries never expired. The calls are {gap:.0} \
         minutes apart, beyond both the 5-minute and the 1-hour TTL, so each of the \
         {distinct_calls} distinct calls writes the shared prefix (instructions + role rubric \
         + knowledge base, {static_prefix} tokens) again: {rewrites_n} re-writes x \
         {static_prefix} tokens x (${w:.2} write - ${r:.2} read) / MTok = ${rewrites:.2} more \
         than the minimum, and each request's dimension criteria + task are sent uncached \
         because the same dimension's next request is a call later. Under the TTL the minimum \
         is ${min_ttl:.2}; transcript_cached measures ${tc:.2} = {ratio_ttl:.3} x that and \
         {ratio:.3} x the TTL-free minimum, so 1.05 x the minimum is out of reach for calls \
         this far apart. Without batch the reduction is {direct:.1} % against the spec's \
         {target:.0} %, and the price rules allow at most {at_min:.1} % (TTL-free minimum), \
         {at_min_ttl:.1} % under the TTL: the output is paid whatever is cached, {output} \
         tokens (~{per:.0} per distinct analysis) x ${o:.0} / MTok = ${output_usd:.2}, \
         {share:.1} % of the no-caching ${none:.2}. ",
        min = f(&["minimum", "usd"]),
        gap = gap.as_secs_f64() / 60.0,
        rewrites_n = distinct_calls.saturating_sub(1),
        w = spec.cache_write_5m,
        r = spec.cache_read,
        min_ttl = f(&["minimum_under_ttl", "usd"]),
        tc = f(&["session_and_prompt_transcript_cached"]),
        ratio_ttl = f(&["ratio_to_minimum_under_ttl", "transcript_cached"]),
        ratio = f(&["ratio_to_minimum", "transcript_cached"]),
        direct = f(&["reductions_pct", "best_without_batch"]),
        target = SPEC_REDUCTION_PCT,
        at_min = f(&["reductions_pct", "at_minimum"]),
        at_min_ttl = f(&["reductions_pct", "at_minimum_under_ttl"]),
        per = output as f64 / tc.requests.len().max(1) as f64,
        o = spec.output,
        share = 100.0 * output_usd / none,
    );
    text.push_str(&format!(
        "With batch mode for the scheduled work (each day's new calls submitted together at \
         the day's end, half price): ${bt:.2}, a {with_batch:.1} % reduction, so the spec's \
         {target:.0} % is {verdict}; the batch minimum is ${bmin:.2} (TTL-free) and \
         ${bmin_ttl:.2} under the TTL, measured = {bratio:.3} x the latter. The gap is mostly \
         the batch path's 1-hour entries: {written_1h} tokens written at ${w1:.2} instead of \
         ${w:.2} / MTok (x {d} batch price) = ${extra_1h:.2}, where the day's batches, \
         answered within seconds of each other here, needed only 5-minute entries (a real \
         batch may take hours, so the 1-hour TTL is the safe choice), plus the criteria + task \
         blocks sent uncached.",
        bt = f(&["with_batch"]),
        target = SPEC_REDUCTION_PCT,
        verdict = if with_batch >= SPEC_REDUCTION_PCT {
            "reached"
        } else {
            "not reached"
        },
        bmin = f(&["batch_minimum", "usd"]),
        bmin_ttl = f(&["batch_minimum_under_ttl", "usd"]),
        bratio = f(&[
            "ratio_to_minimum_under_ttl",
            "with_batch_to_batch_minimum_under_ttl"
        ]),
        w1 = spec.cache_write_1h,
        w = spec.cache_write_5m,
        d = spec.batch_discount,
    ));
    text
}

// ---------------------------------------------------------------------------------------------
// The price-rule minimum (pure).

/// Prices in USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Uncached input.
    pub input: f64,
    /// Cache write, 5-minute TTL.
    pub write_5m: f64,
    /// Cache write, 1-hour TTL.
    pub write_1h: f64,
    /// Cache read.
    pub read: f64,
    /// Output.
    pub output: f64,
}

impl Rates {
    /// A model's standard (not batch) prices.
    pub fn of(model: &ModelInfo) -> Self {
        Self {
            input: model.input,
            write_5m: model.cache_write_5m,
            write_1h: model.cache_write_1h,
            read: model.cache_read,
            output: model.output,
        }
    }
}

/// One distinct request as the minimum sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sent {
    /// When it was sent.
    pub at: Duration,
    /// Its token sequences: an identity and a size.
    pub sequences: Vec<(String, u64)>,
    /// Output tokens.
    pub output_tokens: u64,
}

/// How token sequences are told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// By content: the same text anywhere in the prompt is the same sequence.
    Content,
    /// By prefix: the same only with everything before it the same (what a prompt cache reuses).
    Prefix,
}

/// Whether cache entries expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlRule {
    /// An entry, once written (5-minute price), serves every later use.
    Unlimited,
    /// An entry serves uses that follow each other within its TTL (5 minutes, or 1 hour at
    /// the 1-hour write price), whichever is cheaper.
    Expiring,
}

/// The minimum and what it is made of.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Minimum {
    /// USD.
    pub usd: f64,
    /// Tokens paid at the input price.
    pub uncached_tokens: u64,
    /// Tokens written to the cache.
    pub written_tokens: u64,
    /// Tokens read from the cache.
    pub read_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
}

impl Minimum {
    /// The same tokens at `factor` × the price (the batch discount).
    pub fn discounted(self, factor: f64) -> Self {
        Self {
            usd: self.usd * factor,
            ..self
        }
    }

    fn to_json(self) -> Value {
        json!({
            "usd": usd(self.usd),
            "uncached_tokens": self.uncached_tokens,
            "written_tokens": self.written_tokens,
            "read_tokens": self.read_tokens,
            "output_tokens": self.output_tokens,
        })
    }
}

/// The distinct requests of a recording (the same full prompt twice counts once: the session
/// cache should have answered it), their sequences identified by `identity`.
pub fn sent_requests(recorded: &[RecordedRequest], identity: Identity) -> Vec<Sent> {
    let mut seen = HashSet::new();
    recorded
        .iter()
        .filter(|r| seen.insert(r.blocks.last().map(|b| b.prefix_hash.clone())))
        .map(|r| Sent {
            at: r.at,
            sequences: r
                .blocks
                .iter()
                .map(|b| {
                    let id = match identity {
                        Identity::Content => &b.content_hash,
                        Identity::Prefix => &b.prefix_hash,
                    };
                    (id.clone(), b.tokens)
                })
                .collect(),
            output_tokens: r.output_tokens,
        })
        .collect()
}

/// The cheapest the price rules allow for `requests`: per sequence, the uses (in time order)
/// are split into runs each served by one cache entry (one write, then reads) or sent
/// uncached, whichever costs less; every output token is paid.
pub fn minimum(requests: &[Sent], rates: &Rates, ttl: TtlRule) -> Minimum {
    let mut uses: HashMap<&str, (u64, Vec<Duration>)> = HashMap::new();
    for r in requests {
        for (id, tokens) in &r.sequences {
            uses.entry(id.as_str())
                .or_insert_with(|| (*tokens, Vec::new()))
                .1
                .push(r.at);
        }
    }
    let output_tokens: u64 = requests.iter().map(|r| r.output_tokens).sum();
    let mut total = Minimum {
        usd: output_tokens as f64 * rates.output / 1e6,
        output_tokens,
        ..Minimum::default()
    };
    for (tokens, mut times) in uses.into_values() {
        times.sort();
        let best = cheapest(tokens, &times, rates, ttl);
        total.usd += best.usd;
        total.uncached_tokens += best.uncached_tokens;
        total.written_tokens += best.written_tokens;
        total.read_tokens += best.read_tokens;
    }
    total
}

/// Dynamic programme over one sequence's sorted use times: `best[i]` covers the first `i`.
fn cheapest(tokens: u64, times: &[Duration], rates: &Rates, ttl: TtlRule) -> Minimum {
    let per = |price: f64| tokens as f64 * price / 1e6;
    let entries: Vec<(Option<Duration>, f64)> = match ttl {
        TtlRule::Unlimited => vec![(None, rates.write_5m)],
        TtlRule::Expiring => vec![
            (Some(FIVE_MINUTES), rates.write_5m),
            (Some(ONE_HOUR), rates.write_1h),
        ],
    };
    let mut best = vec![Minimum::default(); times.len() + 1];
    for i in 1..=times.len() {
        let prev = best[i - 1];
        let mut choice = Minimum {
            usd: prev.usd + per(rates.input),
            uncached_tokens: prev.uncached_tokens + tokens,
            ..prev
        };
        for &(life, write) in &entries {
            // Uses j..i (0-based j..=i-1) served by one entry written at use j.
            let mut j = i - 1;
            loop {
                let reads = (i - 1 - j) as u64;
                let base = best[j];
                let usd = base.usd + per(write) + reads as f64 * per(rates.read);
                if usd < choice.usd {
                    choice = Minimum {
                        usd,
                        written_tokens: base.written_tokens + tokens,
                        read_tokens: base.read_tokens + reads * tokens,
                        uncached_tokens: base.uncached_tokens,
                        output_tokens: 0,
                    };
                }
                if j == 0 {
                    break;
                }
                let gap = times[j] - times[j - 1];
                if life.is_some_and(|life| gap > life) {
                    break;
                }
                j -= 1;
            }
        }
        best[i] = choice;
    }
    best[times.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sonnet 4.5's prices.
    fn spec() -> Rates {
        Rates::of(ModelTable::builtin().get(SPEC_MODEL).unwrap())
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn sent(at_secs: u64, sequences: &[(&str, u64)], output: u64) -> Sent {
        Sent {
            at: Duration::from_secs(at_secs),
            sequences: sequences.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            output_tokens: output,
        }
    }

    #[test]
    fn a_sequence_sent_once_pays_input_and_output_is_always_paid() {
        let m = minimum(
            &[sent(0, &[("a", 1_000)], 500)],
            &spec(),
            TtlRule::Unlimited,
        );
        // 1000 × $3 + 500 × $15 per MTok = 0.003 + 0.0075
        assert!(close(m.usd, 0.0105), "{m:?}");
        assert_eq!(
            (m.uncached_tokens, m.written_tokens, m.read_tokens),
            (1_000, 0, 0)
        );
        assert_eq!(m.output_tokens, 500);
    }

    #[test]
    fn a_repeated_sequence_is_written_once_and_read_after() {
        // Four analyses of one call: shared prefix S (10k) and transcript T (8k) in all
        // four, a different criteria block (1k) in each, 1.5k output each.
        let requests: Vec<Sent> = (0..4)
            .map(|d| {
                let c = format!("c{d}");
                Sent {
                    at: Duration::from_millis(d),
                    sequences: vec![("S".into(), 10_000), ("T".into(), 8_000), (c, 1_000)],
                    output_tokens: 1_500,
                }
            })
            .collect();
        let m = minimum(&requests, &spec(), TtlRule::Unlimited);
        // Writes 18k × $3.75 = 0.0675; reads 3 × 18k × $0.30 = 0.0162;
        // criteria 4k × $3 = 0.012; output 6k × $15 = 0.09. Total 0.1857.
        assert!(close(m.usd, 0.1857), "{m:?}");
        assert_eq!(m.written_tokens, 18_000);
        assert_eq!(m.read_tokens, 54_000);
        assert_eq!(m.uncached_tokens, 4_000);
    }

    #[test]
    fn expiry_forces_a_write_per_use_spaced_beyond_the_ttl() {
        // S in two requests 72 minutes apart, and twice within a minute.
        let far = [
            sent(0, &[("S", 10_000)], 0),
            sent(72 * 60, &[("S", 10_000)], 0),
        ];
        let unlimited = minimum(&far, &spec(), TtlRule::Unlimited);
        // Written once, read once: 0.0375 + 0.003.
        assert!(close(unlimited.usd, 0.0405), "{unlimited:?}");
        let expiring = minimum(&far, &spec(), TtlRule::Expiring);
        // Neither TTL bridges 72 minutes: both sent uncached, 2 × 0.03.
        assert!(close(expiring.usd, 0.06), "{expiring:?}");
        assert_eq!(expiring.uncached_tokens, 20_000);
        let near = [sent(0, &[("S", 10_000)], 0), sent(60, &[("S", 10_000)], 0)];
        assert!(close(
            minimum(&near, &spec(), TtlRule::Expiring).usd,
            0.0405
        ));
    }

    #[test]
    fn the_one_hour_entry_wins_when_uses_are_minutes_apart() {
        // Uses every 10 minutes for 50 minutes: 5-minute entries expire in between, a
        // 1-hour entry serves all six. 1h write 10k × $6 = 0.06 + 5 reads × 0.003 = 0.075,
        // against 6 × 0.03 = 0.18 uncached.
        let uses: Vec<Sent> = (0..6).map(|i| sent(i * 600, &[("S", 10_000)], 0)).collect();
        let m = minimum(&uses, &spec(), TtlRule::Expiring);
        assert!(close(m.usd, 0.075), "{m:?}");
        assert_eq!((m.written_tokens, m.read_tokens), (10_000, 50_000));
    }

    #[test]
    fn runs_split_where_a_gap_exceeds_the_ttl() {
        // Two bursts of four uses an hour and a half apart: one 5-minute entry per burst.
        let uses: Vec<Sent> = [0, 1, 2, 3, 5_400, 5_401, 5_402, 5_403]
            .iter()
            .map(|&t| sent(t, &[("S", 1_000_000)], 0))
            .collect();
        let m = minimum(&uses, &spec(), TtlRule::Expiring);
        // Per burst: $3.75 + 3 × $0.30 = $4.65.
        assert!(close(m.usd, 9.3), "{m:?}");
    }

    #[test]
    fn schedule_has_the_share_of_new_transcripts_and_repeats_only_earlier_ones() {
        let s = schedule(600, 70);
        assert_eq!(s.len(), 600);
        assert_eq!(s[0], 0);
        let distinct = s.iter().max().unwrap() + 1;
        assert_eq!(distinct, 180);
        let mut seen = 0;
        for &t in &s {
            assert!(t <= seen, "transcript {t} used before it was new");
            if t == seen {
                seen += 1;
            }
        }
        assert_eq!(schedule(600, 70), s, "deterministic");
    }

    #[test]
    fn generated_texts_have_the_asked_size_and_differ() {
        let a = normalized_transcript(&transcript("t", 1, 32_000));
        let b = normalized_transcript(&transcript("t", 2, 32_000));
        assert_ne!(a, b);
        let tokens = llm::estimate_tokens(&a);
        assert!((7_900..8_300).contains(&tokens), "{tokens}");
        let p = prose("Head.", 3_000, 5);
        assert!(p.starts_with("Head.") && (3_000..3_200).contains(&p.len()));
    }

    #[test]
    fn blocks_are_told_apart_by_their_opening_tag() {
        assert_eq!(
            block_kind("<instructions>\n# Sales", "system"),
            "instructions"
        );
        assert_eq!(
            block_kind("<role_rubric role=\"csm\">", "system"),
            "role_rubric"
        );
        assert_eq!(block_kind("<transcript>\nRep:", "system"), "transcript");
        assert_eq!(
            block_kind("<transcript>\nRep:", "user"),
            "transcript_and_task"
        );
        assert_eq!(
            block_kind("<dimension name=", "user"),
            "dimension_criteria_and_task"
        );
        assert_eq!(
            block_kind("<dimension name=", "system"),
            "dimension_criteria"
        );
    }
}
