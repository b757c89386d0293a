//! The one way jobs call the LLM: [`Gateway::send`] puts every request through the fleet's
//! guards, in this order:
//!
//! 1. **Spend guard** — a spent daily or monthly budget answers [`GatewayError::OverBudget`]
//!    before anything is sent.
//! 2. **Prefix gate** (cache-aware fan-out) — requests that share a cached prefix nobody has
//!    written yet do not all pay its cache write: the first becomes the *writer* and is sent;
//!    the others wait until its answer is back (the API can serve an entry only after the
//!    response that wrote it) and then read the prefix from the cache. The gate is a Redis
//!    key per prefix id (`callcoach:prefix:{id}`: `pending:{owner}` while the writer is in
//!    flight, `warm` for the cache TTL after), claimed and checked in one Lua script. A writer
//!    that fails releases its claim; one that dies lets it expire; a waiter goes ahead after
//!    [`GatewayOptions::fan_out_wait`] whatever happens. Redis unreachable: the gate is
//!    skipped (it only saves money, it guards nothing).
//! 3. **Fleet rate limit** — the request and its estimated tokens are charged to the fleet's
//!    buckets; a wait longer than the limiter's maximum answers [`GatewayError::Throttled`].
//! 4. **The call**, then the limiter is corrected from `usage`, tightened from the
//!    `anthropic-ratelimit-*` headers, and the real cost is charged to the spend guard.

use super::{
    CacheTtl, LlmClient, LlmError, LlmResponse, PromptRequest,
    cost::Cost,
    limits::{AcquireError, FleetLimiter, OverBudget, Reservation, SpendGuard},
};
use redis::aio::ConnectionManager;
use std::time::Duration;

/// Output tokens a coaching answer typically takes, charged before the call (corrected after).
const EXPECTED_OUTPUT_TOKENS: u64 = 1500;

/// How often a waiting request looks at the writer's gate key.
const GATE_POLL: Duration = Duration::from_millis(25);

/// Timeout of one gate command.
const GATE_TIMEOUT: Duration = Duration::from_millis(200);

/// Why [`Gateway::send`] did not return an answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The API (or the way to it) failed.
    #[error(transparent)]
    Api(#[from] LlmError),
    /// The fleet's rate limit has no room within the maximum wait.
    #[error("{reason}")]
    Throttled {
        /// When to try again.
        retry_after: Duration,
        /// Which limit.
        reason: String,
    },
    /// A spend budget is used up.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
}

/// An answer and what it cost.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The API's response.
    pub response: LlmResponse,
    /// Its cost from the model table.
    pub cost: Cost,
}

/// Gateway settings.
#[derive(Clone, Copy, Debug)]
pub struct GatewayOptions {
    /// Longest a request waits for another request writing the prefix it needs.
    pub fan_out_wait: Duration,
}

/// The guarded LLM path. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    client: LlmClient,
    limiter: FleetLimiter,
    spend: SpendGuard,
    gate: PrefixGate,
    options: GatewayOptions,
}

impl Gateway {
    /// Wires the guards around `client`; `redis` carries the gate.
    pub fn new(
        client: LlmClient,
        limiter: FleetLimiter,
        spend: SpendGuard,
        redis: ConnectionManager,
        options: GatewayOptions,
    ) -> Self {
        Self {
            client,
            limiter,
            spend,
            gate: PrefixGate { redis },
            options,
        }
    }

    /// The bare client (tools and benchmarks that bypass the guards).
    pub fn client(&self) -> &LlmClient {
        &self.client
    }

    /// The spend guard (the HTTP front refuses interactive work over budget).
    pub fn spend(&self) -> &SpendGuard {
        &self.spend
    }

    /// Sends `request` through the guards (see the module docs). `ttl` is the lifetime of the
    /// cache entries it writes; `work` names what is computed (the analysis cache key), so a
    /// re-run of the same work after a crash or a stop passes its own earlier claims on the
    /// prefix gate instead of waiting for them to expire.
    ///
    /// # Errors
    ///
    /// [`GatewayError`]: over budget, throttled by the fleet limit, or the API's error.
    pub async fn send(
        &self,
        request: &PromptRequest,
        ttl: CacheTtl,
        work: &str,
    ) -> Result<Answer, GatewayError> {
        self.spend.check().await?;
        let claim = self
            .gate
            .enter(&request.prefixes, work, self.options.fan_out_wait)
            .await;
        let result = self.limited_call(request).await;
        match &result {
            Ok(_) => self.gate.warm(&request.prefixes, ttl).await,
            Err(_) => self.gate.release(&request.prefixes, &claim).await,
        }
        let response = result?;
        let cost = Cost::for_model(&response.model, &response.usage)
            .or_else(|| Cost::for_model(request_model(request), &response.usage))
            .unwrap_or_default();
        self.spend.charge(cost.usd).await;
        Ok(Answer { response, cost })
    }

    /// The fleet-limited call: charge, send, settle.
    async fn limited_call(&self, request: &PromptRequest) -> Result<LlmResponse, GatewayError> {
        let max_tokens = request.body["max_tokens"]
            .as_u64()
            .unwrap_or(EXPECTED_OUTPUT_TOKENS);
        let output_estimate = EXPECTED_OUTPUT_TOKENS.min(max_tokens);
        let reservation = self
            .limiter
            .acquire(request.estimated_input_tokens, output_estimate)
            .await
            .map_err(throttled)?;
        let result = self.client.messages(&request.body).await;
        self.settle(reservation, &result).await;
        Ok(result?)
    }

