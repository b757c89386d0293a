//! The HTTP front (axum): routes, shared state, and the one error type every handler returns,
//! rendered as `{"error":{"code","message"}}` with a 4xx for every client mistake.

pub mod api;
pub mod auth;
pub mod compression;
pub mod dashboard;
pub mod html;
pub mod idempotency;
pub mod leases;
pub mod limits;
pub mod openapi;
pub mod reads;
pub mod server;

use crate::{config::Settings, queue::Queue};
use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{
        DefaultBodyLimit, FromRequest, FromRequestParts, Request,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::StatusCode,
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use std::sync::Arc;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, router::UtoipaMethodRouter, routes};

/// Default largest request body accepted (2 MiB, `HTTP_MAX_BODY_BYTES`): enough for a long
/// transcript.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// Postgres pool.
    pub pg: PgPool,
    /// Redis connection (readiness checks).
    pub redis: ConnectionManager,
    /// Producer handle.
    pub queue: Queue,
    /// Grouped ledger reads (`GET /v1/jobs/{id}`).
    pub ledger: crate::ledger::Ledger,
    /// Settings.
    pub settings: Arc<Settings>,
    /// Prometheus renderer for `/metrics`.
    pub metrics: PrometheusHandle,
    /// The fleet's LLM budgets: interactive analyses are refused once one is spent.
    pub spend: crate::llm::limits::SpendGuard,
    /// Authenticated API keys, cached for `AUTH_CACHE_MS`.
    pub keys: auth::KeyCache,
    /// The HTTP rate limits (`None` with `RATE_LIMIT_ENABLED=false`): the route classes'
    /// buckets per key, and the key lookups per client address.
    pub limiter: Option<limits::HttpRateLimiter>,
    /// What the dashboard's schedule panel lists ([`crate::schedule::DashboardSchedule`]);
    /// `None` shows "scheduler not configured".
    pub schedule: Option<Arc<crate::schedule::DashboardSchedule>>,
}

/// Builds the router with every route and layer. Each handler is registered with its OpenAPI
/// operation ([`openapi`]), and the document is served at `/openapi.json` and `/docs`.
pub fn router(state: AppState) -> Router {
    let max_body_bytes = state.settings.http_max_body_bytes;
    let cors = cors(&state.settings.cors_allowed_origins);
    let limits = limits::RateLimits::new(&state);
    let dashboard = dashboard::router(state.clone(), limits.clone());
    let idempotent = || from_fn_with_state(state.clone(), idempotency::idempotent);
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(api::healthz))
        .routes(routes!(api::readyz))
        .routes(routes!(api::metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs))
        .routes(with_route_layer(routes!(api::create_call), idempotent()))
        .routes(routes!(reads::search_calls))
        .routes(routes!(api::get_call))
        .routes(routes!(reads::rep_insights))
        .routes(routes!(reads::cache_stats))
        .routes(with_route_layer(
            routes!(api::create_analysis),
            idempotent(),
        ))
        .routes(routes!(api::get_job))
        .routes(routes!(api::put_rubric))
        // Rate limits per API key and route class: keep this after the last route (a
        // route_layer covers the routes added before it; /healthz and /readyz are exempt).
        .route_layer(from_fn_with_state(limits, limits::enforce))
        .split_for_parts();
    openapi::describe_common_errors(&mut doc);
    router
        // Browser pages, not JSON API: kept out of the OpenAPI document.
        .merge(dashboard)
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::Extension(openapi::Document::new(&doc)))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(from_fn_with_state(
            state.settings.compression_min_bytes,
            compression::gzip,
        ))
        // Outside the limits and authentication: a preflight carries no key.
        .layer(tower::util::option_layer(cors))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The CORS layer of `CORS_ALLOWED_ORIGINS` (none without origins): it answers preflights
/// and lets the listed origins send the API's headers and read the rate-limit ones.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                limits::X_RATELIMIT_LIMIT,
                limits::X_RATELIMIT_REMAINING,
                limits::X_RATELIMIT_RESET,
                limits::RATELIMIT_POLICY,
                limits::RATELIMIT,
                header::RETRY_AFTER,
                compression::X_COMPRESSION_RATIO,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// A registered handler with a layer on its route only.
