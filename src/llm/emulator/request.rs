//! Request validation, as the real Messages API does it: the `x-api-key` /
//! `Authorization: Bearer` key and the `anthropic-version` date, then the body
//! (model, `max_tokens`, tools → system → messages, `cache_control`
//! breakpoints including the top-level automatic one, sampling parameters per
//! API version, `thinking` and `output_config`).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use chrono::NaiveDate;
use serde_json::{Map, Value};

use super::errors::ApiError;
use crate::llm::ModelTable;

/// Default cache TTL (`cache_control` without `ttl`, or `"ttl": "5m"`).
pub(super) const TTL_5M: Duration = Duration::from_secs(5 * 60);
/// Extended cache TTL (`"ttl": "1h"`).
pub(super) const TTL_1H: Duration = Duration::from_secs(60 * 60);
/// Most `cache_control` breakpoints one request may carry.
const MAX_BREAKPOINTS: usize = 4;
/// Minimum cacheable prefix for a model missing from the table.
const FALLBACK_MIN_CACHEABLE: u64 = 1024;
/// Models that only think adaptively: no `disabled`, no budgets, no prefill,
/// no forced tool use.
const ADAPTIVE_ONLY_MODELS: [&str; 1] = ["claude-sonnet-5-5"];
/// Sampling parameters removed by `anthropic-version: 2026-10-21`.
const SAMPLING_PARAMS: [&str; 3] = ["temperature", "top_p", "top_k"];
/// Top-level fields the create and count_tokens bodies may carry.
const KNOWN_FIELDS: [&str; 20] = [
    "model",
    "max_tokens",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "thinking",
    "output_config",
    "cache_control",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "inference_geo",
];

/// Which request rules an `anthropic-version` date selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApiVersion {
    /// Before 2026-10-21 (e.g. `2023-06-01`): sampling parameters allowed,
    /// but 5.x models reject non-default values.
    Legacy,
    /// `2026-10-21` and later: `temperature` / `top_p` / `top_k` removed.
    Current,
}

impl ApiVersion {
    /// Parses a header value: a well-formed, zero-padded `YYYY-MM-DD` date.
    pub(super) fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let date = NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .ok()
            .filter(|d| d.format("%Y-%m-%d").to_string() == value)?;
        let current_from = NaiveDate::from_ymd_opt(2026, 10, 21)?;
        Some(if date >= current_from {
            Self::Current
        } else {
            Self::Legacy
        })
    }
}

/// Which endpoint a body is validated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `POST /v1/messages` (and batch params): `max_tokens` required.
    Create,
    /// `POST /v1/messages/count_tokens`: `max_tokens` ignored.
    CountTokens,
}

/// `output_config.effort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Effort {
    Low,
    Medium,
    High,
    XHigh,
    Max,
}

impl Effort {
    /// Parses the API spelling.
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "low" => Self::Low,
            "medium" => Self::Medium,
            "high" => Self::High,
            "xhigh" => Self::XHigh,
            "max" => Self::Max,
            _ => return None,
        })
    }
}

/// The `thinking` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Thinking {
    /// Not given: the model's default (adaptive on 5.x, off before).
    Default,
    /// `{"type": "adaptive"}`.
    Adaptive,
    /// `{"type": "enabled", "budget_tokens": N}`.
    Budget(u64),
    /// `{"type": "disabled"}`.
    Disabled,
}

/// One unit of prompt content, in cache-prefix order.
#[derive(Debug, Clone)]
pub(super) struct PromptBlock {
    /// `tools`, `system`, `user` or `assistant`.
    pub(super) section: &'static str,
    /// Text of a text block, or the JSON of any other block.
    pub(super) content: String,
    /// Approximate token count.
    pub(super) tokens: u64,
    /// Cache TTL when the block carries a `cache_control` breakpoint.
    pub(super) ttl: Option<Duration>,
}

