-- Tiered cache, part 2: the role a cached result was computed for (rubric versions are per
-- role), single-flight leases used while Redis is unavailable, and daily cache event counters.

ALTER TABLE coaching_cache ADD COLUMN role text NOT NULL DEFAULT 'ae' CHECK (role IN ('ae', 'se', 'csm'));
ALTER TABLE coaching_cache ALTER COLUMN role DROP DEFAULT;
DROP INDEX coaching_cache_rubric_idx;
-- Invalidation looks up every key of one (role, dimension, rubric version).
CREATE INDEX coaching_cache_rubric_idx ON coaching_cache (role, dimension, rubric_version);

-- Postgres fallback for single-flight leases (Redis SET NX PX is used while Redis is up).
CREATE TABLE cache_leases (
    cache_key  text PRIMARY KEY,
    owner      uuid NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Cache events that analysis_runs does not show: single-flight waits, corrupt entries,
-- Redis errors and circuit-breaker openings, per day and dimension ('' when not applicable).
CREATE TABLE cache_counters (
    day       date NOT NULL,
    name      text NOT NULL,
    dimension text NOT NULL DEFAULT '',
    value     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, name, dimension)
);

ALTER TABLE analysis_runs ADD COLUMN singleflight_wait_ms bigint NOT NULL DEFAULT 0;
