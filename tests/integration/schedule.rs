//! The scheduler against real Redis and Postgres: concurrent schedulers enqueue each tick
//! once, a restarted one catches up only the latest missed tick, ticks follow a real
//! timezone's daylight-saving changes, and `callcoach schedule` reports bad files and last
//! runs. Time is injected (`Scheduler::enqueue_due(now)`), so no test waits for a tick.

use crate::{
    cli::{callcoach, stderr},
    helpers::{TestApp, spawn_app},
};
use callcoach::schedule::{Schedule, Scheduler};
use chrono::{DateTime, Duration as Span, Utc};
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);

fn schedule(text: &str) -> Schedule {
    Schedule::parse(text, "test").unwrap()
}

/// One `noop` entry called `tick` on `cron`, in UTC.
fn every(cron: &str) -> Schedule {
    schedule(&format!(
        "timezone = \"UTC\"\n[[job]]\nname = \"tick\"\ncron = \"{cron}\"\nkind = \"noop\"\n"
    ))
}

fn scheduler(app: &TestApp, schedule: Schedule, grace: Duration) -> Scheduler {
    Scheduler::new(schedule, app.app.queue.clone(), app.app.pg.clone(), grace)
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

/// Every cron dedup key in the ledger, with how many jobs carry it, in order.
async fn cron_keys(app: &TestApp) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT dedup_key, count(*) FROM jobs WHERE dedup_key LIKE 'cron:%'
         GROUP BY dedup_key ORDER BY dedup_key",
    )
    .fetch_all(&app.app.pg)
    .await
    .unwrap()
}

/// Jobs of the `noop` kind the schedules enqueue, all on the background lane.
async fn noop_jobs(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'noop' AND lane = 'background'")
        .fetch_one(&app.app.pg)
        .await
        .unwrap()
}

fn once(keys: &[&str]) -> Vec<(String, i64)> {
    keys.iter().map(|k| (k.to_string(), 1)).collect()
}

#[tokio::test]
async fn two_schedulers_enqueue_every_tick_exactly_once() {
    let app = spawn_app().await;
    let t0 = at("2031-01-01T00:00:00.100Z");
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut s = scheduler(&app, every("*/2 * * * * *"), HOUR);
        let barrier = barrier.clone();
        runs.push(tokio::spawn(async move {
            let (mut created, mut already) = (0, 0);
            // 10 s of schedule time in 250 ms steps, both schedulers at the same instants.
            for step in 0..40 {
                barrier.wait().await;
                let pass = s
                    .enqueue_due(t0 + Span::milliseconds(250 * step))
                    .await
                    .unwrap();
                assert_eq!(pass.failed, 0);
                created += pass.enqueued.len();
                already += pass.already_enqueued;
            }
            (created, already)
        }));
    }
    let mut totals = (0, 0);
    for run in runs {
        let (created, already) = run.await.unwrap();
        totals = (totals.0 + created, totals.1 + already);
    }
    let ticks = ["00", "02", "04", "06", "08"].map(|s| format!("cron:tick:2031-01-01T00:00:{s}Z"));
    assert_eq!(
        cron_keys(&app).await,
        once(&ticks.iter().map(String::as_str).collect::<Vec<_>>())
    );
    // Each tick was created by one of them; the other found it enqueued (or, when the first
    // had already committed it before the other's pass read the ledger, never saw it due).
    assert_eq!(totals.0, 5, "{totals:?}");
    assert!(totals.1 <= 5, "{totals:?}");
    assert_eq!(noop_jobs(&app).await, 5, "one background job per tick");
}

