//! Anthropic-shaped error answers (`{"type":"error","error":{…},"request_id":…}`
//! plus a `request-id` header) and the identifiers the emulator hands out.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An Anthropic-shaped error answer.
#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) message: String,
    /// Sent as `retry-after` (whole seconds, rounded up) and `retry-after-ms`.
    pub(super) retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with an explicit status and type.
    pub(super) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401 `authentication_error`.
    pub(super) fn auth(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    /// 404 `not_found_error`.
    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    /// 429 `rate_limit_error` asking the client to wait `retry_after`.
    pub(super) fn rate_limited(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// The error the real API sends with `status` (for fault injection); a
    /// 429 carries `retry_after`. Statuses below 400 or above 999 become 500.
    pub(super) fn for_status(status: u16, retry_after: Duration) -> Self {
        let status = StatusCode::from_u16(status)
            .ok()
            .filter(|s| s.as_u16() >= 400)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (kind, message) = match status.as_u16() {
            400 => ("invalid_request_error", "Invalid request (emulated)"),
            401 => ("authentication_error", "invalid x-api-key (emulated)"),
            403 => ("permission_error", "Permission denied (emulated)"),
            404 => ("not_found_error", "Not found (emulated)"),
            413 => ("request_too_large", "Request too large (emulated)"),
            429 => return Self::rate_limited("Rate limit exceeded (emulated)", retry_after),
            529 => ("overloaded_error", "Overloaded (emulated)"),
            504 => ("timeout_error", "Request timed out (emulated)"),
            s if s >= 500 => ("api_error", "Internal server error (emulated)"),
            _ => ("invalid_request_error", "Request failed (emulated)"),
        };
        Self::new(status, kind, message)
    }

    /// The `{"type":"error","error":{…}}` object (also used in batch results).
    pub(super) fn body(&self, request_id: &str) -> Value {
        json!({
            "type": "error",
            "error": {"type": self.kind, "message": self.message},
            "request_id": request_id,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = new_id("req");
        let mut response = (self.status, Json(self.body(&request_id))).into_response();
        set_request_id(&mut response, &request_id);
        if let Some(wait) = self.retry_after {
            let headers = response.headers_mut();
            let secs = wait.as_millis().div_ceil(1000);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&wait.as_millis().to_string()) {
                headers.insert("retry-after-ms", v);
            }
        }
        response
    }
}

/// `{prefix}_{uuid}` identifier.
pub(super) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Adds the `request-id` header.
pub(super) fn set_request_id(response: &mut Response, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("request-id", value);
    }
}

/// A 200 JSON answer with a fresh `request-id` header.
pub(super) fn json_ok(body: Value) -> Response {
    let mut response = Json(body).into_response();
    set_request_id(&mut response, &new_id("req"));
    response
}
