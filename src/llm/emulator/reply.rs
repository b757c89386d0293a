//! The generated answer: a deterministic coaching JSON derived from the
//! transcript and dimension in the prompt, or — when `output_config.format`
//! gives another JSON schema — a deterministic value conforming to it; plus
//! deterministic thinking tokens that grow with `output_config.effort`.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::request::{Effort, ParsedRequest, Thinking, approx_tokens, is_5x};
use super::schema;

/// Marker that makes the emulator answer with invalid JSON.
pub const MALFORMED_MARKER: &str = "[[emulator:malformed]]";
/// Dimensions recognised when the prompt does not name one explicitly.
const DIMENSIONS: [&str; 4] = [
    "product_knowledge",
    "discovery",
    "objection_handling",
    "engagement",
];
/// Longest quote taken from the transcript, in characters.
const MAX_QUOTE_CHARS: usize = 160;

/// The generated answer.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) text: String,
    pub(super) stop_reason: &'static str,
    /// Text plus thinking tokens.
    pub(super) output_tokens: u64,
    pub(super) thinking_tokens: u64,
}

/// Thinking tokens a request asks for at `effort` (before `max_tokens`).
pub(super) fn thinking_budget(effort: Effort) -> u64 {
    match effort {
        Effort::Low => 64,
        Effort::Medium => 192,
        Effort::High => 512,
        Effort::XHigh => 1_024,
        Effort::Max => 2_048,
    }
}

/// Thinking tokens wanted by `req`: 5.x models think adaptively by default
/// (effort `high`); older ones only when asked. A budget caps the effort.
fn wanted_thinking(req: &ParsedRequest) -> u64 {
    let effort = thinking_budget(req.effort.unwrap_or(Effort::High));
    match req.thinking {
        Thinking::Disabled => 0,
        Thinking::Default if !is_5x(&req.model) => 0,
        Thinking::Default | Thinking::Adaptive => effort,
        Thinking::Budget(budget) => budget.min(effort),
    }
}

/// Generates the deterministic answer. The text is cut to `max_tokens`;
/// thinking uses what `max_tokens` leaves after the text (so it never cuts
/// the answer). `malformed` forces a non-JSON answer. `min_output` raises
/// thinking until text plus thinking reach it (still within `max_tokens`).
pub(super) fn reply(req: &ParsedRequest, malformed: bool, min_output: Option<u64>) -> Reply {
    let transcript = find_transcript(req);
    let text = if malformed || transcript.contains(MALFORMED_MARKER) {
        malformed_text()
    } else {
        answer_text(req, &transcript)
    };
    let limit = req.max_tokens.saturating_mul(4);
    let too_long = u64::try_from(text.chars().count()).unwrap_or(u64::MAX) > limit;
    let (text, stop_reason) = if too_long {
        let keep = usize::try_from(limit).unwrap_or(usize::MAX);
        (text.chars().take(keep).collect(), "max_tokens")
    } else {
        (text, "end_turn")
    };
    let text_tokens = approx_tokens(&text);
    let padding = min_output.map_or(0, |m| m.saturating_sub(text_tokens));
    let thinking_tokens = wanted_thinking(req)
        .max(padding)
        .min(req.max_tokens.saturating_sub(text_tokens));
    Reply {
        output_tokens: text_tokens + thinking_tokens,
        thinking_tokens,
        text,
        stop_reason,
    }
}

/// The coaching JSON when it satisfies the requested schema (or none was
/// given), else a value generated from the schema.
fn answer_text(req: &ParsedRequest, transcript: &str) -> String {
    let dimension = find_dimension(&req.last_user_text);
    let coaching = coaching_value(transcript, &dimension);
    match &req.schema {
        Some(wanted) if schema::validate(wanted, &coaching).is_err() => {
            schema::generate(wanted, &format!("{transcript}\u{0}{dimension}")).to_string()
        }
        _ => coaching.to_string(),
    }
}

/// The dimension quoted in backticks right after "for the", else a known
/// dimension name found in the text, else `general`.
pub(super) fn find_dimension(text: &str) -> String {
    if let Some((_, rest)) = text.split_once("for the `")
        && let Some((name, _)) = rest.split_once('`')
        && !name.trim().is_empty()
        && name.len() <= 64
    {
        return name.trim().to_owned();
    }
    DIMENSIONS
        .iter()
        .find(|d| text.contains(*d))
        .map_or_else(|| "general".to_owned(), |d| (*d).to_owned())
}

