//! The ledger's promises: the state set, guarded transitions, the rescuer, relay
//! coordination, enqueue inside a transaction, the registry as the only way in, lanes,
//! bounded growth, drain on shutdown.

use crate::helpers::{Options, TestApp, assert_enqueued, perform, spawn_app, spawn_app_with};
use callcoach::{
    delivery::Lane,
    jobs::{Job, Noop, RunLabel},
    ledger::{self, JobState, Outcome, relay::Upkeep},
    llm::emulator::EmulatorConfig,
    queue::{NewJob, QueueError},
};
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

/// Inserts a ledger row directly (state, delivery, attempts/budget).
async fn row(app: &TestApp, state: JobState, delivery: i32, attempts: i32, budget: i32) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, delivery, attempts, max_attempts)
         VALUES ($1, 'noop', '{}', $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(state.as_str())
    .bind(delivery)
    .bind(attempts)
    .bind(budget)
    .execute(&app.app.pg)
    .await
    .unwrap();
    id
}

async fn state_of(app: &TestApp, id: Uuid) -> ledger::JobRow {
    ledger::job(&app.app.pg, id).await.unwrap().unwrap()
}

async fn enqueue_noop(app: &TestApp) -> Uuid {
    let job = Noop::default().to_job().unwrap();
    app.app.queue.enqueue(job).await.unwrap().job_id
}

fn upkeep(app: &callcoach::App) -> Upkeep {
    let s = &app.settings;
    Upkeep {
        pg: app.pg.clone(),
        redis: app.redis.clone(),
        options: ledger::relay::UpkeepOptions {
            relay_every: s.relay_interval,
            rescue_every: s.rescue_interval,
            redeliver_after: Duration::from_secs(1),
            retention: s.job_retention,
            prune_every: s.prune_interval,
        },
    }
}

#[tokio::test]
async fn the_database_allows_exactly_the_job_states() {
    let app = spawn_app().await;
    for state in JobState::ALL {
        row(&app, state, 0, 0, 1).await;
    }
    let bogus = sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, max_attempts) VALUES ($1, 'noop', '{}', 'done', 1)",
    )
    .bind(Uuid::now_v7())
    .execute(&app.app.pg)
    .await;
    assert!(bogus.is_err(), "a state outside JobState was accepted");
}

#[tokio::test]
async fn a_claim_needs_the_current_delivery_and_a_claimable_state() {
    let app = spawn_app().await;
    let ledger = &app.app.jobs.ledger;
    let id = row(&app, JobState::Queued, 0, 0, 3).await;
    assert_eq!(ledger.claim(id, 1).await.unwrap(), None, "future delivery");
    // Fifty claims of one delivery land in one grouped batch: exactly one wins.
    let claims = futures::future::join_all((0..50).map(|_| ledger.claim(id, 0))).await;
    let winners = claims
        .into_iter()
        .filter(|c| c.as_ref().unwrap().is_some())
        .count();
    assert_eq!(winners, 1);
    assert_eq!(ledger.claim(id, 0).await.unwrap(), None, "already running");
    // The run asks for a retry: a new delivery; the old one can no longer be claimed.
    let retry = Outcome::Again {
        state: JobState::Queued,
        after: Duration::ZERO,
        reason: "transient".into(),
        refund: false,
    };
    assert!(ledger.finish(id, 0, retry).await.unwrap());
    let job = state_of(&app, id).await;
    assert_eq!((job.status, job.delivery), (JobState::Queued, 1));
    assert_eq!(ledger.claim(id, 0).await.unwrap(), None, "stale delivery");
    assert!(ledger.claim(id, 1).await.unwrap().is_some());
}

