-- Usage and cost of every analysis run: cache writes split by TTL, thinking tokens, the
-- service tier, the USD cost from the model table and its counterfactuals (without prompt
-- caching, without the session cache, without either), so savings are sums, never claims.
ALTER TABLE analysis_runs
    ADD COLUMN cache_write_5m_tokens          bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_1h_tokens          bigint NOT NULL DEFAULT 0,
    ADD COLUMN thinking_tokens                bigint NOT NULL DEFAULT 0,
    ADD COLUMN service_tier                   text,
    ADD COLUMN cost_usd                       double precision NOT NULL DEFAULT 0,
    ADD COLUMN cost_without_prompt_cache_usd  double precision NOT NULL DEFAULT 0,
    ADD COLUMN cost_without_session_cache_usd double precision NOT NULL DEFAULT 0,
    ADD COLUMN cost_without_caching_usd       double precision NOT NULL DEFAULT 0;
