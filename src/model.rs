//! Domain types shared by the HTTP front, the jobs and the database layer: coaching dimensions,
//! rep roles, and the call-ingest payload with its validation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{fmt, str::FromStr};

/// A coaching dimension a call is analysed along.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// Accuracy and depth of what the rep says about the product.
    ProductKnowledge,
    /// Quality of the questions that uncover the customer's needs.
    Discovery,
    /// Handling of concerns, pricing pushback and competitive objections.
    ObjectionHandling,
    /// Rapport, talk/listen balance and next steps.
    Engagement,
}

impl Dimension {
    /// Every dimension, in display order.
    pub const ALL: [Dimension; 4] = [
        Dimension::ProductKnowledge,
        Dimension::Discovery,
        Dimension::ObjectionHandling,
        Dimension::Engagement,
    ];

    /// The stable wire name (`product_knowledge`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::ProductKnowledge => "product_knowledge",
            Dimension::Discovery => "discovery",
            Dimension::ObjectionHandling => "objection_handling",
            Dimension::Engagement => "engagement",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dimension {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dimension::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown dimension {s:?} (expected one of product_knowledge, discovery, objection_handling, engagement)"
                )
            })
    }
}

/// The role of the rep whose call is analysed; each role has its own rubric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Account executive.
    Ae,
    /// Sales engineer.
    Se,
    /// Customer success manager.
    Csm,
}

impl Role {
    /// The stable wire name (`ae`, `se`, `csm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ae => "ae",
            Role::Se => "se",
            Role::Csm => "csm",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Role::Ae, Role::Se, Role::Csm]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (expected ae, se or csm)"))
    }
}

/// One participant of a call.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpeakerInput {
    /// Display name, as used in the transcript's `speaker` field.
    pub name: String,
    /// E-mail address, if known.
    #[serde(default)]
    pub email: Option<String>,
    /// Role of an internal speaker (`ae`, `se`, `csm`), if any.
    #[serde(default)]
    pub role: Option<String>,
    /// `internal` (our side) or `external` (the customer).
    pub company_side: String,
}

/// One utterance of a transcript.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Utterance {
    /// Speaker name.
    pub speaker: String,
    /// Offset from the start of the call.
    #[serde(default)]
    pub start_seconds: f64,
    /// What was said.
    pub text: String,
}

/// The body of `POST /v1/calls` and the format of the sample calls under `jobs/samples/`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallInput {
    /// Caller-chosen unique id (ingesting the same id twice returns the existing call).
    #[serde(default)]
    pub external_id: Option<String>,
    /// Short title.
    pub title: String,
    /// Product discussed.
    #[serde(default)]
    pub product: Option<String>,
    /// discovery, demo, negotiation, …
    #[serde(default)]
    pub call_type: Option<String>,
    /// When the call took place.
    pub scheduled_at: DateTime<Utc>,
    /// Length of the call.
    #[serde(default)]
    pub duration_seconds: Option<i32>,
    /// Participants.
    #[serde(default)]
    pub speakers: Vec<SpeakerInput>,
    /// The rep being coached.
    pub rep_email: String,
    /// The rep's name (default: the internal speaker with `rep_email`, else its local part).
    #[serde(default)]
    pub rep_name: Option<String>,
    /// The rep's team, if known.
    #[serde(default)]
    pub rep_team: Option<String>,
    /// The rep's role; selects the rubric.
    pub rep_role: Role,
    /// The transcript, in order.
    pub transcript: Vec<Utterance>,
    /// Short labels to search calls by (lower-cased and deduplicated at ingest).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The producer's own attributes (CRM ids, deal stage, region…), a JSON object searched by
    /// containment.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Largest transcript accepted, in characters of normalized text.
pub const MAX_TRANSCRIPT_CHARS: usize = 400_000;

/// Most utterances a transcript may have.
pub const MAX_UTTERANCES: usize = 10_000;

/// Most speakers a call may list.
pub const MAX_SPEAKERS: usize = 50;

/// Longest `external_id`, in characters (it is a unique index key).
pub const MAX_EXTERNAL_ID_CHARS: usize = 200;

/// Longest call title, in characters.
pub const MAX_TITLE_CHARS: usize = 500;