#[tokio::test]
async fn a_stale_run_never_overwrites_a_newer_outcome() {
    let app = spawn_app().await;
    let ledger = &app.app.jobs.ledger;
    let id = row(&app, JobState::Queued, 0, 0, 3).await;
    ledger.claim(id, 0).await.unwrap().unwrap();
    // The run's worker is presumed dead: the rescuer re-issues the job, a new run succeeds.
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&app.app.pg)
        .await
        .unwrap();
    let rescued = upkeep(&app.app).rescue_once().await.unwrap();
    assert_eq!(rescued.requeued, 1);
    ledger.claim(id, 1).await.unwrap().unwrap();
    assert!(
        ledger
            .finish(id, 1, Outcome::Succeeded(Some(json!("new"))))
            .await
            .unwrap()
    );
    // The first run comes back late with a failure: discarded.
    let late = ledger
        .finish(id, 0, Outcome::Failed("late".into()))
        .await
        .unwrap();
    assert!(!late, "a stale outcome was applied");
    let job = state_of(&app, id).await;
    assert_eq!(job.status, JobState::Succeeded);
    assert_eq!(job.result, Some(json!("new")));
    // After an operator replay, the replayed run's outcome is the one that counts.
    assert!(ledger::retry(&app.app.pg, id).await.is_ok());
    sqlx::query("UPDATE jobs SET status = 'failed' WHERE id = $1")
        .bind(id)
        .execute(&app.app.pg)
        .await
        .unwrap();
    assert!(ledger::retry(&app.app.pg, id).await.unwrap());
    let late = ledger
        .finish(id, 1, Outcome::Succeeded(None))
        .await
        .unwrap();
    assert!(!late, "the run before the replay overwrote it");
    assert_eq!(state_of(&app, id).await.status, JobState::Queued);
}

#[tokio::test]
async fn the_rescuer_requeues_lost_runs_and_fails_spent_ones() {
    let app = spawn_app().await;
    let live = row(&app, JobState::Running, 0, 1, 3).await;
    let spent = row(&app, JobState::Running, 2, 3, 3).await;
    let healthy = row(&app, JobState::Running, 0, 1, 3).await;
    sqlx::query(
        "UPDATE jobs SET lease_expires_at = CASE WHEN id = $3 THEN now() + interval '1 minute'
                                               ELSE now() - interval '1 second' END
         WHERE id IN ($1, $2, $3)",
    )
    .bind(live)
    .bind(spent)
    .bind(healthy)
    .execute(&app.app.pg)
    .await
    .unwrap();
    let rescued = upkeep(&app.app).rescue_once().await.unwrap();
    assert_eq!((rescued.requeued, rescued.failed), (1, 1));
    let job = state_of(&app, live).await;
    assert_eq!((job.status, job.delivery), (JobState::Queued, 1));
    assert!(
        job.delivered_at.is_none(),
        "the relay pushes the new delivery"
    );
    let job = state_of(&app, spent).await;
    assert_eq!(job.status, JobState::Failed);
    assert!(job.last_error.unwrap().contains("attempt budget"));
    assert_eq!(state_of(&app, healthy).await.status, JobState::Running);
}

#[tokio::test]
async fn a_delivery_redis_dropped_is_reissued_under_a_new_task_id() {
    let mut app = spawn_app().await;
    let job_id = enqueue_noop(&app).await;
    // apalis gave up on the task (its claim kept failing while Postgres was down) and
    // dropped its data; pushing the same task id again would be a no-op. Its id may still be
    // listed: the fetch skips ids without data.
    let mut conn = app.redis.conn().await;
    let data = format!("{}:data", Lane::Interactive.queue_name());
    let _: () = redis::cmd("DEL")
        .arg(&data)
        .query_async(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET delivered_at = now() - interval '1 minute', run_at = now() - interval '1 minute'")
        .execute(&app.app.pg)
        .await
        .unwrap();
    let rescued = upkeep(&app.app).rescue_once().await.unwrap();
    assert_eq!(rescued.redelivered, 1);
    app.start_worker();
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["delivery"], 1);
}

#[tokio::test]
async fn several_relays_push_each_row_once() {
    let app = spawn_app().await;
    let rows = (0..2000).map(|_| Noop::default().to_job().unwrap());
    let mut tx = app.app.pg.begin().await.unwrap();
    for job in rows {
        app.app.queue.enqueue_tx(&mut tx, job).await.unwrap();
    }
    tx.commit().await.unwrap();
    let relays: Vec<Upkeep> = (0..3).map(|_| upkeep(&app.another_app(&[]))).collect();
    let rounds = relays.iter().map(|r| async move {
        let mut pushed = 0;
        loop {
            let n = r.relay_once().await.unwrap();
            if n == 0 {
                return pushed;
            }
            pushed += n;
        }
    });
    let pushed: Vec<usize> = futures::future::join_all(rounds).await;
    assert_eq!(pushed.iter().sum::<usize>(), 2000, "{pushed:?}");
    assert!(pushed.iter().filter(|n| **n > 0).count() > 1, "{pushed:?}");
    let undelivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE delivered_at IS NULL")
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(undelivered, 0);
}

