-- `fulfillment reconcile`, per Stripe account ('' for the platform's own): where a run
-- without --since resumes (resume_from: every complete session created before it was
-- checked), what the last run found, and how many sessions reconcile ever found without a
-- fulfillment (missing_total: the workers export it as reconcile_sessions_missing_total;
-- it only grows, so never reset it).
CREATE TABLE IF NOT EXISTS reconcile_accounts (
    account       text PRIMARY KEY,
    resume_from   timestamptz,
    last_run_at   timestamptz,
    last_checked  integer,
    last_missing  integer,
    missing_total bigint NOT NULL DEFAULT 0
);
-- The sessions reconcile queued a fulfillment.requested for, so that a run does not queue
-- one again while its request may still be waiting in the queue, and counts each once.
CREATE TABLE IF NOT EXISTS reconciled_sessions (
    checkout_session_id text PRIMARY KEY,
    account             text NOT NULL DEFAULT '',
    first_queued_at     timestamptz NOT NULL DEFAULT now(),
    last_queued_at      timestamptz NOT NULL DEFAULT now(),
    times_queued        integer NOT NULL DEFAULT 1
);
