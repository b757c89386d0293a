//! Prompt assembly for one coaching dimension and parsing of the model's
//! JSON answer.
//!
//! [`build_request`] lays a dimension analysis out for prompt caching. The large, slowly
//! changing parts come first, each a `system` block: general instructions → role rubric →
//! knowledge base → transcript ([`BlockOrder::TranscriptCached`]). The four dimension analyses
//! of one call then share everything up to the transcript, which is written to the cache once
//! and read three times; only the short dimension criteria and task are sent uncached. The
//! spec's layout ([`BlockOrder::CriteriaCached`]: criteria cached, transcript uncached) stays
//! available so `callcoach bench cost` can compare both.
//!
//! A block carries a cache breakpoint only where the prefix up to it reaches the model's
//! minimum cacheable length (shorter prefixes are never cached, so a breakpoint there buys
//! nothing); there are at most four. The answer is constrained by structured output
//! (`output_config.format` with [`coaching_schema`]) and validated anyway by
//! [`parse_coaching`]. No sampling parameters are sent: API version 2026-10-21 rejects them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::client::LlmError;

/// Version of the prompt layout below; part of the analysis cache key, so
/// bump it whenever the wording or structure of the prompt changes.
pub const PROMPT_TEMPLATE_VERSION: &str = "2";

/// Highest valid coaching score.
const MAX_SCORE: u64 = 100;

/// How many `{` positions [`parse_coaching`] tries before giving up.
const MAX_OBJECT_STARTS: usize = 64;

/// Most `cache_control` breakpoints the API accepts in one request.
pub const MAX_BREAKPOINTS: usize = 4;

/// The texts one dimension analysis is built from.
#[derive(Debug, Clone, Copy)]
pub struct PromptInputs<'a> {
    /// General coaching instructions shared by every analysis.
    pub instructions: &'a str,
    /// Name of the sales role being coached (e.g. `AE`, `SDR`).
    pub role: &'a str,
    /// Rubric for that role.
    pub rubric: &'a str,
    /// Product knowledge base the rep is expected to know.
    pub knowledge_base: &'a str,
    /// The call transcript.
    pub transcript: &'a str,
    /// Dimension being scored (e.g. `discovery`).
    pub dimension: &'a str,
    /// What good looks like for that dimension.
    pub dimension_criteria: &'a str,
}

/// Which block ends the cached part of the prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockOrder {
    /// Instructions → rubric → knowledge base → transcript cached; criteria and task uncached.
    #[default]
    TranscriptCached,
    /// The spec's order: instructions → rubric → knowledge base → criteria cached; transcript
    /// and task uncached.
    CriteriaCached,
}

impl std::str::FromStr for BlockOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "transcript_cached" => Ok(Self::TranscriptCached),
            "criteria_cached" => Ok(Self::CriteriaCached),
            other => Err(format!(
                "unknown prompt order {other:?}; use transcript_cached or criteria_cached"
            )),
        }
    }
}

/// How long a prompt-cache entry lives after its last use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheTtl {
    /// 5 minutes (writes cost 1.25× input): interactive work.
    #[default]
    #[serde(rename = "5m")]
    FiveMinutes,
    /// 1 hour (writes cost 2× input): batch and scheduled work, whose requests are spread out.
    #[serde(rename = "1h")]
    OneHour,
}

/// How much the model may think (`output_config.effort`); thinking is billed as output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effort {
    /// Least thinking: the cost-aware default for rubric scoring.
    Low,
    /// More thinking.
    Medium,
    /// The API's default for 5.x models.
    High,
    /// Extra high.
    Xhigh,
    /// Most thinking.
    Max,
}

impl Effort {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Xhigh => "xhigh",
            Self::Max => "max",
        }
    }
}

impl std::str::FromStr for Effort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Low, Self::Medium, Self::High, Self::Xhigh, Self::Max]
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("unknown effort {s:?}; use low, medium, high, xhigh or max"))
    }
}