#[tokio::test]
async fn enqueue_tx_commits_or_rolls_back_with_the_callers_data() {
    let mut app = spawn_app().await;
    let mut tx = app.app.pg.begin().await.unwrap();
    let gone = app
        .app
        .queue
        .enqueue_tx(&mut tx, Noop { enqueued_at_us: 1 }.to_job().unwrap())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        ledger::job(&app.app.pg, gone.job_id)
            .await
            .unwrap()
            .is_none()
    );
    let mut tx = app.app.pg.begin().await.unwrap();
    app.app
        .queue
        .enqueue_tx(&mut tx, Noop { enqueued_at_us: 2 }.to_job().unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let kept = assert_enqueued(
        &app.app.pg,
        "noop",
        json!({"enqueued_at_us": 2}),
        JobState::Queued,
    )
    .await;
    app.start_worker();
    assert_eq!(app.wait_for_job(kept, 30).await["status"], "succeeded");
}

#[tokio::test]
async fn only_registered_kinds_get_in() {
    let mut app = spawn_app().await;
    let job = NewJob::new("send_email", json!({}), Lane::Background, None);
    match app.app.queue.enqueue(job).await {
        Err(QueueError::UnknownKind(kind)) => assert_eq!(kind, "send_email"),
        other => panic!("an unregistered kind was accepted: {other:?}"),
    }
    // A row written behind the registry's back fails with a clear reason, no panic.
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, max_attempts) VALUES ($1, 'send_email', '{}', 3)",
    )
    .bind(id)
    .execute(&app.app.pg)
    .await
    .unwrap();
    app.start_worker();
    let job = app.wait_for_job(id, 30).await;
    assert_eq!(job["status"], "failed");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("not in the job registry"),
        "{job}"
    );
}

#[tokio::test]
async fn an_interactive_job_never_waits_behind_the_background_backlog() {
    let mut app = spawn_app_with(Options {
        env: vec![("WORKER_BACKGROUND_CONCURRENCY", "1".into())],
        ..Default::default()
    })
    .await;
    let backlog: Vec<NewJob> = (0..5000)
        .map(|_| Noop::default().to_job().unwrap().on_lane(Lane::Background))
        .collect();
    app.app.queue.enqueue_many(backlog).await.unwrap();
    app.start_worker();
    let urgent = enqueue_noop(&app).await;
    assert_eq!(app.wait_for_job(urgent, 30).await["status"], "succeeded");
    let ahead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE lane = 'background'
           AND started_at < (SELECT started_at FROM jobs WHERE id = $1)",
    )
    .bind(urgent)
    .fetch_one(&app.app.pg)
    .await
    .unwrap();
    // On one shared queue all 5000 would have started first.
    assert!(
        ahead < 2500,
        "{ahead} background jobs started before the interactive one"
    );
}

