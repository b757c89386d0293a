//! HTTP rate limits: one token bucket per API key and route class, charged in Redis through
//! the fleet limiter of [`crate::rate_limit`] (the same Lua script as the LLM limits). A
//! busy key's requests spend tokens leased to the process ([`super::leases`]): one
//! `EVALSHA` per lease, not per request, and never more admitted than the bucket holds.
//!
//! # Who and what is charged
//! The identity is the authenticated API key's id ([`Principal::key_id`]); nothing the client
//! sends besides its key (an e-mail header, the path's values) picks the bucket. A request is
//! authenticated before anything is charged, so a request without a valid key gets its 401
//! and costs nobody anything. The principal is then handed to the handler in the request's
//! extensions, so the key is looked up once per request.
//!
//! The class comes from the method and the matched route template (axum's [`MatchedPath`]),
//! never the raw path, so `/v1/jobs/1` and `/v1/jobs/2` share a bucket:
//!
//! | class | requests | default |
//! |---|---|---|
//! | `analysis` | `POST /v1/analyses` | 10/min |
//! | `insights` | `GET /v1/reps/{email}/insights` | 20/min |
//! | `search` | `GET /v1/calls/search` | 50/min |
//! | `get` | every other `GET` / `HEAD` | 100/min |
//! | `post` | every other `POST`, `PUT`, `PATCH`, `DELETE` | 30/min |
//!
//! A request whose key is not in the key cache is also charged, before its key is looked up
//! in Postgres, to the `key_lookup` bucket of its client's address (the TCP peer),
//! `RATE_LIMIT_KEY_LOOKUPS_PER_MIN` (600) a minute: the bound on what unknown keys cost.
//!
//! `/healthz` and `/readyz` are never limited, nor are unknown routes and methods a route
//! does not serve (their 404 and 405 do no work). A bucket holds a minute's worth of
//! requests and refills continuously (`per_min / 60` a second); its Redis key expires once
//! it would be full again.
//!
//! # Headers
//! Every response of a limited route carries, for a class `get` of 100/min after 5 requests:
//!
//! ```text
//! X-RateLimit-Limit: 100
//! X-RateLimit-Remaining: 95
//! X-RateLimit-Reset: 1767225603        (Unix seconds when the bucket is full again)
//! RateLimit-Policy: "get";q=100;w=60
//! RateLimit: "get";r=95;t=3           (t: seconds until the bucket is full again)
//! ```
//!
//! `RateLimit-Policy` and `RateLimit` follow draft-ietf-httpapi-ratelimit-headers (-09 to -11):
//! the policy is named after the class, `q` is the capacity and `w` the 60-second window;
//! `r` is the whole requests left now. A refused request is answered `429` with the JSON
//! error `{"error":{"code":"rate_limited","message":…}}`, `Retry-After` (seconds until the
//! next request is allowed, at least 1), `X-RateLimit-Remaining: 0`, and `t` equal to
//! `Retry-After` (the draft asks that `Retry-After` not end before the effective window; within
//! that time the client can use no more than `r=0`). `X-RateLimit-Reset` is always the time
//! the bucket is full again. The request body of a refused request is read and dropped
//! (up to `HTTP_MAX_BODY_BYTES`), so the connection stays usable.
//!
//! # When Redis is unreachable
//! The limiter call has a timeout ([`RateLimitSettings::timeout`], 25 ms); past it, or on any
//! Redis error, the request is let through (fail open), counted in
//! `callcoach_http_rate_limit_failed_open_total{class}` (and the limiter's own
//! `callcoach_rate_limit_fallbacks_total{mode="open"}`), and answered with only the static
//! `X-RateLimit-Limit` and `RateLimit-Policy`: nobody knows what is left. After a failure the
//! limiter skips Redis for a second, so an outage costs one timeout a second, not one per
//! request; it is logged when it starts and when it ends.

use super::{ApiError, AppState, auth::Principal, leases::Leases};
use crate::{
    config::Settings,
    rate_limit::{Bucket, FailMode, LimiterOptions, RateLimiter},
    telemetry::names,
};
use axum::{
    body::Body,
    extract::{FromRequestParts, MatchedPath, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use redis::aio::ConnectionManager;
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};
use uuid::Uuid;

/// `X-RateLimit-Limit`: the class's capacity (requests per minute).
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining`: whole requests left now.
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset`: Unix seconds (rounded up) when the bucket is full again.
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): `"class";q=N;w=60`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers): `"class";r=N;t=S`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The window of every class, in seconds: limits are per minute.
const WINDOW_SECS: u64 = 60;

