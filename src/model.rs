//! Domain types shared by the HTTP front, the jobs and the database layer: coaching dimensions,
//! rep roles, and the call-ingest payload with its validation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{fmt, str::FromStr};

/// A coaching dimension a call is analysed along.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Largest transcript accepted, in characters of normalized text.
pub const MAX_TRANSCRIPT_CHARS: usize = 400_000;

/// Most tags a call may carry.
pub const MAX_TAGS: usize = 20;

/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;

/// Largest `metadata` object accepted, in bytes of JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

impl CallInput {
    /// Checks what serde cannot: non-empty fields, sane sizes, known speaker sides.
    pub fn validate(&self) -> Result<(), String> {
        if self.title.trim().is_empty() {
            return Err("title must not be empty".into());
        }
        if !self.rep_email.contains('@') {
            return Err(format!(
                "rep_email {:?} is not an e-mail address",
                self.rep_email
            ));
        }
        if self.transcript.is_empty() {
            return Err("transcript must contain at least one utterance".into());
        }
        if let Some(i) = self
            .transcript
            .iter()
            .position(|u| u.text.trim().is_empty())
        {
            return Err(format!("transcript[{i}].text must not be empty"));
        }
        if self.duration_seconds.is_some_and(|d| d < 0) {
            return Err("duration_seconds must not be negative".into());
        }
        if let Some(s) = self
            .speakers
            .iter()
            .find(|s| s.company_side != "internal" && s.company_side != "external")
        {
            return Err(format!(
                "speaker {:?}: company_side must be internal or external",
                s.name
            ));
        }
        if normalized_transcript(&self.transcript).len() > MAX_TRANSCRIPT_CHARS {
            return Err(format!(
                "transcript exceeds {MAX_TRANSCRIPT_CHARS} characters"
            ));
        }
        self.validate_attributes()
    }

    /// Checks `tags` and `metadata`.
    fn validate_attributes(&self) -> Result<(), String> {
        if self.tags.len() > MAX_TAGS {
            return Err(format!(
                "tags: at most {MAX_TAGS} allowed, got {}",
                self.tags.len()
            ));
        }
        if let Some((i, _)) = self.tags.iter().enumerate().find(|(_, t)| {
            let t = t.trim();
            t.is_empty() || t.chars().count() > MAX_TAG_CHARS
        }) {
            return Err(format!("tags[{i}] must be 1 to {MAX_TAG_CHARS} characters"));
        }
        let metadata_bytes = self.metadata.as_ref().map_or(0, |m| {
            serde_json::to_string(m).map_or(usize::MAX, |s| s.len())
        });
        if metadata_bytes > MAX_METADATA_BYTES {
            return Err(format!(
                "metadata exceeds {MAX_METADATA_BYTES} bytes of JSON"
            ));
        }
        Ok(())
    }

    /// The tags as stored: trimmed, lower-cased, sorted, without duplicates.
    pub fn normalized_tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = self.tags.iter().map(|t| t.trim().to_lowercase()).collect();
        tags.sort();
        tags.dedup();
        tags
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
