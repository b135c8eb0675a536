-- A line item's quantity may be null: Stripe leaves it null for a metered (usage-based)
-- price, whose amount is only known when usage is reported. It used to be stored as 1.
-- Metadata-only (no rewrite); workers on the previous code insert non-null values, which
-- stay valid. The ALTER still takes the table's lock for a moment: give up rather than
-- queue every worker's insert behind a long transaction (migrate fails; run it again).
SET LOCAL lock_timeout = '10s';
ALTER TABLE fulfillment_line_items ALTER COLUMN quantity DROP NOT NULL;
