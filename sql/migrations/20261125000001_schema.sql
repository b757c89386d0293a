-- callcoach schema: calls and transcripts, versioned rubrics and knowledge base, analysis results,
-- the durable coaching cache, the job ledger and API keys.

CREATE TABLE calls (
    id               uuid PRIMARY KEY,
    external_id      text UNIQUE,
    title            text NOT NULL,
    product          text,
    call_type        text,
    scheduled_at     timestamptz NOT NULL,
    duration_seconds integer CHECK (duration_seconds >= 0),
    rep_email        text NOT NULL,
    rep_role         text NOT NULL CHECK (rep_role IN ('ae', 'se', 'csm')),
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE speakers (
    id           bigserial PRIMARY KEY,
    call_id      uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    name         text NOT NULL,
    email        text,
    role         text,
    company_side text NOT NULL CHECK (company_side IN ('internal', 'external'))
);
CREATE INDEX speakers_call_idx ON speakers (call_id);

CREATE TABLE transcripts (
    call_id         uuid PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
    transcript_hash text NOT NULL,
    full_text       text NOT NULL,
    utterances      jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transcripts_hash_idx ON transcripts (transcript_hash);

-- Versioned rubrics: old versions stay for history, exactly one is active per role + dimension.
CREATE TABLE coaching_rubrics (
    id         bigserial PRIMARY KEY,
    role       text NOT NULL CHECK (role IN ('ae', 'se', 'csm')),
    dimension  text NOT NULL,
    version    text NOT NULL,
    criteria   text NOT NULL,
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (role, dimension, version)
);
CREATE UNIQUE INDEX coaching_rubrics_one_active ON coaching_rubrics (role, dimension) WHERE active;

CREATE TABLE knowledge_base (
    id         bigserial PRIMARY KEY,
    product    text NOT NULL,
    category   text NOT NULL,
    version    text NOT NULL,
    content    text NOT NULL,
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (product, category, version)
);

-- One row per attempt to produce a coaching result, including cache hits (source says which tier).
CREATE TABLE analysis_runs (
    id                     uuid PRIMARY KEY,
    job_id                 uuid,
    call_id                uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    dimension              text NOT NULL,
    rubric_version         text NOT NULL,
    cache_key              text NOT NULL,
    source                 text NOT NULL CHECK (source IN ('llm', 'redis', 'postgres')),
    model                  text,
    input_tokens           bigint NOT NULL DEFAULT 0,
    output_tokens          bigint NOT NULL DEFAULT 0,
    cache_creation_tokens  bigint NOT NULL DEFAULT 0,
    cache_read_tokens      bigint NOT NULL DEFAULT 0,
    duration_ms            bigint NOT NULL DEFAULT 0,
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX analysis_runs_call_idx ON analysis_runs (call_id, dimension);
CREATE INDEX analysis_runs_created_idx ON analysis_runs (created_at DESC);

-- Coaching results, range-partitioned by month. Partitions are created ahead by
-- ensure_coaching_partitions() (migrate and the maintenance job), and the DEFAULT partition catches
-- anything else, so an insert never fails for lack of a partition.
CREATE TABLE coaching_sessions (
    id              uuid NOT NULL,
    call_id         uuid NOT NULL,
    rep_email       text NOT NULL,
    dimension       text NOT NULL,
    rubric_version  text NOT NULL,
    cache_key       text NOT NULL,
    score           integer NOT NULL CHECK (score BETWEEN 0 AND 100),
    result          jsonb NOT NULL,
    analysis_run_id uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE coaching_sessions_default PARTITION OF coaching_sessions DEFAULT;
CREATE INDEX coaching_sessions_call_idx ON coaching_sessions (call_id, dimension, rubric_version);
CREATE INDEX coaching_sessions_rep_idx ON coaching_sessions (rep_email, dimension, created_at DESC);

CREATE FUNCTION ensure_coaching_partitions(months_ahead integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    first_month date := date_trunc('month', now())::date;
    m date;
    name text;
    created integer := 0;
BEGIN
    FOR i IN 0..months_ahead LOOP
        m := (first_month + make_interval(months => i))::date;
        name := format('coaching_sessions_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF coaching_sessions FOR VALUES FROM (%L) TO (%L)',
                name, m, (m + interval '1 month')::date);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

SELECT ensure_coaching_partitions(3);

-- The durable cache tier: not partitioned, so cache_key can really be unique.
CREATE TABLE coaching_cache (
    cache_key       text PRIMARY KEY,
    dimension       text NOT NULL,
    transcript_hash text NOT NULL,
    rubric_version  text NOT NULL,
    fingerprint     text NOT NULL,
    result          jsonb NOT NULL,
    session_id      uuid,
    model           text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX coaching_cache_rubric_idx ON coaching_cache (dimension, rubric_version);

-- The job ledger: the source of truth for every job. Redis only delivers; a row whose
-- delivered_at is NULL has not reached the queue yet and the outbox relay will push it.
CREATE TABLE jobs (
    id           uuid PRIMARY KEY,
    kind         text NOT NULL,
    payload      jsonb NOT NULL,
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'snoozed')),
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL,
    last_error   text,
    result       jsonb,
    dedup_key    text UNIQUE,
    delivery     integer NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz
);
CREATE INDEX jobs_undelivered_idx ON jobs (enqueued_at) WHERE delivered_at IS NULL AND status IN ('queued', 'snoozed');
CREATE INDEX jobs_status_idx ON jobs (status, enqueued_at DESC);

-- API keys: only a SHA-256 hash of the key is stored; the prefix identifies a key in listings.
CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    prefix     text NOT NULL,
    key_hash   text NOT NULL UNIQUE,
    scope      text NOT NULL CHECK (scope IN ('producer', 'ops', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
