"""``python -m devkit.stripe``: the stand-in in its own process, with seeded demo sessions."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from aiohttp import web

from devkit.stripe.app import ADMIN, StripeStandIn


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.stripe",
        description="Serve a local Stripe API stand-in. Seed and fault it over HTTP: "
        f"POST {ADMIN}/sessions, POST {ADMIN}/sessions/ID/payment_status, "
        f"POST {ADMIN}/faults, GET {ADMIN}/stats.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay on every API call")
    args = parser.parse_args(argv)
    standin = StripeStandIn(latency_s=args.latency_s)
    customer = standin.add_customer("cus_demo")
    standin.add_session(
        "cs_test_demo_paid",
        line_items=[("T-shirt", 2, 2000), ("Mug", 1, 1200)],
        customer=customer["id"],
    )
    standin.add_session("cs_test_demo_unpaid", payment_status="unpaid")
    standin.add_session_event("cs_test_demo_paid")
    standin.add_session_event("cs_test_demo_unpaid", "checkout.session.async_payment_failed")
    print(json.dumps({"sessions": sorted(standin.sessions), "events": sorted(standin.events)}))
    web.run_app(standin.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
