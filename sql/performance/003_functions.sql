-- Read-path functions called by callcoach's Rust code. CREATE OR REPLACE keeps them current.

-- The durable cache tier's read (CoachingCache::pg_get): primary-key lookup.
CREATE OR REPLACE FUNCTION get_cached_coaching_session(p_cache_key text)
RETURNS TABLE (result jsonb, session_id uuid, model text, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.result, c.session_id, c.model, c.created_at
    FROM coaching_cache c WHERE c.cache_key = p_cache_key
$$;

-- One rep's sessions of the last p_days days, per dimension (index-only scan on
-- coaching_sessions_rep_dim_created_idx).
CREATE OR REPLACE FUNCTION get_rep_performance_summary(p_rep_id uuid, p_days integer)
RETURNS TABLE (dimension text, sessions bigint, avg_score numeric, min_score integer,
               max_score integer, last_coached timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT s.dimension, count(*), round(avg(s.score), 2), min(s.score), max(s.score),
           max(s.created_at)
    FROM coaching_sessions s
    WHERE s.rep_id = p_rep_id AND s.created_at >= now() - make_interval(days => p_days)
    GROUP BY s.dimension
    ORDER BY s.dimension
$$;

-- Refreshes mv_rep_performance without blocking readers; returns the time taken.
CREATE OR REPLACE FUNCTION refresh_rep_performance_view()
RETURNS interval LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz := clock_timestamp();
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY mv_rep_performance;
    RETURN clock_timestamp() - started;
END $$;

-- The cache's effect over the last p_days days, by where answers came from (llm, redis,
-- postgres): runs, their share, what was paid and what it would have cost without caching.
-- Index-only scan on analysis_runs_created_source_idx.
CREATE OR REPLACE FUNCTION get_cache_statistics(p_days integer)
RETURNS TABLE (source text, runs bigint, share numeric, cost_usd double precision,
               cost_without_caching_usd double precision)
LANGUAGE sql STABLE AS $$
    SELECT r.source, count(*),
           round(count(*) / sum(count(*)) OVER (), 4),
           sum(r.cost_usd), sum(r.cost_without_caching_usd)
    FROM analysis_runs r
    WHERE r.created_at >= now() - make_interval(days => p_days)
    GROUP BY r.source
    ORDER BY r.source
$$;