/// How a request is built, apart from its texts.
#[derive(Clone, Copy, Debug)]
pub struct PromptOptions<'a> {
    /// Model id.
    pub model: &'a str,
    /// `max_tokens` (thinking included).
    pub max_tokens: u32,
    /// The model's minimum cacheable prefix, in tokens (from the model table).
    pub min_cacheable_tokens: u32,
    /// Which block ends the cached part.
    pub order: BlockOrder,
    /// Lifetime of the cache entries this request writes.
    pub ttl: CacheTtl,
    /// `output_config.effort`; `None` leaves the model's default.
    pub effort: Option<Effort>,
}

impl<'a> PromptOptions<'a> {
    /// The defaults for `model`: its minimum cacheable length from the model table (1024 for
    /// a model not in it), the cheaper block order, 5-minute entries and low effort.
    pub fn new(model: &'a str, max_tokens: u32) -> Self {
        let min_cacheable_tokens = super::ModelTable::builtin()
            .get(model)
            .map_or(1024, |m| m.min_cacheable_tokens);
        Self {
            model,
            max_tokens,
            min_cacheable_tokens,
            order: BlockOrder::default(),
            ttl: CacheTtl::default(),
            effort: Some(Effort::Low),
        }
    }
}

/// A Messages API request body and what the builder knows about it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptRequest {
    /// The JSON body.
    pub body: Value,
    /// Input tokens by [`estimate_tokens`] (for rate limiting before the call).
    pub estimated_input_tokens: u64,
    /// One id per cache breakpoint, shortest prefix first: a hash of the model and every
    /// block up to the breakpoint, so requests sharing a cached prefix share its id.
    pub prefixes: Vec<String>,
}

/// A rough token count (4 characters a token), used where the exact count does not matter
/// enough for a `count_tokens` round trip: breakpoint placement and rate-limit estimates.
pub fn estimate_tokens(text: &str) -> u64 {
    u64::try_from(text.chars().count())
        .unwrap_or(u64::MAX)
        .div_ceil(4)
}

/// The coaching answer for one dimension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoachingResult {
    /// Score in `0..=100`.
    pub score: u8,
    /// What the rep did well.
    pub strengths: Vec<String>,
    /// What the rep should do differently.
    pub improvements: Vec<String>,
    /// Quotes or moments from the transcript backing the assessment.
    pub examples: Vec<String>,
    /// One-paragraph summary.
    pub summary: String,
}

/// The JSON schema of [`CoachingResult`] sent as `output_config.format`. Numeric bounds are
/// stated in the description (structured output does not enforce `minimum`/`maximum`) and
/// checked by [`parse_coaching`].
pub fn coaching_schema() -> Value {
    let list =
        |what: &str| json!({"type": "array", "items": {"type": "string"}, "description": what});
    json!({
        "type": "object",
        "properties": {
            "score": {"type": "integer", "description": "0-100"},
            "strengths": list("two to four, one sentence each"),
            "improvements": list("two to four, one actionable sentence each"),
            "examples": list("verbatim transcript quotes with the speaker"),
            "summary": {"type": "string", "description": "at most three sentences"}
        },
        "required": ["score", "strengths", "improvements", "examples", "summary"],
        "additionalProperties": false
    })
}

/// Builds the Messages API request for one dimension analysis.
pub fn build_request(options: &PromptOptions<'_>, p: &PromptInputs<'_>) -> PromptRequest {
    let instructions = format!("<instructions>\n{}\n</instructions>", p.instructions);
    let rubric = format!(
        "<role_rubric role=\"{}\">\n{}\n</role_rubric>",
        p.role, p.rubric
    );
    let kb = format!("<knowledge_base>\n{}\n</knowledge_base>", p.knowledge_base);
    let transcript = format!("<transcript>\n{}\n</transcript>", p.transcript);
    let criteria = format!(
        "<dimension name=\"{}\">\n{}\n</dimension>",
        p.dimension, p.dimension_criteria
    );
    let (fourth, uncached) = match options.order {
        BlockOrder::TranscriptCached => (transcript, criteria),
        BlockOrder::CriteriaCached => (criteria, transcript),
    };
    let cached = [instructions, rubric, kb, fourth];
    let (system, prefixes) = system_blocks(&cached, options);
    let task = format!("{uncached}\n\n{}", task_text(p.dimension));
    let mut output_config = json!({"format": {"type": "json_schema", "schema": coaching_schema()}});
    if let Some(effort) = options.effort {
        output_config["effort"] = json!(effort.as_str());
    }
    let schema_tokens = estimate_tokens(&output_config.to_string());
    let estimated_input_tokens = cached.iter().map(|t| estimate_tokens(t)).sum::<u64>()
        + estimate_tokens(&task)
        + schema_tokens;
    let body = json!({
        "model": options.model,
        "max_tokens": options.max_tokens,
        "system": system,
        "messages": [{"role": "user", "content": [{"type": "text", "text": task}]}],
        "output_config": output_config,
    });
    PromptRequest {
        body,
        estimated_input_tokens,
        prefixes,
    }
}

