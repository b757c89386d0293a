-- Reps: the people being coached. Calls reference their rep; ingest creates the rep on first
-- sight of an e-mail address and matches it (case-insensitively) afterwards. Coaching
-- sessions carry the rep too, so per-rep reads use an index on the sessions alone.
CREATE TABLE reps (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    email      text NOT NULL,
    role       text NOT NULL CHECK (role IN ('ae', 'se', 'csm')),
    team       text,
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Serves: ingest's create-or-match by e-mail (ON CONFLICT (lower(email))).
CREATE UNIQUE INDEX reps_email_key ON reps (lower(email));

-- Existing calls: one rep per distinct e-mail, named after the matching internal speaker
-- when there is one, else after the address's local part; role from the latest call.
INSERT INTO reps (id, name, email, role)
SELECT gen_random_uuid(), coalesce(sp.name, split_part(c.rep_email, '@', 1)), c.rep_email, c.rep_role
FROM (
    SELECT DISTINCT ON (lower(rep_email)) id, rep_email, rep_role
    FROM calls ORDER BY lower(rep_email), scheduled_at DESC
) c
LEFT JOIN LATERAL (
    SELECT s.name FROM speakers s
    WHERE s.call_id = c.id AND lower(s.email) = lower(c.rep_email) LIMIT 1
) sp ON true;

ALTER TABLE calls ADD COLUMN rep_id uuid REFERENCES reps (id);
UPDATE calls c SET rep_id = r.id FROM reps r WHERE lower(r.email) = lower(c.rep_email);
ALTER TABLE calls ALTER COLUMN rep_id SET NOT NULL;

ALTER TABLE coaching_sessions ADD COLUMN rep_id uuid;
UPDATE coaching_sessions s SET rep_id = c.rep_id FROM calls c WHERE c.id = s.call_id;
