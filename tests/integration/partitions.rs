//! coaching_sessions partitions that never trap: inserts of any date land, the upkeep keeps
//! months ahead, moves the default partition's rows into the partitions of their months
//! without losing any, is idempotent, and reports a month it cannot create instead of failing.

use crate::helpers::fresh_database;
use callcoach::db::{self, CreatedPartition, PartitionReport};
use chrono::{Datelike, Months, NaiveDate, Utc};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

const DEFAULT: &str = "coaching_sessions_default";

/// A fresh database, migrated as the application does it.
async fn migrated() -> PgPool {
    let pool = PgPool::connect(&fresh_database().await).await.unwrap();
    db::migrate(&pool).await.unwrap();
    pool
}

/// The first day of the UTC month `offset` months from the current one.
fn month(offset: i32) -> NaiveDate {
    let first = Utc::now().date_naive().with_day(1).unwrap();
    let months = Months::new(offset.unsigned_abs());
    if offset < 0 {
        first.checked_sub_months(months).unwrap()
    } else {
        first.checked_add_months(months).unwrap()
    }
}

fn partition(month: NaiveDate) -> String {
    month.format("coaching_sessions_%Y_%m").to_string()
}

/// `timestamptz` text for an instant `micros` microseconds after midnight UTC of `day`.
fn at(day: NaiveDate, micros: i64) -> String {
    let instant =
        day.and_hms_opt(0, 0, 0).unwrap().and_utc() + chrono::Duration::microseconds(micros);
    instant.to_rfc3339()
}

/// Inserts a coaching session created at `created_at` (any `timestamptz` text, `infinity`
/// included) and returns its id.
async fn insert_at(pool: &PgPool, created_at: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO coaching_sessions (id, call_id, rep_email, dimension, rubric_version,
             cache_key, score, result, created_at)
         VALUES ($1, $1, 'ana@lumen.example', 'discovery', '1', 'k', 50, '{}', $2::timestamptz)",
    )
    .bind(id)
    .bind(created_at)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("insert at {created_at}: {e}"));
    id
}

