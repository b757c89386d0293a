//! Route handlers: health, readiness, metrics, call ingest and reads, analysis enqueue, job status.

use super::openapi::ErrorBody;
use super::{
    ApiError, ApiJson, ApiPath, AppState,
    auth::{Principal, Scope},
};
use crate::{
    db,
    jobs::{AnalyzeCall, InvalidateRubric, Job, warm_cache},
    ledger,
    model::{self, CallInput, Dimension, Role},
};
use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;
use utoipa::ToSchema;
use uuid::Uuid;

const WRITERS: &[Scope] = &[Scope::Producer, Scope::Admin];

/// Body of `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Body of `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `degraded`.
    pub status: String,
    /// `ok` or the error Postgres gave.
    pub postgres: String,
    /// `ok` or the error Redis gave.
    pub redis: String,
}

/// `GET /readyz`: Postgres and Redis both answer (503 naming the one that does not).
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Postgres and Redis answer", body = Readiness),
    (status = 503, description = "Postgres or Redis does not answer", body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let pg = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.pg),
    )
    .await;
    let pg = match pg {
        Ok(Ok(_)) => "ok".to_string(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: timed out".to_string(),
    };
    let redis = match tokio::time::timeout(Duration::from_millis(500), ping_redis(&state)).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => format!("error: {e:#}"),
        Err(_) => "error: timed out".to_string(),
    };
    let ready = pg == "ok" && redis == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status_text = if ready { "ready" } else { "degraded" };
    let body = Readiness {
        status: status_text.into(),
        postgres: pg,
        redis,
    };
    (status, Json(body))
}

/// PING over a new connection: the shared connection may still be reconnecting after an
/// outage, and readiness must say what Redis answers now, not what it answered last.
async fn ping_redis(state: &AppState) -> anyhow::Result<()> {
    let client = crate::redis_client(&state.settings)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING").query_async::<String>(&mut conn).await?;
    Ok(())
}

/// `GET /metrics`: Prometheus text format (ops and admin keys).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses(
    (status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String),
    (status = 403, description = "The key's scope is not ops or admin", body = ErrorBody)))]
pub async fn metrics(State(state): State<AppState>, principal: Principal) -> impl IntoResponse {
    if let Err(e) = principal.require(&[Scope::Ops, Scope::Admin]) {
        return e.into_response();
    }
    state.metrics.render().into_response()
}

/// Body of the answer to `POST /v1/calls`.
#[derive(Serialize, ToSchema)]
pub struct CallCreated {
    /// The call's id.
    pub id: Uuid,
    /// False when a call with this `external_id` existed and is returned instead.
    pub created: bool,
}

/// `POST /v1/calls`: ingest a call and its transcript (producer and admin keys). With an
/// `Idempotency-Key` header a retry gets the first answer again.
#[utoipa::path(post, path = "/v1/calls", tag = "calls", request_body = CallInput,
    params(IdempotencyHeader),
    responses(
        (status = 201, description = "Call stored", body = CallCreated),
        (status = 200, description = "A call with this external_id exists; it is returned", body = CallCreated),
        (status = 400, description = "Invalid field or body", body = ErrorBody),
        (status = 403, description = "The key's scope may not write", body = ErrorBody),
        (status = 409, description = "Same Idempotency-Key still being processed", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape, or Idempotency-Key reused with another body", body = ErrorBody)))]
pub async fn create_call(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(call): ApiJson<CallInput>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(WRITERS)?;
    call.validate().map_err(ApiError::bad_request)?;
    let (id, created) = db::insert_call(&state.pg, &call).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(CallCreated { id, created })))
}

/// `GET /v1/calls/{id}`: `get_call_with_details`: the call, its rep, speakers, transcript and
/// the latest coaching per dimension.
#[utoipa::path(get, path = "/v1/calls/{id}", tag = "calls",
    params(("id" = Uuid, Path, description = "Call id")),
    responses(
        (status = 200, description = "The call with its details", body = super::openapi::CallDetails),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such call", body = ErrorBody)))]
pub async fn get_call(
    State(state): State<AppState>,
    _principal: Principal,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Value>, ApiError> {
    crate::performance::call_details(&state.pg, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("call {id} does not exist")))
}

/// Body of `POST /v1/analyses`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnalysisRequest {
    /// Call to analyse.
    pub call_id: Uuid,
    /// Dimensions (all four when omitted or empty); at most four, duplicates removed.
    #[serde(default)]
    pub dimensions: Vec<Dimension>,
}

