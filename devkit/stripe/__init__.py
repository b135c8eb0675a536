"""A local stand-in for the parts of Stripe's API that fulfillment reads, with fault injection.

Point stripe-python here (``base_addresses={"api": base_url}`` or ``stripe.api_base``) and
it behaves as against Stripe: objects are shaped from Stripe's published fixtures and
errors carry the JSON stripe-python maps onto its own exception classes.

    store.py     the objects (sessions, line items, customers, products, events) and seeding
    faults.py    latency, dropped connections, injected errors and foreign answers
    app.py       the HTTP routes over both, and the control routes under ``/_standin``
    checkout.py  Checkout Session creation and the hosted payment page that pays
    params.py    Stripe's list parameters, list object and ``expand[]``
    errors.py    Stripe's error answers

Run it standalone with seeded demo sessions: ``python -m devkit.stripe --port 12111``.
"""

from devkit.stripe.app import ADMIN, StripeStandIn, serve
from devkit.stripe.checkout import HostedCheckout

__all__ = ["ADMIN", "HostedCheckout", "StripeStandIn", "serve"]
