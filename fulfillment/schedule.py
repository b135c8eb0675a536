"""``fulfillment up``'s scheduled work: reconcile every RECONCILE_INTERVAL_S."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from fulfillment.reconcile import ReconcileSettings, reconcile
from shared import runtime
from shared.errors import FulfillmentError
from shared.logging import get_logger
from shared.settings import BrokerSettings, Env
from shared.stripe_client import StripeSettings
from worker.settings import database_url_from_env

log = get_logger(__name__)


@dataclass(frozen=True)
class Schedule:
    """``fulfillment up``'s reconcile every RECONCILE_INTERVAL_S, from its children's
    environment (the local stand-ins included)."""

    settings: ReconcileSettings
    stripe: StripeSettings
    broker: BrokerSettings
    database_url: str

    @classmethod
    def from_env(cls, env: Env) -> Schedule | None:
        """None when RECONCILE_INTERVAL_S is 0; a bad value raises ConfigError."""
        settings = ReconcileSettings.from_env(env)
        if not settings.interval_s:
            return None
        return cls(
            settings, StripeSettings.from_env(env), BrokerSettings.from_env(env),
            database_url_from_env(env),
        )  # fmt: skip

    async def run(self, stopping: asyncio.Event) -> None:
        """Reconcile now, then every interval, until ``stopping`` is set. A failed run is
        logged and leaves its cursor: the next one covers its window."""
        log.info("reconcile scheduled", every_s=self.settings.interval_s)
        while not stopping.is_set():
            try:
                await runtime.unless_stopped(
                    reconcile(self.stripe, self.broker, self.database_url, self.settings),
                    stopping,
                )
            except Exception as exc:  # a bug included: `up` and its next run go on
                log.warning(
                    "scheduled reconcile failed; the next run tries again",
                    error=f"{type(exc).__name__}: {exc}",
                    next_run_in_s=self.settings.interval_s,
                    exc_info=exc if not isinstance(exc, FulfillmentError) else None,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.interval_s)
