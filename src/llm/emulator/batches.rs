//! Message Batches: `POST /v1/messages/batches`, `GET …/batches` (paged),
//! `GET …/{id}`, `POST …/{id}/cancel`, `GET …/{id}/results` (JSONL) and
//! `DELETE …/{id}`.
//!
//! A batch is validated as a whole when created (unique `custom_id`s of 1-64
//! characters `[a-zA-Z0-9_-]`, every `params` like a create body; a model
//! that is not served makes that one request `errored`). After
//! [`EmulatorConfig::batch_delay`](super::EmulatorConfig::batch_delay) all
//! its requests are answered at once through the same prompt cache with
//! `service_tier: "batch"` (usage at full price; the client applies the
//! discount) — or, with
//! [`EmulatorConfig::batch_expire`](super::EmulatorConfig::batch_expire), all
//! expire. A batch canceled before then ends with its requests `canceled`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::errors::{ApiError, json_ok, new_id};
use super::request::{
    ApiVersion, Endpoint, ParsedRequest, check_headers, parse_body, parse_request,
};
use super::{EmulatorState, lock};

/// Most requests one batch may hold.
const MAX_BATCH_REQUESTS: usize = 100_000;
/// Longest `custom_id`.
const MAX_CUSTOM_ID_CHARS: usize = 64;
/// Default and largest page size of the list endpoint.
const LIST_DEFAULT: usize = 20;
const LIST_MAX: usize = 1_000;
/// How long a batch may run before it expires.
const EXPIRY: chrono::Duration = chrono::Duration::hours(24);

/// `processing_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    InProgress,
    Canceling,
    Ended,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Canceling => "canceling",
            Self::Ended => "ended",
        }
    }
}

/// One request waiting to be processed (or already refused).
type PendingItem = (String, Result<ParsedRequest, ApiError>);

/// One batch.
#[derive(Debug)]
struct Batch {
    id: String,
    status: Status,
    created_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    cancel_initiated_at: Option<DateTime<Utc>>,
    pending: Vec<PendingItem>,
    /// Result lines, in request order once ended.
    results: Vec<Value>,
}

impl Batch {
    /// How many results have `result.type == kind`.
    fn count(&self, kind: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r["result"]["type"] == kind)
            .count()
    }

    /// The batch object; `base` is the URL the client reached us at.
    fn to_json(&self, base: &str) -> Value {
        let time =
            |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true));
        let ended = self.status == Status::Ended;
        json!({
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status.as_str(),
            "request_counts": {
                "processing": self.pending.len(),
                "succeeded": self.count("succeeded"),
                "errored": self.count("errored"),
                "canceled": self.count("canceled"),
                "expired": self.count("expired"),
            },
            "ended_at": time(self.ended_at),
            "created_at": time(Some(self.created_at)),
            "expires_at": time(Some(self.created_at + EXPIRY)),
            "cancel_initiated_at": time(self.cancel_initiated_at),
            "archived_at": null,
            "results_url": ended.then(|| format!("{base}/v1/messages/batches/{}/results", self.id)),
        })
    }
}

/// All batches, oldest first.
#[derive(Debug, Default)]
pub(super) struct BatchStore {
    batches: Mutex<Vec<Batch>>,
}

impl BatchStore {
    /// Runs `f` on batch `id`, or answers 404.
    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Batch) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut batches = lock(&self.batches);
        let batch = batches
            .iter_mut()
            .find(|b| b.id == id)
            .ok_or_else(|| ApiError::not_found(format!("message_batch: {id} not found")))?;
        f(batch)
    }
}

/// `http://HOST` as the client addressed us.
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

/// Checks the key and version header.
fn authorize(state: &EmulatorState, headers: &HeaderMap) -> Result<ApiVersion, ApiError> {
    check_headers(headers, state.inner.config.api_key.as_deref())
}

/// Turns a handler result into a response.
fn respond(result: Result<Value, ApiError>) -> Response {
    result.map_or_else(IntoResponse::into_response, json_ok)
}

/// `POST /v1/messages/batches`.
pub(super) async fn create(
    State(state): State<EmulatorState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(create_batch(&state, &headers, body))
}

