-- What the confirmation email itemises, so that support sees what the customer was told:
-- the subtotal before discounts and taxes, each adjustment, the kind of Checkout and the
-- subscription it started; per item, its amount before discounts and taxes. NULL on rows
-- recorded before this migration. Metadata-only (no rewrite), but the ALTERs take the
-- tables' locks for a moment: give up rather than queue every worker's insert behind a
-- long transaction (migrate fails; run it again).
SET LOCAL lock_timeout = '10s';
ALTER TABLE fulfillments
    ADD COLUMN amount_subtotal bigint,
    ADD COLUMN amount_discount bigint,
    ADD COLUMN amount_shipping bigint,
    ADD COLUMN amount_tax bigint,
    ADD COLUMN mode text,
    ADD COLUMN subscription_id text;
ALTER TABLE fulfillment_line_items ADD COLUMN amount_subtotal bigint;
