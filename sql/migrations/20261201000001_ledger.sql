-- Job ledger, part 2: priority lanes, per-run leases (the rescuer re-delivers a running job
-- whose worker stopped renewing its lease), and indexes that keep the hot transitions cheap.

ALTER TABLE jobs ADD COLUMN lane text NOT NULL DEFAULT 'interactive'
    CHECK (lane IN ('interactive', 'background'));
-- Set at claim, renewed by the running worker; NULL when the job is not running.
ALTER TABLE jobs ADD COLUMN lease_expires_at timestamptz;
-- Which worker process claimed the current run (for operators).
ALTER TABLE jobs ADD COLUMN claimed_by text;

-- Most ledger rows carry no dedup key; only the ones that do need an index entry.
ALTER TABLE jobs DROP CONSTRAINT jobs_dedup_key_key;
CREATE UNIQUE INDEX jobs_dedup_key_idx ON jobs (dedup_key) WHERE dedup_key IS NOT NULL;

-- Unfinished rows (queued, snoozed, running): the relay (delivered_at IS NULL), the rescuer
-- and the lost-delivery check (delivered_at long ago) scan only these. No index holds
-- status, attempts or the lease, so a claim and a lease renewal are HOT updates.
DROP INDEX jobs_undelivered_idx;
DROP INDEX jobs_status_idx;
CREATE INDEX jobs_open_idx ON jobs (delivered_at) WHERE finished_at IS NULL;
-- The pruner deletes finished rows past the retention, oldest first.
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;
-- `jobs list` and the dashboard: newest first.
CREATE INDEX jobs_enqueued_idx ON jobs (enqueued_at DESC);

-- Every job updates its row three times: leave room on each page for the new versions and
-- vacuum after a small share of the table has changed, so back-to-back bursts do not slow down.
ALTER TABLE jobs SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