/// Longest e-mail address (`rep_email`, a speaker's `email`), in characters.
pub const MAX_EMAIL_CHARS: usize = 320;

/// Longest person or team name (`rep_name`, `rep_team`, a speaker's `name`, an utterance's
/// `speaker`), in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// Longest short label (`product`, `call_type`, a speaker's `role`), in characters.
pub const MAX_LABEL_CHARS: usize = 100;

/// Most tags a call may carry.
pub const MAX_TAGS: usize = 20;

/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;

/// Largest `metadata` object accepted, in bytes of JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Longest rubric version label, in characters (see [`check_rubric_version`]).
pub const MAX_RUBRIC_VERSION_CHARS: usize = 32;

/// Longest rubric criteria text, in characters.
pub const MAX_RUBRIC_CRITERIA_CHARS: usize = 20_000;

/// Most entries a `dimensions` list may have: one per known dimension.
pub const MAX_DIMENSIONS: usize = Dimension::ALL.len();

/// Checks one text field: no NUL character (Postgres cannot store it) and at most
/// `max_chars` characters. `field` names the field in the error, e.g. `transcript[3].text`.
pub fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!("{field} contains a NUL character"));
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(format!(
            "{field} is {chars} characters long; at most {max_chars} allowed"
        ));
    }
    Ok(())
}

/// Checks an e-mail address field: [`check_text`] with [`MAX_EMAIL_CHARS`], then the shape
/// `local@domain.tld` (one `@`, a local part of at most 64 characters, a domain of dot-separated
/// labels of letters, digits and `-`; no spaces, control or invisible formatting characters,
/// nor any of `<>()[],;:\"`).
pub fn check_email(field: &str, value: &str) -> Result<(), String> {
    check_text(field, value, MAX_EMAIL_CHARS)?;
    if email_shape_ok(value) {
        return Ok(());
    }
    Err(format!(
        "{field} {} is not an e-mail address (expected local@domain.tld)",
        quoted(value)
    ))
}

fn email_shape_ok(value: &str) -> bool {
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    let forbidden = |c: char| {
        c.is_whitespace() || c.is_control() || invisible(c) || "<>()[],;:\\\"@".contains(c)
    };
    let local_ok = !local.is_empty()
        && local.chars().count() <= 64
        && !local.chars().any(forbidden)
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && domain.chars().count() <= 255
        && labels.iter().all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    local_ok && domain_ok
}

/// Zero-width and bidirectional formatting characters (U+200B-U+200F, U+202A-U+202E,
/// U+2066-U+2069, U+FEFF): invisible, and able to make a value display as another.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
    )
}

/// A user-supplied value for an error message: Rust-escaped (control and bidi characters
/// show as escapes), and only its length when it is long.
fn quoted(value: &str) -> String {
    let chars = value.chars().count();
    if chars > 64 {
        format!("({chars} characters)")
    } else {
        format!("{value:?}")
    }
}

/// Checks a rubric version label. Versions are part of cache keys
/// (`…:{role}-{version}:…`) and of log lines, so they follow a strict grammar:
/// `^[0-9A-Za-z][0-9A-Za-z.-]{0,31}$` (`1.0.0`, `2.1-beta`, `2026-06`, `v3`). Every place that
/// accepts a version (`PUT /v1/rubrics/…`, `invalidate_rubric` payloads, so also
/// `callcoach jobs enqueue`) uses this one function.
pub fn check_rubric_version(version: &str) -> Result<(), String> {
    let mut chars = version.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if first_ok && rest_ok && version.len() <= MAX_RUBRIC_VERSION_CHARS {
        return Ok(());
    }
    Err(format!(
        "version {} is not a valid rubric version: expected 1-{MAX_RUBRIC_VERSION_CHARS} \
         ASCII letters, digits, '.' or '-', starting with a letter or digit (e.g. 1.2.0)",
        quoted(version)
    ))
}

/// Serde `deserialize_with` for a rubric version field: [`check_rubric_version`].
pub fn deserialize_rubric_version<'de, D>(deserializer: D) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let version = String::deserialize(deserializer)?;
    check_rubric_version(&version).map_err(serde::de::Error::custom)?;
    Ok(version)
}

