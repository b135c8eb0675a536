-- The delay queues workers declared, by full name. RETRY_DELAYS_S may differ between
-- workers (a rolling change of schedule), and AMQP cannot list a broker's queues, so
-- `fulfillment status` reads here which delay queues to show besides its own schedule's.
CREATE TABLE IF NOT EXISTS delay_queues (
    name text PRIMARY KEY,
    delay_s double precision NOT NULL,
    first_declared_at timestamptz NOT NULL DEFAULT now(),
    last_declared_at timestamptz NOT NULL DEFAULT now()
);
