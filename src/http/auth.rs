//! API keys: creation (the key is shown once, only its SHA-256 is stored) and the [`Principal`]
//! extractor that authenticates `Authorization: Bearer <key>` on every non-health route.

use super::{ApiError, AppState};
use crate::model::sha256_hex;
use axum::{extract::FromRequestParts, http::request::Parts};
use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use sqlx::{PgPool, Row};
use std::str::FromStr;
use uuid::Uuid;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Ingest calls, enqueue analyses, read results and job status.
    Producer,
    /// Read everything, operate jobs and the dashboard.
    Ops,
    /// Everything, including rubric changes.
    Admin,
}

impl Scope {
    /// Stable name stored in `api_keys.scope`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Producer => "producer",
            Scope::Ops => "ops",
            Scope::Admin => "admin",
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "producer" => Ok(Scope::Producer),
            "ops" => Ok(Scope::Ops),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope {other:?} (expected producer, ops or admin)"
            )),
        }
    }
}

/// A newly created key: `secret` is shown once and never stored.
#[derive(Debug, Serialize)]
pub struct NewApiKey {
    /// Key id.
    pub id: Uuid,
    /// The full key, `cc_<prefix>_<secret>`.
    pub key: String,
    /// Non-secret prefix that identifies the key in listings and logs.
    pub prefix: String,
}

/// Creates a key with a name and scope; stores only its hash.
pub async fn create_key(pg: &PgPool, name: &str, scope: Scope) -> sqlx::Result<NewApiKey> {
    let prefix = Alphanumeric.sample_string(&mut rand::rng(), 8);
    let secret = Alphanumeric.sample_string(&mut rand::rng(), 40);
    let key = format!("cc_{prefix}_{secret}");
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO api_keys (id, name, prefix, key_hash, scope) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(name)
    .bind(&prefix)
    .bind(sha256_hex(&key))
    .bind(scope.as_str())
    .execute(pg)
    .await?;
    Ok(NewApiKey { id, key, prefix })
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Key id: the rate-limit and audit identity.
    pub key_id: Uuid,
    /// Key name.
    pub name: String,
    /// Key scope.
    pub scope: Scope,
}

impl Principal {
    /// Fails with 403 unless the key has one of `allowed`.
    pub fn require(&self, allowed: &[Scope]) -> Result<(), ApiError> {
        if allowed.contains(&self.scope) {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "this API key has scope {}; this route needs one of {}",
            self.scope.as_str(),
            allowed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key>"))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be 'Bearer <api key>'"))?;
        let row = sqlx::query(
            "SELECT id, name, scope FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(sha256_hex(key))
        .fetch_optional(&state.pg)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::unauthorized("invalid or revoked API key"))?;
        let scope: String = row.get("scope");
        Ok(Principal {
            key_id: row.get("id"),
            name: row.get("name"),
            scope: scope.parse().map_err(|e: String| ApiError::internal(e))?,
        })
    }
}
