//! The built-in scheduler (`callcoach scheduler`): enqueues the recurring jobs of the
//! schedule file ([`mod@file`]) at their cron ticks, exactly once per tick however many
//! schedulers run.
//!
//! - **Ticks** are computed here ([`tick`]) in the file's IANA timezone with croner over naive
//!   local times, so they follow daylight-saving changes. tokio-cron-scheduler is only the
//!   heartbeat: a one-second job in UTC that wakes [`Scheduler::enqueue_due`]. Its own
//!   timezone support fixes the UTC offset when a job is created, so a job built in winter
//!   would fire an hour off all summer; a UTC heartbeat has no offset to get wrong.
//! - **Exactly once**: each tick is enqueued through the job ledger with the dedup key
//!   `cron:{name}:{tick}` (tick in RFC 3339 UTC). The ledger's insert is `ON CONFLICT
//!   (dedup_key) DO NOTHING`, so when two schedulers enqueue the same tick one creates the
//!   job and the other finds it ([`crate::queue::Enqueued::created`] is false).
//! - **Catch-up**: at each heartbeat an entry's due tick is the latest tick ≤ now, later than
//!   the last one enqueued, within `SCHEDULE_CATCH_UP_GRACE_SECS`
//!   ([`tick::Timetable::due`]). A scheduler that was down enqueues the tick it missed once
//!   on its return; older missed ticks are never replayed. The last tick enqueued comes from
//!   the ledger at start-up (index `jobs_cron_dedup_idx`), so a restart neither repeats nor
//!   forgets one. The grace is kept below `JOB_RETENTION_DAYS` so a tick's ledger row outlives
//!   the window in which it could be enqueued again.
//! - A failed enqueue (Postgres down) is logged and counted; the next heartbeat tries again
//!   while the tick is within the grace.

pub mod file;
pub mod tick;

pub use file::{Entry, Schedule, ScheduleError};

use crate::{App, delivery::Lane, queue::Queue, telemetry::names};
use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;
use std::{collections::HashMap, time::Duration};
use tokio_util::sync::CancellationToken;

/// The dedup key of `entry`'s job for `tick`.
pub fn dedup_key(entry: &str, tick: DateTime<Utc>) -> String {
    format!(
        "{}{}",
        key_prefix(entry),
        tick.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// `cron:{name}:`, the prefix of every dedup key of `entry` (names hold no `:`).
fn key_prefix(entry: &str) -> String {
    format!("cron:{entry}:")
}

/// The latest ledger job of a schedule entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastRun {
    /// The tick it was enqueued for.
    pub tick: DateTime<Utc>,
    /// Its ledger state (`queued`, `succeeded`, …).
    pub status: String,
}

/// The latest tick enqueued for `entry`, from the ledger. Fixed-width RFC 3339 ticks sort as
/// text in time order, so this is one backward step on `jobs_cron_dedup_idx`.
pub async fn last_run(pg: &PgPool, entry: &str) -> sqlx::Result<Option<LastRun>> {
    let prefix = key_prefix(entry);
    // `;` follows `:`: every key with the prefix sorts in [prefix, upper).
    let upper = format!("cron:{entry};");
    let row: Option<(String, String)> = sqlx::query_as(
        r#"SELECT dedup_key, status FROM jobs
           WHERE dedup_key LIKE 'cron:%'
             AND dedup_key COLLATE "C" >= $1 AND dedup_key COLLATE "C" < $2
           ORDER BY dedup_key COLLATE "C" DESC
           LIMIT 1"#,
    )
    .bind(&prefix)
    .bind(&upper)
    .fetch_optional(pg)
    .await?;
    Ok(row.and_then(|(key, status)| {
        let tick = DateTime::parse_from_rfc3339(key.strip_prefix(&prefix)?).ok()?;
        Some(LastRun {
            tick: tick.with_timezone(&Utc),
            status,
        })
    }))
}

/// What one pass of [`Scheduler::enqueue_due`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Ticks this scheduler created a job for, as `(entry, tick)`.
    pub enqueued: Vec<(String, DateTime<Utc>)>,
    /// Due ticks another scheduler had already enqueued.
    pub already_enqueued: usize,
    /// Due ticks whose enqueue failed (tried again at the next heartbeat).
    pub failed: usize,
}