/// Commands in flight on the limiter's own Redis connection: above the busiest front's
/// concurrency, so a burst never queues for a slot within the 25 ms timeout.
const REDIS_IN_FLIGHT: usize = 1024;

/// Longest a refused request's body is read before answering (so the connection is kept).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The HTTP rate-limit settings (`RATE_LIMIT_*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimitSettings {
    /// Whether requests are limited at all (`RATE_LIMIT_ENABLED`, default true).
    pub enabled: bool,
    /// Reads (`RATE_LIMIT_GET_PER_MIN`, default 100).
    pub get_per_min: u32,
    /// Writes (`RATE_LIMIT_POST_PER_MIN`, default 30).
    pub post_per_min: u32,
    /// `POST /v1/analyses` (`RATE_LIMIT_ANALYSIS_PER_MIN`, default 10).
    pub analysis_per_min: u32,
    /// `GET /v1/reps/{email}/insights` (`RATE_LIMIT_INSIGHTS_PER_MIN`, default 20).
    pub insights_per_min: u32,
    /// `GET /v1/calls/search` (`RATE_LIMIT_SEARCH_PER_MIN`, default 50).
    pub search_per_min: u32,
    /// API key lookups in Postgres per client address (`RATE_LIMIT_KEY_LOOKUPS_PER_MIN`,
    /// default 600): keys not in the in-memory cache, unknown ones included.
    pub key_lookups_per_min: u32,
    /// Longest wait for Redis before a request is let through unchecked
    /// (`RATE_LIMIT_TIMEOUT_MS`, default 25).
    pub timeout: Duration,
}

impl Default for RateLimitSettings {
    /// The spec's limits.
    fn default() -> Self {
        Self {
            enabled: true,
            get_per_min: 100,
            post_per_min: 30,
            analysis_per_min: 10,
            insights_per_min: 20,
            search_per_min: 50,
            key_lookups_per_min: 600,
            timeout: Duration::from_millis(25),
        }
    }
}

impl RateLimitSettings {
    /// Requests a minute allowed for `class`.
    pub fn per_min(&self, class: RouteClass) -> u32 {
        match class {
            RouteClass::Get => self.get_per_min,
            RouteClass::Post => self.post_per_min,
            RouteClass::Analysis => self.analysis_per_min,
            RouteClass::Insights => self.insights_per_min,
            RouteClass::Search => self.search_per_min,
            RouteClass::KeyLookup => self.key_lookups_per_min,
        }
    }
}

/// The class of a request, which picks its limit and (with the key) its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// Reads.
    Get,
    /// Writes.
    Post,
    /// `POST /v1/analyses`.
    Analysis,
    /// `GET /v1/reps/{email}/insights`.
    Insights,
    /// `GET /v1/calls/search`.
    Search,
    /// An API key looked up in Postgres (not in the key cache), charged to the client's
    /// address before the key is known: what bounds the lookups unknown keys cost.
    KeyLookup,
}

/// Routes with a class of their own: (method, route template, class). A template's `{…}`
/// segment matches any parameter name, so `/v1/reps/{rep}/insights` is the same route.
const SPECIAL_ROUTES: &[(Method, &str, RouteClass)] = &[
    (Method::POST, "/v1/analyses", RouteClass::Analysis),
    (
        Method::GET,
        "/v1/reps/{email}/insights",
        RouteClass::Insights,
    ),
    (Method::GET, "/v1/calls/search", RouteClass::Search),
];

/// Routes never limited.
const UNLIMITED_ROUTES: &[&str] = &["/healthz", "/readyz"];

impl RouteClass {
    /// Every class.
    pub const ALL: [RouteClass; 6] = [
        RouteClass::Get,
        RouteClass::Post,
        RouteClass::Analysis,
        RouteClass::Insights,
        RouteClass::Search,
        RouteClass::KeyLookup,
    ];