-- How each index of the schema is used (ops: "SELECT * FROM get_index_usage_stats()").
CREATE OR REPLACE FUNCTION get_index_usage_stats()
RETURNS TABLE (table_name text, index_name text, scans bigint, tuples_read bigint,
               size_bytes bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.relname::text, s.indexrelname::text, s.idx_scan, s.idx_tup_read,
           pg_relation_size(s.indexrelid)
    FROM pg_stat_user_indexes s
    ORDER BY s.relname, s.indexrelname
$$;

-- Call search with optional filters and keyset pagination over (scheduled_at, id), newest
-- first: pass the last row's (scheduled_at, id) as the cursor for the next page. The query is
-- assembled with only the filters given (bound with USING, never spliced in), so each filter
-- mix gets its own index: calls_rep_scheduled_idx, calls_product_scheduled_idx or
-- calls_scheduled_id_idx.
CREATE OR REPLACE FUNCTION search_calls_optimized(
    p_rep_id uuid DEFAULT NULL,
    p_product text DEFAULT NULL,
    p_call_type text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL,
    p_cursor_at timestamptz DEFAULT NULL,
    p_cursor_id uuid DEFAULT NULL,
    p_limit integer DEFAULT 50)
RETURNS TABLE (id uuid, title text, product text, call_type text, scheduled_at timestamptz,
               rep_id uuid, rep_email text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    q text := 'SELECT c.id, c.title, c.product, c.call_type, c.scheduled_at, c.rep_id, c.rep_email
               FROM calls c WHERE true';
BEGIN
    IF p_rep_id IS NOT NULL THEN q := q || ' AND c.rep_id = $1'; END IF;
    IF p_product IS NOT NULL THEN q := q || ' AND c.product = $2'; END IF;
    IF p_call_type IS NOT NULL THEN q := q || ' AND c.call_type = $3'; END IF;
    IF p_from IS NOT NULL THEN q := q || ' AND c.scheduled_at >= $4'; END IF;
    IF p_to IS NOT NULL THEN q := q || ' AND c.scheduled_at < $5'; END IF;
    IF p_cursor_at IS NOT NULL THEN
        q := q || ' AND (c.scheduled_at, c.id) < ($6, $7)';
    END IF;
    q := q || ' ORDER BY c.scheduled_at DESC, c.id DESC LIMIT $8';
    RETURN QUERY EXECUTE q
        USING p_rep_id, p_product, p_call_type, p_from, p_to, p_cursor_at,
              coalesce(p_cursor_id, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid),
              least(greatest(p_limit, 1), 500);
END $$;

-- A call with everything a call page shows, in one round trip: the call, its rep, speakers,
-- transcript and the latest coaching session per dimension (coaching_sessions_call_dim_created_idx).
-- NULL when the call does not exist.
CREATE OR REPLACE FUNCTION get_call_with_details(p_call_id uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'call', jsonb_build_object(
            'id', c.id, 'external_id', c.external_id, 'title', c.title, 'product', c.product,
            'call_type', c.call_type, 'scheduled_at', c.scheduled_at,
            'duration_seconds', c.duration_seconds, 'rep_role', c.rep_role),
        'rep', jsonb_build_object('id', r.id, 'name', r.name, 'email', r.email,
                                  'role', r.role, 'team', r.team),
        'speakers', coalesce((
            SELECT jsonb_agg(jsonb_build_object('name', s.name, 'email', s.email,
                                                'role', s.role, 'company_side', s.company_side)
                             ORDER BY s.id)
            FROM speakers s WHERE s.call_id = c.id), '[]'::jsonb),
        'transcript', (SELECT jsonb_build_object('hash', t.transcript_hash,
                                                 'utterances', t.utterances)
                       FROM transcripts t WHERE t.call_id = c.id),
        'coaching', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'dimension', l.dimension, 'score', l.score,
                       'rubric_version', l.rubric_version, 'result', l.result,
                       'created_at', l.created_at) ORDER BY l.dimension)
            FROM (SELECT DISTINCT ON (cs.dimension) cs.dimension, cs.score, cs.rubric_version,
                         cs.result, cs.created_at
                  FROM coaching_sessions cs WHERE cs.call_id = c.id
                  ORDER BY cs.dimension, cs.created_at DESC) l), '[]'::jsonb))
    FROM calls c JOIN reps r ON r.id = c.rep_id
    WHERE c.id = p_call_id
$$;

-- Table upkeep (the maintain_tables job): keeps coaching_sessions partitions ahead (moving
-- rows out of the default), ANALYZEs tables changed by more than 10 % since their last
-- analysis, and returns which tables have more than 20 % dead rows so the caller VACUUMs them
-- (VACUUM cannot run inside a function). Returns
-- {"partitions": …, "analyzed": [...], "vacuum": [quoted table names]}.
CREATE OR REPLACE FUNCTION maintain_performance_tables()
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    partitions jsonb := maintain_coaching_partitions(3);
    analyzed jsonb := '[]'::jsonb;
    t record;
BEGIN
    FOR t IN
        SELECT s.relid::regclass::text AS name
        FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
        WHERE s.n_mod_since_analyze > greatest(50, 0.1 * c.reltuples)
    LOOP
        EXECUTE format('ANALYZE %s', t.name);
        analyzed := analyzed || to_jsonb(t.name);
    END LOOP;
    RETURN jsonb_build_object(
        'partitions', partitions,
        'analyzed', analyzed,
        'vacuum', coalesce((
            SELECT jsonb_agg(s.relid::regclass::text ORDER BY s.relid::regclass::text)
            FROM pg_stat_user_tables s
            WHERE s.n_dead_tup > greatest(100, 0.2 * s.n_live_tup)), '[]'::jsonb));
END $$;