/// Validates, stores and schedules a new batch.
fn create_batch(
    state: &EmulatorState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let version = authorize(state, headers)?;
    let pending = parse_batch(&parse_body(body)?, version)?;
    let batch = Batch {
        id: new_id("msgbatch"),
        status: Status::InProgress,
        created_at: Utc::now(),
        ended_at: None,
        cancel_initiated_at: None,
        pending,
        results: Vec::new(),
    };
    let shown = batch.to_json(&base_url(headers));
    let id = batch.id.clone();
    lock(&state.inner.batches.batches).push(batch);
    let worker = state.clone();
    let delay = state.inner.config.batch_delay;
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        finish(&worker, &id);
    });
    Ok(shown)
}

/// `{requests: [{custom_id, params}]}`.
fn parse_batch(value: &Value, version: ApiVersion) -> Result<Vec<PendingItem>, ApiError> {
    let requests = match value.get("requests") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => return Err(ApiError::invalid("requests: Field required")),
        Some(_) => return Err(ApiError::invalid("requests: Input should be a valid list")),
    };
    if requests.is_empty() || requests.len() > MAX_BATCH_REQUESTS {
        return Err(ApiError::invalid(format!(
            "requests: List should have between 1 and {MAX_BATCH_REQUESTS} items"
        )));
    }
    let mut seen = HashSet::new();
    requests
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let custom_id = parse_custom_id(item, i)?;
            if !seen.insert(custom_id.clone()) {
                return Err(ApiError::invalid(format!(
                    "requests.{i}.custom_id: duplicate custom_id {custom_id:?}; custom_id values must be unique"
                )));
            }
            let parsed = parse_params(item.get("params"), i, version)?;
            Ok((custom_id, parsed))
        })
        .collect()
}

/// `requests.{i}.custom_id`: 1-64 characters of `[a-zA-Z0-9_-]`.
fn parse_custom_id(item: &Value, i: usize) -> Result<String, ApiError> {
    let id = item
        .get("custom_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(format!("requests.{i}.custom_id: Field required")))?;
    let valid_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if id.is_empty() || id.chars().count() > MAX_CUSTOM_ID_CHARS || !valid_chars {
        return Err(ApiError::invalid(format!(
            "requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        )));
    }
    Ok(id.to_owned())
}

/// `requests.{i}.params`: a create body. A model that is not served is kept
/// as that request's error; anything else refuses the batch.
fn parse_params(
    params: Option<&Value>,
    i: usize,
    version: ApiVersion,
) -> Result<Result<ParsedRequest, ApiError>, ApiError> {
    let params =
        params.ok_or_else(|| ApiError::invalid(format!("requests.{i}.params: Field required")))?;
    match parse_request(params, version, Endpoint::Create) {
        Ok(req) => Ok(Ok(req)),
        Err(e) if e.status == StatusCode::NOT_FOUND => Ok(Err(e)),
        Err(e) => Err(ApiError::invalid(format!(
            "requests.{i}.params.{}",
            e.message
        ))),
    }
}

/// Processes (or cancels / expires) everything still pending in batch `id`.
fn finish(state: &EmulatorState, id: &str) {
    let Ok((status, pending)) = state
        .inner
        .batches
        .with(id, |b| Ok((b.status, std::mem::take(&mut b.pending))))
    else {
        return; // deleted meanwhile
    };
    let results: Vec<Value> = pending
        .into_iter()
        .map(|(custom_id, parsed)| {
            let result = outcome(state, status, parsed);
            json!({"custom_id": custom_id, "result": result})
        })
        .collect();
    let _ = state.inner.batches.with(id, |b| {
        b.results = results;
        b.status = Status::Ended;
        b.ended_at = Some(Utc::now());
        Ok(())
    });
}

/// The `result` object of one request.
fn outcome(
    state: &EmulatorState,
    status: Status,
    parsed: Result<ParsedRequest, ApiError>,
) -> Value {
    if status == Status::Canceling {
        return json!({"type": "canceled"});
    }
    if state.inner.config.batch_expire {
        return json!({"type": "expired"});
    }
    match parsed {
        Ok(req) => {
            let message = state.answer_now(&req, "batch", state.now());
            json!({"type": "succeeded", "message": message})
        }
        Err(e) => json!({"type": "errored", "error": e.body(&new_id("req"))}),
    }
}

/// `GET /v1/messages/batches/{id}`.
pub(super) async fn retrieve(
    State(state): State<EmulatorState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(authorize(&state, &headers).and_then(|_| {
        state
            .inner
            .batches
            .with(&id, |b| Ok(b.to_json(&base_url(&headers))))
    }))
}

/// `POST /v1/messages/batches/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<EmulatorState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(authorize(&state, &headers).and_then(|_| {
        state.inner.batches.with(&id, |b| {
            if b.status == Status::InProgress {
                b.status = Status::Canceling;
                b.cancel_initiated_at = Some(Utc::now());
            }
            Ok(b.to_json(&base_url(&headers)))
        })
    }))
}