    /// The policy name in the headers and the bucket key.
    pub fn name(self) -> &'static str {
        match self {
            RouteClass::Get => "get",
            RouteClass::Post => "post",
            RouteClass::Analysis => "analysis",
            RouteClass::Insights => "insights",
            RouteClass::Search => "search",
            RouteClass::KeyLookup => "key_lookup",
        }
    }

    /// The class of a request to the route `template` (as matched by the router), or `None`
    /// for routes that are not limited.
    pub fn classify(method: &Method, template: &str) -> Option<RouteClass> {
        if UNLIMITED_ROUTES.contains(&template) {
            return None;
        }
        // HEAD is a GET without the body.
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let special = SPECIAL_ROUTES
            .iter()
            .find(|(m, t, _)| m == method && same_template(t, template));
        if let Some((_, _, class)) = special {
            return Some(*class);
        }
        Some(match *method {
            Method::GET | Method::OPTIONS => RouteClass::Get,
            _ => RouteClass::Post,
        })
    }
}

/// Whether two route templates are the same route: equal literal segments, and a parameter
/// (`{…}`) wherever the other has one.
fn same_template(a: &str, b: &str) -> bool {
    let param = |s: &str| s.starts_with('{') && s.ends_with('}');
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x == y || (param(x) && param(y)) => {}
            _ => return false,
        }
    }
}

/// The name of the bucket of `who` (an API key id, or a client address for
/// [`RouteClass::KeyLookup`]) for `class` (its Redis key is `callcoach:rl:http:<class>:<who>`).
pub fn bucket_name(class: RouteClass, who: impl std::fmt::Display) -> String {
    format!("http:{}:{who}", class.name())
}

/// A class's limit and its rendered static headers.
#[derive(Clone, Debug)]
struct Policy {
    per_min: u32,
    limit: HeaderValue,
    policy: HeaderValue,
}

impl Policy {
    fn new(class: RouteClass, per_min: u32) -> Self {
        let policy = format!("\"{}\";q={per_min};w={WINDOW_SECS}", class.name());
        Self {
            per_min,
            limit: HeaderValue::from(per_min),
            policy: HeaderValue::try_from(policy).expect("a class name and digits"),
        }
    }
}

/// What the limits decided for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The request's class.
    pub class: RouteClass,
    /// Whether the request may proceed (also when Redis could not be asked).
    pub allowed: bool,
    /// The class's limit per minute.
    pub limit: u32,
    /// What Redis said; `None` when it could not be asked and the request was let through.
    pub state: Option<BucketState>,
}

/// A bucket's state after a decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketState {
    /// Whole requests left now.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub full_in: Duration,
    /// Until the next request is allowed (zero unless refused).
    pub retry_in: Duration,
}

impl Verdict {
    /// Whether Redis could not be asked and the request was let through unchecked.
    pub fn failed_open(&self) -> bool {
        self.state.is_none()
    }

    /// Counts the decision in the rate-limit metrics.
    fn count(&self) {
        let class = self.class.name();
        let decision = match (self.failed_open(), self.allowed) {
            (true, _) => "fail_open",
            (false, true) => "allowed",
            (false, false) => "denied",
        };
        metrics::counter!(names::HTTP_RATE_LIMIT_DECISIONS, "class" => class, "decision" => decision)
            .increment(1);
        if self.failed_open() {
            metrics::counter!(names::HTTP_RATE_LIMIT_FAILED_OPEN, "class" => class).increment(1);
        } else if !self.allowed {
            metrics::counter!(names::HTTP_RATE_LIMITED, "class" => class).increment(1);
        }
    }

    /// `Retry-After` of a refused request: whole seconds until the next request is allowed,
    /// at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        let state = self.state.filter(|_| !self.allowed)?;
        Some(ceil_secs(state.retry_in).max(1))
    }

    /// The `t` of `RateLimit`: seconds until the bucket is full again, or, when refused, the
    /// `Retry-After` (the draft's effective window must not outlast it).
    fn window_secs(&self, state: &BucketState) -> u64 {
        self.retry_after_secs()
            .unwrap_or_else(|| ceil_secs(state.full_in))
    }

    /// Writes the rate-limit headers (and `Retry-After` when refused) into `headers`, with
    /// `now` the time the reset is counted from.
    fn write_headers(&self, policy: &Policy, headers: &mut HeaderMap, now: SystemTime) {
        headers.insert(X_RATELIMIT_LIMIT, policy.limit.clone());
        headers.insert(RATELIMIT_POLICY, policy.policy.clone());
        let Some(state) = &self.state else {
            return;
        };
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let reset = ceil_secs(now + state.full_in);
        headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(state.remaining));
        headers.insert(X_RATELIMIT_RESET, HeaderValue::from(reset));
        let current = format!(
            "\"{}\";r={};t={}",
            self.class.name(),
            state.remaining,
            self.window_secs(state)
        );
        if let Ok(value) = HeaderValue::try_from(current) {
            headers.insert(RATELIMIT, value);
        }
        if let Some(secs) = self.retry_after_secs() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The HTTP limits over the fleet limiter (fail mode [`FailMode::Open`]). Cheap to clone.
