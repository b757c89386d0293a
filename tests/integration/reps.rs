//! Reps: created or matched by e-mail at ingest, and migrated from calls that predate them.

use crate::helpers::{fresh_database, sample_call, spawn_app};
use callcoach::model::Dimension;
use std::borrow::Cow;

#[tokio::test]
async fn ingest_creates_a_rep_once_and_matches_it_by_email_in_any_case() {
    let app = spawn_app().await;
    let first = app.ingest(&sample_call("rep-1")).await;
    let mut again = sample_call("rep-2");
    again["rep_email"] = serde_json::json!("ANA@Lumen.Example");
    again["rep_team"] = serde_json::json!("Enterprise West");
    let second = app.ingest(&again).await;
    let reps: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT name, email, role, team FROM reps")
            .fetch_all(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(
        reps,
        [(
            "Ana Rep".to_string(),
            "ana@lumen.example".to_string(),
            "ae".to_string(),
            Some("Enterprise West".to_string())
        )],
        "named after the internal speaker; the team filled in later"
    );
    let rep_ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT rep_id FROM calls WHERE id = ANY($1)")
            .bind([first, second].as_slice())
            .fetch_all(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(rep_ids.len(), 2);
    assert_eq!(rep_ids[0], rep_ids[1]);

    app.perform(&app.app, first, &[Dimension::Discovery]).await;
    let session_rep: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT rep_id FROM coaching_sessions WHERE call_id = $1")
            .bind(first)
            .fetch_one(&app.app.pg)
            .await
            .unwrap();
    assert_eq!(session_rep, Some(rep_ids[0]), "sessions carry their rep");
}

#[tokio::test]
async fn calls_that_predate_reps_get_one_rep_per_address() {
    let url = fresh_database().await;
    let pg = sqlx::PgPool::connect(&url).await.unwrap();
    let all = sqlx::migrate!("sql/migrations");
    let before_reps = sqlx::migrate::Migrator {
        migrations: Cow::Owned(
            all.migrations
                .iter()
                .filter(|m| m.version < 20261202000002)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate!("sql/migrations")
    };
    before_reps.run(&pg).await.unwrap();
    for (n, email) in ["bo@lumen.example", "BO@lumen.example", "cy@lumen.example"]
        .iter()
        .enumerate()
    {
        let id = uuid::Uuid::now_v7();
        sqlx::query(
            "INSERT INTO calls (id, title, scheduled_at, rep_email, rep_role)
             VALUES ($1, 'old call', now() - make_interval(days => $2), $3, 'se')",
        )
        .bind(id)
        .bind(n as i32)
        .bind(email)
        .execute(&pg)
        .await
        .unwrap();
        if n == 2 {
            sqlx::query(
                "INSERT INTO speakers (call_id, name, email, company_side)
                 VALUES ($1, 'Cy Sales', 'cy@lumen.example', 'internal')",
            )
            .bind(id)
            .execute(&pg)
            .await
            .unwrap();
        }
    }
    all.run(&pg).await.unwrap();
    let reps: Vec<(String, String)> =
        sqlx::query_as("SELECT lower(email), name FROM reps ORDER BY 1")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(
        reps,
        [
            ("bo@lumen.example".to_string(), "bo".to_string()),
            ("cy@lumen.example".to_string(), "Cy Sales".to_string())
        ]
    );
    let unlinked: i64 = sqlx::query_scalar("SELECT count(*) FROM calls WHERE rep_id IS NULL")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(unlinked, 0);
}