/// `DELETE /v1/messages/batches/{id}` (ended batches only).
pub(super) async fn delete(
    State(state): State<EmulatorState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(authorize(&state, &headers).and_then(|_| {
        state.inner.batches.with(&id, |b| match b.status {
            Status::Ended => Ok(()),
            _ => Err(ApiError::invalid(format!(
                "Batch {id} cannot be deleted while it is processing; cancel it and wait for it to end"
            ))),
        })?;
        lock(&state.inner.batches.batches).retain(|b| b.id != id);
        Ok(json!({"id": id, "type": "message_batch_deleted"}))
    }))
}

/// `GET /v1/messages/batches/{id}/results`: JSONL, once ended.
pub(super) async fn results(
    State(state): State<EmulatorState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let lines = authorize(&state, &headers).and_then(|_| {
        state.inner.batches.with(&id, |b| {
            if b.status != Status::Ended {
                return Err(ApiError::invalid(format!(
                    "Batch {id} has not ended yet; results are available once processing_status is \"ended\""
                )));
            }
            Ok(b.results.iter().map(|r| format!("{r}\n")).collect::<String>())
        })
    });
    match lines {
        Ok(text) => ([(header::CONTENT_TYPE, "application/x-jsonl")], text).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/messages/batches?limit&before_id&after_id`: newest first.
pub(super) async fn list(
    State(state): State<EmulatorState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    respond(
        authorize(&state, &headers).and_then(|_| list_page(&state, &query, &base_url(&headers))),
    )
}

/// One page of the list.
fn list_page(
    state: &EmulatorState,
    query: &HashMap<String, String>,
    base: &str,
) -> Result<Value, ApiError> {
    let limit = match query.get("limit") {
        None => LIST_DEFAULT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=LIST_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!("limit: Input should be between 1 and {LIST_MAX}"))
            })?,
    };
    let batches = lock(&state.inner.batches.batches);
    let newest_first: Vec<&Batch> = batches.iter().rev().collect();
    let position = |key: &str| -> Result<Option<usize>, ApiError> {
        query
            .get(key)
            .map(|id| {
                newest_first
                    .iter()
                    .position(|b| &b.id == id)
                    .ok_or_else(|| ApiError::invalid(format!("{key}: unknown batch {id}")))
            })
            .transpose()
    };
    let (page, has_more) = match (position("before_id")?, position("after_id")?) {
        (Some(end), _) => {
            let start = end.saturating_sub(limit);
            (newest_first.get(start..end).unwrap_or_default(), start > 0)
        }
        (None, after) => {
            let start = after.map_or(0, |i| i + 1);
            let end = (start + limit).min(newest_first.len());
            (
                newest_first.get(start..end).unwrap_or_default(),
                end < newest_first.len(),
            )
        }
    };
    let data: Vec<Value> = page.iter().map(|b| b.to_json(base)).collect();
    Ok(json!({
        "data": data,
        "has_more": has_more,
        "first_id": page.first().map(|b| b.id.clone()),
        "last_id": page.last().map(|b| b.id.clone()),
    }))
}