#[derive(Clone)]
pub struct HttpRateLimiter {
    leases: Leases,
    policies: Arc<[Policy; 6]>,
}

impl HttpRateLimiter {
    /// Limits of `settings` over `conn` (give it its own connection: see [`RateLimiter::new`]).
    pub fn new(conn: ConnectionManager, settings: &RateLimitSettings) -> Self {
        let options = LimiterOptions {
            timeout: settings.timeout,
            fail_mode: FailMode::Open,
        };
        let policies = RouteClass::ALL.map(|class| Policy::new(class, settings.per_min(class)));
        Self {
            leases: Leases::new(RateLimiter::new(conn, options)),
            policies: Arc::new(policies),
        }
    }

    fn policy(&self, class: RouteClass) -> &Policy {
        let index = RouteClass::ALL
            .iter()
            .position(|c| *c == class)
            .expect("every class is in ALL");
        &self.policies[index]
    }

    /// The limits configured in `settings`, on a Redis connection of their own (`fallback`,
    /// the app's shared one, if that cannot be opened); `None` when limits are off.
    pub fn from_settings(settings: &Settings, fallback: &ConnectionManager) -> Option<Self> {
        let limits = settings.http_rate_limits;
        limits.enabled.then(|| {
            let conn = crate::redis_connection(settings, REDIS_IN_FLIGHT).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "rate limits share the app's Redis connection");
                fallback.clone()
            });
            HttpRateLimiter::new(conn, &limits)
        })
    }

    /// The bucket of `who` for `class`.
    pub fn bucket(&self, class: RouteClass, who: impl std::fmt::Display) -> Bucket {
        let per_min = f64::from(self.policy(class).per_min);
        Bucket::per_minute(&bucket_name(class, who), per_min)
            .expect("limits are validated as positive")
    }

    /// Charges one request of `key_id` in `class`: a token this process holds for the bucket,
    /// or one of a lease from Redis ([`Leases`]); no Redis call while Redis is skipped after
    /// a failure.
    pub async fn check(&self, key_id: Uuid, class: RouteClass) -> Verdict {
        self.charge(class, key_id).await
    }

    /// Charges one API key lookup in Postgres to the client at `address`: `429` with
    /// `Retry-After` when its bucket is empty.
    pub async fn admit_key_lookup(&self, address: std::net::IpAddr) -> Result<(), ApiError> {
        let verdict = self.charge(RouteClass::KeyLookup, address).await;
        verdict.count();
        if verdict.allowed {
            return Ok(());
        }
        let secs = verdict.retry_after_secs().unwrap_or(1);
        let message = format!(
            "more than {} API key lookups a minute from {address}; retry in {secs} s",
            verdict.limit
        );
        Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(secs))
    }

    async fn charge(&self, class: RouteClass, who: impl std::fmt::Display) -> Verdict {
        let acquired = self.leases.acquire(&self.bucket(class, who)).await;
        Verdict {
            class,
            allowed: acquired.allowed,
            limit: self.policy(class).per_min,
            state: acquired.state,
        }
    }

    /// Writes the headers of `verdict` into `headers`.
    pub fn write_headers(&self, verdict: &Verdict, headers: &mut HeaderMap) {
        verdict.write_headers(self.policy(verdict.class), headers, SystemTime::now());
    }
}

/// The state of the rate-limit middleware: the app, to authenticate and to charge its
/// limiter ([`AppState::limiter`], if limits are enabled).
#[derive(Clone)]
pub struct RateLimits {
    app: AppState,
}

impl RateLimits {
    /// The app these limits authenticate against.
    pub fn app(&self) -> &AppState {
        &self.app
    }