/// Enqueues the due ticks of a schedule. One per process; any number may run at once.
pub struct Scheduler {
    schedule: Schedule,
    queue: Queue,
    pg: PgPool,
    grace: Duration,
    /// Latest tick enqueued (by anyone) per entry name; filled from the ledger on first use.
    last: Option<HashMap<String, DateTime<Utc>>>,
}

impl Scheduler {
    /// A scheduler enqueueing through `queue`, reading last runs from `pg`.
    pub fn new(schedule: Schedule, queue: Queue, pg: PgPool, grace: Duration) -> Self {
        Self {
            schedule,
            queue,
            pg,
            grace,
            last: None,
        }
    }

    /// A scheduler over `app`'s ledger with its configured catch-up grace.
    pub fn for_app(app: &App, schedule: Schedule) -> Self {
        Self::new(
            schedule,
            app.queue.clone(),
            app.pg.clone(),
            app.settings.schedule_catch_up_grace,
        )
    }

    /// Enqueues every enabled entry's due tick at `now` (see [`tick::Timetable::due`]).
    /// Errors only when the last runs cannot be read from the ledger at first use.
    pub async fn enqueue_due(&mut self, now: DateTime<Utc>) -> anyhow::Result<Pass> {
        let last = match self.last.take() {
            Some(last) => last,
            None => self.read_last().await?,
        };
        let last = self.last.insert(last);
        let mut pass = Pass::default();
        for entry in self.schedule.enabled() {
            let previous = last.get(&entry.name).copied();
            let Some(tick) = entry.timetable.due(previous, now, self.grace) else {
                continue;
            };
            let job = entry
                .job
                .clone()
                .dedup_key(dedup_key(&entry.name, tick))
                .on_lane(Lane::Background);
            let outcome = match self.queue.enqueue(job).await {
                Ok(e) if e.created => {
                    tracing::info!(entry = %entry.name, %tick, job_id = %e.job_id, "scheduled job enqueued");
                    pass.enqueued.push((entry.name.clone(), tick));
                    "enqueued"
                }
                Ok(_) => {
                    pass.already_enqueued += 1;
                    "already_enqueued"
                }
                Err(e) => {
                    tracing::warn!(entry = %entry.name, %tick, error = %e, "enqueueing a scheduled job failed; retrying at the next heartbeat");
                    pass.failed += 1;
                    metrics::counter!(names::SCHEDULE_TICKS, "entry" => entry.name.clone(), "outcome" => "failed").increment(1);
                    continue;
                }
            };
            metrics::counter!(names::SCHEDULE_TICKS, "entry" => entry.name.clone(), "outcome" => outcome).increment(1);
            last.insert(entry.name.clone(), tick);
        }
        Ok(pass)
    }

    async fn read_last(&self) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
        let mut last = HashMap::new();
        for entry in self.schedule.enabled() {
            if let Some(run) = last_run(&self.pg, &entry.name)
                .await
                .with_context(|| format!("reading the last run of job {:?}", entry.name))?
            {
                last.insert(entry.name.clone(), run.tick);
            }
        }
        Ok(last)
    }

    /// Runs until `shutdown`: a pass at once (catching up), then one per heartbeat.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (tx, mut beats) = tokio::sync::mpsc::channel::<()>(1);
        let mut heart = heartbeat(tx).await?;
        tracing::info!(
            schedule = %self.schedule.origin,
            timezone = %self.schedule.timezone,
            entries = self.schedule.enabled().count(),
            "scheduler started"
        );
        let mut beat = Some(());
        while beat.is_some() {
            if let Err(e) = self.enqueue_due(Utc::now()).await {
                tracing::warn!(error = %format!("{e:#}"), "scheduler pass failed; retrying at the next heartbeat");
            }
            beat = shutdown.run_until_cancelled(beats.recv()).await.flatten();
        }
        heart.shutdown().await.context("stopping the heartbeat")?;
        tracing::info!("scheduler stopped");
        Ok(())
    }
}