/// The system blocks, with a breakpoint on each block whose prefix reaches the model's
/// minimum cacheable length; returns them and the prefix id of each breakpoint.
fn system_blocks(texts: &[String], options: &PromptOptions<'_>) -> (Vec<Value>, Vec<String>) {
    let mut tokens = 0u64;
    let mut hasher = Sha256::new();
    hasher.update(options.model.as_bytes());
    let mut prefixes = Vec::new();
    let blocks = texts
        .iter()
        .map(|text| {
            tokens += estimate_tokens(text);
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
            let mut block = json!({"type": "text", "text": text});
            if tokens >= u64::from(options.min_cacheable_tokens) && prefixes.len() < MAX_BREAKPOINTS
            {
                block["cache_control"] = cache_control(options.ttl);
                prefixes.push(hex::encode(&hasher.clone().finalize()[..16]));
            }
            block
        })
        .collect();
    (blocks, prefixes)
}

/// A `cache_control` object for `ttl`.
fn cache_control(ttl: CacheTtl) -> Value {
    match ttl {
        CacheTtl::FiveMinutes => json!({"type": "ephemeral"}),
        CacheTtl::OneHour => json!({"type": "ephemeral", "ttl": "1h"}),
    }
}

/// The uncached, dimension-specific task.
fn task_text(dimension: &str) -> String {
    format!(
        "Analyse the transcript for the `{dimension}` dimension, judging the rep against the \
         role rubric, the knowledge base and the dimension criteria. Base every point on what \
         was actually said; quote the transcript in examples."
    )
}

/// Parses the model's answer into a [`CoachingResult`].
///
/// Accepts the object bare, inside a ```` ```json ```` fence or surrounded by
/// prose; extra fields are ignored.
///
/// # Errors
///
/// [`LlmError::BadOutput`] naming the problem when no JSON object is found, a
/// field is missing or has the wrong type, or the score is outside `0..=100`.
pub fn parse_coaching(text: &str) -> Result<CoachingResult, LlmError> {
    let object = extract_object(text)?;
    let score = score_field(&object)?;
    Ok(CoachingResult {
        score,
        strengths: string_list(&object, "strengths")?,
        improvements: string_list(&object, "improvements")?,
        examples: string_list(&object, "examples")?,
        summary: string_field(&object, "summary")?,
    })
}

/// Finds the JSON object in `text`: first `{` to last `}`, falling back to
/// the first complete object starting at a later `{`.
fn extract_object(text: &str) -> Result<Map<String, Value>, LlmError> {
    let start = text
        .find('{')
        .ok_or_else(|| bad("no JSON object found in the model output"))?;
    let end = text
        .rfind('}')
        .filter(|&end| end > start)
        .ok_or_else(|| bad("the JSON object in the model output is not closed"))?;
    let first_error = match serde_json::from_str::<Value>(&text[start..=end]) {
        Ok(value) => return into_object(value),
        Err(e) => e,
    };
    first_complete_object(text)
        .ok_or_else(|| bad(format!("model output is not valid JSON: {first_error}")))
}

