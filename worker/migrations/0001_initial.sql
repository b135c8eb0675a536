-- Every Checkout Session the worker has seen, and its state; the row workers lock to
-- serialize the handling of one session across processes.
CREATE TABLE checkout_sessions (
    checkout_session_id text PRIMARY KEY,
    state               text NOT NULL DEFAULT 'new'
                        CHECK (state IN ('new', 'awaiting_payment', 'fulfilled', 'payment_failed')),
    payment_status      text,
    customer_email      text,
    last_event_id       text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per fulfilled Checkout Session (the contract's table).
CREATE TABLE fulfillments (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    checkout_session_id text NOT NULL UNIQUE REFERENCES checkout_sessions,
    customer_id         text,
    customer_email      text,
    customer_name       text,
    amount_total        bigint NOT NULL,
    currency            text NOT NULL,
    payment_status      text NOT NULL,
    status              text NOT NULL DEFAULT 'fulfilled',
    livemode            boolean NOT NULL DEFAULT false,
    event_id            text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX fulfillments_created_at ON fulfillments (created_at);

CREATE TABLE fulfillment_line_items (
    checkout_session_id text NOT NULL REFERENCES fulfillments (checkout_session_id),
    line_item_id        text NOT NULL,
    description         text,
    price_id            text,
    quantity            bigint NOT NULL,
    unit_amount         bigint,
    amount_total        bigint NOT NULL,
    currency            text NOT NULL,
    PRIMARY KEY (checkout_session_id, line_item_id)
);

-- External effects done per session (email, outbound message): recorded after each is done.
CREATE TABLE fulfillment_steps (
    checkout_session_id text NOT NULL REFERENCES checkout_sessions,
    step                text NOT NULL,
    detail             text,
    done_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (checkout_session_id, step)
);

-- Stripe events handled, for backfill ("not yet processed") and audit.
CREATE TABLE processed_events (
    event_id            text PRIMARY KEY,
    event_type          text NOT NULL,
    checkout_session_id text,
    outcome             text NOT NULL,
    processed_at        timestamptz NOT NULL DEFAULT now()
);
