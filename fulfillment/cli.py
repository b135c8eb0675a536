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
  fulfillment migrate                 # create or upgrade the database schema
  fulfillment worker --concurrency 64 # consume the fulfillment queue
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


def _worker(args: argparse.Namespace) -> int:
    from worker.main import run

    run(concurrency=args.concurrency)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    import os

    from shared.logging import configure_logging
    from worker.db import migrate
    from worker.settings import database_url_from_env

    configure_logging("migrate")
    applied = asyncio.run(migrate(database_url_from_env(os.environ)))
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
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
    worker = add(
        "worker",
        _worker,
        "Run a fulfillment worker (competing consumer).",
        "STRIPE_API_KEY=sk_test_... fulfillment worker --concurrency 64",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="messages handled at once (prefetch); default $WORKER_CONCURRENCY or 32",
    )
    add(
        "migrate",
        _migrate,
        "Create or upgrade the database schema (safe to run concurrently).",
        "DATABASE_URL=postgresql://localhost/fulfillment fulfillment migrate",
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
