"""Per-client limits on the public Checkout routes, and reloads that cost Stripe nothing:
a client's token buckets, who the client is behind proxies, the bounded tables, and what
the stand-in counts when a client floods the success page or session creation."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp
import pytest
import structlog

from devkit.stripe import StripeStandIn
from ingress.checkout import CREATE_LIMIT, LOOKUP_LIMIT
from ingress.clients import ClientAddress, parse_trusted
from ingress.limits import ClientBuckets
from ingress.success import ANSWERS
from shared.topology import Topology
from shared.vocabulary import HEADER_EVENT_TYPE
from tests.conftest import counted, drain
from tests.pipeline import Pipeline
from tests.storefront import Storefront, from_address, storefront_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(90)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the buckets ------------------------------------------------------------------------------


def test_a_client_gets_its_burst_at_once_then_one_more_per_refill_interval() -> None:
    clock = Clock()
    limit = ClientBuckets(per_min=6, burst=3, clock=clock)  # one token every 10 s

    assert [limit.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("a") == pytest.approx(10.0)  # how long until it may: Retry-After
    assert limit.take("b") == 0.0  # another client has a bucket of its own
    clock.now += 10
    assert limit.take("a") == 0.0
    assert limit.take("a") == pytest.approx(10.0)


def test_a_refused_request_takes_nothing_so_waiting_the_retry_after_is_enough() -> None:
    clock = Clock()
    limit = ClientBuckets(per_min=60, burst=1, clock=clock)
    limit.take("a")
    for _ in range(100):
        wait_s = limit.take("a")
    clock.now += wait_s
    assert limit.take("a") == 0.0


def test_zero_per_minute_turns_the_limit_off() -> None:
    limit = ClientBuckets(per_min=0, burst=1)
    assert limit.off and all(limit.take("a") == 0.0 for _ in range(1000)) and len(limit) == 0


def test_the_client_table_is_bounded_and_forgets_clients_whose_bucket_refilled() -> None:
    clock = Clock()
    limit = ClientBuckets(per_min=60, burst=5, max_clients=100, clock=clock)

    for n in range(10_000):  # a flood of distinct clients
        limit.take(f"10.0.{n // 256}.{n % 256}")
    assert len(limit) == 100
    clock.now += 5  # burst / rate: every bucket full again, nothing worth remembering
    limit.take("a")
    assert len(limit) == 1


# --- who the client is ------------------------------------------------------------------------


def test_without_trusted_proxies_forwarded_headers_are_ignored() -> None:
    clients = ClientAddress(parse_trusted(()))
    assert clients.of("198.51.100.7", ["203.0.113.1"]) == "198.51.100.7"


def test_behind_a_trusted_proxy_the_right_most_untrusted_entry_is_the_client() -> None:
    clients = ClientAddress(parse_trusted(("10.0.0.0/8", "192.0.2.1")))

    # the client wrote the first entry itself; the proxies appended the rest
    assert clients.of("10.1.2.3", ["6.6.6.6, 203.0.113.9, 192.0.2.1"]) == "203.0.113.9"
    assert clients.of("10.1.2.3", ["6.6.6.6", "203.0.113.9, 10.9.9.9"]) == "203.0.113.9"
    assert clients.of("10.1.2.3", ["203.0.113.9:51234"]) == "203.0.113.9"  # with a port
    # not from a trusted proxy: the header is the client's own words
    assert clients.of("198.51.100.7", ["203.0.113.9"]) == "198.51.100.7"
    # every entry a trusted proxy: the client is inside; the left-most, as uvicorn has it
    assert clients.of("10.1.2.3", ["10.0.0.5, 10.0.0.6"]) == "10.0.0.5"


def test_a_star_trusts_any_peer_and_takes_what_it_appended_not_what_the_client_wrote() -> None:
    clients = ClientAddress(parse_trusted(("*",)))
    assert clients.of("10.1.2.3", ["6.6.6.6, 203.0.113.9"]) == "203.0.113.9"


def test_an_ipv6_client_is_one_client_per_slash_64() -> None:
    clients = ClientAddress(parse_trusted(()))
    first = clients.of("2001:db8:1:2::1")
    assert first == clients.of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert clients.of("2001:db8:1:3::1") != first
    assert clients.of("::ffff:198.51.100.7") == "198.51.100.7"


@pytest.mark.parametrize("value", ["10.0.0.0/33", "proxy.internal", "10.0.0.1 10.0.0.2"])
def test_a_bad_forwarded_allow_ips_is_refused_naming_the_variable(value: str) -> None:
    from ingress.settings import IngressSettings
    from shared.errors import ConfigError

    env = {"STRIPE_WEBHOOK_SECRETS": "whsec_x", "FORWARDED_ALLOW_IPS": value}
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        IngressSettings.from_env(env)


# --- against the ingress, the stand-in counting Stripe calls ----------------------------------


async def get_success(http: aiohttp.ClientSession, shop: Storefront, session_id: str,
                      **headers: str) -> aiohttp.ClientResponse:  # fmt: skip
    async with http.get(
        f"{shop.base}/checkout/success", params={"session_id": session_id}, headers=headers
    ) as r:
        await r.read()
        return r


async def post_create(
    http: aiohttp.ClientSession, shop: Storefront, **headers: str
) -> aiohttp.ClientResponse:
    async with http.post(
        f"{shop.base}/create-checkout-session", allow_redirects=False, headers=headers
    ) as r:
        await r.read()
        return r


def made_up_id() -> str:
    return "cs_test_" + secrets.token_hex(16)


async def test_made_up_success_ids_from_one_client_cost_stripe_at_most_the_burst(
    storefront: Any,
) -> None:
    shop = await storefront()
    burst = shop.checkout.lookup_burst
    before = counted("ingress_client_limited_total", route="checkout_success")

    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            answers = await asyncio.gather(
                *(get_success(http, shop, made_up_id()) for _ in range(300))
            )
    statuses = [r.status for r in answers]

    assert shop.session_reads() <= burst
    assert statuses.count(404) == shop.session_reads() and statuses.count(429) >= 300 - burst
    limited = next(r for r in answers if r.status == 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert counted("ingress_client_limited_total", route="checkout_success") - before >= 290
    # sampled: a flood is counted, not logged line by line
    lines = [line for line in logs if line["event"] == "checkout request limited"]
    assert 1 <= len(lines) <= 3 and lines[0]["client"] == "127.0.0.1"


async def test_a_hundred_reloads_of_a_paid_session_cost_a_call_and_queue_one_request(
    storefront: Any, standin: StripeStandIn, channel: Any, topology: Topology
) -> None:
    shop = await storefront()
    session_id = standin.add_session(payment_status="paid")["id"]

    async with aiohttp.ClientSession() as http:
        together = await asyncio.gather(*(get_success(http, shop, session_id) for _ in range(50)))
        one_by_one = [await get_success(http, shop, session_id) for _ in range(50)]

    assert {r.status for r in together + one_by_one} == {200}  # reloads are not limited
    assert shop.session_reads() <= 2
    queued = await drain(channel, topology.work_queue)
    assert [m.headers[HEADER_EVENT_TYPE] for m in queued] == ["fulfillment.requested"]


async def test_an_unpaid_sessions_reloads_queue_nothing(
    storefront: Any, standin: StripeStandIn, channel: Any, topology: Topology
) -> None:
    shop = await storefront()
    session_id = standin.add_session(payment_status="unpaid")["id"]

    async with aiohttp.ClientSession() as http:
        for _ in range(30):
            assert (await get_success(http, shop, session_id)).status == 200

    assert await drain(channel, topology.work_queue) == []
    assert shop.session_reads() <= 10  # its answer is kept a few seconds: it may change


async def test_sixty_creations_from_one_client_create_at_most_the_burst_while_another_is_served(
    storefront: Any, pipeline: Pipeline
) -> None:
    shop = await storefront()
    await pipeline.start()
    burst = shop.checkout.create_burst

    async with aiohttp.ClientSession() as flood:
        answers = await asyncio.gather(*(post_create(flood, shop) for _ in range(60)))
        # meanwhile a customer from another address checks out, pays and is fulfilled
        async with from_address("127.0.0.2") as customer:
            created = await post_create(customer, shop)
            assert created.status == 303
            async with customer.post(created.headers["Location"]) as paid:
                assert paid.status == 200 and "Thank you" in await paid.text()

    statuses = [r.status for r in answers]
    assert statuses.count(303) == burst and statuses.count(429) == 60 - burst
    assert shop.session_creations() == burst + 1
    await pipeline.fulfilled(created.headers["Location"].rsplit("/", 1)[1])


async def test_rotating_x_forwarded_for_without_trusted_proxies_does_not_escape_the_limit(
    storefront: Any,
) -> None:
    shop = await storefront()
    async with aiohttp.ClientSession() as http:
        answers = [
            await post_create(http, shop, **{"X-Forwarded-For": f"203.0.113.{n}"})
            for n in range(20)
        ]

    assert [r.status for r in answers].count(303) == shop.checkout.create_burst
    assert shop.session_creations() == shop.checkout.create_burst


async def test_behind_a_trusted_proxy_the_client_it_reports_is_the_one_limited(
    storefront: Any,
) -> None:
    shop = await storefront(forwarded_allow_ips=("127.0.0.1",), create_burst=2)
    async with aiohttp.ClientSession() as proxy:
        # one client behind the proxy, whatever it writes before the proxy's entry
        greedy = [
            await post_create(proxy, shop, **{"X-Forwarded-For": f"6.6.6.{n}, 203.0.113.5"})
            for n in range(5)
        ]
        others = [
            await post_create(proxy, shop, **{"X-Forwarded-For": f"198.51.100.{n}"})
            for n in range(5)
        ]

    assert [r.status for r in greedy] == [303, 303, 429, 429, 429]
    assert [r.status for r in others] == [303] * 5
    # a peer not named in FORWARDED_ALLOW_IPS is not believed
    async with from_address("127.0.0.3") as stranger:
        spoofing = [
            await post_create(stranger, shop, **{"X-Forwarded-For": f"198.51.100.{n + 50}"})
            for n in range(4)
        ]
    assert [r.status for r in spoofing] == [303, 303, 429, 429]


async def test_a_flood_of_distinct_clients_keeps_the_ingresss_tables_bounded(
    storefront: Any,
) -> None:
    shop = await storefront(forwarded_allow_ips=("127.0.0.1",))
    shop.app[LOOKUP_LIMIT].max_clients = 50
    shop.app[CREATE_LIMIT].max_clients = 50
    shop.app[ANSWERS].max_entries = 50

    async with aiohttp.ClientSession() as proxy:
        for batch in range(10):
            await asyncio.gather(
                *(
                    get_success(
                        proxy, shop, made_up_id(), **{"X-Forwarded-For": f"10.{batch}.0.{n}"}
                    )
                    for n in range(100)
                ),
                *(
                    post_create(proxy, shop, **{"X-Forwarded-For": f"10.{batch}.1.{n}"})
                    for n in range(20)
                ),
            )

    assert shop.session_reads() == 1000  # each a client of its own: none limited
    assert len(shop.app[LOOKUP_LIMIT]) <= 50
    assert len(shop.app[CREATE_LIMIT]) <= 50
    assert len(shop.app[ANSWERS]) <= 50


async def test_limits_set_to_zero_are_off(storefront: Any) -> None:
    shop = await storefront(create_per_min=0, lookup_per_min=0)
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(get_success(http, shop, made_up_id()) for _ in range(40)))
    assert {r.status for r in answers} == {404} and shop.session_reads() == 40
