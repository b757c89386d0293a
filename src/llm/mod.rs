//! LLM access: the Anthropic Messages API client, prompt assembly and the local emulator.
//!
//! - [`client`]: [`LlmClient`], one HTTP request per call, errors classified
//!   for the job system's retry policy ([`LlmError`]).
//! - [`prompt`]: [`build_request`] lays a dimension analysis out for prompt
//!   caching; [`parse_coaching`] validates the model's JSON answer.
//! - [`batch`]: the Message Batches API (half price, results within 24 h).
//! - [`cost`]: what a call cost from its usage, and without each cache.
//! - [`gateway`]: [`Gateway`], the guarded path jobs use: spend guard, cache-aware
//!   fan-out, fleet rate limit, cost.
//! - [`limits`]: the fleet rate limits and the spend guard.
//! - [`models`]: the model table (`jobs/models.toml`): prices, limits, lifecycle.
//! - [`emulator`]: an Anthropic-compatible local server for dev, demos and
//!   tests.

pub mod batch;
pub mod client;
pub mod cost;
pub mod emulator;
pub mod gateway;
pub mod limits;
pub mod models;
pub mod prompt;

pub use client::{LlmClient, LlmError, LlmResponse, ServiceTier, Usage};
pub use gateway::{Answer, Gateway, GatewayError, GatewayOptions};
pub use models::{ModelError, ModelTable};
pub use prompt::{
    BlockOrder, CacheTtl, CoachingResult, Effort, PROMPT_TEMPLATE_VERSION, PromptInputs,
    PromptOptions, PromptRequest, build_request, estimate_tokens, parse_coaching,
};
