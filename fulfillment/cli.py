"""``fulfillment``: one console script; each subcommand's code lives in its role's package."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from shared.errors import FulfillmentError

EPILOG = """examples:
  fulfillment ingress                 # serve POST /webhooks/stripe on $INGRESS_PORT
  fulfillment topology                # declare exchanges and queues, print their names
"""


def _ingress(args: argparse.Namespace) -> int:
    from ingress.main import run

    run()
    return 0


def _topology(args: argparse.Namespace) -> int:
    from shared.logging import configure_logging
    from shared.settings import BrokerSettings
    from shared.topology import declare_on_broker

    configure_logging("topology")
    topology = asyncio.run(declare_on_broker(BrokerSettings.from_env()))
    print(topology.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fulfillment",
        description="Stripe Checkout fulfillment over RabbitMQ.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str, example: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    add(
        "ingress",
        _ingress,
        "Run the Stripe webhook HTTP ingress.",
        "STRIPE_WEBHOOK_SECRETS=whsec_... fulfillment ingress",
    )
    add(
        "topology",
        _topology,
        "Declare the broker's exchanges and queues (idempotent).",
        "RABBITMQ_URL=amqp://guest:guest@localhost:5672/ fulfillment topology",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except FulfillmentError as exc:
        print(f"fulfillment {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
