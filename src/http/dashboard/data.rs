//! What the dashboard shows, read fresh for every page view. The time series come from
//! Postgres, not from history kept in the web process: throughput buckets the ledger's
//! `finished_at` per hour, hit rates bucket `analysis_runs.created_at` per day. So every
//! replica of the front draws the same charts, a restart loses nothing, and the window is
//! bounded by what the tables keep (`JOB_RETENTION_DAYS` for the ledger).

use super::super::AppState;
use crate::{
    ledger::{self, JobFilter, JobRow, JobState},
    llm::limits::{SpendBudgets, SpendTotals},
    stats::{self, CacheStats},
};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sqlx::PgPool;
use std::collections::HashMap;

/// Rows shown per job table.
pub const JOBS_PER_TABLE: i64 = 25;
/// Hours of the throughput chart.
pub const THROUGHPUT_HOURS: i64 = 24;
/// Finished states the throughput chart draws, in legend order.
pub const FINISHED: [JobState; 3] = [JobState::Succeeded, JobState::Failed, JobState::Cancelled];

/// One schedule entry as the schedule panel shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRow {
    /// Entry name.
    pub name: String,
    /// Job kind it enqueues.
    pub kind: String,
    /// Cron expression (with its timezone, as the scheduler prints it).
    pub cron: String,
    /// Whether it fires.
    pub enabled: bool,
    /// When it last enqueued its job.
    pub last_run: Option<DateTime<Utc>>,
    /// When it fires next.
    pub next_run: Option<DateTime<Utc>>,
}

/// The job tables.
#[derive(Clone, Debug, Default)]
pub struct JobTables {
    /// Running now.
    pub running: Vec<JobRow>,
    /// Queued or snoozed (cancellable).
    pub waiting: Vec<JobRow>,
    /// Failed for good: the dead-letter list (retryable).
    pub failed: Vec<JobRow>,
    /// Cancelled (retryable).
    pub cancelled: Vec<JobRow>,
    /// Recently succeeded.
    pub succeeded: Vec<JobRow>,
}

/// Finished jobs per hour and outcome.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Start of each hour, oldest first.
    pub hours: Vec<DateTime<Utc>>,
    /// Per state of [`FINISHED`], one count per hour.
    pub counts: Vec<Vec<i64>>,
}

/// Hit rates per day and tier.
#[derive(Clone, Debug)]
pub struct HitRates {
    /// Each day, oldest first.
    pub days: Vec<DateTime<Utc>>,
    /// Redis hits, % of the day's analyses (`None`: no analyses that day).
    pub redis: Vec<Option<f64>>,
    /// Postgres hits, % of the analyses Redis missed.
    pub database: Vec<Option<f64>>,
}

/// The schedule panel's state.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// No scheduler is wired into this front.
    NotConfigured,
    /// The scheduler's entries.
    Entries(Vec<ScheduleRow>),
    /// The scheduler could not list them.
    Failed(String),
}

/// Everything on the page.
pub struct Dashboard {
    /// Waiting jobs per lane.
    pub queue_depth: Vec<(String, i64)>,
    /// Throughput chart.
    pub throughput: Throughput,
    /// Job tables.
    pub jobs: JobTables,
    /// Hit-rate chart.
    pub hit_rates: HitRates,
    /// The stats report over the window, with the dimension breakdown.
    pub stats: CacheStats,
    /// LLM spend in the current windows.
    pub spend: SpendTotals,
    /// LLM budgets.
    pub budgets: SpendBudgets,
    /// Schedule panel.
    pub schedule: Schedule,
}

/// Reads the whole page's data; `days` is the window of the cache panels.
pub async fn load(state: &AppState, days: i32) -> Result<Dashboard, sqlx::Error> {
    let pg = &state.pg;
    let stats = stats::collect(pg, &state.redis, days, true).await;
    Ok(Dashboard {
        queue_depth: ledger::queue_depth(pg).await?,
        throughput: throughput(pg, Utc::now()).await?,
        jobs: job_tables(pg).await?,
        hit_rates: hit_rates(pg, days, Utc::now()).await?,
        stats,
        spend: state.spend.spent().await,
        budgets: state.spend.budgets(),
        schedule: schedule(state.schedule.as_deref()).await,
    })
}

