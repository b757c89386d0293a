//! Read endpoints over the database's read functions (`src/performance.rs`): call search with
//! an opaque keyset cursor, rep insights (from `mv_rep_performance` while it is fresh, live
//! otherwise) and the cache statistics.

use super::openapi::ErrorBody;
use super::{
    ApiError, ApiPath, ApiQuery, AppState,
    auth::{Principal, Scope},
};
use crate::{
    model::{Dimension, Role},
    performance::{self, CallSearch},
};
use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// Every scope may read.
const READERS: &[Scope] = &[Scope::Producer, Scope::Ops, Scope::Admin];

/// Default page of `GET /v1/calls/search`.
pub const SEARCH_DEFAULT_LIMIT: i32 = 20;
/// Largest page of `GET /v1/calls/search`.
pub const SEARCH_MAX_LIMIT: i32 = 100;
/// Most tags one search may ask for.
const SEARCH_MAX_TAGS: usize = 20;
/// Largest window of `days` parameters.
const MAX_DAYS: i32 = 3650;

/// Query of `GET /v1/calls/search`; every filter is optional.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// Scheduled at or after (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    pub from: Option<DateTime<Utc>>,
    /// Scheduled before (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    pub to: Option<DateTime<Utc>>,
    /// Product.
    pub product: Option<String>,
    /// Call type.
    pub call_type: Option<String>,
    /// The rep's e-mail address.
    pub rep: Option<String>,
    /// The rep's role on the call.
    pub role: Option<Role>,
    /// With a coaching session of this dimension.
    pub dimension: Option<Dimension>,
    /// With a session (of `dimension`) scoring at least this (0-100).
    #[param(minimum = 0, maximum = 100)]
    pub min_score: Option<i32>,
    /// With a session (of `dimension`) scoring at most this (0-100).
    #[param(minimum = 0, maximum = 100)]
    pub max_score: Option<i32>,
    /// Comma-separated tags the calls must all carry.
    pub tags: Option<String>,
    /// A participant's e-mail address.
    pub participant: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1-100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i32>,
}

/// `GET /v1/calls/search`: one page of calls, newest first, and the cursor of the next page
/// (`null` on the last one).
#[utoipa::path(get, path = "/v1/calls/search", tag = "reads", params(SearchParams),
    responses(
        (status = 200, description = "One page of calls", body = SearchPage),
        (status = 400, description = "A parameter is invalid (named in the message)", body = ErrorBody)))]
pub async fn search_calls(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<SearchParams>,
) -> Result<Json<SearchPage>, ApiError> {
    principal.require(READERS)?;
    let mut search = search_of(&params)?;
    if let Some(email) = &params.rep {
        match performance::rep_by_email(&state.pg, email).await? {
            Some(rep) => search.rep_id = Some(rep.id),
            None => return Ok(Json(page(Vec::new(), search.limit))),
        }
    }
    let calls = performance::search_calls(&state.pg, &search).await?;
    Ok(Json(page(calls, search.limit)))
}

/// The search the parameters describe, or a 400 naming the bad one.
fn search_of(p: &SearchParams) -> Result<CallSearch, ApiError> {
    let limit = p.limit.unwrap_or(SEARCH_DEFAULT_LIMIT);
    if !(1..=SEARCH_MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1-{SEARCH_MAX_LIMIT}, got {limit}"
        )));
    }
    for (name, score) in [("min_score", p.min_score), ("max_score", p.max_score)] {
        if score.is_some_and(|s| !(0..=100).contains(&s)) {
            return Err(ApiError::bad_request(format!("{name} must be 0-100")));
        }
    }
    if let (Some(min), Some(max)) = (p.min_score, p.max_score)
        && min > max
    {
        return Err(ApiError::bad_request("min_score must not exceed max_score"));
    }
    if let (Some(from), Some(to)) = (p.from, p.to)
        && from >= to
    {
        return Err(ApiError::bad_request("from must be before to"));
    }
    Ok(CallSearch {
        product: p.product.clone(),
        call_type: p.call_type.clone(),
        from: p.from,
        to: p.to,
        tags: tags_of(p.tags.as_deref())?,
        participant: p.participant.clone(),
        role: p.role,
        dimension: p.dimension,
        min_score: p.min_score,
        max_score: p.max_score,
        after: p.cursor.as_deref().map(decode_cursor).transpose()?,
        limit,
        ..CallSearch::default()
    })
}

fn tags_of(tags: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(tags) = tags else { return Ok(None) };
    let list: Vec<String> = tags
        .split(',')
        .map(|t| t.trim().to_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    if list.is_empty() || list.len() > SEARCH_MAX_TAGS {
        return Err(ApiError::bad_request(format!(
            "tags must list 1-{SEARCH_MAX_TAGS} comma-separated tags"
        )));
    }
    Ok(Some(list))
}

/// Body of `GET /v1/calls/search`.
#[derive(Serialize, ToSchema)]
pub struct SearchPage {
    /// The calls, newest first.
    pub calls: Vec<performance::CallHit>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    /// The page size used.
    pub limit: i32,
}

/// The response page: the calls and, when the page is full, the cursor after its last call.
fn page(calls: Vec<performance::CallHit>, limit: i32) -> SearchPage {
    let next_cursor = (calls.len() == limit as usize)
        .then(|| calls.last().map(|c| encode_cursor(c.scheduled_at, c.id)))
        .flatten();
    SearchPage {
        calls,
        next_cursor,
        limit,
    }
}

/// An opaque cursor: the hex of `<microseconds since the epoch>:<call id>`.
pub fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    hex::encode(format!("{}:{id}", at.timestamp_micros()))
}