#[tokio::test]
async fn finished_jobs_leave_nothing_in_redis_and_old_rows_are_pruned() {
    let mut app = spawn_app().await;
    let mut conn = app.redis.conn().await;
    let keys_before: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    let jobs: Vec<NewJob> = (0..300)
        .map(|_| Noop::default().to_job().unwrap())
        .collect();
    let ids = app.app.queue.enqueue_many(jobs).await.unwrap();
    app.start_worker();
    for id in &ids {
        app.wait_for_job(*id, 60).await;
    }
    app.stop_worker().await;
    let queue = Lane::Interactive.queue_name();
    let data: usize = redis::cmd("HLEN")
        .arg(format!("{queue}:data"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(data, 0, "task data left behind");
    let meta: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{queue}:meta*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(meta.is_empty(), "{} meta hashes left behind", meta.len());
    for set in ["done", "dead"] {
        let n: usize = redis::cmd("SCARD")
            .arg(format!("{queue}:{set}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 0, "{set} set grows");
    }
    let keys_after: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert!(
        keys_after <= keys_before + 10,
        "{keys_before} keys before, {keys_after} after"
    );
    // Past the retention, finished rows go; unfinished ones stay.
    let waiting = row(&app, JobState::Queued, 0, 0, 3).await;
    sqlx::query(
        "UPDATE jobs SET finished_at = now() - interval '31 days' WHERE finished_at IS NOT NULL",
    )
    .execute(&app.app.pg)
    .await
    .unwrap();
    let pruned = ledger::prune(&app.app.pg, app.app.settings.job_retention, 100)
        .await
        .unwrap();
    assert_eq!(pruned, 300);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(left, 1);
    assert!(ledger::job(&app.app.pg, waiting).await.unwrap().is_some());
}

async fn wait_until_running(app: &TestApp, id: Uuid) {
    for _ in 0..500 {
        if state_of(app, id).await.status == JobState::Running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {id} never started");
}

fn slow_llm(ms: u64) -> EmulatorConfig {
    EmulatorConfig {
        latency: Duration::from_millis(ms),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_draining_worker_finishes_its_job_and_nobody_runs_it_twice() {
    let app = spawn_app_with(Options {
        emulator: slow_llm(3000),
        env: vec![("JOB_LEASE_SECS", "2".into())],
        ..Default::default()
    })
    .await;
    let first = app.spawn_worker(&[]);
    let call_id = app.ingest(&crate::helpers::sample_call("drain")).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    wait_until_running(&app, job_id).await;
    let second = app.spawn_worker(&[]);
    // SIGTERM mid-job: the first worker stops fetching, hands its fetched tasks back to
    // Redis, finishes the job while renewing its lease (2 s, shorter than the job), exits.
    first.stop().await.unwrap();
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "nobody else ran it: {job}");
    assert_eq!(app.emulator.messages_served(), 1);
    second.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_stopped_past_its_drain_hands_the_job_back() {
    let app = spawn_app_with(Options {
        emulator: slow_llm(4000),
        env: vec![
            ("WORKER_DRAIN_SECS", "1".into()),
            ("JOB_LEASE_SECS", "120".into()),
        ],
        ..Default::default()
    })
    .await;
    let first = app.spawn_worker(&[]);
    let call_id = app.ingest(&crate::helpers::sample_call("handback")).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    wait_until_running(&app, job_id).await;
    first.stop().await.unwrap();
    let job = state_of(&app, job_id).await;
    assert_eq!(
        (job.status, job.delivery, job.attempts),
        (JobState::Queued, 1, 0),
        "{job:?}"
    );
    // Re-delivered at once (the 120 s lease never had to run out).
    let second = app.spawn_worker(&[]);
    let job = app.wait_for_job(job_id, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(app.session_count(call_id, "discovery").await, 1);
    second.stop().await.unwrap();
}

#[tokio::test]
async fn perform_reports_a_stale_delivery_as_skipped() {
    let app = spawn_app().await;
    let id = row(&app, JobState::Succeeded, 0, 1, 3).await;
    assert_eq!(
        perform(&app.app, id, 0, &Noop::default()).await,
        RunLabel::Skipped
    );
}

#[tokio::test]
async fn grouped_job_reads_answer_each_caller_with_its_own_row() {
    let app = spawn_app().await;
    let mut expected = Vec::new();
    for i in 0..200 {
        // Every third id has no row; the rest differ in state and attempts.
        let id = if i % 3 == 0 {
            Uuid::now_v7()
        } else {
            row(&app, JobState::Queued, 0, i % 4, 4).await
        };
        expected.push((id, i % 3 != 0, i % 4));
    }
    let ledger = &app.app.jobs.ledger;
    // Every read is sent at once, so the reader answers them in shared statements.
    let answers = futures::future::join_all(expected.iter().map(|(id, ..)| ledger.job(*id))).await;
    for ((id, exists, attempts), answer) in expected.iter().zip(answers) {
        match answer.unwrap() {
            Some(job) => {
                assert!(exists, "a row was returned for {id}, which has none");
                assert_eq!(job.id, *id);
                assert_eq!(job.attempts, *attempts);
            }
            None => assert!(!exists, "no row returned for {id}"),
        }
    }
    // A read sees a write committed before it.
    let (id, ..) = expected[1];
    sqlx::query("UPDATE jobs SET attempts = 3 WHERE id = $1")
        .bind(id)
        .execute(&app.app.pg)
        .await
        .unwrap();
    assert_eq!(ledger.job(id).await.unwrap().unwrap().attempts, 3);
}
