-- Indexes for the read paths. Idempotent: applied by `callcoach migrate` and
-- `callcoach db optimize`, which also verifies each one exists and is valid. Every index names
-- the query it serves ("Serves:"); tests/integration/performance.rs checks with EXPLAIN that
-- those queries use them on seeded data. Indexes on the partitioned coaching_sessions are
-- created on the parent, so every partition (present and future) gets them.
--
-- Named queries live in sql/performance/003_functions.sql (functions) and src/performance.rs
-- (statements with a `_SQL` name).

-- Hot-data partial indexes: registered in hot_indexes with a fixed cutoff (never now() in a
-- predicate) and built when missing. A changed definition sets the cutoff to -infinity, which
-- makes the next maintain_tables run rebuild the index (queries meanwhile use the full
-- indexes, since "column >= -infinity" does not imply the old predicate).
CREATE OR REPLACE FUNCTION register_hot_index(p_name text, p_window_days integer, p_definition text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff timestamptz;
BEGIN
    INSERT INTO hot_indexes AS h (index_name, cutoff, window_days, definition)
    VALUES (p_name, date_trunc('day', now()) - make_interval(days => p_window_days),
            p_window_days, p_definition)
    ON CONFLICT (index_name) DO UPDATE
        SET window_days = EXCLUDED.window_days,
            definition = EXCLUDED.definition,
            cutoff = CASE WHEN h.definition = EXCLUDED.definition THEN h.cutoff
                          ELSE '-infinity' END
    RETURNING cutoff INTO v_cutoff;
    IF to_regclass(p_name) IS NULL THEN
        IF v_cutoff = '-infinity' THEN
            v_cutoff := date_trunc('day', now()) - make_interval(days => p_window_days);
            UPDATE hot_indexes SET cutoff = v_cutoff WHERE index_name = p_name;
        END IF;
        EXECUTE format(p_definition, '', p_name, v_cutoff);
    END IF;
END $$;

-- ---------------------------------------------------------------- coaching_sessions

-- Serves: get_rep_score_trends(rep, dimension, days): one rep's sessions of one dimension by
-- date; INCLUDE (score) answers the averages from the index alone.
CREATE INDEX IF NOT EXISTS coaching_sessions_rep_dim_created_idx
    ON coaching_sessions (rep_id, dimension, created_at DESC) INCLUDE (score);

-- Serves: get_call_with_details (latest session per dimension).
CREATE INDEX IF NOT EXISTS coaching_sessions_call_dim_created_idx
    ON coaching_sessions (call_id, dimension, created_at DESC);

-- Serves: get_rep_performance_summary(rep, days) (the range is on rep_id and created_at; the
-- INCLUDEd dimension and score answer it from the index alone) and REP_SESSIONS_SQL (a rep's
-- coaching history, newest first, keyset-paginated).
CREATE INDEX IF NOT EXISTS coaching_sessions_rep_created_idx
    ON coaching_sessions (rep_id, created_at DESC, id DESC) INCLUDE (dimension, score, call_id);

-- Serves: get_score_trends(dimension, days) (weekly averages of one dimension, all reps).
CREATE INDEX IF NOT EXISTS coaching_sessions_dim_created_idx
    ON coaching_sessions (dimension, created_at DESC) INCLUDE (score);

-- Serves: COACHING_OPPORTUNITIES_SQL (a rep's recent sessions scoring below
-- performance::NEEDS_WORK_BELOW, to review with the rep). The predicate is a constant.
CREATE INDEX IF NOT EXISTS coaching_sessions_needs_work_idx
    ON coaching_sessions (rep_id, created_at DESC) INCLUDE (dimension, score, call_id)
    WHERE score < 60;

-- ---------------------------------------------------------------- calls

-- Serves: search_calls_optimized filtered by rep; mv_rep_performance's total_calls.
CREATE INDEX IF NOT EXISTS calls_rep_scheduled_idx
    ON calls (rep_id, scheduled_at DESC, id DESC);

-- Serves: search_calls_optimized filtered by product.
CREATE INDEX IF NOT EXISTS calls_product_scheduled_idx
    ON calls (product, scheduled_at DESC, id DESC);

-- Serves: search_calls_optimized filtered by product and call type (with or without dates).
CREATE INDEX IF NOT EXISTS calls_product_type_scheduled_idx
    ON calls (product, call_type, scheduled_at DESC, id DESC);

-- Serves: search_calls_optimized filtered by call type alone.
CREATE INDEX IF NOT EXISTS calls_type_scheduled_idx
    ON calls (call_type, scheduled_at DESC, id DESC);

-- Serves: search_calls_optimized without a rep, product or type filter: keyset pagination
-- over (scheduled_at, id) for date windows older than calls_recent_idx's cutoff.
CREATE INDEX IF NOT EXISTS calls_scheduled_id_idx
    ON calls (scheduled_at DESC, id DESC);

-- Serves: search_calls_optimized filtered by tags (calls carrying all the tags asked for).
CREATE INDEX IF NOT EXISTS calls_tags_idx ON calls USING gin (tags);

-- Serves: search_calls_optimized filtered by metadata containment (metadata @> '{...}').
CREATE INDEX IF NOT EXISTS calls_metadata_idx ON calls USING gin (metadata jsonb_path_ops);

-- Serves: search_calls_optimized over the last 45 days without a rep, product or type
-- filter (the dashboard's recent calls): an index-only scan of a small index. Hot data:
-- rebuilt with a later cutoff by the maintain_tables job.
SELECT register_hot_index('calls_recent_idx', 45, $$
    CREATE INDEX %s %I ON calls (scheduled_at DESC, id DESC)
        INCLUDE (title, product, call_type, rep_id, tags)
        WHERE scheduled_at >= %L::timestamptz
$$);

-- ---------------------------------------------------------------- speakers, reps

-- Serves: search_calls_optimized filtered by participant (a customer contact's e-mail).
CREATE INDEX IF NOT EXISTS speakers_email_idx ON speakers (lower(email)) INCLUDE (call_id);

-- Serves: performance::list_reps filtered by team: its active reps by name.
CREATE INDEX IF NOT EXISTS reps_team_name_idx
    ON reps (team, name) WHERE active;

-- Serves: performance::list_reps by name prefix (case-insensitive, the rep picker).
CREATE INDEX IF NOT EXISTS reps_name_prefix_idx ON reps (lower(name) text_pattern_ops);

-- ---------------------------------------------------------------- analysis_runs

-- Serves: get_cache_statistics(days) for windows beyond analysis_runs_recent_idx.
CREATE INDEX IF NOT EXISTS analysis_runs_created_source_idx
    ON analysis_runs (created_at DESC) INCLUDE (source, cost_usd, cost_without_caching_usd);

-- Serves: get_cache_statistics(days) for the last 30 days (the ops dashboard's window).
-- Hot data: rebuilt with a later cutoff by the maintain_tables job.
SELECT register_hot_index('analysis_runs_recent_idx', 30, $$
    CREATE INDEX %s %I ON analysis_runs (created_at DESC)
        INCLUDE (source, cost_usd, cost_without_caching_usd)
        WHERE created_at >= %L::timestamptz
$$);

-- Serves: performance::job_runs (the analysis runs a job made: `callcoach jobs show`).
CREATE INDEX IF NOT EXISTS analysis_runs_job_idx
    ON analysis_runs (job_id, created_at) WHERE job_id IS NOT NULL;

-- ---------------------------------------------------------------- jobs

-- Serves: ledger::relay's delivery scan (undelivered open rows, oldest run_at first, LIMIT,
-- FOR UPDATE SKIP LOCKED): the scan reads the rows it returns and no others.
CREATE INDEX IF NOT EXISTS jobs_relay_idx ON jobs (run_at)
    WHERE delivered_at IS NULL AND finished_at IS NULL;

-- Serves: ledger::relay's rescuer (running rows whose lease expired, oldest first).
CREATE INDEX IF NOT EXISTS jobs_lease_idx ON jobs (lease_expires_at) WHERE finished_at IS NULL;

-- Serves: ledger::jobs filtered by state (the newest jobs in one state: the dashboard's lists).
CREATE INDEX IF NOT EXISTS jobs_status_enqueued_idx ON jobs (status, enqueued_at DESC);

-- Serves: ledger::jobs filtered by kind (the newest jobs of one kind).
CREATE INDEX IF NOT EXISTS jobs_kind_enqueued_idx ON jobs (kind, enqueued_at DESC);

-- Serves: ledger::jobs filtered by call (the jobs of one call, any kind).
CREATE INDEX IF NOT EXISTS jobs_call_idx ON jobs ((payload ->> 'call_id'), enqueued_at DESC)
    WHERE payload ? 'call_id';

-- ---------------------------------------------------------------- cache tables

-- Serves: maintain_performance_tables' retention of expired cache leases.
CREATE INDEX IF NOT EXISTS cache_leases_expires_idx ON cache_leases (expires_at);

-- get_cached_coaching_session: the durable tier read by key is the primary key of
-- coaching_cache (coaching_cache_pkey); listed here so `db optimize` verifies it.
