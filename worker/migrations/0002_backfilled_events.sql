-- Events that `fulfillment backfill` enqueued, so a second run does not enqueue them again.
CREATE TABLE backfilled_events (
    event_id    text PRIMARY KEY,
    event_type  text NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now()
);
