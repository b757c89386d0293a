//! Prompt assembly for one coaching dimension and parsing of the model's
//! JSON answer.
//!
//! The request is laid out for prompt caching: the four large, slowly
//! changing parts (general instructions, role rubric, knowledge base,
//! transcript) are separate `system` blocks, each ending in a cache
//! breakpoint, so the analyses of the other dimensions of the same call reuse
//! the cached prefix. Only the short dimension-specific user message changes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::client::LlmError;

/// Version of the prompt layout below; part of the analysis cache key, so
/// bump it whenever the wording or structure of the prompt changes.
pub const PROMPT_TEMPLATE_VERSION: &str = "1";

/// Highest valid coaching score.
const MAX_SCORE: u64 = 100;

/// How many `{` positions [`parse_coaching`] tries before giving up.
const MAX_OBJECT_STARTS: usize = 64;

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

/// Builds the Messages API request body for one dimension analysis.
pub fn build_request(model: &str, max_tokens: u32, p: &PromptInputs<'_>) -> Value {
    let system = [
        format!("<instructions>\n{}\n</instructions>", p.instructions),
        format!(
            "<role_rubric role=\"{}\">\n{}\n</role_rubric>",
            p.role, p.rubric
        ),
        format!("<knowledge_base>\n{}\n</knowledge_base>", p.knowledge_base),
        format!("<transcript>\n{}\n</transcript>", p.transcript),
    ];
    let system: Vec<Value> = system.iter().map(|t| cached_text_block(t)).collect();
    json!({
        "model": model,
        "max_tokens": max_tokens,
        "system": system,
        "messages": [{"role": "user", "content": user_message(p)}],
    })
}

/// A system text block carrying an ephemeral cache breakpoint.
fn cached_text_block(text: &str) -> Value {
    json!({"type": "text", "text": text, "cache_control": {"type": "ephemeral"}})
}

/// The uncached, dimension-specific task.
fn user_message(p: &PromptInputs<'_>) -> String {
    format!(
        "<dimension name=\"{dim}\">\n{criteria}\n</dimension>\n\n\
         Analyse the transcript above for the `{dim}` dimension, judging the rep against \
         the role rubric, the knowledge base and the dimension criteria. Base every point \
         on what was actually said; quote the transcript in examples.\n\
         Reply with only a JSON object, no prose and no code fences:\n\
         {{\"score\": 0-100 integer, \"strengths\": [\"...\"], \"improvements\": [\"...\"], \
         \"examples\": [\"...\"], \"summary\": \"...\"}}",
        dim = p.dimension,
        criteria = p.dimension_criteria,
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

    #[test]
    fn request_layout_has_four_cached_system_blocks() {
        let body = build_request(
            "claude-haiku-5-5",
            1024,
            &inputs("Rep: Hi?", "discovery", "KB"),
        );
        assert_eq!(body["model"], "claude-haiku-5-5");
        assert_eq!(body["max_tokens"], 1024);
        let system = body["system"].as_array().expect("system array");
        assert_eq!(system.len(), 4);
        assert!(
            system
                .iter()
                .all(|b| b["cache_control"]["type"] == "ephemeral")
        );
        assert!(
            system[3]["text"]
                .as_str()
                .is_some_and(|t| t.contains("Rep: Hi?"))
        );
        let messages = body["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0]["role"], "user");
        let task = messages[0]["content"].as_str().expect("string content");
        assert!(task.contains("for the `discovery` dimension"));
        assert!(task.contains("\"score\""));
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
            let body = build_request("claude-sonnet-5-5", 1024, &inputs(t, "discovery", "KB"));
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
            "claude-sonnet-5-5",
            1024,
            &inputs(TRANSCRIPT_A, "engagement", &kb),
        );
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
            "claude-sonnet-5-5",
            1024,
            &inputs(TRANSCRIPT_A, "discovery", &kb),
        );
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
            "claude-sonnet-5-5",
            1024,
            &inputs(&transcript, "discovery", "KB"),
        );
        let response = client.messages(&body).await.expect("HTTP success");
        let err = parse_coaching(&response.text).expect_err("malformed");
        assert!(matches!(err, LlmError::BadOutput(_)), "{err:?}");
        emu.shutdown().await;
    }
}
