-- A redelivered or replayed event no longer overwrites what its first handling did:
-- outcome and processed_at stay the first handling's; the latest is kept beside them.
ALTER TABLE processed_events
    ADD COLUMN times_handled     integer NOT NULL DEFAULT 1,
    ADD COLUMN last_outcome      text,
    ADD COLUMN last_processed_at timestamptz;
UPDATE processed_events SET last_outcome = outcome, last_processed_at = processed_at;
ALTER TABLE processed_events
    ALTER COLUMN last_outcome SET NOT NULL,
    ALTER COLUMN last_processed_at SET NOT NULL,
    ALTER COLUMN last_processed_at SET DEFAULT now();