/// Tries successive `{` positions and returns the first that starts a
/// complete JSON object.
fn first_complete_object(text: &str) -> Option<Map<String, Value>> {
    text.match_indices('{')
        .take(MAX_OBJECT_STARTS)
        .find_map(|(i, _)| {
            let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
            match stream.next() {
                Some(Ok(Value::Object(map))) => Some(map),
                _ => None,
            }
        })
}

/// Requires the top-level JSON value to be an object.
fn into_object(value: Value) -> Result<Map<String, Value>, LlmError> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(bad(format!(
            "expected a JSON object, got {}",
            type_name(&other)
        ))),
    }
}

/// Reads `score` as an integer in `0..=100` (a whole float like `80.0` is
/// tolerated).
fn score_field(object: &Map<String, Value>) -> Result<u8, LlmError> {
    let value = required(object, "score")?;
    let whole = value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from))
        .or_else(|| whole_float(value));
    let Some(score) = whole else {
        return Err(bad(format!(
            "field `score` must be an integer, got {}",
            type_name(value)
        )));
    };
    u8::try_from(score)
        .ok()
        .filter(|s| u64::from(*s) <= MAX_SCORE)
        .ok_or_else(|| bad(format!("field `score` is {score}, outside 0..=100")))
}

/// A float with no fractional part, as an integer.
fn whole_float(value: &Value) -> Option<i128> {
    let f = value.as_f64()?;
    // The range check keeps the cast exact; out-of-range scores are rejected
    // later anyway.
    (f.fract() == 0.0 && f.abs() < 1e15).then_some(f as i128)
}

/// Reads a required string field.
fn string_field(object: &Map<String, Value>, name: &str) -> Result<String, LlmError> {
    match required(object, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(bad(format!(
            "field `{name}` must be a string, got {}",
            type_name(other)
        ))),
    }
}

/// Reads a required array-of-strings field.
fn string_list(object: &Map<String, Value>, name: &str) -> Result<Vec<String>, LlmError> {
    let Value::Array(items) = required(object, name)? else {
        return Err(bad(format!("field `{name}` must be an array of strings")));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(bad(format!(
                "field `{name}[{i}]` must be a string, got {}",
                type_name(other)
            ))),
        })
        .collect()
}

/// Looks up a field that must be present (and not `null`).
fn required<'v>(object: &'v Map<String, Value>, name: &str) -> Result<&'v Value, LlmError> {
    match object.get(name) {
        None | Some(Value::Null) => Err(bad(format!("field `{name}` is missing"))),
        Some(value) => Ok(value),
    }
}

