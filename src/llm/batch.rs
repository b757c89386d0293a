//! The Message Batches API, client side: work nobody waits on at half the price.
//!
//! [`LlmClient::create_batch`] submits requests under `custom_id`s, [`LlmClient::batch`]
//! reads the batch's status, and once it has `ended` (all answered, or the 24 h window ran
//! out), [`LlmClient::batch_results`] reads the JSONL results: each `custom_id` succeeded
//! (with the same message a direct call returns, `usage.service_tier` = `batch`), errored,
//! was canceled or expired. What to do with the answers is the job system's business
//! (`jobs::collect_batch`).

use super::{
    LlmClient, LlmError, LlmResponse,
    client::{parse_success, truncated},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

/// A batch as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct BatchInfo {
    /// `msgbatch_…`.
    pub id: String,
    /// `in_progress`, `canceling` or `ended`.
    pub processing_status: String,
    /// When the batch stops processing (created + 24 h).
    pub expires_at: DateTime<Utc>,
}

impl BatchInfo {
    /// Whether results can be read.
    pub fn ended(&self) -> bool {
        self.processing_status == "ended"
    }
}

/// The outcome of one request of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchOutcome {
    /// Answered.
    Succeeded(Box<LlmResponse>),
    /// Refused or failed; the API's message.
    Errored(String),
    /// Canceled before it ran.
    Canceled,
    /// The 24 h window ran out before it ran.
    Expired,
}

/// Wire shape of one JSONL result line.
#[derive(Deserialize)]
struct ResultLine {
    custom_id: String,
    result: ResultBody,
}

#[derive(Deserialize)]
struct ResultBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

impl LlmClient {
    /// Submits `requests` (`custom_id`, Messages API body) as one batch.
    ///
    /// # Errors
    ///
    /// The API's error, as for [`LlmClient::messages`].
    pub async fn create_batch(&self, requests: &[(String, Value)]) -> Result<BatchInfo, LlmError> {
        let requests: Vec<Value> = requests
            .iter()
            .map(|(id, params)| json!({"custom_id": id, "params": params}))
            .collect();
        let request = self
            .request(reqwest::Method::POST, "/v1/messages/batches")
            .json(&json!({ "requests": requests }));
        parse_batch(&self.send(request).await?.1)
    }

    /// The batch's current status.
    ///
    /// # Errors
    ///
    /// The API's error (404 for an unknown batch).
    pub async fn batch(&self, id: &str) -> Result<BatchInfo, LlmError> {
        let request = self.request(reqwest::Method::GET, &format!("/v1/messages/batches/{id}"));
        parse_batch(&self.send(request).await?.1)
    }

    /// The results of an ended batch, by `custom_id`.
    ///
    /// # Errors
    ///
    /// The API's error, or [`LlmError::BadResponse`] naming a line that does not parse.
    pub async fn batch_results(&self, id: &str) -> Result<Vec<(String, BatchOutcome)>, LlmError> {
        let path = format!("/v1/messages/batches/{id}/results");
        let (_, bytes) = self.send(self.request(reqwest::Method::GET, &path)).await?;
        parse_results(&bytes)
    }
}

fn parse_batch(bytes: &[u8]) -> Result<BatchInfo, LlmError> {
    serde_json::from_slice(bytes)
        .map_err(|e| LlmError::BadResponse(format!("batch: {e}; body: {}", truncated(bytes))))
}

/// Parses JSONL results (blank lines skipped).
fn parse_results(bytes: &[u8]) -> Result<Vec<(String, BatchOutcome)>, LlmError> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(n, line)| {
            let parsed: ResultLine = serde_json::from_str(line)
                .map_err(|e| LlmError::BadResponse(format!("batch result line {}: {e}", n + 1)))?;
            Ok((parsed.custom_id, outcome(parsed.result)?))
        })
        .collect()
}

fn outcome(body: ResultBody) -> Result<BatchOutcome, LlmError> {
    Ok(match body.kind.as_str() {
        "succeeded" => {
            let message = body.message.unwrap_or_default().to_string();
            BatchOutcome::Succeeded(Box::new(parse_success(message.as_bytes())?))
        }
        "errored" => BatchOutcome::Errored(
            body.error
                .as_ref()
                .and_then(|e| e.pointer("/error/message").or_else(|| e.get("message")))
                .and_then(Value::as_str)
                .unwrap_or("the request failed")
                .to_string(),
        ),
        "canceled" => BatchOutcome::Canceled,
        "expired" => BatchOutcome::Expired,
        other => {
            return Err(LlmError::BadResponse(format!(
                "unknown batch result type {other:?}"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_of_every_kind_parse() {
        let message = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5-5",
            "content": [{"type": "text", "text": "{}"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 4, "service_tier": "batch"}
        });
        let jsonl = [
            json!({"custom_id": "discovery", "result": {"type": "succeeded", "message": message}}),
            json!({"custom_id": "engagement", "result": {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}}}),
            json!({"custom_id": "objection_handling", "result": {"type": "expired"}}),
            json!({"custom_id": "product_knowledge", "result": {"type": "canceled"}}),
        ]
        .map(|l| l.to_string())
        .join("\n");
        let results = parse_results(format!("{jsonl}\n\n").as_bytes()).unwrap();
        assert_eq!(results.len(), 4);
        let BatchOutcome::Succeeded(r) = &results[0].1 else {
            panic!("{results:?}")
        };
        assert_eq!(r.usage.service_tier, crate::llm::ServiceTier::Batch);
        assert_eq!(results[1].1, BatchOutcome::Errored("bad".into()));
        assert_eq!(results[2].1, BatchOutcome::Expired);
        assert_eq!(results[3].1, BatchOutcome::Canceled);
        let err = parse_results(b"{\"custom_id\": 1}").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