impl PromptBlock {
    /// Builds a block, counting its tokens.
    pub(super) fn new(section: &'static str, content: String, ttl: Option<Duration>) -> Self {
        Self {
            tokens: approx_tokens(&content),
            section,
            content,
            ttl,
        }
    }
}

/// A validated request.
#[derive(Debug, Clone)]
pub(super) struct ParsedRequest {
    pub(super) model: String,
    /// 0 for `count_tokens`.
    pub(super) max_tokens: u64,
    pub(super) blocks: Vec<PromptBlock>,
    /// Text of the last user message.
    pub(super) last_user_text: String,
    /// The model's shortest cacheable prefix (from the model table).
    pub(super) min_cacheable_tokens: u64,
    /// `output_config.effort`, if given.
    pub(super) effort: Option<Effort>,
    /// `output_config.format.schema`, if given.
    pub(super) schema: Option<Value>,
    pub(super) thinking: Thinking,
}

impl ParsedRequest {
    /// All prompt tokens.
    pub(super) fn input_tokens(&self) -> u64 {
        self.blocks.iter().map(|b| b.tokens).sum()
    }
}

/// The emulator's tokenizer: the same estimate the prompt builder places breakpoints with.
pub(super) fn approx_tokens(text: &str) -> u64 {
    crate::llm::estimate_tokens(text)
}

/// The major model generation in an id (`claude-haiku-4-5` → 4,
/// `claude-sonnet-5` → 5): the first all-digit segment.
pub(super) fn generation(model: &str) -> Option<u32> {
    model
        .split('-')
        .find(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
}

/// Whether `model` is a 5.x model.
pub(super) fn is_5x(model: &str) -> bool {
    generation(model).is_some_and(|g| g >= 5)
}

// ---------------------------------------------------------------------------
// Headers and body

/// Checks the API key, then `anthropic-version`; returns the rules it selects.
pub(super) fn check_headers(
    headers: &HeaderMap,
    expected_key: Option<&str>,
) -> Result<ApiVersion, ApiError> {
    match (presented_key(headers), expected_key) {
        (None, _) => return Err(ApiError::auth("x-api-key header is required")),
        (Some(key), Some(expected)) if key != expected => {
            return Err(ApiError::auth("invalid x-api-key"));
        }
        _ => {}
    }
    let Some(value) = headers.get("anthropic-version") else {
        return Err(ApiError::invalid("anthropic-version: header is required"));
    };
    let text = value.to_str().unwrap_or_default();
    ApiVersion::parse(text).ok_or_else(|| {
        ApiError::invalid(format!(
            "anthropic-version: {text:?} is not a valid version; use a date such as 2023-06-01"
        ))
    })
}

/// The key from `x-api-key` or `Authorization: Bearer`, if non-empty.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let from_x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    from_x_api_key.or_else(|| {
        let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = auth.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    })
}

/// Reads the body as JSON.
pub(super) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
            )
        } else {
            ApiError::invalid(format!("could not read the request body: {rejection}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))
}

// ---------------------------------------------------------------------------
// Body

/// Validates a create / count_tokens body like the real API.
pub(super) fn parse_request(
    value: &Value,
    version: ApiVersion,
    endpoint: Endpoint,
) -> Result<ParsedRequest, ApiError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::invalid("request body must be a JSON object"))?;
    check_known_fields(obj)?;
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid(
            "stream: streaming is not supported by the emulator",
        ));
    }
    let model = parse_model(obj)?;
    let min_cacheable_tokens = check_model(&model)?;
    let max_tokens = match endpoint {
        Endpoint::Create => parse_max_tokens(obj)?,
        Endpoint::CountTokens => 0,
    };
    check_sampling(obj, &model, version)?;
    let thinking = parse_thinking(obj.get("thinking"), &model, max_tokens)?;
    let (effort, schema) = parse_output_config(obj.get("output_config"))?;
    let mut blocks = Vec::new();
    parse_tools(obj.get("tools"), &mut blocks)?;
    parse_system(obj.get("system"), &mut blocks)?;
    let last_user_text = parse_messages(obj.get("messages"), &mut blocks)?;
    check_adaptive_only(obj, &model)?;
    apply_automatic_breakpoint(obj, &mut blocks)?;
    check_breakpoints(&blocks)?;
    Ok(ParsedRequest {
        model,
        max_tokens,
        blocks,
        last_user_text,
        min_cacheable_tokens,
        effort,
        schema,
        thinking,
    })
}

