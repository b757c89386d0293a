//! What an LLM call cost, from its `usage` and the model table's prices, and what it would
//! have cost without each cache — so savings are computed from real usage, never claimed.
//!
//! - [`Cost::of`]: one API answer. `usd` prices uncached input, 5-minute and 1-hour cache
//!   writes, cache reads and output (thinking included) at the model's rates, with the batch
//!   discount when the answer came from the Message Batches API. `without_prompt_cache_usd`
//!   prices every input token (written, read or not) as uncached input.
//! - [`RunCost`]: one stored analysis run, adding the session-cache counterfactual: a run
//!   answered from the session cache (Redis or Postgres) paid nothing, but without that
//!   cache it would have paid what the run that produced the answer paid.

use super::{ModelTable, ServiceTier, Usage, models::ModelInfo};
use serde::{Deserialize, Serialize};

/// Tokens per price unit: prices are USD per million tokens.
const PER_MTOK: f64 = 1_000_000.0;

/// The cost of one API answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// What was paid.
    pub usd: f64,
    /// What the same request would have cost with no prompt caching.
    pub without_prompt_cache_usd: f64,
}

impl Cost {
    /// Prices `usage` at the rates of the model table's `model_id`; `None` for a model the
    /// table does not list.
    pub fn for_model(model_id: &str, usage: &Usage) -> Option<Self> {
        ModelTable::builtin()
            .get(model_id)
            .map(|m| Self::of(m, usage))
    }

    /// Prices `usage` at `model`'s rates.
    pub fn of(model: &ModelInfo, usage: &Usage) -> Self {
        let discount = if usage.service_tier == ServiceTier::Batch {
            model.batch_discount
        } else {
            1.0
        };
        let (write_5m, write_1h) = usage.cache_writes();
        let tokens = |n: u64, price: f64| n as f64 * price;
        let output = tokens(usage.output_tokens, model.output);
        let paid = tokens(usage.input_tokens, model.input)
            + tokens(write_5m, model.cache_write_5m)
            + tokens(write_1h, model.cache_write_1h)
            + tokens(usage.cache_read_input_tokens, model.cache_read)
            + output;
        let all_input = usage.input_tokens + write_5m + write_1h + usage.cache_read_input_tokens;
        let uncached = tokens(all_input, model.input) + output;
        Self {
            usd: paid * discount / PER_MTOK,
            without_prompt_cache_usd: uncached * discount / PER_MTOK,
        }
    }
}

/// The cost of one stored analysis run and its counterfactuals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunCost {
    /// Paid by this run (0 for a session-cache hit).
    pub usd: f64,
    /// This run without prompt caching (session cache as it was).
    pub without_prompt_cache_usd: f64,
    /// This run without the session cache (prompt caching as it was).
    pub without_session_cache_usd: f64,
    /// This run with neither cache.
    pub without_caching_usd: f64,
}

impl RunCost {
    /// A run that called the LLM: without the session cache it would have called it anyway.
    pub fn computed(cost: Cost) -> Self {
        Self {
            usd: cost.usd,
            without_prompt_cache_usd: cost.without_prompt_cache_usd,
            without_session_cache_usd: cost.usd,
            without_caching_usd: cost.without_prompt_cache_usd,
        }
    }

    /// A run answered from the session cache, whose answer was first paid for at `origin`.
    pub fn hit(origin: Cost) -> Self {
        Self {
            usd: 0.0,
            without_prompt_cache_usd: 0.0,
            without_session_cache_usd: origin.usd,
            without_caching_usd: origin.without_prompt_cache_usd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ModelTable, client::CacheCreation};

    fn sonnet() -> &'static ModelInfo {
        ModelTable::builtin().get("claude-sonnet-5-5").unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn prices_each_kind_of_token_at_its_rate() {
        // 100 input, 1000 written for 5 min, 2000 for 1 h, 10 000 read, 1500 output.
        let usage = Usage {
            input_tokens: 100,
            output_tokens: 1500,
            cache_creation_input_tokens: 3000,
            cache_read_input_tokens: 10_000,
            cache_creation: CacheCreation {
                ephemeral_5m_input_tokens: 1000,
                ephemeral_1h_input_tokens: 2000,
            },
            ..Usage::default()
        };
        let cost = Cost::of(sonnet(), &usage);
        // By hand at $2 in, $2.50 5m write, $4 1h write, $0.20 read, $10 out per MTok:
        // 0.0002 + 0.0025 + 0.008 + 0.002 + 0.015 = 0.0277
        assert!(close(cost.usd, 0.0277), "{cost:?}");
        // Uncached: 13 100 input × $2 + 1500 × $10 = 0.0262 + 0.015 = 0.0412
        assert!(close(cost.without_prompt_cache_usd, 0.0412), "{cost:?}");
    }

    #[test]
    fn batch_answers_cost_half() {
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            service_tier: ServiceTier::Batch,
            ..Usage::default()
        };
        let cost = Cost::of(sonnet(), &usage);
        // (1M × $2 + 0.1M × $10) / 2 = $1.50
        assert!(close(cost.usd, 1.5), "{cost:?}");
        assert!(close(cost.without_prompt_cache_usd, 1.5), "{cost:?}");
    }

    #[test]
    fn writes_without_the_ttl_split_count_as_five_minute_writes() {
        let usage = Usage {
            cache_creation_input_tokens: 1_000_000,
            ..Usage::default()
        };
        assert!(close(Cost::of(sonnet(), &usage).usd, 2.5));
    }

    #[test]
    fn a_session_cache_hit_pays_nothing_but_counts_what_it_saved() {
        let origin = Cost {
            usd: 0.03,
            without_prompt_cache_usd: 0.05,
        };
        let hit = RunCost::hit(origin);
        assert_eq!((hit.usd, hit.without_prompt_cache_usd), (0.0, 0.0));
        assert_eq!(
            (hit.without_session_cache_usd, hit.without_caching_usd),
            (0.03, 0.05)
        );
        let computed = RunCost::computed(origin);
        assert_eq!(computed.without_session_cache_usd, 0.03);
        assert_eq!(computed.without_caching_usd, 0.05);
    }
}
