//! API keys: creation (the key is shown once, only its SHA-256 is stored), listing and
//! revocation, and the [`Principal`] extractor that authenticates `Authorization: Bearer <key>`
//! on every non-health route. Lookups are cached in memory for `AUTH_CACHE_MS` ([`KeyCache`]),
//! so a request costs no database round trip; each lookup that does reach the database also
//! records the key's `last_used_at`, at most once per key per cache period and process, and
//! is first charged to the client address's key-lookup bucket ([`super::limits`]), so
//! unknown keys cannot make every request a query.
//! `GET /docs` and `GET /openapi.json` also accept the dashboard's session cookie
//! ([`SESSION_COOKIE`]); the dashboard's own routes authenticate with it in
//! [`super::dashboard`].

use super::{ApiError, AppState};
use crate::model::sha256_hex;
use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
};
use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use sqlx::{PgPool, Row};
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
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

/// The dashboard's session cookie: it holds the API key itself (see [`super::dashboard`]).
pub const SESSION_COOKIE: &str = "callcoach_session";

/// Read-only routes that also accept the [`SESSION_COOKIE`] instead of a bearer header, so a
/// browser logged in to the dashboard can follow its link to the docs. Only `GET`s: a request
/// another site makes a browser send (with the cookie) can change nothing.
const COOKIE_READ_ROUTES: &[&str] = &["/docs", "/openapi.json"];

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already authenticated by the rate limits (`super::limits`), which run first.
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            if let Some(key) = session_key(&parts.headers).filter(|_| accepts_cookie(parts)) {
                return authenticate(state, key, client_address(&parts.extensions)).await;
            }
            return Err(ApiError::unauthorized(
                "missing Authorization: Bearer <api key>",
            ));
        };
        let key = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be 'Bearer <api key>'"))?;
        authenticate(state, key, client_address(&parts.extensions)).await
    }
}

/// Whether this request may authenticate with the session cookie.
fn accepts_cookie(parts: &Parts) -> bool {
    let route = parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str());
    parts.method == axum::http::Method::GET
        && route.is_some_and(|route| COOKIE_READ_ROUTES.contains(&route))
}

/// The API key in the request's [`SESSION_COOKIE`], if any.
pub fn session_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// The address of the client that sent the request: the TCP peer ([`super::server`] puts it
/// in the extensions), never a header the client could set.
pub fn client_address(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip())
}

/// The principal of an API key (401 when it is unknown or revoked), from the cache or the
/// database. A lookup in the database is first charged to `client`'s key-lookup bucket
/// (429 when it is empty), so unknown keys cannot cost Postgres a query each without bound.
pub async fn authenticate(
    state: &AppState,
    key: &str,
    client: Option<IpAddr>,
) -> Result<Principal, ApiError> {
    let hash = sha256_hex(key);
    if let Some(principal) = state.keys.get(&hash) {
        return Ok(principal);
    }
    if let (Some(limiter), Some(client)) = (&state.limiter, client) {
        limiter.admit_key_lookup(client).await?;
    }
    let principal = lookup(&state.pg, &hash)
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid or revoked API key"))?;
    state.keys.put(hash, principal.clone());
    Ok(principal)
}

/// The unrevoked key with this hash, recording that it was used.
async fn lookup(pg: &PgPool, hash: &str) -> Result<Option<Principal>, ApiError> {
    let row = sqlx::query(
        "UPDATE api_keys SET last_used_at = now() WHERE key_hash = $1 AND revoked_at IS NULL
         RETURNING id, name, scope",
    )
    .bind(hash)
    .fetch_optional(pg)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let scope: String = row.get("scope");
    Ok(Some(Principal {
        key_id: row.get("id"),
        name: row.get("name"),
        scope: scope.parse().map_err(|e: String| ApiError::internal(e))?,
    }))
}

/// Most keys a [`KeyCache`] holds; when full it starts over (only keys in use come back).
const MAX_CACHED_KEYS: usize = 10_000;

/// Authenticated keys by hash, each kept for the cache period. Only keys that exist are
/// cached, so random keys cannot fill it.
#[derive(Clone)]
pub struct KeyCache {
    ttl: Duration,
    entries: Arc<Mutex<HashMap<String, (Principal, Instant)>>>,
}

impl KeyCache {
    /// An empty cache keeping entries for `ttl`.
    pub fn new(ttl: Duration) -> KeyCache {
        KeyCache {
            ttl,
            entries: Arc::default(),
        }
    }

    fn get(&self, hash: &str) -> Option<Principal> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (principal, at) = entries.get(hash)?;
        (at.elapsed() < self.ttl).then(|| principal.clone())
    }

    fn put(&self, hash: String, principal: Principal) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_CACHED_KEYS {
            entries.clear();
        }
        entries.insert(hash, (principal, Instant::now()));
    }
}

/// A key as listed by `callcoach apikey list` (never the key itself).
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    /// Key id.
    pub id: Uuid,
    /// The key's non-secret prefix.
    pub prefix: String,
    /// Who it is for.
    pub name: String,
    /// producer, ops or admin.
    pub scope: String,
    /// Created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last used (to within `AUTH_CACHE_MS`).
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Revoked, if it is.
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every key, newest first.
pub async fn list_keys(pg: &PgPool) -> sqlx::Result<Vec<KeyInfo>> {
    sqlx::query_as(
        "SELECT id, prefix, name, scope, created_at, last_used_at, revoked_at
         FROM api_keys ORDER BY created_at DESC",
    )
    .fetch_all(pg)
    .await
}

/// Revokes the key with this id or prefix; `None` when no unrevoked key matches. Every
/// process refuses it within `AUTH_CACHE_MS`.
pub async fn revoke_key(pg: &PgPool, id_or_prefix: &str) -> sqlx::Result<Option<KeyInfo>> {
    let id = id_or_prefix.parse::<Uuid>().ok();
    sqlx::query_as(
        "UPDATE api_keys SET revoked_at = now()
         WHERE (id = $1 OR prefix = $2) AND revoked_at IS NULL
         RETURNING id, prefix, name, scope, created_at, last_used_at, revoked_at",
    )
    .bind(id)
    .bind(id_or_prefix)
    .fetch_optional(pg)
    .await
}
