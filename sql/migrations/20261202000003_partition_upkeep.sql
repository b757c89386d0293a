-- Partition upkeep for coaching_sessions: monthly partitions that never trap.
--
-- Until now partitions were only created by migrate, for the current month and three ahead.
-- Once those months passed every row fell into coaching_sessions_default, and creating a
-- month's partition later failed while the default held rows of that month (Postgres refuses
-- a partition whose range the default already has rows in).
--
-- The design:
--  * A month's partition is always created by create_coaching_partition(), which first moves
--    the month's rows out of the default, so creating a partition cannot fail on them.
--  * maintain_coaching_partitions(n) keeps the current month and n ahead, and also gives its
--    own partition to every month the default holds rows of, far past and far future
--    included. The default therefore ends every run empty, apart from rows no monthly
--    partition can take (±infinity, years outside 1-9999, which the four-digit names cannot
--    express). Leaving past months in the default would let it grow without bound, and every
--    partition attached later scans the whole default under an ACCESS EXCLUSIVE lock, so a
--    small default is what keeps upkeep's locks short. Partitions are only ever made for months
--    that are kept ahead or that hold rows, so stray dates cost one small partition each.
--  * Month boundaries are UTC, whatever the session's TimeZone: two sessions in different
--    time zones must not compute different bounds for the same month (which would overlap and
--    fail). The server runs in UTC, so this matches the partitions made by the first migration.
--  * A month whose partition cannot be made (a table of that name that is not a partition,
--    a lock not obtained within the caller's lock_timeout, ...) is reported and skipped; its
--    rows stay in the default, inserts keep working, and the next run tries again.
--
-- Inserts never fail for lack of a partition: every date, ±infinity included, that has no
-- monthly partition lands in the default, which maintain_coaching_partitions() recreates if it
-- is ever missing.

-- The name of the partition of the month containing `in_month`.
CREATE FUNCTION coaching_partition_name(in_month date) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format('coaching_sessions_%s', to_char(in_month, 'YYYY_MM'))
$$;

-- Whether `part` is a partition of coaching_sessions (a table of that name may exist without
-- being one).
CREATE FUNCTION coaching_partition_exists(part text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_inherits
                   WHERE inhparent = 'coaching_sessions'::regclass AND inhrelid = to_regclass(part))
$$;

-- Creates the partition of the month containing `in_month` (UTC bounds) and moves that month's
-- rows into it from the default partition, all in the caller's transaction. Returns the number
-- of rows moved, or NULL when the month already has its partition.
--
-- Rather than detaching the default (DETACH PARTITION takes ACCESS EXCLUSIVE on the whole
-- coaching_sessions table, stopping every write of the current month too; DETACH ... CONCURRENTLY
-- cannot run in a transaction nor on a table with a default partition), the month is built as a
-- standalone table and then attached:
--   1. lock ONLY the parent in SHARE UPDATE EXCLUSIVE (what ATTACH needs; taken first, in the
--      order queries lock parent then partition, so upkeep does not deadlock with them; it also
--      makes a concurrent upkeep run wait instead of racing to create the same month),
--   2. lock the default in ACCESS EXCLUSIVE (what ATTACH needs there; taken before the move, so
--      no row of the month can be inserted into the default between the move and the attach),
--   3. create the table like the parent, move the month's rows into it (one DELETE ... RETURNING
--      feeding an INSERT), and attach it; ATTACH builds the parent's indexes (and primary key) on
--      it and checks that the default no longer holds rows of the month.
-- Both locks are held until the caller commits. Reads and writes that touch only monthly
-- partitions carry on meanwhile; queries that read the default (any query not pruned to a
-- month) and inserts routed to it wait for the move, which is as short as the default is small.
CREATE FUNCTION create_coaching_partition(in_month date) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', in_month)::date;
    part text := coaching_partition_name(first_day);
    lower_bound timestamptz := first_day::timestamp AT TIME ZONE 'UTC';
    upper_bound timestamptz := (first_day + interval '1 month')::timestamp AT TIME ZONE 'UTC';
    columns text;
    moved bigint;
