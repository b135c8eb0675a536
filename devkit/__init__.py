"""Development doubles, beside the product: the Stripe API stand-in and its hosted Checkout
pages, the mail sink, webhook signing and Stripe-shaped payloads, Stripe's fixture objects.

Used by the tests, by ``ops/``, by ``fulfillment up`` / ``demo`` when no Stripe key is set,
and by ``fulfillment send`` to sign a test event. The product packages never import it,
except in those two places (fulfillment/local.py and fulfillment/send.py), function-locally.
"""
