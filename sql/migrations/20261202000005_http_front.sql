-- The HTTP front's state: when each materialized view was last refreshed (rep insights read
-- the view only while it is fresh), replayable responses of idempotent requests, and when an
-- API key was last used.

CREATE TABLE view_refreshes (
    view_name    text PRIMARY KEY,
    refreshed_at timestamptz NOT NULL
);

-- One row per (principal, Idempotency-Key): the request's fingerprint and, once answered, the
-- response replayed to retries. status is NULL while the first request is being processed.
CREATE TABLE idempotency_keys (
    principal    uuid NOT NULL,
    key          text NOT NULL,
    request_hash text NOT NULL,
    status       integer,
    body         jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (principal, key)
);
-- Serves: the retention of expired keys (maintain_performance_tables).
CREATE INDEX idempotency_keys_expires_idx ON idempotency_keys (expires_at);

-- Written when a process looks the key up (at most once per key per AUTH_CACHE_MS and
-- process), never once per request.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