    /// The limits of `app` ([`AppState::limiter`]).
    pub fn new(app: &AppState) -> Self {
        Self { app: app.clone() }
    }
}

/// The class of a request to a limited route, when limits are on.
fn limited_class(limits: &RateLimits, request: &Request) -> Option<RouteClass> {
    limits.app.limiter.as_ref()?;
    let path = request.extensions().get::<MatchedPath>()?;
    RouteClass::classify(request.method(), path.as_str())
}

/// The middleware (`route_layer`, so the matched route is known): authenticates, charges the
/// principal's bucket for the route's class, answers 429 when it is empty, and adds the
/// headers to every response of a limited route.
pub async fn enforce(State(limits): State<RateLimits>, request: Request, next: Next) -> Response {
    if limited_class(&limits, &request).is_none() {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let principal = match Principal::from_request_parts(&mut parts, &limits.app).await {
        Ok(principal) => principal,
        Err(rejection) => return rejection.into_response(),
    };
    limits
        .admit(principal, Request::from_parts(parts, body), next)
        .await
}

impl RateLimits {
    /// Charges the bucket of an authenticated `principal` for the request's class: 429 when it
    /// is empty, else the request runs with the principal in its extensions. The rate-limit
    /// headers go on the response. Used by [`enforce`] and by the dashboard, whose principal
    /// comes from its session cookie.
    pub async fn admit(&self, principal: Principal, request: Request, next: Next) -> Response {
        let (Some(limiter), Some(class)) = (&self.app.limiter, limited_class(self, &request))
        else {
            let mut request = request;
            request.extensions_mut().insert(principal);
            return next.run(request).await;
        };
        let (mut parts, body) = request.into_parts();
        let verdict = limiter.check(principal.key_id, class).await;
        verdict.count();
        let mut response = if verdict.allowed {
            parts.extensions.insert(principal);
            next.run(Request::from_parts(parts, body)).await
        } else {
            drain(&parts.headers, body, self.app.settings.http_max_body_bytes).await;
            refusal(&verdict).into_response()
        };
        limiter.write_headers(&verdict, response.headers_mut());
        response
    }
}

/// The 429 of a refused request.
fn refusal(verdict: &Verdict) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "rate limit of {} {} requests a minute for this API key exceeded; retry in {} s",
            verdict.limit,
            verdict.class.name(),
            verdict.retry_after_secs().unwrap_or(1),
        ),
    )
}