/// Unknown top-level fields are rejected, like the API's strict schema.
fn check_known_fields(obj: &Map<String, Value>) -> Result<(), ApiError> {
    match obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        Some(key) => Err(extra_input(key)),
        None => Ok(()),
    }
}

/// `<path>: Extra inputs are not permitted`.
fn extra_input(path: &str) -> ApiError {
    ApiError::invalid(format!("{path}: Extra inputs are not permitted"))
}

/// `model`: non-empty string.
fn parse_model(obj: &Map<String, Value>) -> Result<String, ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => Err(ApiError::invalid("model: Field required")),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(ApiError::invalid(
            "model: String should have at least 1 character",
        )),
        Some(_) => Err(ApiError::invalid("model: Input should be a valid string")),
    }
}

/// Like the API: a model that is not served (unknown, or retired by today per
/// `jobs/models.toml`) is a 404 `not_found_error` naming it. Returns the
/// model's minimum cacheable prefix.
fn check_model(model: &str) -> Result<u64, ApiError> {
    let table = ModelTable::builtin();
    let today = chrono::Utc::now().date_naive();
    if !table.usable(today).any(|id| id == model) {
        return Err(ApiError::not_found(format!("model: {model}")));
    }
    Ok(table.get(model).map_or(FALLBACK_MIN_CACHEABLE, |m| {
        u64::from(m.min_cacheable_tokens)
    }))
}

/// `max_tokens`: positive integer.
fn parse_max_tokens(obj: &Map<String, Value>) -> Result<u64, ApiError> {
    let value = match obj.get("max_tokens") {
        None | Some(Value::Null) => return Err(ApiError::invalid("max_tokens: Field required")),
        Some(v) => v,
    };
    match value.as_u64() {
        Some(0) => Err(ApiError::invalid(
            "max_tokens: Input should be greater than or equal to 1",
        )),
        Some(n) => Ok(n),
        None if value.as_i64().is_some() => Err(ApiError::invalid(
            "max_tokens: Input should be greater than or equal to 1",
        )),
        None => Err(ApiError::invalid(
            "max_tokens: Input should be a valid integer",
        )),
    }
}

/// `temperature` / `top_p` / `top_k` per API version and model.
fn check_sampling(
    obj: &Map<String, Value>,
    model: &str,
    version: ApiVersion,
) -> Result<(), ApiError> {
    for name in SAMPLING_PARAMS {
        let Some(value) = obj.get(name).filter(|v| !v.is_null()) else {
            continue;
        };
        if version == ApiVersion::Current {
            return Err(extra_input(name));
        }
        let is_default = check_sampling_value(name, value)?;
        if is_5x(model) && !is_default {
            return Err(ApiError::invalid(format!(
                "`{name}` is deprecated for this model."
            )));
        }
    }
    Ok(())
}

/// Type and range of one sampling parameter; returns whether it is the
/// default value (1.0 for `temperature` and `top_p`; `top_k` has none).
fn check_sampling_value(name: &str, value: &Value) -> Result<bool, ApiError> {
    if name == "top_k" {
        return match value.as_u64() {
            Some(_) => Ok(false),
            None => Err(ApiError::invalid(
                "top_k: Input should be a valid non-negative integer",
            )),
        };
    }
    let number = value
        .as_f64()
        .ok_or_else(|| ApiError::invalid(format!("{name}: Input should be a valid number")))?;
    if !(0.0..=1.0).contains(&number) {
        return Err(ApiError::invalid(format!(
            "{name}: Input should be between 0 and 1"
        )));
    }
    Ok((number - 1.0).abs() < f64::EPSILON)
}