#[tokio::test]
async fn schedulers_driven_by_the_heartbeat_enqueue_each_tick_once() {
    let app = spawn_app().await;
    let stop = CancellationToken::new();
    let runs: Vec<_> = (0..2)
        .map(|_| tokio::spawn(scheduler(&app, every("* * * * * *"), HOUR).run(stop.clone())))
        .collect();
    for _ in 0..200 {
        if cron_keys(&app).await.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    let keys = cron_keys(&app).await;
    assert!(keys.len() >= 3, "the heartbeat drove passes: {keys:?}");
    assert!(keys.iter().all(|(_, n)| *n == 1), "{keys:?}");
    assert_eq!(
        noop_jobs(&app).await as usize,
        keys.len(),
        "one job per tick"
    );
}

#[tokio::test]
async fn a_restarted_scheduler_catches_up_the_latest_missed_tick_once() {
    let app = spawn_app().await;
    let mut first = scheduler(&app, every("*/2 * * * * *"), HOUR);
    first
        .enqueue_due(at("2031-01-01T00:00:00.100Z"))
        .await
        .unwrap();
    drop(first);
    // Down for 10 s: ticks 02, 04, 06 and 08 are missed; only 10 is caught up.
    let mut again = scheduler(&app, every("*/2 * * * * *"), HOUR);
    let pass = again
        .enqueue_due(at("2031-01-01T00:00:10.100Z"))
        .await
        .unwrap();
    assert_eq!(
        pass.enqueued,
        [("tick".to_string(), at("2031-01-01T00:00:10Z"))]
    );
    let pass = again
        .enqueue_due(at("2031-01-01T00:00:11.900Z"))
        .await
        .unwrap();
    assert!(
        pass.enqueued.is_empty() && pass.already_enqueued == 0,
        "{pass:?}"
    );
    // Back after the grace: the latest tick is too old, nothing is enqueued.
    let mut late = scheduler(&app, every("*/2 * * * * *"), Duration::from_secs(1));
    let pass = late
        .enqueue_due(at("2031-01-01T00:00:13.500Z"))
        .await
        .unwrap();
    assert!(pass.enqueued.is_empty(), "{pass:?}");
    assert_eq!(
        cron_keys(&app).await,
        once(&[
            "cron:tick:2031-01-01T00:00:00Z",
            "cron:tick:2031-01-01T00:00:10Z"
        ])
    );
}

#[tokio::test]
async fn ticks_follow_daylight_saving_changes_in_new_york() {
    let app = spawn_app().await;
    let nightly = schedule(
        r#"timezone = "America/New_York"
[[job]]
name = "spring"
cron = "0 30 2 * * *"
kind = "noop"
[[job]]
name = "fall"
cron = "0 30 1 * * *"
kind = "noop"
[[job]]
name = "off"
cron = "* * * * * *"
kind = "noop"
enabled = false
"#,
    );
    let mut s = scheduler(&app, nightly, Duration::from_secs(60));
    for now in [
        "2026-03-08T07:00:05Z", // 03:00:05 EDT: 02:30 was skipped, it fires at the gap's end
        "2026-11-01T05:30:05Z", // 01:30:05 EDT, the first 01:30
        "2026-11-01T06:30:05Z", // 01:30:05 EST, the repeated 01:30: no tick
    ] {
        s.enqueue_due(at(now)).await.unwrap();
    }
    assert_eq!(
        cron_keys(&app).await,
        once(&[
            "cron:fall:2026-11-01T05:30:00Z",
            "cron:spring:2026-03-08T07:00:00Z"
        ])
    );
}

/// A schedule file in the temporary directory.
fn schedule_file(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("schedule-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_schedule_file_is_refused_naming_the_entry() {
    let path = schedule_file(
        "timezone = \"UTC\"\n[[job]]\nname = \"nightly\"\ncron = \"0 0 2 * * *\"\nkind = \"launch_rockets\"\n",
    );
    let path = path.to_str().unwrap();
    for args in [
        ["schedule", "list", "--schedule", path].as_slice(),
        &["schedule", "check", "--schedule", path],
        &["scheduler", "--schedule", path],
    ] {
        let out = callcoach(&[], args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("job \"nightly\": unknown kind \"launch_rockets\""),
            "{args:?}: {err}"
        );
    }
    let out = callcoach(
        &[],
        &["schedule", "check", "--schedule", "/no/such/schedule.toml"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/no/such/schedule.toml"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn schedule_list_shows_the_last_and_next_runs() {
    let app = spawn_app().await;
    let text = r#"timezone = "Europe/Berlin"
[[job]]
name = "hourly"
cron = "0 0 * * * *"
kind = "noop"
[[job]]
name = "weekly"
cron = "0 0 4 * * Sun"
kind = "maintain_tables"
enabled = false
"#;
    let path = schedule_file(text);
    let now = Utc::now();
    scheduler(&app, schedule(text), HOUR)
        .enqueue_due(now)
        .await
        .unwrap();
    let tick = callcoach::schedule::last_run(&app.app.pg, "hourly")
        .await
        .unwrap()
        .unwrap()
        .tick;
    let out = callcoach(
        &[
            ("DATABASE_URL", &app.env["DATABASE_URL"]),
            ("REDIS_URL", &app.env["REDIS_URL"]),
        ],
        &["schedule", "list", "--schedule", path.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in\n{stdout}"))
            .to_string()
    };
    let hourly = line("hourly");
    let utc = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for wanted in ["noop", "Europe/Berlin", &format!("{}) queued", utc(tick))] {
        assert!(hourly.contains(wanted), "{wanted} not in {hourly}");
    }
    // The next tick after the listing (an hour boundary may have passed since the pass).
    let next = [1, 2].map(|h| utc(tick + Span::hours(h)));
    assert!(
        next.iter().any(|n| hourly.ends_with(&format!("({n})"))),
        "{hourly}"
    );
    let weekly = line("weekly");
    assert!(
        weekly.contains(" no ") && weekly.contains("never"),
        "{weekly}"
    );
}
