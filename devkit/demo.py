"""``fulfillment demo``'s Stripe side: a realistic mix of orders, played as Stripe would.

Sample customers and sessions are shaped from Stripe's published fixtures; signed events
go through the ingress exactly as Stripe would send them (paid at once, delayed then
succeeded, failed, duplicates, one for a session Stripe does not know), and a table shows
each session as the workers get to it, then a summary. The Checkout pages are on too:
open the printed URL, click Checkout, pay on the stand-in's hosted page.

``fulfillment up --demo`` starts it beside the stand-in and hands it how to speak (``say``,
and ``table`` for the one table it keeps up to date) and how to read the dead-letter queue,
so that nothing here imports the CLI.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg

from devkit import signing
from devkit.stripe import HostedCheckout, StripeStandIn
from shared.money import format_amount
from shared.settings import env_port
from worker.settings import database_url_from_env

CATALOG = [("T-shirt", 2000), ("Mug", 1250), ("Notebook", 1500), ("Sticker pack", 500)]
PEOPLE = [("Ada Lovelace", "ada"), ("Grace Hopper", "grace"), ("Alan Turing", "alan"),
          ("Katherine Johnson", "katherine")]  # fmt: skip
# what each demo session should end as
EXPECTED = {"paid": "fulfilled", "delayed": "fulfilled", "failed": "payment_failed"}
UNKNOWN = "cs_test_demo_unknown"  # a session Stripe does not know: its event is dead-lettered
DEAD = "dead letter"
# the effects recorded for a session (fulfillment_steps), as the table names them
SHORT = {
    "confirmation_email": "email", "order_fulfilled_message": "message",
    "payment_failed_email": "email", "payment_failed_message": "message",
}  # fmt: skip
# a row's mark: as expected, not (yet), given up on
DONE, WAITING, MISSED = "✓", "…", "✗"


class Demo:
    def __init__(
        self,
        env: dict[str, str],
        standin: StripeStandIn,
        *,
        say: Callable[[str], None],
        table: Callable[[list[str], bool], None],
        dead_letter_ids: Callable[[], Awaitable[list[str]]],
        colour: bool = False,
    ) -> None:
        self.env = env
        self.standin = standin
        self.say = say
        self.table = table  # the table's lines now, and whether they are the last
        self.dead_letter_ids = dead_letter_ids  # the event ids now in the dead-letter queue
        self.colour = colour
        self.unknown_event: str | None = None  # the event id of the dead letter to be
        port = env_port(env, "INGRESS_PORT", 8080)
        self.base = f"http://127.0.0.1:{port}"
        self.secret = env["STRIPE_WEBHOOK_SECRETS"].split(",")[0].strip()
        self.sent_ids: set[str] = set()  # every event this demo sent
        self.hosted = HostedCheckout(
            standin, webhook_url=f"{self.base}/webhooks/stripe", webhook_secret=self.secret
        )
        rng = random.Random(42)
        self.customers = [
            standin.add_customer(email=f"{handle}@example.com", name=name)
            for name, handle in PEOPLE
        ]
        price = self.hosted.add_price("T-shirt", 2000)
        env["CHECKOUT_PRICE"] = price["id"]
        env["CHECKOUT_CUSTOMER"] = self.customers[0]["id"]
        env.setdefault("PUBLIC_URL", f"http://localhost:{port}")
        self.sessions: list[tuple[str, str]] = []  # (session id, kind)
        kinds = ["paid"] * 6 + ["delayed"] * 3 + ["failed"] * 2
        for i, kind in enumerate(kinds):
            customer = self.customers[i % len(self.customers)]
            items = [(name, rng.randint(1, 3), amount) for name, amount in rng.sample(CATALOG, 2)]
            session = standin.add_session(
                payment_status="paid" if kind == "paid" else "unpaid",
                line_items=items,
                customer_email=customer["email"],
                customer=customer["id"],
            )
            self.sessions.append((session["id"], kind))

    async def close(self) -> None:
        await self.hosted.close()

    async def _send(self, http: aiohttp.ClientSession, event: dict[str, Any]) -> int:
        body = signing.body(event)
        headers = {"Stripe-Signature": signing.signature_header(body, self.secret),
                   "Content-Type": "application/json"}  # fmt: skip
        self.sent_ids.add(event["id"])
        for _ in range(20):  # like Stripe: again until 2xx
            try:
                async with http.post(
                    f"{self.base}/webhooks/stripe", data=body, headers=headers
                ) as r:
                    if r.status == 200:
                        return r.status
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        return 0

    async def run(self, stopping: asyncio.Event, *, keep_running: bool) -> bool:
        """Play the demo to its summary; True then. ``up`` cancels it on Ctrl-C."""
        await self._run()
        if keep_running:
            url = f"{self.env['PUBLIC_URL']}/"
            self.say(f"demo done; buy with the saved card at {url} (Ctrl-C stops)")
        else:
            stopping.set()
        return True

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{self.base}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            sent = 0
            for sid, kind in self.sessions:
                event = self.standin.add_session_event(sid)
                sent += bool(await self._send(http, event))
                if kind == "paid" and sent % 2:
                    sent += bool(await self._send(http, event))  # Stripe redelivers
            unknown = self.standin.add_session(UNKNOWN)
            event = self.standin.add_session_event(unknown["id"])
            del self.standin.sessions[unknown["id"]]  # Stripe does not know it: a dead letter
            self.unknown_event = event["id"]
            sent += bool(await self._send(http, event))
            await asyncio.sleep(1.5)  # the delayed payments resolve a little later
            for sid, kind in self.sessions:
                if kind == "delayed":
                    self.standin.set_payment_status(sid, "paid")
                    event = self.standin.add_session_event(
                        sid, "checkout.session.async_payment_succeeded"
                    )
                elif kind == "failed":
                    event = self.standin.add_session_event(
                        sid, "checkout.session.async_payment_failed"
                    )
                else:
                    continue
                sent += bool(await self._send(http, event))
            self.say(f"demo: {sent} signed events sent through the ingress")
        await self._watch()

    async def _watch(self, timeout_s: float = 60) -> None:
        ids = [sid for sid, _ in self.sessions]
        conn = await asyncpg.connect(database_url_from_env(self.env))
        # read until the unknown session's letter is there, then no more: a read holds the
        # letters for a moment, and the summary counts from the last one
        letters: list[str] = []
        dead = False
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                rows = {
                    r["checkout_session_id"]: r
                    for r in await conn.fetch(
                        """SELECT s.checkout_session_id, s.state, array(
                               SELECT step FROM fulfillment_steps f
                               WHERE f.checkout_session_id = s.checkout_session_id) AS steps
                           FROM checkout_sessions s WHERE s.checkout_session_id = ANY($1)""",
                        ids,
                    )
                }
                if not dead:
                    letters = await self.dead_letter_ids()
                    dead = self.unknown_event in letters
                done = dead and all(
                    self._as_expected(rows.get(sid), kind) for sid, kind in self.sessions
                )
                over = done or time.monotonic() > deadline
                self.table(self._table(rows, dead, final=over), over)
                if over:
                    break
                await asyncio.sleep(0.5)
            await self._summary(conn, ids, letters)
        finally:
            await conn.close()

    @staticmethod
    def _as_expected(row: Any, kind: str) -> bool:
        return row is not None and row["state"] == EXPECTED[kind] and len(row["steps"]) == 2

    def _mark(self, ok: bool, final: bool) -> str:
        mark = DONE if ok else MISSED if final else WAITING
        if self.colour and mark != WAITING:
            return f"\x1b[{32 if ok else 31}m{mark}\x1b[0m"
        return mark

    def _table(self, rows: dict[str, Any], dead: bool, *, final: bool) -> list[str]:
        lines = [f"  {'SESSION':32} {'CUSTOMER':21} {'TOTAL':>10}  {'EXPECTED':14} NOW"]
        for sid, kind in self.sessions:
            session = self.standin.sessions[sid]
            total = format_amount(session["amount_total"], session["currency"])
            row = rows.get(sid)
            effects = sorted(SHORT.get(step, step) for step in row["steps"]) if row else []
            now = (
                "-" if row is None else f"{row['state']} ({', '.join(effects) or 'no effects yet'})"
            )
            email = session["customer_details"]["email"]
            mark = self._mark(self._as_expected(row, kind), final)
            lines.append(f"{mark} {sid:32} {email:21} {total:>10}  {EXPECTED[kind]:14} {now}")
        unknown = "dead-lettered (Stripe does not know it)" if dead else "-"
        mark = self._mark(dead, final)
        lines.append(f"{mark} {UNKNOWN:32} {'-':21} {'-':>10}  {DEAD:14} {unknown}")
        return lines

    async def _summary(self, conn: asyncpg.Connection, ids: list[str], letters: list[str]) -> None:
        fulfilled = await conn.fetchval(
            "SELECT count(*) FROM fulfillments WHERE checkout_session_id = ANY($1)", ids
        )
        emails = await conn.fetchval(
            "SELECT count(*) FROM fulfillment_steps WHERE checkout_session_id = ANY($1) "
            "AND step IN ('confirmation_email', 'payment_failed_email')",
            ids,
        )
        failed = await conn.fetchval(
            "SELECT count(*) FROM checkout_sessions WHERE checkout_session_id = ANY($1) "
            "AND state = 'payment_failed'",
            ids,
        )
        # this demo's own: the queue may hold letters of earlier runs, or of anything else
        dead = sum(event_id in self.sent_ids for event_id in letters)
        others = len(letters) - dead
        self.say(
            f"demo summary: fulfilled {fulfilled}, emails sent {emails}, "
            f"failed payments {failed}, dead letters {dead}"
            + (f" (the dead-letter queue holds {others} more from before)" if others else "")
        )