/// `thinking`: adaptive, enabled with a budget, or disabled.
fn parse_thinking(
    value: Option<&Value>,
    model: &str,
    max_tokens: u64,
) -> Result<Thinking, ApiError> {
    let obj = match value {
        None | Some(Value::Null) => return Ok(Thinking::Default),
        Some(Value::Object(obj)) => obj,
        Some(_) => {
            return Err(ApiError::invalid(
                "thinking: Input should be a valid dictionary",
            ));
        }
    };
    let adaptive_only = ADAPTIVE_ONLY_MODELS.contains(&model);
    let thinking = match obj.get("type").and_then(Value::as_str) {
        Some("adaptive") => Thinking::Adaptive,
        Some("disabled") if adaptive_only => {
            return Err(ApiError::invalid(format!(
                "thinking.type: 'disabled' is not supported on {model}; it always thinks adaptively"
            )));
        }
        Some("disabled") => Thinking::Disabled,
        Some("enabled") if adaptive_only => {
            return Err(ApiError::invalid(format!(
                "thinking.budget_tokens: thinking budgets are not supported on {model}; use output_config.effort"
            )));
        }
        Some("enabled") => Thinking::Budget(parse_budget(obj, max_tokens)?),
        _ => {
            return Err(ApiError::invalid(
                "thinking.type: Input should be 'adaptive', 'enabled' or 'disabled'",
            ));
        }
    };
    Ok(thinking)
}

/// `thinking.budget_tokens`: at least 1024 and below `max_tokens`.
fn parse_budget(obj: &Map<String, Value>, max_tokens: u64) -> Result<u64, ApiError> {
    let budget = obj
        .get("budget_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::invalid("thinking.enabled.budget_tokens: Field required"))?;
    if budget < 1024 {
        return Err(ApiError::invalid(
            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
        ));
    }
    if max_tokens > 0 && budget >= max_tokens {
        return Err(ApiError::invalid(
            "`max_tokens` must be greater than `thinking.budget_tokens`",
        ));
    }
    Ok(budget)
}

/// `output_config`: optional `effort` and `format` (json_schema).
fn parse_output_config(value: Option<&Value>) -> Result<(Option<Effort>, Option<Value>), ApiError> {
    let obj = match value {
        None | Some(Value::Null) => return Ok((None, None)),
        Some(Value::Object(obj)) => obj,
        Some(_) => {
            return Err(ApiError::invalid(
                "output_config: Input should be a valid dictionary",
            ));
        }
    };
    if let Some(key) = obj
        .keys()
        .find(|k| !["effort", "format"].contains(&k.as_str()))
    {
        return Err(extra_input(&format!("output_config.{key}")));
    }
    let effort = match obj.get("effort") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_str().and_then(Effort::parse).ok_or_else(|| {
            ApiError::invalid(
                "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'",
            )
        })?),
    };
    let schema = parse_format(obj.get("format"))?;
    Ok((effort, schema))
}

/// `output_config.format`: `{"type": "json_schema", "schema": {…}}`.
fn parse_format(value: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let obj = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(obj)) => obj,
        Some(_) => {
            return Err(ApiError::invalid(
                "output_config.format: Input should be a valid dictionary",
            ));
        }
    };
    if obj.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(ApiError::invalid(
            "output_config.format.type: Input should be 'json_schema'",
        ));
    }
    match obj.get("schema") {
        Some(Value::Object(schema)) => {
            super::schema::check_supported(schema, "output_config.format.schema")?;
            Ok(Some(Value::Object(schema.clone())))
        }
        None | Some(Value::Null) => Err(ApiError::invalid(
            "output_config.format.schema: Field required",
        )),
        Some(_) => Err(ApiError::invalid(
            "output_config.format.schema: Input should be a valid dictionary",
        )),
    }
}