fn with_route_layer<L>(
    (schemas, paths, method_router): UtoipaMethodRouter<AppState>,
    layer: L,
) -> UtoipaMethodRouter<AppState>
where
    L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service:
        tower::Service<Request, Error = std::convert::Infallible> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<Request>>::Response: IntoResponse + 'static,
    <L::Service as tower::Service<Request>>::Future: Send + 'static,
{
    (schemas, paths, method_router.route_layer(layer))
}

/// An error answered to the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation naming the problem.
    pub message: String,
    /// `Retry-After` seconds (503s without one get [`RETRY_AFTER_SECS`]).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// Any error with a status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// This error with `Retry-After: secs`.
    pub fn retry_after(self, secs: u64) -> Self {
        Self {
            retry_after: Some(secs),
            ..self
        }
    }
    /// 400 for input that is well-formed JSON but semantically wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 500: logs the cause, tells the client nothing internal.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see server logs",
        )
    }
    /// 503 when a dependency is down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

/// Seconds a client is asked to wait before retrying a 503.
pub const RETRY_AFTER_SECS: u64 = 2;

/// A spent LLM budget: 402 naming the budget and when it resets. Work nobody waits on still
/// queues (and snoozes until then); an interactive analysis would only fail.
impl From<crate::llm::limits::OverBudget> for ApiError {
    fn from(over: crate::llm::limits::OverBudget) -> Self {
        Self::new(
            StatusCode::PAYMENT_REQUIRED,
            "budget_exhausted",
            over.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        let retry_after = self
            .retry_after
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECS));
        if let Some(secs) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            return ApiError::unavailable("database unavailable, retry later");
        }
        ApiError::internal(e)
    }
}

impl From<crate::ledger::LedgerError> for ApiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        if e.unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            return ApiError::unavailable("database unavailable, retry later");
        }
        ApiError::internal(e)
    }
}

impl From<crate::queue::QueueError> for ApiError {
    fn from(e: crate::queue::QueueError) -> Self {
        match e {
            crate::queue::QueueError::Ledger(e) => ApiError::from(e),
            other => ApiError::internal(other),
        }
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s: 415 for a wrong content type, 413 for an
/// oversize body, 408 for a body not received in time, 400 for a body that is not UTF-8 or not
/// JSON, 422 for JSON of the wrong shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a JSON body with Content-Type: application/json",
            ));
        }
        let bytes = read_body(req.into_body(), state.settings.http_max_body_bytes).await?;
        if let Err(e) = std::str::from_utf8(&bytes) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_utf8",
                format!(
                    "request body is not valid UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                ),
            ));
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `application/json` or any `application/*+json`, parameters (`; charset=…`) ignored.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.split_once('/').is_some_and(|(kind, sub)| {
        kind == "application" && (sub == "json" || sub.ends_with("+json"))
    })
}

/// Reads a whole request body of at most `limit` bytes (`HTTP_MAX_BODY_BYTES`): 413 past the
/// limit, 408 when the server's body deadline ([`server::BodyTimeout`]) passes first, 400 when
/// the body breaks off.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if let Some(timeout) = find_cause::<server::BodyTimeout>(&e) {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                timeout.to_string(),
            );
        }
        if find_cause::<http_body_util::LengthLimitError>(&e).is_some() {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body exceeds {limit} bytes (HTTP_MAX_BODY_BYTES)"),
            );
        }
        let cause = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .last()
        .map(|e| e.to_string())
        .unwrap_or_default();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("could not read the request body: {cause}"),
        )
    })
}

/// The first error of type `E` in `error`'s source chain.
fn find_cause<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    std::iter::successors(Some(error), |e| e.source()).find_map(|e| e.downcast_ref::<E>())
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let code = match &rejection {
        JsonRejection::JsonSyntaxError(_) => "invalid_json",
        JsonRejection::JsonDataError(_) => "invalid_request",
        _ => "invalid_body",
    };
    ApiError::new(rejection.status(), code, rejection.body_text())
}

/// `Path<T>` whose rejection is a 400 naming the bad segment.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_path",
        rejection.body_text(),
    )
}

/// `Query<T>` whose rejection is a 400 naming the bad parameter.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        rejection.body_text(),
    )
}