/// A `dimensions` list as stored in job payloads: at most [`MAX_DIMENSIONS`] entries,
/// sorted, without duplicates (empty still means all four).
pub fn dimension_set(dimensions: &[Dimension]) -> Result<Vec<Dimension>, String> {
    if dimensions.len() > MAX_DIMENSIONS {
        return Err(format!(
            "dimensions: at most {MAX_DIMENSIONS} entries (one per dimension) allowed, got {}",
            dimensions.len()
        ));
    }
    let mut set = dimensions.to_vec();
    set.sort();
    set.dedup();
    Ok(set)
}

/// Serde `deserialize_with` for a `dimensions` field: [`dimension_set`].
pub fn deserialize_dimension_set<'de, D>(deserializer: D) -> Result<Vec<Dimension>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let dimensions = Vec::<Dimension>::deserialize(deserializer)?;
    dimension_set(&dimensions).map_err(serde::de::Error::custom)
}

impl CallInput {
    /// Checks what serde cannot: non-empty fields, bounded lengths (in characters), no NUL
    /// characters anywhere (Postgres cannot store them), e-mail shapes, known speaker sides.
    /// The error names the field, e.g. `transcript[3].text contains a NUL character`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(external_id) = &self.external_id {
            check_text("external_id", external_id, MAX_EXTERNAL_ID_CHARS)?;
            if external_id.trim().is_empty() {
                return Err("external_id must not be empty when given".into());
            }
        }
        check_text("title", &self.title, MAX_TITLE_CHARS)?;
        if self.title.trim().is_empty() {
            return Err("title must not be empty".into());
        }
        if let Some(product) = &self.product {
            check_text("product", product, MAX_LABEL_CHARS)?;
        }
        if let Some(call_type) = &self.call_type {
            check_text("call_type", call_type, MAX_LABEL_CHARS)?;
        }
        check_email("rep_email", &self.rep_email)?;
        if let Some(name) = &self.rep_name {
            check_text("rep_name", name, MAX_NAME_CHARS)?;
        }
        if let Some(team) = &self.rep_team {
            check_text("rep_team", team, MAX_NAME_CHARS)?;
        }
        if self.duration_seconds.is_some_and(|d| d < 0) {
            return Err("duration_seconds must not be negative".into());
        }
        let year = chrono::Datelike::year(&self.scheduled_at);
        if !(1900..=9999).contains(&year) {
            return Err(format!(
                "scheduled_at must be between the years 1900 and 9999, got {year}"
            ));
        }
        self.validate_speakers()?;
        self.validate_transcript()?;
        self.validate_attributes()
    }

    /// Checks `speakers`.
    fn validate_speakers(&self) -> Result<(), String> {
        if self.speakers.len() > MAX_SPEAKERS {
            return Err(format!(
                "speakers: at most {MAX_SPEAKERS} allowed, got {}",
                self.speakers.len()
            ));
        }
        for (i, s) in self.speakers.iter().enumerate() {
            check_text(&format!("speakers[{i}].name"), &s.name, MAX_NAME_CHARS)?;
            if let Some(email) = &s.email {
                check_email(&format!("speakers[{i}].email"), email)?;
            }
            if let Some(role) = &s.role {
                check_text(&format!("speakers[{i}].role"), role, MAX_LABEL_CHARS)?;
            }
            if s.company_side != "internal" && s.company_side != "external" {
                return Err(format!(
                    "speakers[{i}].company_side must be internal or external (speaker {})",
                    quoted(&s.name)
                ));
            }
        }
        Ok(())
    }

    /// Checks `transcript`.
    fn validate_transcript(&self) -> Result<(), String> {
        if self.transcript.is_empty() {
            return Err("transcript must contain at least one utterance".into());
        }
        if self.transcript.len() > MAX_UTTERANCES {
            return Err(format!(
                "transcript: at most {MAX_UTTERANCES} utterances allowed, got {}",
                self.transcript.len()
            ));
        }
        for (i, u) in self.transcript.iter().enumerate() {
            check_text(
                &format!("transcript[{i}].speaker"),
                &u.speaker,
                MAX_NAME_CHARS,
            )?;
            check_text(
                &format!("transcript[{i}].text"),
                &u.text,
                MAX_TRANSCRIPT_CHARS,
            )?;
            if u.text.trim().is_empty() {
                return Err(format!("transcript[{i}].text must not be empty"));
            }
        }
        let chars = normalized_transcript(&self.transcript).chars().count();
        if chars > MAX_TRANSCRIPT_CHARS {
            return Err(format!(
                "transcript is {chars} characters long (normalized); at most \
                 {MAX_TRANSCRIPT_CHARS} allowed"
            ));
        }
        Ok(())
    }

    /// Checks `tags` and `metadata`.
    fn validate_attributes(&self) -> Result<(), String> {
        if self.tags.len() > MAX_TAGS {
            return Err(format!(
                "tags: at most {MAX_TAGS} allowed, got {}",
                self.tags.len()
            ));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            check_text(&format!("tags[{i}]"), tag, MAX_TAG_CHARS)?;
            if tag.trim().is_empty() {
                return Err(format!("tags[{i}] must be 1 to {MAX_TAG_CHARS} characters"));
            }
        }
        let Some(metadata) = &self.metadata else {
            return Ok(());
        };
        let metadata_bytes = serde_json::to_string(metadata).map_or(usize::MAX, |s| s.len());
        if metadata_bytes > MAX_METADATA_BYTES {
            return Err(format!(
                "metadata exceeds {MAX_METADATA_BYTES} bytes of JSON"
            ));
        }
        check_json_object("metadata", metadata)
    }

    /// The tags as stored: trimmed, lower-cased, sorted, without duplicates.
    pub fn normalized_tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = self.tags.iter().map(|t| t.trim().to_lowercase()).collect();
        tags.sort();
        tags.dedup();
        tags
    }
}