/// The position a cursor from [`encode_cursor`] names, or a 400.
pub fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_cursor",
            "cursor is not one this API returned (pass next_cursor unchanged)",
        )
    };
    let text = hex::decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

/// Query of the endpoints taking a window in days.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DaysParams {
    /// Days back from now (1-3650).
    #[param(minimum = 1, maximum = 3650)]
    pub days: Option<i32>,
}

impl DaysParams {
    fn days(&self, default: i32) -> Result<i32, ApiError> {
        let days = self.days.unwrap_or(default);
        if !(1..=MAX_DAYS).contains(&days) {
            return Err(ApiError::bad_request(format!(
                "days must be 1-{MAX_DAYS}, got {days}"
            )));
        }
        Ok(days)
    }
}

/// `GET /v1/reps/{email}/insights?days=90`: the rep's performance, from `mv_rep_performance`
/// when its last refresh is at most `INSIGHTS_MAX_STALENESS_SECS` old and holds the rep,
/// computed live otherwise (`source` says which, `as_of` when the figures are from), and the
/// per-dimension summary of the last `days` days (always live).
#[utoipa::path(get, path = "/v1/reps/{email}/insights", tag = "reads",
    params(("email" = String, Path, description = "The rep's e-mail address"), DaysParams),
    responses(
        (status = 200, description = "The rep's performance", body = RepInsights),
        (status = 400, description = "A parameter is invalid", body = ErrorBody),
        (status = 404, description = "No rep has this e-mail address", body = ErrorBody)))]
pub async fn rep_insights(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(email): ApiPath<String>,
    ApiQuery(params): ApiQuery<DaysParams>,
) -> Result<Json<RepInsights>, ApiError> {
    principal.require(READERS)?;
    let days = params.days(90)?;
    let rep = performance::rep_by_email(&state.pg, &email)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no rep has the e-mail address {email:?}")))?;
    let refreshed = performance::rep_view_refreshed_at(&state.pg).await?;
    let fresh = refreshed.filter(|at| {
        Utc::now().signed_duration_since(*at).num_seconds()
            <= state.settings.insights_max_staleness.as_secs() as i64
    });
    let from_view = match fresh {
        Some(at) => performance::rep_performance(&state.pg, rep.id)
            .await?
            .map(|row| (at, row)),
        None => None,
    };
    let (source, as_of, performance) = match from_view {
        Some((at, row)) => (InsightsSource::View, at, Some(row)),
        None => (
            InsightsSource::Live,
            Utc::now(),
            performance::rep_performance_live(&state.pg, rep.id).await?,
        ),
    };
    let dimensions = performance::rep_performance_summary(&state.pg, rep.id, days).await?;
    Ok(Json(RepInsights {
        rep,
        source,
        as_of,
        view_refreshed_at: refreshed,
        performance,
        window_days: days,
        dimensions,
    }))
}

/// Where rep insights' figures come from.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InsightsSource {
    /// `mv_rep_performance`, refreshed recently enough.
    View,
    /// Computed now (`get_rep_performance_live`).
    Live,
}

/// Body of `GET /v1/reps/{email}/insights`.
#[derive(Serialize, ToSchema)]
pub struct RepInsights {
    /// The rep.
    pub rep: performance::RepItem,
    /// Where `performance` comes from.
    pub source: InsightsSource,
    /// When `performance` was computed.
    pub as_of: DateTime<Utc>,
    /// The view's last refresh, if any.
    pub view_refreshed_at: Option<DateTime<Utc>>,
    /// Totals and averages over all the rep's calls; `null` before the rep has any.
    pub performance: Option<performance::RepPerformance>,
    /// The window of `dimensions`, in days.
    pub window_days: i32,
    /// Per-dimension figures of the window.
    pub dimensions: Vec<performance::DimensionSummary>,
}

/// `GET /v1/cache/stats?days=7`: the spec's sections and the per-dimension figures
/// ([`crate::stats::collect`]), with where the window's answers came from and what they cost
/// ([`performance::cache_report`], from the same reading of the runs).
#[utoipa::path(get, path = "/v1/cache/stats", tag = "reads", params(DaysParams),
    responses(
        (status = 200, description = "Cache statistics of the window", body = Object),
        (status = 400, description = "A parameter is invalid", body = ErrorBody)))]
pub async fn cache_stats(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<DaysParams>,
) -> Result<Json<Value>, ApiError> {
    principal.require(READERS)?;
    let days = params.days(7)?;
    let stats = crate::stats::collect(&state.pg, &state.redis, days, true).await;
    let mut report = performance::cache_report(&state.pg, days, &stats.sources).await?;
    if let (Value::Object(report), Ok(Value::Object(stats))) =
        (&mut report, serde_json::to_value(&stats))
    {
        report.extend(stats);
    }
    Ok(Json(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)).unwrap(), (at, id));
        for bad in ["", "zz", &hex::encode("12:not-a-uuid"), &hex::encode("x:y")] {
            assert_eq!(
                decode_cursor(bad).unwrap_err().code,
                "invalid_cursor",
                "{bad}"
            );
        }
    }
}
