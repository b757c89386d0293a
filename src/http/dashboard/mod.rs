//! The job dashboard at `/dashboard`: server-rendered HTML with SVG charts, no script,
//! nothing fetched from elsewhere (the stylesheet is served by the binary). It is for people
//! with an ops or admin key and is not part of the JSON API, so it is left out of the
//! OpenAPI document.
//!
//! # Login and session
//! `GET /dashboard/login` shows a form; `POST /dashboard/login` takes an API key, checks it
//! with [`auth::authenticate`] (the same lookup and cache as the bearer header) and needs
//! scope ops or admin. It then sets the cookie `callcoach_session` holding the key itself,
//! `HttpOnly; SameSite=Strict; Path=/` (and `Secure` with `DASHBOARD_COOKIE_SECURE=true`).
//! Keeping the key rather than a signed session token means every request is checked
//! against `api_keys` exactly as an API call is, so revoking the key ends the session within
//! `AUTH_CACHE_MS`, and the front needs no session store or signing secret; the cookie is as
//! sensitive as the key, which `HttpOnly` (no script can read it), `SameSite=Strict` and
//! `Secure` protect. The key is never logged. `POST /dashboard/logout` clears the cookie.
//! Every other dashboard route needs the session: without a valid one a request is
//! redirected (303) to the login page. Only the login page and the stylesheet are served
//! without a key. Authenticated requests are rate limited like the API, on the key's own
//! buckets ([`RateLimits::admit`]); login attempts have no principal to charge (a key is 40
//! random alphanumerics, beyond guessing) and, like any request without a valid key, cost
//! one cached or indexed lookup. The login form must be posted from this origin too.
//!
//! # Actions and CSRF
//! Retry (failed or cancelled jobs, [`ledger::retry`]), cancel (queued or snoozed jobs,
//! [`ledger::cancel`]) and replay of every failed job ([`ledger::replay_failed`]) are form
//! posts, each carrying a token: HMAC-SHA256, keyed with the session's API key, of a fixed
//! label and the key's id. Another site can neither read it nor compute it without the key;
//! it needs no server secret and is the same on every replica. A post without the right
//! token, or whose `Origin` (else `Referer`) names another host than the request's `Host`,
//! gets 403. Actions answer 303 back to `/dashboard` with a flash message.
//!
//! # Data
//! See [`data`]: read fresh from Postgres (and Redis for the spend counters and cache stats)
//! on each view; the page reloads itself every [`page::REFRESH_SECS`] seconds.

pub mod data;
pub mod page;
pub mod svg;

pub use data::ScheduleRow;