/// Which partition holds the row `id`.
async fn holder(pool: &PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM coaching_sessions WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rows per partition, read through the parent (`tableoid` names the partition holding a row).
async fn rows_per_partition(pool: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT tableoid::regclass::text, count(*) FROM coaching_sessions GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn all_ids(pool: &PgPool) -> BTreeSet<Uuid> {
    sqlx::query_scalar("SELECT id FROM coaching_sessions")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Names of the partitions of coaching_sessions, the default included.
async fn partitions(pool: &PgPool) -> BTreeSet<String> {
    sqlx::query_scalar(
        "SELECT inhrelid::regclass::text FROM pg_inherits
         WHERE inhparent = 'coaching_sessions'::regclass",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn created(months: &[(NaiveDate, i64)]) -> Vec<CreatedPartition> {
    months
        .iter()
        .map(|&(month, moved_rows)| CreatedPartition {
            partition: partition(month),
            month,
            moved_rows,
        })
        .collect()
}

fn names(months: impl IntoIterator<Item = NaiveDate>) -> BTreeSet<String> {
    months.into_iter().map(partition).collect()
}

#[tokio::test]
async fn rows_years_ahead_and_behind_land_then_move_to_their_own_partitions() {
    let pool = migrated().await;
    let window = (0..=3).map(month);
    assert!(
        names(window).is_subset(&partitions(&pool).await),
        "the current month and three ahead after migrate"
    );

    let (behind, ahead, after_ahead) = (month(-36), month(36), month(37));
    let last_micro = |m: NaiveDate| {
        let next = m.checked_add_months(Months::new(1)).unwrap();
        (next - m).num_microseconds().unwrap() - 1
    };
    let mut ids = Vec::new();
    for created_at in [
        at(behind, 0),
        at(behind, last_micro(behind)),
        // The UTC bounds of a month: its first and last microsecond, and the next month's first.
        at(ahead, 0),
        at(ahead, 86_400_000_000 * 14),
        at(ahead, last_micro(ahead)),
        at(after_ahead, 0),
        "infinity".into(),
        "-infinity".into(),
    ] {
        let id = insert_at(&pool, &created_at).await;
        assert_eq!(holder(&pool, id).await, DEFAULT, "{created_at}");
        ids.push(id);
    }
    let now = insert_at(&pool, &Utc::now().to_rfc3339()).await;
    assert_eq!(holder(&pool, now).await, partition(month(0)));
    let before = all_ids(&pool).await;

    let report = db::maintain_partitions(&pool, 3).await.unwrap();
    assert_eq!(
        report,
        PartitionReport {
            created: created(&[(behind, 2), (ahead, 3), (after_ahead, 1)]),
            failed: vec![],
        }
    );
    assert_eq!(report.moved_rows(), 6);
    let expected: BTreeMap<String, i64> = [
        (partition(behind), 2),
        (partition(ahead), 3),
        (partition(after_ahead), 1),
        (partition(month(0)), 1),
        // No monthly partition can take ±infinity; they are all the default keeps.
        (DEFAULT.into(), 2),
    ]
    .into_iter()
    .collect();
    assert_eq!(rows_per_partition(&pool).await, expected);
    assert_eq!(all_ids(&pool).await, before, "no row lost or duplicated");
    for (id, holds) in ids
        .iter()
        .zip([behind, behind, ahead, ahead, ahead, after_ahead])
    {
        assert_eq!(holder(&pool, *id).await, partition(holds));
    }

    // A created partition is a full one: the parent's primary key and indexes, its checks.
    let indexes: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_indexes WHERE tablename = $1")
        .bind(partition(ahead))
        .fetch_one(&pool)
        .await
        .unwrap();
    let parent_indexes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_indexes WHERE tablename = 'coaching_sessions'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(parent_indexes >= 3);
    assert_eq!(indexes, parent_indexes, "every index of the parent");
    let duplicate = sqlx::query(
        "INSERT INTO coaching_sessions (id, call_id, rep_email, dimension, rubric_version,
             cache_key, score, result, created_at)
         SELECT id, call_id, rep_email, dimension, rubric_version, cache_key, score, result,
                created_at
         FROM coaching_sessions WHERE id = $1",
    )
    .bind(ids[2])
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(
        duplicate.as_database_error().unwrap().code().as_deref(),
        Some("23505")
    );

    // Idempotent: a second run finds nothing to do and changes nothing.
    let layout = partitions(&pool).await;
    let again = db::maintain_partitions(&pool, 3).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(partitions(&pool).await, layout);
    assert_eq!(rows_per_partition(&pool).await, expected);
}

#[tokio::test]
async fn creating_a_month_whose_rows_are_in_the_default_no_longer_fails() {
    let pool = migrated().await;
    // Months past the window migrate keeps, as every month becomes once migrate stops running.
    let ahead = insert_at(&pool, &at(month(5), 3_600_000_000)).await;
    let further = insert_at(&pool, &at(month(7), 0)).await;
    assert_eq!(holder(&pool, ahead).await, DEFAULT);

    // The trap the upkeep avoids: Postgres refuses a partition whose rows are in the default.
    let trap = sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {} PARTITION OF coaching_sessions FOR VALUES FROM ('{}') TO ('{}')",
        partition(month(7)),
        at(month(7), 0),
        at(month(8), 0)
    )))
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(
        trap.as_database_error().unwrap().code().as_deref(),
        Some("23514")
    );

    // The per-month function moves the rows first.
    let moved: Option<i64> = sqlx::query_scalar("SELECT create_coaching_partition($1)")
        .bind(month(7))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(moved, Some(1));
    assert_eq!(holder(&pool, further).await, partition(month(7)));
    let exists: Option<i64> = sqlx::query_scalar("SELECT create_coaching_partition($1)")
        .bind(month(7))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(exists, None, "an existing month is left alone");

    // The first migration's ensure_coaching_partitions goes through the upkeep now: months
    // 4 to 6 are created and month 5's row moves instead of failing the call.
    let made: i32 = sqlx::query_scalar("SELECT ensure_coaching_partitions(6)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(made, 3);
    assert_eq!(holder(&pool, ahead).await, partition(month(5)));
    assert!(names((0..=7).map(month)).is_subset(&partitions(&pool).await));
    let later = insert_at(&pool, &at(month(5), 0)).await;
    assert_eq!(holder(&pool, later).await, partition(month(5)));
    assert_eq!(rows_per_partition(&pool).await.get(DEFAULT), None);
    assert!(db::maintain_partitions(&pool, 7).await.unwrap().is_empty());
}

#[tokio::test]
async fn month_bounds_are_utc_whatever_the_session_time_zone() {
    let pool = migrated().await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL TimeZone = 'Pacific/Auckland'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let report: sqlx::types::Json<PartitionReport> =
        sqlx::query_scalar("SELECT maintain_coaching_partitions(12)")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.commit().await.unwrap();
    let months: Vec<NaiveDate> = report.0.created.iter().map(|p| p.month).collect();
    assert_eq!(months, (4..=12).map(month).collect::<Vec<_>>());

    let first = insert_at(&pool, &at(month(12), 0)).await;
    let before = insert_at(&pool, &at(month(12), -1)).await;
    assert_eq!(holder(&pool, first).await, partition(month(12)));
    assert_eq!(holder(&pool, before).await, partition(month(11)));
}

#[tokio::test]
async fn a_month_that_cannot_be_created_is_reported_and_keeps_its_rows() {
    let pool = migrated().await;
    let (blocked, free) = (month(-24), month(-23));
    // A table with the month's name that is not a partition of coaching_sessions.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {} (note text)",
        partition(blocked)
    )))
    .execute(&pool)
    .await
    .unwrap();
    let stuck = insert_at(&pool, &at(blocked, 0)).await;
    let moves = insert_at(&pool, &at(free, 0)).await;

    for run in 0..2 {
        let report = db::maintain_partitions(&pool, 3).await.unwrap();
        let expected = if run == 0 {
            created(&[(free, 1)])
        } else {
            vec![]
        };
        assert_eq!(report.created, expected, "run {run}");
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert_eq!(report.failed[0].partition, partition(blocked));
        assert_eq!(report.failed[0].sqlstate, "42P07");
    }
    assert_eq!(holder(&pool, stuck).await, DEFAULT);
    assert_eq!(holder(&pool, moves).await, partition(free));
    // Inserts of the month keep landing, in the default.
    let another = insert_at(&pool, &at(blocked, 1)).await;
    assert_eq!(holder(&pool, another).await, DEFAULT);
}

#[tokio::test]
async fn concurrent_runs_create_each_month_once() {
    let pool = migrated().await;
    for offset in [-40, -13, 20, 50] {
        insert_at(&pool, &at(month(offset), 0)).await;
    }
    let (a, b) = tokio::join!(
        db::maintain_partitions(&pool, 6),
        db::maintain_partitions(&pool, 6)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.failed.is_empty() && b.failed.is_empty(), "{a:?} {b:?}");
    let mut made: Vec<String> = a
        .created
        .iter()
        .chain(&b.created)
        .map(|p| p.partition.clone())
        .collect();
    made.sort();
    let expected: Vec<String> = names([-40, -13, 4, 5, 6, 20, 50].map(month))
        .into_iter()
        .collect();
    assert_eq!(made, expected);
    assert_eq!(a.moved_rows() + b.moved_rows(), 4);
    assert_eq!(rows_per_partition(&pool).await.get(DEFAULT), None);
}
