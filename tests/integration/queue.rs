//! Queue guarantees that apalis-redis alone does not give: crash recovery of a killed worker's
//! jobs, and surviving a backlog larger than Redis' Lua unpack limit.

use crate::helpers::{Options, sample_call, spawn_app, spawn_app_with};
use apalis::prelude::TaskSink;
use callcoach::{
    delivery::{self, Lane},
    jobs::AnalyzeCall,
    llm::emulator::EmulatorConfig,
    model::Dimension,
};
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn a_killed_workers_job_is_run_by_another_worker() {
    let mut app = spawn_app_with(Options {
        emulator: EmulatorConfig {
            latency: Duration::from_millis(1500),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("killed")).await;
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    // Wait until the job is running (a loaded machine may take seconds to start the
    // worker), then kill the worker mid-job: its LLM call takes 1.5 s.
    let mut running = false;
    for _ in 0..1500 {
        let (_, job) = app.get(&format!("/v1/jobs/{job_id}")).await;
        if job["status"] == "running" {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running, "the job never started");
    app.kill_worker();
    app.start_worker();
    // Recovery: the dead run's lease expires (JOB_LEASE_SECS) and the rescuer re-delivers it.
    let job = app.wait_for_job(job_id, 45).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["attempts"], 2,
        "the killed run counts as an attempt: {job}"
    );
    assert_eq!(app.session_count(call_id, "discovery").await, 1);
}

#[tokio::test]
async fn a_backlog_beyond_the_lua_unpack_limit_is_drained() {
    let mut app = spawn_app_with(Options {
        env: vec![("WORKER_CONCURRENCY", "32".into())],
        ..Default::default()
    })
    .await;
    let call_id = app.ingest(&sample_call("backlog")).await;
    // 9000 deliveries whose ledger rows do not exist: each run is a cheap "stale" skip.
    let mut store = delivery::storage(app.app.redis.clone(), Lane::Interactive);
    let args = AnalyzeCall {
        call_id,
        dimensions: vec![Dimension::Discovery],
        batch: false,
    };
    let envelopes: Vec<_> = (0..9000)
        .map(|_| crate::helpers::envelope(Uuid::new_v4(), 0, &args))
        .collect();
    store.push_bulk(envelopes).await.unwrap();
    app.start_worker();
    let mut conn = app.redis.conn().await;
    let name = Lane::Interactive.queue_name();
    let mut left = usize::MAX;
    for _ in 0..600 {
        let active: usize = redis::cmd("LLEN")
            .arg(format!("{name}:active"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let scheduled: usize = redis::cmd("ZCARD")
            .arg(format!("{name}:scheduled"))
            .query_async(&mut conn)
            .await
            .unwrap();
        left = active + scheduled;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "backlog not drained");
    // The worker is still alive and runs real jobs.
    let job_id = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(job_id, 30).await["status"], "succeeded");
}

#[tokio::test]
async fn jobs_lost_by_a_redis_restart_are_delivered_again() {
    let mut app = spawn_app().await;
    let lost_call = app.ingest(&sample_call("lost")).await;
    let lost = app.enqueue(lost_call, &["discovery"]).await;
    // Redis restarts without persistence: the delivered task is gone.
    app.redis.stop();
    app.redis.restart().await;
    let kept_call = app.ingest(&sample_call("kept")).await;
    let kept = app.enqueue(kept_call, &["discovery"]).await;
    // Both were due long ago and never started.
    sqlx::query(
        "UPDATE jobs SET delivered_at = now() - interval '5 minutes', run_at = now() - interval '5 minutes'",
    )
    .execute(&app.app.pg)
    .await
    .unwrap();
    app.start_worker();
    for (job_id, call_id) in [(lost, lost_call), (kept, kept_call)] {
        let job = app.wait_for_job(job_id, 30).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "pushed again, run once: {job}");
        assert_eq!(app.session_count(call_id, "discovery").await, 1);
    }
}

#[tokio::test]
async fn workers_survive_postgres_dropping_every_connection() {
    let mut app = spawn_app().await;
    app.start_worker();
    let call_id = app.ingest(&sample_call("pg-restart")).await;
    let first = app.enqueue(call_id, &["discovery"]).await;
    assert_eq!(app.wait_for_job(first, 30).await["status"], "succeeded");
    // What clients see of a Postgres restart: every connection is cut.
    let admin = sqlx::PgPool::connect(&std::env::var("CALLCOACH_TEST_ADMIN_URL").unwrap())
        .await
        .unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&app.app.pg)
        .await
        .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(&database)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!killed.is_empty());
    let second = app.enqueue(call_id, &["engagement"]).await;
    let job = app.wait_for_job(second, 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

#[tokio::test]
async fn grouped_ledger_writes_answer_each_caller_correctly() {
    use callcoach::ledger::{Claimed, Outcome};
    let app = spawn_app().await;
    let pg = &app.app.pg;
    let mut expected = Vec::new();
    for i in 0..300 {
        let id = Uuid::new_v4();
        // A third is finished already, a third is claimed with a stale delivery number.
        let status = if i % 3 == 0 { "succeeded" } else { "queued" };
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, status, max_attempts) VALUES ($1, 'analyze_call', '{}', $2, 4)",
        )
        .bind(id)
        .bind(status)
        .execute(pg)
        .await
        .unwrap();
        let delivery = if i % 3 == 1 { 7 } else { 0 };
        expected.push((id, delivery, i % 3 == 2));
    }
    let ledger = &app.app.jobs.ledger;
    let claims = expected.iter().map(|(id, d, _)| ledger.claim(*id, *d));
    let answers = futures::future::join_all(claims).await;
    let claimed = Claimed {
        attempt: 1,
        max_attempts: 4,
        lane: callcoach::delivery::Lane::Interactive,
        queue_wait_secs: 0.0,
    };
    for ((_, _, claimable), answer) in expected.iter().zip(answers) {
        let answer = answer.unwrap().map(|c| {
            assert!(c.queue_wait_secs >= 0.0, "{c:?}");
            Claimed {
                queue_wait_secs: 0.0,
                ..c
            }
        });
        assert_eq!(answer, claimable.then_some(claimed));
    }
    let finishes = expected
        .iter()
        .map(|(id, d, _)| ledger.finish(*id, *d, Outcome::Failed(format!("error of {id}"))));
    let applied = futures::future::join_all(finishes).await;
    for ((_, _, claimable), applied) in expected.iter().zip(applied) {
        assert_eq!(
            applied.unwrap(),
            *claimable,
            "only running deliveries take an outcome"
        );
    }
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE status = 'failed' AND last_error <> 'error of ' || id",
    )
    .fetch_one(pg)
    .await
    .unwrap();
    assert_eq!(mismatched, 0);
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'failed'")
        .fetch_one(pg)
        .await
        .unwrap();
    assert_eq!(failed, 100);
}