/// The text inside `<transcript>` tags (searching system blocks from the
/// last one, then message blocks, so instructions that merely mention the tag
/// do not win), else the last system block, else the whole prompt.
pub(super) fn find_transcript(req: &ParsedRequest) -> String {
    let system_first = req
        .blocks
        .iter()
        .rev()
        .filter(|b| b.section == "system")
        .chain(req.blocks.iter().filter(|b| b.section != "system"));
    let tagged = system_first
        .filter_map(|b| b.content.split_once("<transcript>").map(|(_, rest)| rest))
        .find_map(|rest| rest.split_once("</transcript>").map(|(inner, _)| inner));
    if let Some(inner) = tagged {
        return inner.to_owned();
    }
    if let Some(last_system) = req.blocks.iter().rev().find(|b| b.section == "system") {
        return last_system.content.clone();
    }
    req.blocks
        .iter()
        .map(|b| b.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// An answer that looks like the start of the JSON but never closes it.
pub(super) fn malformed_text() -> String {
    "Sure! Here is the analysis: {\"score\": 61, \"strengths\": [\"Clear agenda\", \
     \"improvements\": [\"Ask more"
        .to_owned()
}

/// Deterministic coaching JSON text derived from the transcript and
/// dimension.
#[cfg(test)]
pub(super) fn coaching_text(transcript: &str, dimension: &str) -> String {
    coaching_value(transcript, dimension).to_string()
}

/// Deterministic coaching JSON derived from the transcript and dimension.
fn coaching_value(transcript: &str, dimension: &str) -> Value {
    let seed = Sha256::digest(format!("{transcript}\u{0}{dimension}").as_bytes());
    let byte = |i: usize| seed.get(i).copied().unwrap_or(0);
    let score = 40 + u16::from_be_bytes([byte(0), byte(1)]) % 56;
    let lines: Vec<&str> = transcript
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('<') && !l.starts_with("[[emulator"))
        .collect();
    let focus = focus_lines(&lines, dimension);
    let others: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !focus.contains(l))
        .collect();
    let others = if others.is_empty() {
        focus.clone()
    } else {
        others
    };
    let [f1, f2] = pick_two(&focus, byte(2), byte(3));
    let [o1, o2] = pick_two(&others, byte(4), byte(5));
    let label = dimension.replace('_', " ");
    json!({
        "score": score,
        "strengths": [
            format!("Strong {label} moment: \"{f1}\""),
            format!("Kept the conversation moving with \"{f2}\""),
        ],
        "improvements": [
            format!("After \"{o1}\", dig deeper into the buyer's goals before moving on."),
            format!("Tie \"{o2}\" back to a concrete next step."),
        ],
        "examples": [f1, f2],
        "summary": format!(
            "Emulated {label} review of {} transcript lines: {score}/100.",
            lines.len()
        ),
    })
}

/// Transcript lines relevant to `dimension` (all lines if none match).
fn focus_lines<'t>(lines: &[&'t str], dimension: &str) -> Vec<&'t str> {
    let matches = |line: &str| {
        let lower = line.to_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| lower.contains(w));
        match dimension {
            "discovery" => line.contains('?'),
            "objection_handling" => any(&[
                "but",
                "concern",
                "expensive",
                "price",
                "budget",
                "not sure",
                "however",
                "worried",
            ]),
            "product_knowledge" => {
                line.chars().any(|c| c.is_ascii_digit())
                    || any(&["feature", "integrat", "support", "plan", "report"])
            }
            "engagement" => any(&["you", "we", "let's"]),
            _ => true,
        }
    };
    let focused: Vec<&str> = lines.iter().copied().filter(|l| matches(l)).collect();
    if focused.is_empty() {
        lines.to_vec()
    } else {
        focused
    }
}

/// Two (distinct when possible) quotes from `pool`, chosen by seed bytes.
fn pick_two(pool: &[&str], a: u8, b: u8) -> [String; 2] {
    let n = pool.len();
    if n == 0 {
        let none = "(no transcript lines to quote)".to_owned();
        return [none.clone(), none];
    }
    let i = usize::from(a) % n;
    let j = if n > 1 {
        (i + 1 + usize::from(b) % (n - 1)) % n
    } else {
        i
    };
    [quote(pool, i), quote(pool, j)]
}

/// The line at `i`, cut to [`MAX_QUOTE_CHARS`].
fn quote(pool: &[&str], i: usize) -> String {
    let line = pool.get(i).copied().unwrap_or_default();
    let mut out: String = line.chars().take(MAX_QUOTE_CHARS).collect();
    if line.chars().nth(MAX_QUOTE_CHARS).is_some() {
        out.push('…');
    }
    out
}