/// Sonnet 5.5 refuses assistant prefill and forced tool use.
fn check_adaptive_only(obj: &Map<String, Value>, model: &str) -> Result<(), ApiError> {
    if !ADAPTIVE_ONLY_MODELS.contains(&model) {
        return Ok(());
    }
    let last_role = obj
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str);
    if last_role == Some("assistant") {
        return Err(ApiError::invalid(format!(
            "messages: assistant message prefill is not supported on {model}"
        )));
    }
    let forced = obj
        .get("tool_choice")
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t == "any" || t == "tool");
    if forced {
        return Err(ApiError::invalid(format!(
            "tool_choice: forced tool use is not supported on {model} with thinking"
        )));
    }
    Ok(())
}

/// A top-level `cache_control` puts a breakpoint on the last block (unless
/// it already has one); it counts toward the four.
fn apply_automatic_breakpoint(
    obj: &Map<String, Value>,
    blocks: &mut [PromptBlock],
) -> Result<(), ApiError> {
    let Some(ttl) = parse_cache_control(obj, "")? else {
        return Ok(());
    };
    if let Some(last) = blocks.last_mut()
        && last.ttl.is_none()
    {
        last.ttl = Some(ttl);
    }
    Ok(())
}

/// `tools`: optional list of objects (counted, cacheable).
fn parse_tools(tools: Option<&Value>, blocks: &mut Vec<PromptBlock>) -> Result<(), ApiError> {
    let items = match tools {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("tools: Input should be a valid list")),
    };
    for (i, tool) in items.iter().enumerate() {
        let path = format!("tools.{i}");
        let obj = tool.as_object().ok_or_else(|| dict_expected(&path))?;
        let ttl = parse_cache_control(obj, &path)?;
        blocks.push(PromptBlock::new(
            "tools",
            json_without_cache_control(obj),
            ttl,
        ));
    }
    Ok(())
}

/// `<path>: Input should be a valid dictionary`.
fn dict_expected(path: &str) -> ApiError {
    ApiError::invalid(format!("{path}: Input should be a valid dictionary"))
}

/// `system`: optional string or list of text blocks.
fn parse_system(system: Option<&Value>, blocks: &mut Vec<PromptBlock>) -> Result<(), ApiError> {
    match system {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(text)) => {
            if !text.is_empty() {
                blocks.push(PromptBlock::new("system", text.clone(), None));
            }
            Ok(())
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("system.{i}");
                let obj = item.as_object().ok_or_else(|| dict_expected(&path))?;
                if obj.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(ApiError::invalid(format!(
                        "{path}.type: Input should be 'text'"
                    )));
                }
                let text = text_field(obj, &path)?;
                let ttl = parse_cache_control(obj, &path)?;
                blocks.push(PromptBlock::new("system", text, ttl));
            }
            Ok(())
        }
        Some(_) => Err(ApiError::invalid(
            "system: Input should be a valid string or a list of text blocks",
        )),
    }
}

/// `messages`: non-empty list starting with a user message. Returns the
/// text of the last user message.
fn parse_messages(
    messages: Option<&Value>,
    blocks: &mut Vec<PromptBlock>,
) -> Result<String, ApiError> {
    let items = match messages {
        None | Some(Value::Null) => return Err(ApiError::invalid("messages: Field required")),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("messages: Input should be a valid list")),
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages: at least one message is required",
        ));
    }
    let mut last_user_text = String::new();
    for (i, message) in items.iter().enumerate() {
        let (role, text) = parse_message(message, i, blocks)?;
        if i == 0 && role != "user" {
            return Err(ApiError::invalid(
                "messages: first message must use the \"user\" role",
            ));
        }
        if role == "user" {
            last_user_text = text;
        }
    }
    Ok(last_user_text)
}

