//! `Idempotency-Key` for `POST /v1/calls` and `POST /v1/analyses`, per principal: the first
//! request with a key is processed and its response stored; a retry with the same key and the
//! same request gets that response again (`Idempotent-Replayed: true`); the same key with a
//! different request is refused with 422. Keys are remembered for `IDEMPOTENCY_TTL_SECS`.
//!
//! The claim is a row inserted before the handler runs (`status` NULL while in progress), so
//! two concurrent requests with one key cannot both run: the second gets 409 and retries. A
//! claim left by a process that died mid-request is taken over after
//! [`ABANDONED_AFTER_SECS`]; the analysis job's ledger dedup key (principal + key) still
//! keeps that second run from enqueuing a second job. 5xx responses are not stored: the
//! claim is released so a retry runs again.

use super::{ApiError, AppState, auth::Principal};
use crate::model::sha256_hex;
use axum::{
    body::{Body, Bytes, to_bytes},
    extract::{Request, State},
    http::{HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use std::time::Duration;

/// Seconds after which an unanswered claim counts as abandoned.
pub const ABANDONED_AFTER_SECS: i64 = 60;

/// Longest key accepted.
const MAX_KEY_CHARS: usize = 200;

/// Largest response stored for replay.
const MAX_STORED_RESPONSE: usize = 1024 * 1024;

/// The middleware (route layer of the idempotent routes).
pub async fn idempotent(
    State(state): State<AppState>,
    principal: Principal,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(key) = key_of(request.headers())? else {
        return Ok(next.run(request).await);
    };
    let (parts, body) = request.into_parts();
    let body = super::read_body(body, state.settings.http_max_body_bytes).await?;
    let fingerprint = sha256_hex(&format!(
        "{} {}\n{}",
        parts.method,
        parts.uri.path(),
        String::from_utf8_lossy(&body)
    ));
    let ttl = state.settings.idempotency_ttl;
    if !claim(&state, &principal, &key, &fingerprint, ttl).await? {
        return earlier(&state, &principal, &key, &fingerprint).await;
    }
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    settle(&state, &principal, &key, response).await
}

/// The request's key: `None` without the header, 400 when it is not 1-200 visible ASCII
/// characters.
pub(super) fn key_of(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_CHARS)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Idempotency-Key must be 1-{MAX_KEY_CHARS} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_string()))
}

/// Claims the key for this request; `false` when an unexpired, unabandoned claim exists.
async fn claim(
    state: &AppState,
    principal: &Principal,
    key: &str,
    fingerprint: &str,
    ttl: Duration,
) -> Result<bool, ApiError> {
    let claimed: Option<bool> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (principal, key, request_hash, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))
         ON CONFLICT (principal, key) DO UPDATE
             SET request_hash = EXCLUDED.request_hash, status = NULL, body = NULL,
                 created_at = now(), expires_at = EXCLUDED.expires_at
             WHERE idempotency_keys.expires_at < now()
                OR (idempotency_keys.status IS NULL
                    AND idempotency_keys.created_at < now() - make_interval(secs => $5))
         RETURNING true",
    )
    .bind(principal.key_id)
    .bind(key)
    .bind(fingerprint)
    .bind(ttl.as_secs_f64())
    .bind(ABANDONED_AFTER_SECS as f64)
    .fetch_optional(&state.pg)
    .await?;
    Ok(claimed.is_some())
}

/// The answer to a request whose key is already claimed: the stored response, 422 when the
/// request differs, 409 while the first one is still being processed.
async fn earlier(
    state: &AppState,
    principal: &Principal,
    key: &str,
    fingerprint: &str,
) -> Result<Response, ApiError> {
    let row: Option<(String, Option<i32>, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT request_hash, status, body FROM idempotency_keys WHERE principal = $1 AND key = $2",
    )
    .bind(principal.key_id)
    .bind(key)
    .fetch_optional(&state.pg)
    .await?;
    let Some((hash, status, body)) = row else {
        return Err(in_progress());
    };
    if hash != fingerprint {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!(
                "Idempotency-Key {key:?} was used for a different request; use a new key for a new request"
            ),
        ));
    }
    let (Some(status), Some(body)) = (status, body) else {
        return Err(in_progress());
    };
    let status = StatusCode::from_u16(status as u16).map_err(ApiError::internal)?;
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(response)
}

fn in_progress() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_in_progress",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )
}

/// Stores the response for replay (or releases the claim after a 5xx) and returns it.
async fn settle(
    state: &AppState,
    principal: &Principal,
    key: &str,
    response: Response,
) -> Result<Response, ApiError> {
    let (parts, body) = response.into_parts();
    let bytes: Bytes = to_bytes(body, MAX_STORED_RESPONSE)
        .await
        .map_err(ApiError::internal)?;
    let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let stored = match json {
        Some(json) if !parts.status.is_server_error() => sqlx::query(
            "UPDATE idempotency_keys SET status = $3, body = $4 WHERE principal = $1 AND key = $2",
        )
        .bind(principal.key_id)
        .bind(key)
        .bind(i32::from(parts.status.as_u16()))
        .bind(json),
        _ => sqlx::query("DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2")
            .bind(principal.key_id)
            .bind(key),
    };
    stored.execute(&state.pg).await?;
    Ok(Response::from_parts(parts, Body::from(bytes)))
}