BEGIN
    -- Checked before locking, so an existing month costs no lock, and again after, in case a
    -- concurrent run created it while this one waited for the locks.
    IF coaching_partition_exists(part) THEN
        RETURN NULL;
    END IF;
    LOCK TABLE ONLY coaching_sessions IN SHARE UPDATE EXCLUSIVE MODE;
    LOCK TABLE coaching_sessions_default IN ACCESS EXCLUSIVE MODE;
    IF coaching_partition_exists(part) THEN
        RETURN NULL;
    END IF;

    -- Without indexes: ATTACH builds them once the rows are in, cheaper than maintaining them
    -- row by row. Columns, NOT NULL, CHECK constraints and defaults come from the parent.
    EXECUTE format('CREATE TABLE %I (LIKE coaching_sessions INCLUDING ALL EXCLUDING INDEXES)', part);
    -- The column list is read from the parent so the move keeps working when columns are added.
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO columns
    FROM pg_attribute
    WHERE attrelid = 'coaching_sessions'::regclass AND attnum > 0 AND NOT attisdropped;
    EXECUTE format(
        'WITH moved AS (DELETE FROM coaching_sessions_default
                        WHERE created_at >= %L AND created_at < %L RETURNING %s)
         INSERT INTO %I (%s) SELECT %s FROM moved',
        lower_bound, upper_bound, columns, part, columns, columns);
    GET DIAGNOSTICS moved = ROW_COUNT;
    EXECUTE format('ALTER TABLE coaching_sessions ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lower_bound, upper_bound);
    RETURN moved;
END $$;

-- Keeps the current month and `months_ahead` more partitioned, and gives every month the
-- default partition holds rows of its own partition (see the top of this file). Runs in the
-- caller's transaction; a month that cannot be created is rolled back on its own (a
-- subtransaction), reported with a WARNING and left for the next run. Returns what it did:
--   {"created": [{"partition", "month", "moved_rows"}, ...],
--    "failed":  [{"partition", "month", "sqlstate", "error"}, ...]}
-- A second run right after the first returns two empty lists.
CREATE FUNCTION maintain_coaching_partitions(months_ahead integer DEFAULT 3) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    this_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    m date;
    moved bigint;
    created jsonb := '[]';
    failed jsonb := '[]';
BEGIN
    IF months_ahead IS NULL OR months_ahead < 0 THEN
        RAISE EXCEPTION 'months_ahead must be 0 or more, not %', months_ahead;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table
                   WHERE partrelid = 'coaching_sessions'::regclass AND partdefid <> 0) THEN
        CREATE TABLE coaching_sessions_default PARTITION OF coaching_sessions DEFAULT;
    END IF;
    FOR m IN
        SELECT (this_month + make_interval(months => i))::date
        FROM generate_series(0, months_ahead) AS i
        UNION
        SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date
        FROM coaching_sessions_default
        WHERE created_at >= '0001-01-01 00:00:00+00' AND created_at < '10000-01-01 00:00:00+00'
        ORDER BY 1
    LOOP
        BEGIN
            moved := create_coaching_partition(m);
            IF moved IS NOT NULL THEN
                created := created || jsonb_build_object(
                    'partition', coaching_partition_name(m), 'month', m, 'moved_rows', moved);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            failed := failed || jsonb_build_object(
                'partition', coaching_partition_name(m), 'month', m,
                'sqlstate', SQLSTATE, 'error', SQLERRM);
            RAISE WARNING 'coaching_sessions partition % not created: % (%)',
                coaching_partition_name(m), SQLERRM, SQLSTATE;
        END;
    END LOOP;
    RETURN jsonb_build_object('created', created, 'failed', failed);
END $$;

-- The first migration's entry point, kept for callers of it; it now moves rows too, so it no
-- longer fails for a month the default holds rows of. Returns the number of partitions created
-- (months that could not be created are only reported as WARNINGs).
CREATE OR REPLACE FUNCTION ensure_coaching_partitions(months_ahead integer) RETURNS integer
LANGUAGE sql AS $$
    SELECT jsonb_array_length(maintain_coaching_partitions(months_ahead) -> 'created')
$$;