use super::{
    AppState,
    auth::{self, Principal, Scope},
    limits::RateLimits,
};
use crate::ledger;
use axum::{
    Extension, Form, Router,
    extract::{
        FromRequest, Query, Request, State,
        rejection::{FormRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{Next, from_fn_with_state},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use uuid::Uuid;

/// Days the cache and savings panels cover unless `?days=` says otherwise.
pub const DEFAULT_DAYS: i32 = 14;
/// Most days `?days=` may ask for.
pub const MAX_DAYS: i32 = 90;
/// Most failed jobs one "replay all" replays.
pub const REPLAY_LIMIT: i64 = 1000;
/// Lifetime of the session cookie (12 hours).
const SESSION_MAX_AGE_SECS: u32 = 12 * 3600;
/// The scopes that may use the dashboard.
const OPERATORS: &[Scope] = &[Scope::Ops, Scope::Admin];

const STYLE: &str = include_str!("style.css");

/// Headers of every dashboard page: nothing but this origin's stylesheet and forms, never
/// framed, never cached.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes; `limits` charges the session's key like an API call.
pub fn router(state: AppState, limits: RateLimits) -> Router<AppState> {
    let session = from_fn_with_state(limits, require_session);
    let protected = Router::new()
        .route("/dashboard", get(show))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/jobs/{id}/{action}", post(job_action))
        .route("/dashboard/jobs/replay-dead", post(replay_dead))
        .route_layer(session);
    Router::new()
        .route("/dashboard/login", get(login_form).post(login))
        .route("/dashboard/style.css", get(stylesheet))
        .merge(protected)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// The session middleware: the cookie's key must be valid and have an operator scope, else
/// 303 to the login page; then the key's rate limit is charged.
async fn require_session(
    State(limits): State<RateLimits>,
    request: Request,
    next: Next,
) -> Response {
    let state = limits.app();
    let client = auth::client_address(request.extensions());
    let principal = match auth::session_key(request.headers()) {
        Some(key) => auth::authenticate(state, key, client)
            .await
            .ok()
            .filter(|p| p.require(OPERATORS).is_ok()),
        None => None,
    };
    let Some(principal) = principal else {
        return Redirect::to("/dashboard/login").into_response();
    };
    let token = csrf_token(
        auth::session_key(request.headers()).unwrap_or(""),
        &principal,
    );
    let mut request = request;
    request.extensions_mut().insert(CsrfToken(token));
    limits.admit(principal, request, next).await
}

/// The CSRF token of the request's session.
#[derive(Clone)]
struct CsrfToken(String);

/// HMAC-SHA256 keyed with the session's API key over a label and the key's id, hex.
fn csrf_token(key: &str, principal: &Principal) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(b"callcoach-dashboard-csrf:");
    mac.update(principal.key_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Adds the page headers (CSP and friends) to every dashboard response.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

async fn login_form() -> Html<String> {
    Html(page::login(None))
}

/// The login form's fields.
#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

async fn login(
    State(state): State<AppState>,
    client: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    if !same_origin(&headers) {
        return refused("the login form was posted from another site");
    }
    let Ok(Form(form)) = form else {
        return (
            StatusCode::BAD_REQUEST,
            Html(page::login(Some("enter an API key"))),
        )
            .into_response();
    };
    let key = form.key.trim();
    let client = client.map(|info| info.0.0.ip());
    let principal = match auth::authenticate(&state, key, client).await {
        Ok(principal) => principal,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            return (
                StatusCode::UNAUTHORIZED,
                Html(page::login(Some("invalid or revoked API key"))),
            )
                .into_response();
        }
        Err(e) => return (e.status, Html(page::login(Some(&e.message)))).into_response(),
    };
    if let Err(e) = principal.require(OPERATORS) {
        return (StatusCode::FORBIDDEN, Html(page::login(Some(&e.message)))).into_response();
    }
    tracing::info!(key_id = %principal.key_id, name = %principal.name, "dashboard login");
    let secure = if state.settings.dashboard_cookie_secure {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{}={key}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_MAX_AGE_SECS}{secure}",
        auth::SESSION_COOKIE
    );
    with_cookie(Redirect::to("/dashboard"), &cookie)
}

fn with_cookie(redirect: Redirect, cookie: &str) -> Response {
    let mut response = redirect.into_response();
    match HeaderValue::from_str(cookie) {
        Ok(value) => {
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        // The key had characters a cookie cannot carry; authenticated, so unreachable.
        Err(_) => refused("this API key cannot be kept in a cookie"),
    }
}

/// Every action's form.
#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

/// Checks the action's origin and token; `Err` says why it is refused (403).
fn check_action(
    headers: &HeaderMap,
    token: &CsrfToken,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<(), &'static str> {
    if !same_origin(headers) {
        return Err("the form was posted from another site");
    }
    let sent = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if !constant_time_eq(sent.as_bytes(), token.0.as_bytes()) {
        return Err("missing or wrong CSRF token; reload the dashboard and try again");
    }
    Ok(())
}

/// An action's form post that passed [`check_action`]; otherwise the 403 is answered.
struct CheckedForm;

impl FromRequest<AppState> for CheckedForm {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Response> {
        let token = request.extensions().get::<CsrfToken>().cloned();
        let headers = request.headers().clone();
        let form = Form::<ActionForm>::from_request(request, state).await;
        let token = token.ok_or_else(|| refused("no dashboard session"))?;
        check_action(&headers, &token, form).map_err(refused)?;
        Ok(CheckedForm)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request's `Origin` (else `Referer`), when present, names the host it was
/// sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .map(|v| v.to_str().unwrap_or("null"));
    let Some(source) = source else { return true };
    let authority = source
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(""));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

fn refused(message: &str) -> Response {
    (StatusCode::FORBIDDEN, Html(page::error("Refused", message))).into_response()
}

async fn logout(_checked: CheckedForm) -> Response {
    let cookie = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        auth::SESSION_COOKIE
    );
    with_cookie(Redirect::to("/dashboard/login"), &cookie)
}

/// `?days=` and the flash message of the last action.
#[derive(Deserialize, Default)]
struct ShowQuery {
    days: Option<i32>,
    flash: Option<String>,
    job: Option<Uuid>,
    n: Option<u64>,
}

async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(token): Extension<CsrfToken>,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> Response {
    let Query(query) = query.unwrap_or_default();
    let days = query.days.unwrap_or(DEFAULT_DAYS).clamp(1, MAX_DAYS);
    match data::load(&state, days).await {
        Ok(data) => {
            let flash = flash_message(&query);
            Html(page::dashboard(
                &data,
                &principal,
                &token.0,
                flash.as_deref(),
                days,
            ))
            .into_response()
        }
        Err(e) => {
            let status = super::ApiError::from(e).status;
            (
                status,
                Html(page::error(
                    "Dashboard unavailable",
                    "the database could not be read; retry shortly",
                )),
            )
                .into_response()
        }
    }
}

/// The words of a flash code (unknown codes show nothing).
fn flash_message(q: &ShowQuery) -> Option<String> {
    let job = q.job.map(|id| id.to_string()).unwrap_or_default();
    Some(match q.flash.as_deref()? {
        "retried" => format!("job {job} queued again"),
        "cancelled" => format!("job {job} cancelled"),
        "replayed" => format!("{} failed jobs queued again", q.n.unwrap_or(0)),
        "not_retryable" => format!("job {job} is not failed or cancelled; nothing was done"),
        "not_cancellable" => format!("job {job} has started or finished; it cannot be cancelled"),
        "not_found" => format!("job {job} does not exist"),
        _ => return None,
    })
}

fn back(flash: &str, job: Option<Uuid>) -> Response {
    let job = job.map(|id| format!("&job={id}")).unwrap_or_default();
    Redirect::to(&format!("/dashboard?flash={flash}{job}")).into_response()
}

/// `POST /dashboard/jobs/{id}/retry` and `…/cancel`: checks the origin and token, runs the
/// ledger transition and redirects back saying whether it applied.
async fn job_action(
    State(state): State<AppState>,
    axum::extract::Path((id, action)): axum::extract::Path<(String, String)>,
    _checked: CheckedForm,
) -> Response {
    if action != "retry" && action != "cancel" {
        let page = page::error("Not found", "the actions are retry and cancel");
        return (StatusCode::NOT_FOUND, Html(page)).into_response();
    }
    let Ok(id) = id.parse::<Uuid>() else {
        let page = page::error("Bad request", "the job id is not a UUID");
        return (StatusCode::BAD_REQUEST, Html(page)).into_response();
    };
    let result = async {
        if ledger::job(&state.pg, id).await?.is_none() {
            return Ok("not_found");
        }
        Ok::<_, sqlx::Error>(match action.as_str() {
            "retry" if ledger::retry(&state.pg, id).await? => "retried",
            "retry" => "not_retryable",
            _ if ledger::cancel(&state.pg, id).await? => "cancelled",
            _ => "not_cancellable",
        })
    };
    match result.await {
        Ok(flash) => back(flash, Some(id)),
        Err(e) => action_failed(e),
    }
}

fn action_failed(e: sqlx::Error) -> Response {
    let status = super::ApiError::from(e).status;
    let page = page::error(
        "Action failed",
        "the database could not be updated; retry shortly",
    );
    (status, Html(page)).into_response()
}

async fn replay_dead(State(state): State<AppState>, _checked: CheckedForm) -> Response {
    match ledger::replay_failed(&state.pg, REPLAY_LIMIT).await {
        Ok(n) => Redirect::to(&format!("/dashboard?flash=replayed&n={n}")).into_response(),
        Err(e) => action_failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    #[test]
    fn only_same_origin_posts_pass() {
        let host = (header::HOST, "127.0.0.1:8080");
        assert!(
            same_origin(&headers(std::slice::from_ref(&host))),
            "no Origin nor Referer"
        );
        assert!(same_origin(&headers(&[
            host.clone(),
            (header::ORIGIN, "http://127.0.0.1:8080")
        ])));
        assert!(!same_origin(&headers(&[
            host.clone(),
            (header::ORIGIN, "http://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            host.clone(),
            (header::ORIGIN, "null")
        ])));
        assert!(same_origin(&headers(&[
            host.clone(),
            (header::REFERER, "http://127.0.0.1:8080/dashboard")
        ])));
        assert!(!same_origin(&headers(&[
            host,
            (header::REFERER, "https://127.0.0.1:8080.evil.example/")
        ])));
    }

    #[test]
    fn tokens_depend_on_the_key() {
        let principal = Principal {
            key_id: Uuid::nil(),
            name: "ops".into(),
            scope: Scope::Ops,
        };
        let a = csrf_token("cc_a_1", &principal);
        assert_eq!(a.len(), 64);
        assert_eq!(a, csrf_token("cc_a_1", &principal));
        assert_ne!(a, csrf_token("cc_a_2", &principal));
        assert!(constant_time_eq(a.as_bytes(), a.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), &a.as_bytes()[1..]));
    }
}