async fn job_tables(pg: &PgPool) -> sqlx::Result<JobTables> {
    let of = |state: JobState| async move {
        let filter = JobFilter {
            state: Some(state),
            ..Default::default()
        };
        ledger::jobs(pg, &filter, JOBS_PER_TABLE).await
    };
    let mut waiting = of(JobState::Queued).await?;
    waiting.extend(of(JobState::Snoozed).await?);
    Ok(JobTables {
        running: of(JobState::Running).await?,
        waiting,
        failed: of(JobState::Failed).await?,
        cancelled: of(JobState::Cancelled).await?,
        succeeded: of(JobState::Succeeded).await?,
    })
}

/// Jobs finished per hour over the last [`THROUGHPUT_HOURS`] hours, by outcome.
async fn throughput(pg: &PgPool, now: DateTime<Utc>) -> sqlx::Result<Throughput> {
    let rows: Vec<(DateTime<Utc>, String, i64)> = sqlx::query_as(
        "SELECT date_trunc('hour', finished_at, 'UTC'), status, count(*) FROM jobs
         WHERE finished_at > date_trunc('hour', now(), 'UTC') - make_interval(hours => $1)
         GROUP BY 1, 2",
    )
    .bind(THROUGHPUT_HOURS as i32 - 1)
    .fetch_all(pg)
    .await?;
    let hours = buckets(now, TimeDelta::hours(1), THROUGHPUT_HOURS);
    let by_key: HashMap<(DateTime<Utc>, &str), i64> = rows
        .iter()
        .map(|(hour, status, n)| ((*hour, status.as_str()), *n))
        .collect();
    let counts = FINISHED
        .iter()
        .map(|state| {
            hours
                .iter()
                .map(|h| by_key.get(&(*h, state.as_str())).copied().unwrap_or(0))
                .collect()
        })
        .collect();
    Ok(Throughput { hours, counts })
}

/// Per-day hit rates of both tiers over the last `days` days, as [`stats`] defines them.
async fn hit_rates(pg: &PgPool, days: i32, now: DateTime<Utc>) -> sqlx::Result<HitRates> {
    let rows: Vec<(DateTime<Utc>, String, i64)> = sqlx::query_as(
        "SELECT date_trunc('day', created_at, 'UTC'), source, count(*) FROM analysis_runs
         WHERE created_at > date_trunc('day', now(), 'UTC') - make_interval(days => $1)
         GROUP BY 1, 2",
    )
    .bind(days - 1)
    .fetch_all(pg)
    .await?;
    let day_starts = buckets(now, TimeDelta::days(1), i64::from(days));
    let count = |day: &DateTime<Utc>, source: &str| -> i64 {
        rows.iter()
            .filter(|(d, s, _)| d == day && s == source)
            .map(|(_, _, n)| n)
            .sum()
    };
    let mut redis = Vec::new();
    let mut database = Vec::new();
    for day in &day_starts {
        let (r, p, l) = (
            count(day, "redis"),
            count(day, "postgres"),
            count(day, "llm"),
        );
        redis.push((r + p + l > 0).then(|| stats::percent(r, r + p + l)));
        database.push((p + l > 0).then(|| stats::percent(p, p + l)));
    }
    Ok(HitRates {
        days: day_starts,
        redis,
        database,
    })
}

/// The starts of the last `n` buckets of `width` up to the one holding `now`, oldest first.
fn buckets(now: DateTime<Utc>, width: TimeDelta, n: i64) -> Vec<DateTime<Utc>> {
    let current = now.duration_trunc(width).unwrap_or(now);
    (0..n).rev().map(|i| current - width * i as i32).collect()
}

async fn schedule(source: Option<&crate::schedule::DashboardSchedule>) -> Schedule {
    let Some(source) = source else {
        return Schedule::NotConfigured;
    };
    match source.entries().await {
        Ok(rows) => Schedule::Entries(rows),
        Err(e) => Schedule::Failed(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_end_with_the_current_one() {
        let now: DateTime<Utc> = "2026-12-02T15:42:10Z".parse().unwrap();
        let hours = buckets(now, TimeDelta::hours(1), 3);
        let expected: Vec<DateTime<Utc>> = [
            "2026-12-02T13:00:00Z",
            "2026-12-02T14:00:00Z",
            "2026-12-02T15:00:00Z",
        ]
        .map(|s| s.parse().unwrap())
        .to_vec();
        assert_eq!(hours, expected);
        let days = buckets(now, TimeDelta::days(1), 2);
        assert_eq!(
            days[1],
            "2026-12-02T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }
}
