-- Indexes for the read paths. Idempotent: applied by `callcoach migrate` and
-- `callcoach db optimize`, which also verifies each one exists and is valid. Every index names
-- the query it serves. Indexes on the partitioned coaching_sessions are created on the parent,
-- so every partition (present and future) gets them.

-- get_rep_performance_summary(rep, days) and mv_rep_performance: one rep's sessions by
-- dimension and date; INCLUDE (score) answers the averages from the index alone.
CREATE INDEX IF NOT EXISTS coaching_sessions_rep_dim_created_idx
    ON coaching_sessions (rep_id, dimension, created_at DESC) INCLUDE (score);

-- get_call_with_details: a call's latest session per dimension.
CREATE INDEX IF NOT EXISTS coaching_sessions_call_dim_created_idx
    ON coaching_sessions (call_id, dimension, created_at DESC);

-- search_calls_optimized filtered by rep: one rep's calls, newest first.
CREATE INDEX IF NOT EXISTS calls_rep_scheduled_idx
    ON calls (rep_id, scheduled_at DESC, id DESC);

-- search_calls_optimized filtered by product (and optionally call type or dates).
CREATE INDEX IF NOT EXISTS calls_product_scheduled_idx
    ON calls (product, scheduled_at DESC, id DESC);

-- search_calls_optimized without a rep filter: keyset pagination over (scheduled_at, id).
CREATE INDEX IF NOT EXISTS calls_scheduled_id_idx
    ON calls (scheduled_at DESC, id DESC);

-- get_cache_statistics(days): analysis runs of the last days by source.
CREATE INDEX IF NOT EXISTS analysis_runs_created_source_idx
    ON analysis_runs (created_at DESC) INCLUDE (source, cost_usd, cost_without_caching_usd);

-- get_cached_coaching_session: the durable tier read by key is the primary key of
-- coaching_cache (coaching_cache_pkey); listed here so `db optimize` verifies it.