/// No NUL character in any key or string value of a JSON object, at any depth.
fn check_json_object(
    path: &str,
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    for (key, value) in object {
        if key.contains('\0') {
            return Err(format!(
                "{path} has a key {} that contains a NUL character",
                quoted(key)
            ));
        }
        let simple = !key.is_empty() && key.chars().all(|c| c.is_alphanumeric() || c == '_');
        let path = if simple {
            format!("{path}.{key}")
        } else {
            format!("{path}[{}]", quoted(key))
        };
        check_json_value(&path, value)?;
    }
    Ok(())
}

fn check_json_value(path: &str, value: &serde_json::Value) -> Result<(), String> {
    match value {
        serde_json::Value::String(s) if s.contains('\0') => {
            Err(format!("{path} contains a NUL character"))
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_json_value(&format!("{path}[{i}]"), item)),
        serde_json::Value::Object(object) => check_json_object(path, object),
        _ => Ok(()),
    }
}

/// The transcript as one text: `Speaker: text` lines, whitespace collapsed. Identical
/// conversations give identical text whatever their timing, so they share cache entries.
pub fn normalized_transcript(utterances: &[Utterance]) -> String {
    let mut out = String::new();
    for u in utterances {
        out.push_str(u.speaker.trim());
        out.push_str(": ");
        let words: Vec<&str> = u.text.split_whitespace().collect();
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// Hex SHA-256 of a text.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_round_trip() {
        for d in Dimension::ALL {
            assert_eq!(d.as_str().parse::<Dimension>().unwrap(), d);
        }
        assert!(
            "closing"
                .parse::<Dimension>()
                .unwrap_err()
                .contains("closing")
        );
    }

    #[test]
    fn text_limits_count_characters_and_refuse_nul() {
        assert!(check_text("f", &"é".repeat(10), 10).is_ok());
        let err = check_text("f", &"é".repeat(11), 10).unwrap_err();
        assert_eq!(err, "f is 11 characters long; at most 10 allowed");
        let err = check_text("transcript[3].text", "a\0b", 10).unwrap_err();
        assert_eq!(err, "transcript[3].text contains a NUL character");
    }

    #[test]
    fn email_addresses_have_a_sane_shape() {
        for ok in [
            "ana@lumen.example",
            "a.b+c@x.co",
            "ANA@sub.lumen-x.example",
            "ü@bücher.de",
        ] {
            assert!(check_email("e", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ana",
            "ana@",
            "@x.y",
            "a b@x.y",
            "ana@localhost",
            "a@@x.y",
            "a@x..y",
            "a@-x.y",
            ".a@x.y",
            "a..b@x.y",
            "<a@x.y>",
            "a@x.y\n",
            "a\u{202e}@x.y",
        ] {
            let err = check_email("rep_email", bad).unwrap_err();
            assert!(err.starts_with("rep_email "), "{bad:?}: {err}");
        }
        let long = format!("{}@x.example", "a".repeat(400));
        assert!(check_email("e", &long).unwrap_err().contains("at most 320"));
    }

    #[test]
    fn rubric_versions_follow_the_grammar() {
        for ok in [
            "1",
            "1.0.0",
            "2.1-beta",
            "2026-06",
            "v3",
            "A",
            &"9".repeat(32),
        ] {
            assert!(check_rubric_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "v\n2",
            "*",
            "../../etc",
            "\u{202e}1",
            "1\u{202e}",
            " 1",
            "1 ",
            "1:2",
            "-1",
            ".1",
            "a/b",
            "1_0",
            "é",
            &"9".repeat(33),
        ] {
            let err = check_rubric_version(bad).unwrap_err();
            assert!(err.contains("not a valid rubric version"), "{bad:?}: {err}");
            assert!(!err.contains('\n') && !err.contains('\u{202e}'), "{err:?}");
        }
        let job: Result<crate::jobs::InvalidateRubric, _> = serde_json::from_value(
            serde_json::json!({ "role": "ae", "dimension": "discovery", "version": "a/b" }),
        );
        assert!(
            job.unwrap_err()
                .to_string()
                .contains("not a valid rubric version")
        );
    }

    #[test]
    fn dimension_sets_are_bounded_and_deduplicated() {
        use Dimension::*;
        assert_eq!(
            dimension_set(&[Engagement, Discovery, Engagement]).unwrap(),
            vec![Discovery, Engagement]
        );
        assert_eq!(dimension_set(&[]).unwrap(), Vec::<Dimension>::new());
        assert!(
            dimension_set(&[Discovery; 5])
                .unwrap_err()
                .contains("at most 4")
        );
        let job: crate::jobs::AnalyzeCall = serde_json::from_value(serde_json::json!({
            "call_id": uuid::Uuid::nil(),
            "dimensions": ["engagement", "discovery", "engagement"],
        }))
        .unwrap();
        assert_eq!(job.dimensions, vec![Discovery, Engagement]);
        let too_many: Result<crate::jobs::AnalyzeCall, _> = serde_json::from_value(
            serde_json::json!({ "call_id": uuid::Uuid::nil(), "dimensions": vec!["discovery"; 5] }),
        );
        assert!(too_many.is_err());
    }

    #[test]
    fn metadata_nul_characters_are_found_at_any_depth() {
        let map = |v: serde_json::Value| v.as_object().unwrap().clone();
        let ok = map(serde_json::json!({ "a": { "b": ["x", 1, null] } }));
        assert!(check_json_object("metadata", &ok).is_ok());
        let nested = map(serde_json::json!({ "a": { "b": ["x", "y\u{0}"] } }));
        assert_eq!(
            check_json_object("metadata", &nested).unwrap_err(),
            "metadata.a.b[1] contains a NUL character"
        );
        let key = map(serde_json::json!({ "deal stage": { "k\u{0}": 1 } }));
        assert_eq!(
            check_json_object("metadata", &key).unwrap_err(),
            "metadata[\"deal stage\"] has a key \"k\\0\" that contains a NUL character"
        );
    }

    #[test]
    fn normalization_ignores_timing_and_spacing() {
        let a = [Utterance {
            speaker: "Ann ".into(),
            start_seconds: 1.0,
            text: "hello   there".into(),
        }];
        let b = [Utterance {
            speaker: "Ann".into(),
            start_seconds: 9.0,
            text: " hello there ".into(),
        }];
        assert_eq!(normalized_transcript(&a), normalized_transcript(&b));
        assert_eq!(
            sha256_hex(&normalized_transcript(&a)),
            sha256_hex(&normalized_transcript(&b))
        );
    }
}
