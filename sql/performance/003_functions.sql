-- Read-path functions called by callcoach's Rust code. CREATE OR REPLACE keeps them current.

-- The durable cache tier's read (CoachingCache::pg_get): primary-key lookup.
CREATE OR REPLACE FUNCTION get_cached_coaching_session(p_cache_key text)
RETURNS TABLE (result jsonb, session_id uuid, model text, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.result, c.session_id, c.model, c.created_at
    FROM coaching_cache c WHERE c.cache_key = p_cache_key
$$;

-- One rep's sessions of the last p_days days, per dimension (index-only scan on
-- coaching_sessions_rep_created_idx: the range is on (rep_id, created_at)).
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

-- Refreshes mv_rep_performance without blocking readers and records when (the rows are as
-- of the refresh's start); returns the time taken.
CREATE OR REPLACE FUNCTION refresh_rep_performance_view()
RETURNS interval LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz := clock_timestamp();
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY mv_rep_performance;
    INSERT INTO view_refreshes (view_name, refreshed_at) VALUES ('mv_rep_performance', started)
    ON CONFLICT (view_name) DO UPDATE SET refreshed_at = EXCLUDED.refreshed_at;
    RETURN clock_timestamp() - started;
END $$;

-- The statement of get_cache_statistics: runs since $1 by source; with p_hot it also bounds
-- created_at by $2, the cutoff of analysis_runs_recent_idx, so the planner can use that
-- smaller index (its predicate is then implied). Separate so tests can EXPLAIN it.
CREATE OR REPLACE FUNCTION cache_statistics_query(p_hot boolean)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT 'SELECT r.source, count(*), round(count(*) / sum(count(*)) OVER (), 4),
                   sum(r.cost_usd), sum(r.cost_without_caching_usd)
            FROM analysis_runs r WHERE r.created_at >= $1'
           || CASE WHEN p_hot THEN ' AND r.created_at >= $2' ELSE '' END
           || ' GROUP BY r.source ORDER BY r.source'
$$;

-- The cache's effect over the last p_days days, by where answers came from (llm, redis,
-- postgres): runs, their share, what was paid and what it would have cost without caching.
-- Windows within the hot cutoff read analysis_runs_recent_idx, longer ones
-- analysis_runs_created_source_idx (index-only either way).
CREATE OR REPLACE FUNCTION get_cache_statistics(p_days integer)
RETURNS TABLE (source text, runs bigint, share numeric, cost_usd double precision,
               cost_without_caching_usd double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    since timestamptz := now() - make_interval(days => p_days);
    cutoff timestamptz := (SELECT h.cutoff FROM hot_indexes h
                           WHERE h.index_name = 'analysis_runs_recent_idx');
BEGIN
    RETURN QUERY EXECUTE cache_statistics_query(since >= cutoff) USING since, cutoff;
END $$;

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

-- The statement of search_calls_optimized for the filters given (non-NULL arguments; only
-- whether each is NULL matters here). Parameters: $1 rep, $2 product, $3 call type, $4 from,
-- $5 to, $6 tags (all of them), $7 metadata (contained), $8 participant e-mail, $9/$10 the
-- cursor (scheduled_at, id), $11 limit, $12 the cutoff of calls_recent_idx, $13 rep role,
-- $14 dimension, $15/$16 minimum and maximum score of a session (of that dimension). Separate so
-- tests can EXPLAIN each filter mix.
DO $$ BEGIN  -- the signatures before the role and score filters
    IF to_regprocedure('search_calls_query(uuid, text, text, timestamptz, timestamptz, text[],
                                           jsonb, text, timestamptz, boolean)') IS NOT NULL THEN
        DROP FUNCTION search_calls_query(uuid, text, text, timestamptz, timestamptz, text[], jsonb,
                                         text, timestamptz, boolean);
    END IF;
    IF to_regprocedure('search_calls_optimized(uuid, text, text, timestamptz, timestamptz,
                       text[], jsonb, text, timestamptz, uuid, integer)') IS NOT NULL THEN
        DROP FUNCTION search_calls_optimized(uuid, text, text, timestamptz, timestamptz, text[],
                                             jsonb, text, timestamptz, uuid, integer);
    END IF;
END $$;
CREATE OR REPLACE FUNCTION search_calls_query(
    p_rep_id uuid, p_product text, p_call_type text, p_from timestamptz, p_to timestamptz,
    p_tags text[], p_metadata jsonb, p_participant text, p_cursor_at timestamptz,
    p_recent boolean, p_role text DEFAULT NULL, p_dimension text DEFAULT NULL,
    p_min_score integer DEFAULT NULL, p_max_score integer DEFAULT NULL)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    q text := 'SELECT c.id, c.title, c.product, c.call_type, c.scheduled_at, c.rep_id, c.tags
               FROM calls c WHERE true';
BEGIN
    IF p_rep_id IS NOT NULL THEN q := q || ' AND c.rep_id = $1'; END IF;
    IF p_product IS NOT NULL THEN q := q || ' AND c.product = $2'; END IF;
    IF p_call_type IS NOT NULL THEN q := q || ' AND c.call_type = $3'; END IF;
    IF p_from IS NOT NULL THEN q := q || ' AND c.scheduled_at >= $4'; END IF;
    IF p_to IS NOT NULL THEN q := q || ' AND c.scheduled_at < $5'; END IF;
    IF p_tags IS NOT NULL THEN q := q || ' AND c.tags @> $6'; END IF;
    IF p_metadata IS NOT NULL THEN q := q || ' AND c.metadata @> $7'; END IF;
    IF p_participant IS NOT NULL THEN
        q := q || ' AND c.id IN (SELECT s.call_id FROM speakers s WHERE lower(s.email) = lower($8))';
    END IF;
    IF p_role IS NOT NULL THEN q := q || ' AND c.rep_role = $13'; END IF;
    IF coalesce(p_dimension, p_min_score::text, p_max_score::text) IS NOT NULL THEN
        -- Calls with a coaching session (of the dimension) scoring in the range.
        q := q || ' AND EXISTS (SELECT 1 FROM coaching_sessions s WHERE s.call_id = c.id'
               || CASE WHEN p_dimension IS NOT NULL THEN ' AND s.dimension = $14' ELSE '' END
               || CASE WHEN p_min_score IS NOT NULL THEN ' AND s.score >= $15' ELSE '' END
               || CASE WHEN p_max_score IS NOT NULL THEN ' AND s.score <= $16' ELSE '' END
               || ')';
    END IF;
    IF p_cursor_at IS NOT NULL THEN q := q || ' AND (c.scheduled_at, c.id) < ($9, $10)'; END IF;
    IF p_recent THEN q := q || ' AND c.scheduled_at >= $12'; END IF;
    RETURN q || ' ORDER BY c.scheduled_at DESC, c.id DESC LIMIT $11';
END $$;

-- Call search with optional filters and keyset pagination over (scheduled_at, id), newest
-- first: pass the last row's (scheduled_at, id) as the cursor for the next page. The query
-- holds only the filters given (bound with USING, never spliced in) and is planned for the
-- values given, so each filter mix gets its own index: calls_rep_scheduled_idx,
-- calls_product_scheduled_idx, calls_product_type_scheduled_idx, calls_type_scheduled_idx,
-- calls_tags_idx, calls_metadata_idx, speakers_email_idx, calls_recent_idx (a window
-- starting after its cutoff) or calls_scheduled_id_idx.
DO $$ BEGIN  -- the signature before tags, metadata and participant filters
    IF to_regprocedure('search_calls_optimized(uuid, text, text, timestamptz, timestamptz,
                                               timestamptz, uuid, integer)') IS NOT NULL THEN
        DROP FUNCTION search_calls_optimized(uuid, text, text, timestamptz, timestamptz,
                                             timestamptz, uuid, integer);
    END IF;
END $$;
CREATE OR REPLACE FUNCTION search_calls_optimized(
    p_rep_id uuid DEFAULT NULL,
    p_product text DEFAULT NULL,
    p_call_type text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL,
    p_tags text[] DEFAULT NULL,
    p_metadata jsonb DEFAULT NULL,
    p_participant text DEFAULT NULL,
    p_cursor_at timestamptz DEFAULT NULL,
    p_cursor_id uuid DEFAULT NULL,
    p_limit integer DEFAULT 50,
    p_role text DEFAULT NULL,
    p_dimension text DEFAULT NULL,
    p_min_score integer DEFAULT NULL,
    p_max_score integer DEFAULT NULL)
RETURNS TABLE (id uuid, title text, product text, call_type text, scheduled_at timestamptz,
               rep_id uuid, tags text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    cutoff timestamptz := (SELECT h.cutoff FROM hot_indexes h
                           WHERE h.index_name = 'calls_recent_idx');
    q text := search_calls_query(p_rep_id, p_product, p_call_type, p_from, p_to, p_tags,
                                 p_metadata, p_participant, p_cursor_at,
                                 coalesce(p_from >= cutoff, false), p_role, p_dimension,
                                 p_min_score, p_max_score);
BEGIN
    RETURN QUERY EXECUTE q
        USING p_rep_id, p_product, p_call_type, p_from, p_to, p_tags, p_metadata,
              p_participant, p_cursor_at,
              coalesce(p_cursor_id, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid),
              least(greatest(p_limit, 1), 500), cutoff, p_role, p_dimension, p_min_score,
              p_max_score;
END $$;

-- A call with everything a call page shows, in one round trip: the call, its rep, speakers,
-- transcript and the latest coaching session per dimension (coaching_sessions_call_dim_created_idx).
-- No row when the call does not exist. A one-statement SQL function, so the planner inlines it
-- into the caller's query.
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'get_call_with_details' AND NOT proretset) THEN
        DROP FUNCTION get_call_with_details(uuid);
    END IF;
END $$;
CREATE OR REPLACE FUNCTION get_call_with_details(p_call_id uuid)
RETURNS TABLE (details jsonb) LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'call', jsonb_build_object(
            'id', c.id, 'external_id', c.external_id, 'title', c.title, 'product', c.product,
            'call_type', c.call_type, 'scheduled_at', c.scheduled_at,
            'duration_seconds', c.duration_seconds, 'rep_role', c.rep_role, 'tags', c.tags,
            'metadata', c.metadata),
        'rep', (SELECT jsonb_build_object('id', r.id, 'name', r.name, 'email', r.email,
                                          'role', r.role, 'team', r.team)
                FROM reps r WHERE r.id = c.rep_id),
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
    FROM calls c
    WHERE c.id = p_call_id
$$;

-- One rep's mv_rep_performance row computed live (rep insights when the view is stale or
-- does not hold the rep yet): the same aggregates over the rep's calls and sessions
-- (calls_rep_scheduled_idx, coaching_sessions_rep_created_idx). A test checks it against the
-- view after a refresh.
CREATE OR REPLACE FUNCTION get_rep_performance_live(p_rep_id uuid)
RETURNS TABLE (rep_id uuid, rep_name text, rep_email text, total_calls bigint,
               total_sessions bigint, avg_score numeric, avg_product_knowledge numeric,
               avg_discovery numeric, avg_objection_handling numeric, avg_engagement numeric,
               last_coached timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.id, r.name, r.email,
           (SELECT count(*) FROM calls c WHERE c.rep_id = r.id),
           count(s.id),
           round(avg(s.score), 2),
           round(avg(s.score) FILTER (WHERE s.dimension = 'product_knowledge'), 2),
           round(avg(s.score) FILTER (WHERE s.dimension = 'discovery'), 2),
           round(avg(s.score) FILTER (WHERE s.dimension = 'objection_handling'), 2),
           round(avg(s.score) FILTER (WHERE s.dimension = 'engagement'), 2),
           max(s.created_at)
    FROM reps r
    LEFT JOIN coaching_sessions s ON s.rep_id = r.id
    WHERE r.id = p_rep_id
    GROUP BY r.id, r.name, r.email
$$;

-- Weekly average score of one dimension over the last p_days days, all reps
-- (coaching_sessions_dim_created_idx, index-only).
CREATE OR REPLACE FUNCTION get_score_trends(p_dimension text, p_days integer)
RETURNS TABLE (week date, sessions bigint, avg_score numeric)
LANGUAGE sql STABLE AS $$
    SELECT date_trunc('week', s.created_at AT TIME ZONE 'UTC')::date, count(*),
           round(avg(s.score), 2)
    FROM coaching_sessions s
    WHERE s.dimension = p_dimension AND s.created_at >= now() - make_interval(days => p_days)
    GROUP BY 1
    ORDER BY 1
$$;

-- Weekly average score of one rep in one dimension over the last p_days days
-- (coaching_sessions_rep_dim_created_idx, index-only).
CREATE OR REPLACE FUNCTION get_rep_score_trends(p_rep_id uuid, p_dimension text, p_days integer)
RETURNS TABLE (week date, sessions bigint, avg_score numeric)
LANGUAGE sql STABLE AS $$
    SELECT date_trunc('week', s.created_at AT TIME ZONE 'UTC')::date, count(*),
           round(avg(s.score), 2)
    FROM coaching_sessions s
    WHERE s.rep_id = p_rep_id AND s.dimension = p_dimension
      AND s.created_at >= now() - make_interval(days => p_days)
    GROUP BY 1
    ORDER BY 1
$$;

-- Table upkeep (the maintain_tables job), in the caller's transaction:
--  * keeps coaching_sessions partitions ahead, moving rows out of the default;
--  * retention: deletes expired cache leases and idempotency keys, and cache counters and
--    analysis runs older than
--    p_retention_days (at most p_batch rows per table a run, oldest first, so a run's
--    transaction stays short; coaching sessions, the coaching history, are kept);
--  * ANALYZEs tables changed by more than 10 % since their last analysis;
--  * reports what it cannot do inside a function: tables with more than 20 % dead rows
--    (VACUUM cannot run in a transaction) and hot partial indexes whose cutoff is more than
--    7 days older than their window (rebuilt with CREATE INDEX CONCURRENTLY).
-- The caller (performance::maintain_tables) does those two. Returns {"partitions", "deleted",
-- "analyzed", "vacuum": [quoted table names], "hot_indexes_due": [index names]}.
DO $$ BEGIN  -- the signature before retention
    IF to_regprocedure('maintain_performance_tables()') IS NOT NULL THEN
        DROP FUNCTION maintain_performance_tables();
    END IF;
END $$;
CREATE OR REPLACE FUNCTION maintain_performance_tables(p_retention_days integer DEFAULT 400,
                                                       p_batch integer DEFAULT 10000)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    partitions jsonb := maintain_coaching_partitions(3);
    horizon timestamptz := now() - make_interval(days => p_retention_days);
    leases bigint;
    counters bigint;
    runs bigint;
    idempotency bigint;
    analyzed jsonb := '[]'::jsonb;
    t record;
BEGIN
    DELETE FROM cache_leases WHERE cache_key IN (
        SELECT l.cache_key FROM cache_leases l WHERE l.expires_at < now() - interval '1 hour'
        ORDER BY l.expires_at LIMIT p_batch);
    GET DIAGNOSTICS leases = ROW_COUNT;
    DELETE FROM cache_counters WHERE day < horizon::date;
    GET DIAGNOSTICS counters = ROW_COUNT;
    DELETE FROM idempotency_keys WHERE (principal, key) IN (
        SELECT i.principal, i.key FROM idempotency_keys i WHERE i.expires_at < now()
        ORDER BY i.expires_at LIMIT p_batch);
    GET DIAGNOSTICS idempotency = ROW_COUNT;
    DELETE FROM analysis_runs WHERE id IN (
        SELECT r.id FROM analysis_runs r WHERE r.created_at < horizon
        ORDER BY r.created_at LIMIT p_batch);
    GET DIAGNOSTICS runs = ROW_COUNT;
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
        'deleted', jsonb_build_object('cache_leases', leases, 'cache_counters', counters,
                                      'analysis_runs', runs, 'idempotency_keys', idempotency),
        'analyzed', analyzed,
        'vacuum', coalesce((
            SELECT jsonb_agg(s.relid::regclass::text ORDER BY s.relid::regclass::text)
            FROM pg_stat_user_tables s
            WHERE s.n_dead_tup > greatest(100, 0.2 * s.n_live_tup)), '[]'::jsonb),
        'hot_indexes_due', coalesce((
            SELECT jsonb_agg(h.index_name ORDER BY h.index_name)
            FROM hot_indexes h
            WHERE h.cutoff < now() - make_interval(days => h.window_days + 7)), '[]'::jsonb));
END $$;