    /// Corrects the limiter from the answer (a failed call refunds the token estimates).
    async fn settle(&self, reservation: Reservation, result: &Result<LlmResponse, LlmError>) {
        match result {
            Ok(response) => {
                let u = &response.usage;
                let input = u.input_tokens + u.cache_creation_input_tokens;
                self.limiter
                    .settle(reservation, input, u.output_tokens)
                    .await;
                let tightened = self.limiter.observe_headers(&response.rate_limits).await;
                if !tightened.is_empty() {
                    tracing::info!(?tightened, "the API reports its rate limits nearly spent");
                }
            }
            Err(_) => self.limiter.settle(reservation, 0, 0).await,
        }
    }
}

fn request_model(request: &PromptRequest) -> &str {
    request.body["model"].as_str().unwrap_or_default()
}

fn throttled(e: AcquireError) -> GatewayError {
    match e {
        AcquireError::Throttled { retry_after, .. } => GatewayError::Throttled {
            retry_after,
            reason: e.to_string(),
        },
        AcquireError::Invalid(invalid) => GatewayError::Api(LlmError::Rejected {
            status: 413,
            kind: "request_too_large".into(),
            message: format!("the request can never fit the fleet's rate limit: {invalid}"),
        }),
    }
}

/// Claims and checks prefix gate keys, shortest prefix first. Returns 0 when every prefix is
/// warm, `i` (1-based) when this owner claimed prefixes `i..` (it writes them), `-i` when
/// prefix `i` is being written by another request.
const ENTER: &str = r"
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then
    for j = i, #KEYS do
      redis.call('SET', KEYS[j], 'pending:' .. ARGV[1], 'PX', ARGV[2], 'NX')
    end
    return i
  elseif v ~= 'warm' and v ~= 'pending:' .. ARGV[1] then
    return -i
  end
end
return 0
";

/// Deletes the keys this owner still holds as pending.
const RELEASE: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == 'pending:' .. ARGV[1] then redis.call('DEL', key) end
end
return 0
";

/// What [`PrefixGate::enter`] decided.
///
/// A writer that dies keeps its claims until they expire ([`GatewayOptions::fan_out_wait`]);
/// the same work run again passes them at once, other work waits at most that long.
#[derive(Clone, Debug, PartialEq, Eq)]
enum GateClaim {
    /// Nothing held (all warm, Redis unreachable, or waited out).
    None,
    /// This request writes some prefixes; `owner` holds their pending keys.
    Writer {
        /// The owner id in the pending keys.
        owner: String,
    },
}

/// The Redis side of the cache-aware fan-out.
#[derive(Clone)]
struct PrefixGate {
    redis: ConnectionManager,
}

impl PrefixGate {
    fn keys(prefixes: &[String]) -> Vec<String> {
        prefixes
            .iter()
            .map(|p| format!("callcoach:prefix:{p}"))
            .collect()
    }

    /// Waits while another request writes a prefix this one needs (at most `max_wait`);
    /// claims the cold ones.
    async fn enter(&self, prefixes: &[String], work: &str, max_wait: Duration) -> GateClaim {
        if prefixes.is_empty() {
            return GateClaim::None;
        }
        let keys = Self::keys(prefixes);
        let owner = work.to_string();
        let pending_ms = max_wait.as_millis().max(1) as u64;
        let deadline = tokio::time::Instant::now() + max_wait;
        let script = redis::Script::new(ENTER);
        loop {
            let mut invocation = script.prepare_invoke();
            invocation.key(&keys).arg(&owner).arg(pending_ms);
            let mut conn = self.redis.clone();
            let answer =
                tokio::time::timeout(GATE_TIMEOUT, invocation.invoke_async::<i64>(&mut conn));
            match answer.await {
                Ok(Ok(0)) => return GateClaim::None,
                Ok(Ok(n)) if n > 0 => {
                    metrics::counter!(crate::telemetry::names::LLM_PREFIX_WRITERS).increment(1);
                    return GateClaim::Writer { owner };
                }
                Ok(Ok(_)) if tokio::time::Instant::now() < deadline => {
                    metrics::counter!(crate::telemetry::names::LLM_PREFIX_WAITS).increment(1);
                    tokio::time::sleep(GATE_POLL).await;
                }
                Ok(Ok(_)) => return GateClaim::None,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "prefix gate unavailable; sending ungated");
                    return GateClaim::None;
                }
                Err(_) => return GateClaim::None,
            }
        }
    }

    /// After a successful answer: every prefix of the request is in the API's cache for `ttl`
    /// (reads refresh it), a little less to be safe.
    async fn warm(&self, prefixes: &[String], ttl: CacheTtl) {
        if prefixes.is_empty() {
            return;
        }
        let ms = match ttl {
            CacheTtl::FiveMinutes => 270_000u64,
            CacheTtl::OneHour => 3_300_000,
        };
        let mut pipe = redis::pipe();
        for key in Self::keys(prefixes) {
            pipe.set_options(
                key,
                "warm",
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ms)),
            )
            .ignore();
        }
        let mut conn = self.redis.clone();
        let _ = tokio::time::timeout(GATE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await;
    }

    /// After a failed call: frees the prefixes this request claimed, so a waiter can write them.
    async fn release(&self, prefixes: &[String], claim: &GateClaim) {
        let GateClaim::Writer { owner } = claim else {
            return;
        };
        let script = redis::Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        invocation.key(Self::keys(prefixes)).arg(owner);
        let mut conn = self.redis.clone();
        let _ = tokio::time::timeout(GATE_TIMEOUT, invocation.invoke_async::<i64>(&mut conn)).await;
    }
}
