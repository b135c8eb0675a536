"""A local stand-in for the parts of Stripe's API that fulfillment reads, with fault injection.

Run it standalone with seeded demo sessions: ``python -m devkit.stripe --port 12111``.
"""

from devkit.stripe.app import StripeStandIn, serve
from devkit.stripe.checkout import HostedCheckout

__all__ = ["HostedCheckout", "StripeStandIn", "serve"]