/// Reads and drops a refused request's body, so the connection can carry the next request
/// (hyper closes it when a body is left unread). Skipped for bodies announced larger than
/// the front accepts and for `Expect: 100-continue` (the client has not sent it yet).
async fn drain(headers: &HeaderMap, body: Body, max_body_bytes: usize) {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if headers.contains_key(header::EXPECT) || declared.is_some_and(|n| n > max_body_bytes) {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, axum::body::to_bytes(body, max_body_bytes)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use std::collections::HashMap;

    #[test]
    fn classes_follow_the_route_template_and_method() {
        let c = |m: Method, t: &str| RouteClass::classify(&m, t);
        assert_eq!(c(Method::POST, "/v1/analyses"), Some(RouteClass::Analysis));
        assert_eq!(c(Method::GET, "/v1/analyses"), Some(RouteClass::Get));
        assert_eq!(
            c(Method::GET, "/v1/reps/{email}/insights"),
            Some(RouteClass::Insights)
        );
        assert_eq!(
            c(Method::GET, "/v1/reps/{rep_email}/insights"),
            Some(RouteClass::Insights),
            "any parameter name"
        );
        assert_eq!(
            c(Method::HEAD, "/v1/calls/search"),
            Some(RouteClass::Search)
        );
        assert_eq!(c(Method::GET, "/v1/calls/{id}"), Some(RouteClass::Get));
        assert_eq!(c(Method::POST, "/v1/calls"), Some(RouteClass::Post));
        assert_eq!(
            c(Method::PUT, "/v1/rubrics/{role}/{dimension}"),
            Some(RouteClass::Post)
        );
        assert_eq!(c(Method::GET, "/healthz"), None);
        assert_eq!(c(Method::GET, "/readyz"), None);
        assert!(!same_template(
            "/v1/reps/{email}/insights",
            "/v1/reps/x/insights"
        ));
        assert!(!same_template("/v1/calls/search", "/v1/calls/{id}"));
        assert!(!same_template("/v1/calls", "/v1/calls/search"));
    }

    fn state(remaining: u32, full_in_ms: u64, retry_in_ms: u64) -> Option<BucketState> {
        Some(BucketState {
            remaining,
            full_in: Duration::from_millis(full_in_ms),
            retry_in: Duration::from_millis(retry_in_ms),
        })
    }

    fn headers(verdict: &Verdict, now_secs: u64) -> HashMap<String, String> {
        let policy = Policy::new(verdict.class, verdict.limit);
        let mut map = HeaderMap::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(now_secs * 1000 + 400);
        verdict.write_headers(&policy, &mut map, now);
        map.iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect()
    }

    #[test]
    fn headers_of_an_allowed_request() {
        let verdict = Verdict {
            class: RouteClass::Get,
            allowed: true,
            limit: 100,
            state: state(95, 2_950, 0),
        };
        let h = headers(&verdict, 1_000);
        assert_eq!(h["x-ratelimit-limit"], "100");
        assert_eq!(h["x-ratelimit-remaining"], "95");
        assert_eq!(h["x-ratelimit-reset"], "1004", "1000.4 + 2.95 rounded up");
        assert_eq!(h["ratelimit-policy"], "\"get\";q=100;w=60");
        assert_eq!(h["ratelimit"], "\"get\";r=95;t=3");
        assert!(!h.contains_key("retry-after"));
    }

    #[test]
    fn headers_of_a_refused_request() {
        let verdict = Verdict {
            class: RouteClass::Analysis,
            allowed: false,
            limit: 10,
            state: state(0, 59_000, 5_100),
        };
        let h = headers(&verdict, 1_000);
        assert_eq!(h["retry-after"], "6");
        assert_eq!(h["ratelimit"], "\"analysis\";r=0;t=6");
        assert_eq!(h["x-ratelimit-reset"], "1060");
        assert_eq!(h["ratelimit-policy"], "\"analysis\";q=10;w=60");
        let soon = Verdict {
            state: state(0, 100, 1),
            ..verdict
        };
        assert_eq!(soon.retry_after_secs(), Some(1), "never 0");
    }

    #[test]
    fn failing_open_sends_only_the_static_headers() {
        let verdict = Verdict {
            class: RouteClass::Post,
            allowed: true,
            limit: 30,
            state: None,
        };
        let h = headers(&verdict, 1_000);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["ratelimit-policy"], "\"post\";q=30;w=60");
    }

    #[test]
    fn settings_have_the_spec_defaults_and_name_bad_variables() {
        let base = |pairs: &[(&str, &str)]| {
            let mut env: HashMap<String, String> =
                [("DATABASE_URL".to_string(), "postgres://u@h/db".to_string())].into();
            env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            Settings::from_map(&env)
        };
        let s = base(&[]).unwrap().http_rate_limits;
        assert_eq!(s, RateLimitSettings::default());
        let per_min = RouteClass::ALL.map(|c| s.per_min(c));
        assert_eq!(per_min, [100, 30, 10, 20, 50, 600]);
        assert_eq!(s.timeout, Duration::from_millis(25));
        let s = base(&[
            ("RATE_LIMIT_ENABLED", "false"),
            ("RATE_LIMIT_SEARCH_PER_MIN", "7"),
            ("RATE_LIMIT_TIMEOUT_MS", "10"),
        ])
        .unwrap()
        .http_rate_limits;
        assert!(!s.enabled);
        assert_eq!(s.search_per_min, 7);
        assert_eq!(s.timeout, Duration::from_millis(10));
        for (var, value) in [
            ("RATE_LIMIT_GET_PER_MIN", "0"),
            ("RATE_LIMIT_POST_PER_MIN", "-1"),
            ("RATE_LIMIT_ANALYSIS_PER_MIN", "ten"),
            ("RATE_LIMIT_INSIGHTS_PER_MIN", "1.5"),
            ("RATE_LIMIT_SEARCH_PER_MIN", "99999999999"),
            ("RATE_LIMIT_KEY_LOOKUPS_PER_MIN", "0"),
            ("RATE_LIMIT_ENABLED", "sometimes"),
            ("RATE_LIMIT_TIMEOUT_MS", "0"),
        ] {
            let err = base(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{value}: {err}");
        }
    }
}
