-- Scheduler: the last tick enqueued per schedule entry is the greatest dedup key
-- `cron:{name}:{tick}` (ticks are fixed-width RFC 3339 UTC, so text order is time order).
-- Byte order ("C") makes the prefix a plain range, and only scheduled jobs are indexed.
CREATE INDEX jobs_cron_dedup_idx ON jobs ((dedup_key COLLATE "C")) WHERE dedup_key LIKE 'cron:%';
