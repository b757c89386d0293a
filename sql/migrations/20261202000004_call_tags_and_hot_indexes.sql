-- Call attributes producers search by, and the registry of "hot data" partial indexes.
--
-- tags: short labels a producer attaches to a call (renewal, enterprise, competitor-x, ...);
-- search_calls_optimized finds calls carrying all the tags asked for (GIN on the array).
-- metadata: the producer's own attributes (CRM opportunity id, deal stage, region, ...);
-- search_calls_optimized finds calls whose metadata contains a JSON object (GIN, @>).
ALTER TABLE calls ADD COLUMN tags text[] NOT NULL DEFAULT '{}';
ALTER TABLE calls ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(metadata) = 'object');

-- Partial indexes over recent rows ("hot data") must not use now() in their predicate (it is
-- not immutable, so Postgres refuses it). Each one is instead built with a fixed cutoff,
-- recorded here; queries read the cutoff and add "column >= cutoff" so the planner can prove
-- the index applies, and the maintain_tables job rebuilds the index with a later cutoff
-- (CREATE INDEX CONCURRENTLY under a temporary name, then a swap in one short transaction)
-- once the cutoff is more than a week older than the window.
CREATE TABLE hot_indexes (
    -- The index's name.
    index_name  text PRIMARY KEY,
    -- Rows at or after this instant are in the index.
    cutoff      timestamptz NOT NULL,
    -- How many days of rows the index is meant to hold.
    window_days integer NOT NULL CHECK (window_days > 0),
    -- The CREATE INDEX statement as a format() template: %s takes CONCURRENTLY or nothing,
    -- %I the index name, %L the cutoff.
    definition  text NOT NULL,
    rolled_at   timestamptz NOT NULL DEFAULT now()
);