/// JSON type name for error messages.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Shorthand for [`LlmError::BadOutput`].
fn bad(message: impl Into<String>) -> LlmError {
    LlmError::BadOutput(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::client::LlmClient;
    use crate::llm::emulator::{self, EmulatorConfig, EmulatorHandle};
    use std::time::Duration;

    const VALID: &str = r#"{"score": 72, "strengths": ["a"], "improvements": ["b"], "examples": ["c"], "summary": "d"}"#;

    fn expect_bad(text: &str, needle: &str) {
        match parse_coaching(text) {
            Err(LlmError::BadOutput(msg)) => {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
            }
            other => panic!("expected BadOutput for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn parses_plain_fenced_and_prose_wrapped() {
        let expected = CoachingResult {
            score: 72,
            strengths: vec!["a".into()],
            improvements: vec!["b".into()],
            examples: vec!["c".into()],
            summary: "d".into(),
        };
        assert_eq!(parse_coaching(VALID).ok(), Some(expected.clone()));
        let fenced = format!("```json\n{VALID}\n```");
        assert_eq!(parse_coaching(&fenced).ok(), Some(expected.clone()));
        let prose = format!("Here is my analysis:\n{VALID}\nLet me know {{if}} needed.");
        assert_eq!(parse_coaching(&prose).ok(), Some(expected));
    }

    #[test]
    fn score_bounds() {
        expect_bad(&VALID.replace("72", "101"), "outside 0..=100");
        expect_bad(&VALID.replace("72", "-1"), "outside 0..=100");
        expect_bad(&VALID.replace("72", "\"72\""), "must be an integer");
        expect_bad(&VALID.replace("72", "72.5"), "must be an integer");
        assert_eq!(
            parse_coaching(&VALID.replace("72", "0")).map(|r| r.score),
            Ok(0)
        );
        assert_eq!(
            parse_coaching(&VALID.replace("72", "100.0")).map(|r| r.score),
            Ok(100)
        );
    }

    #[test]
    fn missing_or_mistyped_fields() {
        expect_bad(
            r#"{"score": 50, "strengths": [], "improvements": [], "examples": []}"#,
            "`summary` is missing",
        );
        expect_bad(
            &VALID.replace("\"strengths\"", "\"strenghts\""),
            "`strengths` is missing",
        );
        expect_bad(
            &VALID.replace("[\"b\"]", "\"b\""),
            "`improvements` must be an array",
        );
        expect_bad(
            &VALID.replace("[\"c\"]", "[1]"),
            "`examples[0]` must be a string",
        );
        expect_bad(&VALID.replace("\"d\"", "null"), "`summary` is missing");
    }

    #[test]
    fn garbage_is_rejected() {
        expect_bad("I cannot help with that.", "no JSON object");
        expect_bad("", "no JSON object");
        expect_bad("{ not json at all }", "not valid JSON");
        expect_bad("} {", "not closed");
        expect_bad(r#"{"score": 50, "strengths": ["x""#, "not closed");
        expect_bad("[1, 2, {}]", "`score` is missing");
    }

    fn inputs<'a>(transcript: &'a str, dimension: &'a str, kb: &'a str) -> PromptInputs<'a> {
        PromptInputs {
            instructions: "You are a sales coach.",
            role: "AE",
            rubric: "Account executives run discovery and handle objections.",
            knowledge_base: kb,
            transcript,
            dimension,
            dimension_criteria: "Asks open questions and digs into pain.",
        }
    }

    fn options(model: &str, min: u32) -> PromptOptions<'_> {
        PromptOptions {
            model,
            max_tokens: 2048,
            min_cacheable_tokens: min,
            order: BlockOrder::TranscriptCached,
            ttl: CacheTtl::FiveMinutes,
            effort: Some(Effort::Low),
        }
    }

    /// Inputs whose blocks have known token estimates (4 characters a token).
    fn sized<'a>(texts: &'a [String; 5]) -> PromptInputs<'a> {
        PromptInputs {
            instructions: &texts[0],
            role: "AE",
            rubric: &texts[1],
            knowledge_base: &texts[2],
            transcript: &texts[3],
            dimension: "discovery",
            dimension_criteria: &texts[4],
        }
    }

    fn texts(tokens: [usize; 5]) -> [String; 5] {
        let letters = ['i', 'r', 'k', 't', 'c'];
        std::array::from_fn(|n| letters[n].to_string().repeat(tokens[n] * 4))
    }

    #[test]
    fn the_request_is_exactly_the_cheapest_layout() {
        let t = texts([2000, 3000, 5000, 8000, 1000]);
        let request = build_request(&options("claude-sonnet-5-5", 1024), &sized(&t));
        let bp = json!({"type": "ephemeral"});
        let expected = json!({
            "model": "claude-sonnet-5-5",
            "max_tokens": 2048,
            "system": [
                {"type": "text", "text": format!("<instructions>\n{}\n</instructions>", t[0]), "cache_control": bp},
                {"type": "text", "text": format!("<role_rubric role=\"AE\">\n{}\n</role_rubric>", t[1]), "cache_control": bp},
                {"type": "text", "text": format!("<knowledge_base>\n{}\n</knowledge_base>", t[2]), "cache_control": bp},
                {"type": "text", "text": format!("<transcript>\n{}\n</transcript>", t[3]), "cache_control": bp},
            ],
            "messages": [{"role": "user", "content": [{"type": "text", "text": format!(
                "<dimension name=\"discovery\">\n{}\n</dimension>\n\n{}", t[4], task_text("discovery"))}]}],
            "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": coaching_schema()}},
        });
        assert_eq!(request.body, expected);
        assert_eq!(request.prefixes.len(), 4);
        // Another dimension of the same call shares every cached prefix; another call only
        // the ones before its transcript.
        let mut other_dimension = sized(&t);
        other_dimension.dimension = "engagement";
        let same_call = build_request(&options("claude-sonnet-5-5", 1024), &other_dimension);
        assert_eq!(same_call.prefixes, request.prefixes);
        let other_text = "u".repeat(32_000);
        let mut other_call = sized(&t);
        other_call.transcript = &other_text;
        let other_call = build_request(&options("claude-sonnet-5-5", 1024), &other_call);
        assert_eq!(other_call.prefixes[..3], request.prefixes[..3]);
        assert_ne!(other_call.prefixes[3], request.prefixes[3]);
        let other_model = build_request(&options("claude-opus-5-5", 1024), &sized(&t));
        assert_ne!(other_model.prefixes[0], request.prefixes[0]);
        for sampling in ["temperature", "top_p", "top_k", "thinking"] {
            assert!(request.body.get(sampling).is_none(), "{sampling} sent");
        }
        let expected_tokens = 19_000..19_400;
        assert!(
            expected_tokens.contains(&request.estimated_input_tokens),
            "{}",
            request.estimated_input_tokens
        );
    }

    #[test]
    fn the_spec_order_caches_the_criteria_and_sends_the_transcript_uncached() {
        let t = texts([2000, 3000, 5000, 8000, 1000]);
        let mut o = options("claude-sonnet-5-5", 1024);
        o.order = BlockOrder::CriteriaCached;
        let body = build_request(&o, &sized(&t)).body;
        let system = body["system"].as_array().unwrap();
        assert!(
            system[3]["text"]
                .as_str()
                .unwrap()
                .starts_with("<dimension name=\"discovery\">")
        );
        assert_eq!(system[3]["cache_control"], json!({"type": "ephemeral"}));
        let task = body["messages"][0]["content"][0]["text"].as_str().unwrap();
        assert!(
            task.starts_with("<transcript>\n") && task.contains(&t[3]),
            "{task:.40}"
        );
    }

    #[test]
    fn breakpoints_only_where_the_prefix_reaches_the_minimum() {
        // Prefix estimates: 300, 800, 1300, 1500 tokens.
        let t = texts([300, 500, 500, 200, 50]);
        let marked = |min: u32| {
            let r = build_request(&options("m", min), &sized(&t));
            let marks: Vec<bool> = r.body["system"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.get("cache_control").is_some())
                .collect();
            assert_eq!(r.prefixes.len(), marks.iter().filter(|m| **m).count());
            marks
        };
        assert_eq!(marked(1024), [false, false, true, true]);
        assert_eq!(marked(4096), [false, false, false, false]);
        assert_eq!(marked(1), [true, true, true, true]);
    }

    #[test]
    fn one_hour_ttl_and_default_effort_are_options() {
        let t = texts([2000, 10, 10, 10, 10]);
        let mut o = options("claude-opus-5-5", 1024);
        o.ttl = CacheTtl::OneHour;
        o.effort = None;
        let body = build_request(&o, &sized(&t)).body;
        assert_eq!(
            body["system"][0]["cache_control"],
            json!({"type": "ephemeral", "ttl": "1h"})
        );
        assert_eq!(body["output_config"].get("effort"), None);
        assert_eq!(body["output_config"]["format"]["type"], "json_schema");
    }

    #[test]
    fn effort_and_order_parse_from_configuration() {
        assert_eq!("xhigh".parse::<Effort>(), Ok(Effort::Xhigh));
        assert!(
            "extreme"
                .parse::<Effort>()
                .unwrap_err()
                .contains("low, medium")
        );
        assert_eq!(
            "criteria_cached".parse::<BlockOrder>(),
            Ok(BlockOrder::CriteriaCached)
        );
        assert!("random".parse::<BlockOrder>().is_err());
    }

    #[test]
    fn the_schema_requires_every_field_of_the_result() {
        let schema = coaching_schema();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let example = serde_json::to_value(parse_coaching(VALID).unwrap()).unwrap();
        let fields: Vec<&str> = example
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            required
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            fields.into_iter().collect()
        );
        assert_eq!(schema["additionalProperties"], false);
    }

    async fn start() -> EmulatorHandle {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        emulator::spawn(listener, EmulatorConfig::default())
            .await
            .expect("spawn")
    }

    const TRANSCRIPT_A: &str = "Rep: Thanks for joining. What made you look at new tooling this quarter?\n\
        Prospect: Our reps spend hours on manual notes.\n\
        Rep: How many reps are on the team today?\n\
        Prospect: About forty, but budget is a concern.\n\
        Rep: Understood. Our integration with Salesforce takes 2 days to set up.";

    const TRANSCRIPT_B: &str = "Rep: Hello, let me show you the dashboard.\n\
        Prospect: Sure.\n\
        Rep: It has 12 reports and supports SSO.\n\
        Prospect: That sounds expensive, however we might try it?";

    #[tokio::test]
    async fn emulator_answers_are_parseable_and_deterministic() {
        let emu = start().await;
        let client = LlmClient::new(emu.base_url(), "k", Duration::from_secs(10)).expect("client");
        let ask = |t: &'static str| {
            let body = build_request(
                &options("claude-sonnet-5-5", 1024),
                &inputs(t, "discovery", "KB"),
            )
            .body;
            let client = client.clone();
            async move {
                let response = client.messages(&body).await.expect("response");
                parse_coaching(&response.text).expect("coaching json")
            }
        };
        let first = ask(TRANSCRIPT_A).await;
        let again = ask(TRANSCRIPT_A).await;
        let other = ask(TRANSCRIPT_B).await;
        assert!(first.score <= 100 && other.score <= 100);
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(first.strengths.len(), 2);
        assert_eq!(first.improvements.len(), 2);
        assert_eq!(first.examples.len(), 2);
        assert!(first.examples.iter().any(|e| e.contains('?')), "{first:?}");
        assert!(!first.summary.is_empty());
        assert_eq!(emu.messages_served(), 3);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn prompt_cache_is_written_then_read() {
        let emu = start().await;
        let client = LlmClient::new(emu.base_url(), "k", Duration::from_secs(10)).expect("client");
        let kb = "Callcoach integrates with every major CRM. ".repeat(120);
        let body = build_request(
            &options("claude-sonnet-5-5", 1024),
            &inputs(TRANSCRIPT_A, "engagement", &kb),
        )
        .body;
        let first = client.messages(&body).await.expect("first").usage;
        let second = client.messages(&body).await.expect("second").usage;
        assert!(first.cache_creation_input_tokens >= 1024, "{first:?}");
        assert_eq!(first.cache_read_input_tokens, 0, "{first:?}");
        assert!(second.cache_read_input_tokens > 0, "{second:?}");
        assert_eq!(
            second.cache_read_input_tokens,
            first.cache_creation_input_tokens
        );
        assert_eq!(second.cache_creation_input_tokens, 0, "{second:?}");
        assert_eq!(first.input_tokens, second.input_tokens);

        // Another dimension of the same call reuses the whole system prefix.
        let body = build_request(
            &options("claude-sonnet-5-5", 1024),
            &inputs(TRANSCRIPT_A, "discovery", &kb),
        )
        .body;
        let third = client.messages(&body).await.expect("third").usage;
        assert_eq!(
            third.cache_read_input_tokens,
            first.cache_creation_input_tokens
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn malformed_marker_yields_bad_output() {
        let emu = start().await;
        let client = LlmClient::new(emu.base_url(), "k", Duration::from_secs(10)).expect("client");
        let transcript = format!("{TRANSCRIPT_A}\n[[emulator:malformed]]");
        let body = build_request(
            &options("claude-sonnet-5-5", 1024),
            &inputs(&transcript, "discovery", "KB"),
        )
        .body;
        let response = client.messages(&body).await.expect("HTTP success");
        let err = parse_coaching(&response.text).expect_err("malformed");
        assert!(matches!(err, LlmError::BadOutput(_)), "{err:?}");
        emu.shutdown().await;
    }
}
