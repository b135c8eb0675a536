-- The connected account (Stripe Connect) an order was sold on; NULL for the platform's own.
ALTER TABLE fulfillments ADD COLUMN stripe_account text;
