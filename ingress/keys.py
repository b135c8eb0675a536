"""What the ingress application holds, by key: its own modules and the Checkout routes read
these without importing the app that sets them."""

from __future__ import annotations

from aiohttp import web

from ingress.guards import BodyBudget, Drain, ReplayGuard
from ingress.publisher import EventPublisher
from ingress.settings import IngressSettings

SETTINGS = web.AppKey("settings", IngressSettings)
PUBLISHER = web.AppKey("publisher", EventPublisher)
BUDGET = web.AppKey("body_budget", BodyBudget)
REPLAYS = web.AppKey("replay_guard", ReplayGuard)
DRAIN = web.AppKey("drain", Drain)
