-- A redelivered or replayed event no longer overwrites what its first handling did:
-- outcome and processed_at stay the first handling's; the latest is kept beside them.
-- Metadata-only changes (no rewrite, no long lock), and nullable, so that workers still on
-- the previous code, which insert without these columns, keep working during a rollout:
-- a NULL last_outcome / last_processed_at means the same as outcome / processed_at.
-- The ALTERs still take the table's lock for a moment: give up rather than queue every
-- worker's insert behind a long transaction (migrate fails; run it again).
SET LOCAL lock_timeout = '10s';
ALTER TABLE processed_events
    ADD COLUMN times_handled     integer NOT NULL DEFAULT 1,
    ADD COLUMN last_outcome      text,
    ADD COLUMN last_processed_at timestamptz;
ALTER TABLE processed_events ALTER COLUMN last_processed_at SET DEFAULT now();