/// One message; returns its role and the concatenation of its text.
fn parse_message(
    message: &Value,
    i: usize,
    blocks: &mut Vec<PromptBlock>,
) -> Result<(&'static str, String), ApiError> {
    let path = format!("messages.{i}");
    let obj = message.as_object().ok_or_else(|| dict_expected(&path))?;
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("user") => "user",
        Some("assistant") => "assistant",
        _ => {
            return Err(ApiError::invalid(format!(
                "{path}.role: Input should be 'user' or 'assistant'"
            )));
        }
    };
    let text = match obj.get("content") {
        Some(Value::String(text)) if !text.is_empty() => {
            blocks.push(PromptBlock::new(role, text.clone(), None));
            text.clone()
        }
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(format!(
                "{path}.content: text content blocks must be non-empty"
            )));
        }
        Some(Value::Array(items)) => parse_content_blocks(items, role, &path, blocks)?,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(format!("{path}.content: Field required")));
        }
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "{path}.content: Input should be a valid string or list of content blocks"
            )));
        }
    };
    Ok((role, text))
}

/// A message's list of content blocks; returns their text joined by `\n`.
fn parse_content_blocks(
    items: &[Value],
    role: &'static str,
    path: &str,
    blocks: &mut Vec<PromptBlock>,
) -> Result<String, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid(format!(
            "{path}.content: List should have at least 1 item"
        )));
    }
    let mut texts = Vec::new();
    for (j, item) in items.iter().enumerate() {
        let block_path = format!("{path}.content.{j}");
        let obj = item.as_object().ok_or_else(|| dict_expected(&block_path))?;
        let ttl = parse_cache_control(obj, &block_path)?;
        let content = match obj.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = text_field(obj, &block_path)?;
                texts.push(text.clone());
                text
            }
            Some(_) => json_without_cache_control(obj),
            None => {
                return Err(ApiError::invalid(format!(
                    "{block_path}.type: Field required"
                )));
            }
        };
        blocks.push(PromptBlock::new(role, content, ttl));
    }
    Ok(texts.join("\n"))
}

/// The non-empty `text` of a text block.
fn text_field(obj: &Map<String, Value>, path: &str) -> Result<String, ApiError> {
    match obj.get("text") {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.clone()),
        Some(Value::String(_)) => Err(ApiError::invalid(format!(
            "{path}: text content blocks must be non-empty"
        ))),
        None | Some(Value::Null) => Err(ApiError::invalid(format!("{path}.text: Field required"))),
        Some(_) => Err(ApiError::invalid(format!(
            "{path}.text: Input should be a valid string"
        ))),
    }
}

/// The object's `cache_control` TTL, if it carries one (`path` empty for the
/// top level).
fn parse_cache_control(obj: &Map<String, Value>, path: &str) -> Result<Option<Duration>, ApiError> {
    let field = if path.is_empty() {
        "cache_control".to_owned()
    } else {
        format!("{path}.cache_control")
    };
    let control = match obj.get("cache_control") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(control)) => control,
        Some(_) => return Err(dict_expected(&field)),
    };
    if control.get("type").and_then(Value::as_str) != Some("ephemeral") {
        return Err(ApiError::invalid(format!(
            "{field}.type: Input should be 'ephemeral'"
        )));
    }
    match control.get("ttl").map(|t| (t, t.as_str())) {
        None | Some((Value::Null, _)) | Some((_, Some("5m"))) => Ok(Some(TTL_5M)),
        Some((_, Some("1h"))) => Ok(Some(TTL_1H)),
        Some(_) => Err(ApiError::invalid(format!(
            "{field}.ttl: Input should be '5m' or '1h'"
        ))),
    }
}

/// Serialises a block without its `cache_control`, so the breakpoint itself
/// does not change the cached content.
fn json_without_cache_control(obj: &Map<String, Value>) -> String {
    let mut copy = obj.clone();
    copy.remove("cache_control");
    Value::Object(copy).to_string()
}

/// Enforces the four-breakpoint limit.
fn check_breakpoints(blocks: &[PromptBlock]) -> Result<(), ApiError> {
    let found = blocks.iter().filter(|b| b.ttl.is_some()).count();
    if found > MAX_BREAKPOINTS {
        Err(ApiError::invalid(format!(
            "A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {found}."
        )))
    } else {
        Ok(())
    }
}
