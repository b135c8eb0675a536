"""Development doubles, beside the product: the Stripe API stand-in and its hosted Checkout
pages, the mail sink, webhook signing and Stripe-shaped payloads, Stripe's fixture objects.

Used by the tests, by ``ops/`` and by ``fulfillment up`` / ``demo`` when no Stripe key is
set. The product packages never import it, except where ``up`` chooses to start it.
"""