/// `POST /v1/analyses`: enqueue an analysis; 202 with the job id and its status URL. Accepted
/// as long as Postgres is up: the ledger row is durable and the relay delivers it if Redis is
/// down. With an `Idempotency-Key` the response is replayed to retries (see
/// [`super::idempotency`]) and the job carries a ledger dedup key, so even a retry that takes
/// over an abandoned claim enqueues no second job.
#[utoipa::path(post, path = "/v1/analyses", tag = "analyses", request_body = AnalysisRequest,
    params(IdempotencyHeader),
    responses(
        (status = 202, description = "Analysis enqueued (or the job of an earlier identical request)", body = AnalysisAccepted),
        (status = 400, description = "Invalid field or body", body = ErrorBody),
        (status = 402, description = "An LLM budget is spent", body = ErrorBody),
        (status = 403, description = "The key's scope may not write", body = ErrorBody),
        (status = 404, description = "No such call", body = ErrorBody),
        (status = 409, description = "Same Idempotency-Key still being processed", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape, or Idempotency-Key reused with another body", body = ErrorBody)))]
pub async fn create_analysis(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<AnalysisRequest>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(WRITERS)?;
    let dimensions = model::dimension_set(&req.dimensions).map_err(ApiError::bad_request)?;
    let idempotency = super::idempotency::key_of(&headers)?;
    state.spend.check().await?;
    if !db::call_exists(&state.pg, req.call_id).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "call_not_found",
            format!("call {} does not exist", req.call_id),
        ));
    }
    let job = AnalyzeCall {
        call_id: req.call_id,
        dimensions,
        batch: false,
    };
    let mut job = job.to_job().map_err(ApiError::internal)?;
    if let Some(key) = idempotency {
        job = job.dedup_key(format!("idem:{}:{key}", principal.key_id));
    }
    let enqueued = state.queue.enqueue(job).await?;
    let status_url = format!("{}/v1/jobs/{}", state.settings.public_url, enqueued.job_id);
    let body = AnalysisAccepted {
        job_id: enqueued.job_id,
        status_url,
        created: enqueued.created,
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// Body of the answer to `POST /v1/analyses`.
#[derive(Serialize, ToSchema)]
pub struct AnalysisAccepted {
    /// The job's id.
    pub job_id: Uuid,
    /// Where to follow it (`GET /v1/jobs/{id}`).
    pub status_url: String,
    /// False when an earlier request with the same `Idempotency-Key` made the job.
    pub created: bool,
}

/// The optional `Idempotency-Key` request header of the write routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyHeader {
    /// Up to 255 visible ASCII characters; a retry with the same key and body gets the first
    /// answer again, the same key with another body a 422.
    #[param(rename = "Idempotency-Key", max_length = 255)]
    pub idempotency_key: Option<String>,
}

/// `GET /v1/jobs/{id}`: the job's ledger row.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "analyses",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = ledger::JobRow),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    _principal: Principal,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ledger::JobRow>, ApiError> {
    state
        .ledger
        .job(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("job {id} does not exist")))
}

/// Body of `PUT /v1/rubrics/{role}/{dimension}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RubricRequest {
    /// New version label ([`model::check_rubric_version`]: `1.2.0`, `2026-06`, …).
    pub version: String,
    /// Criteria text given to the model (at most [`model::MAX_RUBRIC_CRITERIA_CHARS`]).
    pub criteria: String,
}

/// `PUT /v1/rubrics/{role}/{dimension}` (admin): stores a new rubric version, makes it active
/// and enqueues `invalidate_rubric` for the superseded version's cache entries, all in one
/// transaction with a `warm_cache` job for that role and dimension over the recent calls
/// ([`warm_cache::after_rubric_update`]): either the rubric and its jobs are all stored, or
/// none.
#[utoipa::path(put, path = "/v1/rubrics/{role}/{dimension}", tag = "admin", request_body = RubricRequest,
    params(("role" = Role, Path, description = "Rep role"), ("dimension" = Dimension, Path, description = "Dimension")),
    responses(
        (status = 200, description = "Rubric stored and active", body = RubricUpdated),
        (status = 400, description = "Invalid role, dimension, version or criteria", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "The version exists", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape", body = ErrorBody)))]
pub async fn put_rubric(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((role, dimension)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<RubricRequest>,
) -> Result<Json<RubricUpdated>, ApiError> {
    principal.require(&[Scope::Admin])?;
    let role: Role = role.parse().map_err(ApiError::bad_request)?;
    let dimension: Dimension = dimension.parse().map_err(ApiError::bad_request)?;
    model::check_rubric_version(&req.version).map_err(ApiError::bad_request)?;
    let version = req.version.as_str();
    model::check_text("criteria", &req.criteria, model::MAX_RUBRIC_CRITERIA_CHARS)
        .map_err(ApiError::bad_request)?;
    if req.criteria.trim().is_empty() {
        return Err(ApiError::bad_request("criteria must not be empty"));
    }
    let mut tx = state.pg.begin().await?;
    let update = db::replace_rubric(&mut tx, role, dimension, version, &req.criteria).await?;
    let previous = match update {
        db::RubricUpdate::VersionExists => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "version_exists",
                format!(
                    "rubric {} / {dimension} already has version {version}",
                    role.as_str()
                ),
            ));
        }
        db::RubricUpdate::Replaced { previous } => previous,
    };
    let invalidation = match &previous {
        Some(old) => {
            let job = InvalidateRubric {
                role,
                dimension,
                version: old.clone(),
            };
            let job = job.to_job().map_err(ApiError::internal)?;
            Some(state.queue.enqueue_tx(&mut tx, job).await?.job_id)
        }
        None => None,
    };
    let warm =
        warm_cache::after_rubric_update(role, dimension, version).map_err(ApiError::internal)?;
    let warm = state.queue.enqueue_tx(&mut tx, warm).await?.job_id;
    tx.commit().await?;
    Ok(Json(RubricUpdated {
        role,
        dimension,
        version: version.to_string(),
        previous_version: previous,
        invalidation_job_id: invalidation,
        warm_job_id: warm,
    }))
}

/// Body of the answer to `PUT /v1/rubrics/{role}/{dimension}`.
#[derive(Serialize, ToSchema)]
pub struct RubricUpdated {
    /// Role.
    pub role: Role,
    /// Dimension.
    pub dimension: Dimension,
    /// The new active version.
    pub version: String,
    /// The version it replaced, if any.
    pub previous_version: Option<String>,
    /// The job invalidating the replaced version's cache entries, if any.
    pub invalidation_job_id: Option<Uuid>,
    /// The job re-warming the cache of this role and dimension's recent calls.
    pub warm_job_id: Uuid,
}

/// Fallback for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// Fallback for a known route with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