/// A started tokio-cron-scheduler with one job, every second in UTC, that signals `tx`
/// (a full channel means a pass is pending: the beat is dropped, not queued).
async fn heartbeat(
    tx: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<tokio_cron_scheduler::JobScheduler> {
    use tokio_cron_scheduler::{Job, JobScheduler};
    let heart = JobScheduler::new()
        .await
        .context("creating the heartbeat")?;
    let job = Job::new_async("* * * * * *", move |_, _| {
        let _ = tx.try_send(());
        Box::pin(async {})
    })
    .context("creating the heartbeat job")?;
    heart.add(job).await.context("adding the heartbeat job")?;
    heart.start().await.context("starting the heartbeat")?;
    Ok(heart)
}

/// One line of `callcoach schedule list`.
#[derive(Clone, Debug)]
pub struct Listed {
    /// The entry.
    pub entry: Entry,
    /// Its latest job in the ledger.
    pub last: Option<LastRun>,
    /// Its next tick after now (None when disabled).
    pub next: Option<DateTime<Utc>>,
}

/// Every entry with its last run (from the ledger) and next tick after `now`.
pub async fn list(
    pg: &PgPool,
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<Listed>> {
    let mut rows = Vec::with_capacity(schedule.entries.len());
    for entry in &schedule.entries {
        rows.push(Listed {
            last: last_run(pg, &entry.name).await?,
            next: entry
                .enabled
                .then(|| entry.timetable.next_after(now))
                .flatten(),
            entry: entry.clone(),
        });
    }
    Ok(rows)
}

/// The `schedule list` table.
pub fn table(schedule: &Schedule, rows: &[Listed]) -> String {
    let tz = schedule.timezone;
    let when = |t: DateTime<Utc>| {
        format!(
            "{} ({})",
            t.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z"),
            t.format("%Y-%m-%dT%H:%M:%SZ")
        )
    };
    let mut out = format!(
        "{:<24} {:<24} {:<16} {:<16} {:<8} {:<54} {}\n",
        "NAME", "KIND", "CRON", "TIMEZONE", "ENABLED", "LAST RUN", "NEXT RUN"
    );
    for row in rows {
        let e = &row.entry;
        let last = row
            .last
            .as_ref()
            .map(|l| format!("{} {}", when(l.tick), l.status))
            .unwrap_or_else(|| "never".into());
        let next = row.next.map(when).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<24} {:<24} {:<16} {:<16} {:<8} {:<54} {}\n",
            e.name,
            e.job.kind(),
            e.cron,
            tz.name(),
            if e.enabled { "yes" } else { "no" },
            last,
            next
        ));
    }
    out
}

/// The schedule panel of the dashboard: the schedule file this process was configured with
/// (`SCHEDULE_FILE`, or the built-in one), each entry with its last run from the ledger.
/// A file that does not load is shown as the panel's error, so the web role still starts.
pub struct DashboardSchedule {
    pg: PgPool,
    schedule: Result<Schedule, String>,
}

impl DashboardSchedule {
    /// Loads the schedule file from `path` (the built-in one for `None`).
    pub fn load(pg: PgPool, path: Option<&std::path::Path>) -> Self {
        let schedule = Schedule::load(path).map_err(|e| e.to_string());
        Self { pg, schedule }
    }

    /// The panel's rows, in the file's order; a file that did not load is the error.
    pub async fn entries(&self) -> anyhow::Result<Vec<crate::http::dashboard::ScheduleRow>> {
        let schedule = self.schedule.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let rows = list(&self.pg, schedule, Utc::now()).await?;
        Ok(rows
            .into_iter()
            .map(|row| crate::http::dashboard::ScheduleRow {
                name: row.entry.name,
                kind: row.entry.job.kind().to_string(),
                cron: format!("{} ({})", row.entry.cron, schedule.timezone),
                enabled: row.entry.enabled,
                last_run: row.last.map(|l| l.tick),
                next_run: row.next,
            })
            .collect())
    }
}
