"""Hostile input: thousands of generated bad requests against a real ingress and broker.

Every answer must be a 4xx (the one each kind of request calls for) or, where the ingress
or aiohttp refuses a request by closing, a closed connection: never a 5xx, never a hang.
Afterwards no queue holds anything and the ingress still queues a valid event.

The requests come from tests/hostile_requests.py: a seeded ``random.Random``
(``HOSTILE_SEED`` to replay another run), sent over raw sockets, so headers and framing
can be as broken as we like.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp.test_utils import TestServer

from devkit import signing as sh
from ingress.app import create_app
from ingress.main import SERVER_ARGS
from ingress.settings import IngressSettings
from ingress.signature import InvalidSignature, verify
from shared.envelope import EventEnvelope
from shared.errors import MalformedEvent
from shared.settings import BrokerSettings
from shared.topology import Topology
from shared.vocabulary import HEADER_API_VERSION, HEADER_CREATED
from tests.conftest import depths, drain, free_port
from tests.hostile_requests import (
    ARABIC_DIGITS,
    LIMIT,
    LINGER_S,
    READ_TIMEOUT_S,
    REQUESTS,
    SECRET,
    SEED,
    TOLERANCE_S,
    URL,
    Hostile,
    RawClient,
    Tally,
    assert_all_refused,
    fire,
    http,
    sign,
    slow_client,
    slow_head,
)
from tests.processes import ingress_process

pytestmark = pytest.mark.timeout(120)


async def assert_still_serves(port: int, channel: AbstractChannel, topology: Topology) -> None:
    """Nothing was queued by the bad requests; a valid event is still answered 200 and queued."""
    assert (await depths(channel, topology)) == dict.fromkeys(topology.all_queues, 0)
    raw = sh.body(sh.event())
    client = RawClient(port)
    try:
        status = await client.send(
            http(raw, [("Content-Type", "application/json"), ("Stripe-Signature", sign(raw))])
        )
    finally:
        await client.close()
    assert status == 200
    expected = dict.fromkeys(topology.all_queues, 0)
    expected[topology.work_queue] = 1
    assert (await depths(channel, topology)) == expected
    [message] = await drain(channel, topology.work_queue)
    assert message.body == raw


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def ingress_settings(broker_settings: BrokerSettings) -> IngressSettings:
    return IngressSettings(
        webhook_secrets=(SECRET,),
        broker=broker_settings,
        max_body_bytes=LIMIT,
        read_timeout_s=READ_TIMEOUT_S,
        tolerance_s=TOLERANCE_S,
    )


@pytest.fixture
async def ingress_port(topology: Topology, ingress_settings: IngressSettings) -> AsyncIterator[int]:
    """An in-process ingress on the real broker; its port."""
    server = TestServer(create_app(ingress_settings), port=0)
    await server.start_server(**SERVER_ARGS)  # as `fulfillment ingress` runs it
    try:
        assert server.port is not None
        yield server.port
    finally:
        await server.close()


# --- tests ------------------------------------------------------------------------------


async def test_ten_thousand_generated_bad_requests_are_all_refused_with_a_4xx_and_none_queued(
    ingress_port: int, topology: Topology, channel: AbstractChannel
) -> None:
    hostile = Hostile(random.Random(SEED))

    tally = await fire(ingress_port, hostile.cases(REQUESTS))

    print(f"seed {SEED}: {tally.summary()}")
    assert_all_refused(tally)
    kinds = {kind for kind, _ in tally.statuses}
    assert len(kinds) == len(hostile.kinds), "every kind of bad request was sent"
    await assert_still_serves(ingress_port, channel, topology)


async def test_slow_bodies_are_cut_off_by_the_read_timeout_with_408_and_a_close(
    ingress_port: int, topology: Topology, channel: AbstractChannel
) -> None:
    rng = random.Random(SEED + 1)
    raw = sh.body(sh.event())
    length = b"Content-Length: %d\r\n" % len(raw)
    stalls = [  # part of the body, then nothing
        slow_client(ingress_port, slow_head(length), [raw[:n]], 0)
        for n in (0, 1, 100, len(raw) - 1)
    ]
    trickles = [  # a byte at a time, never fast enough
        slow_client(ingress_port, slow_head(length), [raw[i : i + 1] for i in range(60)], gap_s)
        for gap_s in [rng.uniform(0.02, 0.2) for _ in range(8)]
    ]
    chunk = b"%x\r\n%s\r\n" % (50, raw[:50])
    chunked = [  # chunks, never the last one
        slow_client(ingress_port, slow_head(b"Transfer-Encoding: chunked\r\n"), [chunk] * n, 0.05)
        for n in [rng.randint(1, 5) for _ in range(8)]
    ]

    results = await asyncio.gather(*stalls, *trickles, *chunked)

    for status, closed_after, elapsed in results:
        assert status == 408
        assert READ_TIMEOUT_S * 0.9 <= elapsed < READ_TIMEOUT_S + 2
        # closed soon after, not lingering (aiohttp's default: reading on for 10 s)
        assert closed_after < READ_TIMEOUT_S + LINGER_S + 2
    # without a signature the body is never waited for: 400 at once
    status, _, elapsed = await slow_client(
        ingress_port,
        slow_head(b"Content-Length: 1000\r\n", signature=False),
        [b"x"],
        0,
        wait_close=False,
    )
    assert status == 400 and elapsed < READ_TIMEOUT_S
    await assert_still_serves(ingress_port, channel, topology)


# --- regression tests for what the generator found ----------------------------------------


def test_a_signature_header_with_non_ascii_characters_is_malformed_not_a_crash() -> None:
    # hmac.compare_digest inside stripe-python raised TypeError on these: a 500
    payload = sh.body(sh.event())
    now = int(time.time())
    for header in (f"t={now},v1=é", f"t={now},v1=\udcff", f"t={ARABIC_DIGITS},v1={'0' * 64}"):
        with pytest.raises(InvalidSignature) as caught:
            verify(payload, header, (SECRET,), TOLERANCE_S)
        assert caught.value.code == "malformed_signature"


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("type", "€" * 100, id="type over 255 bytes"),
        pytest.param("id", "€" * 100, id="id over 255 bytes"),
        pytest.param("id", "evt_\ud800", id="lone surrogate in id"),
        pytest.param("type", "x\udfff", id="lone surrogate in type"),
        # PostgreSQL text cannot hold a NUL (the event could never be recorded as handled),
        # and a line break would split log lines and the dlq table (black-box trial)
        pytest.param("id", "evt_a\x00b", id="NUL in id"),
        pytest.param("id", "evt_a\r\nX-Evil: 1", id="line break in id"),
        pytest.param("type", "checkout.session.completed\x7f", id="DEL in type"),
        pytest.param("id", "evt_a\x85b", id="C1 next-line in id"),
        pytest.param("type", "checkout.session\u2028completed", id="line separator in type"),
    ],
)
def test_event_ids_and_types_that_cannot_be_amqp_short_strings_are_malformed(
    field: str, value: str
) -> None:
    doc = sh.event()
    doc[field] = value

    with pytest.raises(MalformedEvent):
        EventEnvelope.parse(json.dumps(doc).encode())


def test_routing_fields_that_cannot_be_amqp_header_values_are_dropped() -> None:
    doc = sh.event()
    doc["created"], doc["api_version"] = 2**70, "2025-\ud800"

    envelope = EventEnvelope.parse(json.dumps(doc).encode())

    assert (envelope.created, envelope.api_version) == (0, None)
    doc["created"] = -(2**63)
    assert EventEnvelope.parse(json.dumps(doc).encode()).created == -(2**63)


async def test_signed_events_with_fields_amqp_cannot_carry_get_400_or_are_queued_never_500(
    ingress_port: int, topology: Topology, channel: AbstractChannel
) -> None:
    # these were 500s: pamqp refused to encode the routing key, a header string or integer
    def signed(field: str, value: Any) -> bytes:
        doc = sh.event()
        doc[field] = value
        raw = json.dumps(doc).encode()
        return http(raw, [("Stripe-Signature", sign(raw))])

    client = RawClient(ingress_port)
    try:
        refused: list[tuple[str, Any]] = [
            ("type", "€" * 100),
            ("id", "evt_\ud800"),
            ("type", "x\udfff"),
            ("id", "evt_a\x00b"),
        ]
        for field, value in refused:
            assert await client.send(signed(field, value)) == 400
        accepted: list[tuple[str, Any]] = [
            ("created", 2**70),
            ("created", -(2**64)),
            ("api_version", "\ud800"),
        ]
        for field, value in accepted:
            assert await client.send(signed(field, value)) == 200
    finally:
        await client.close()

    queued = await drain(channel, topology.work_queue)
    assert len(queued) == 3
    assert [m.headers[HEADER_CREATED] for m in queued[:2]] == [0, 0]
    assert HEADER_API_VERSION not in (queued[2].headers or {})


async def test_an_encoded_body_gets_415_not_500_whatever_the_server_decodes(
    topology: Topology, ingress_settings: IngressSettings
) -> None:
    # With aiohttp's defaults (as any runner but `fulfillment ingress` serves the app) a
    # Content-Encoding it cannot decode made request.content.read() raise
    # RequestPayloadError out of the handler: a 500. Now refused from the head alone.
    server = TestServer(create_app(ingress_settings), port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for encoding in ("gzip", "deflate"):
                headers = {
                    "Stripe-Signature": f"t={int(time.time())},v1={'0' * 64}",
                    "Content-Encoding": encoding,
                }
                async with session.post(
                    server.make_url(URL), data=b"not compressed at all", headers=headers
                ) as response:
                    assert response.status == 415
                    error = (await response.json())["error"]["type"]
                    assert error == "unsupported_content_encoding"
    finally:
        await server.close()


async def test_expect_100_continue_is_refused_from_the_head_before_the_body_is_invited(
    ingress_port: int, topology: Topology, channel: AbstractChannel
) -> None:
    """A client that asks first is told 413 (or 415, 400) at once, not invited to upload
    a body that would then be refused; a good request is invited and queued."""

    async def ask(head: bytes) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress_port)
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5), reader, writer

    raw = sh.body(sh.event())
    signed = f"POST {URL} HTTP/1.1\r\nHost: x\r\nStripe-Signature: {sign(raw)}\r\n".encode()
    expect = b"Expect: 100-continue\r\n\r\n"
    refused = [
        (signed + b"Content-Length: %d\r\n" % (LIMIT + 1) + expect, 413),
        (signed + b"Content-Encoding: gzip\r\nContent-Length: 9\r\n" + expect, 415),
        (slow_head(b"Content-Length: 9\r\nExpect: 100-continue\r\n", signature=False), 400),
    ]
    refused.append((signed + b"Content-Length: 2\r\nExpect: something-else\r\n\r\n", 417))
    for head, status in refused:
        line, reader, writer = await ask(head)
        # the connection ends with the refusal: a body sent all the same is no next request
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert line.startswith(b"HTTP/1.1 %d " % status), line
        assert b"Connection: close" in rest

    line, reader, writer = await ask(
        signed + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(raw)
    )
    try:
        assert line == b"HTTP/1.1 100 Continue\r\n"
        assert await reader.readline() == b"\r\n"
        writer.write(raw)
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    [queued] = await drain(channel, topology.work_queue)
    assert queued.body == raw


async def test_a_compressed_body_is_refused_never_inflated(
    ingress_port: int, topology: Topology, channel: AbstractChannel
) -> None:
    raw = sh.body(sh.event())
    compressed = gzip.compress(raw)
    client = RawClient(ingress_port)
    try:
        # signed over what it inflates to (Stripe never compresses): refused, not verified
        headers = [("Stripe-Signature", sign(raw)), ("Content-Encoding", "gzip")]
        assert await client.send(http(compressed, headers)) == 415
        # signed over the bytes sent, and a header that says they are gzip: not sent as
        # Stripe sends, and what a receiver would make of them is anyone's guess
        headers = [("Stripe-Signature", sign(raw)), ("Content-Encoding", "gzip")]
        assert await client.send(http(raw, headers)) == 415
        # gzip that inflates far past the limit
        bomb = gzip.compress(b"{" * (32 * 1024 * 1024), 9)
        headers = [("Stripe-Signature", sign(bomb)), ("Content-Encoding", "gzip")]
        assert await client.send(http(bomb, headers)) == 415
        # no encoding, said so: as if the header were not there
        headers = [("Stripe-Signature", sign(raw)), ("Content-Encoding", "identity")]
        assert await client.send(http(raw, headers)) == 200
        assert len(await drain(channel, topology.work_queue)) == 1
        # a broken chunk arriving after the handler started reading: aiohttp's parser
        # fails on it without telling the body stream, so the handler waits for the timeout
        status, closed_after, _ = await slow_client(
            ingress_port,
            slow_head(b"Transfer-Encoding: chunked\r\n"),
            [b"5\r\nhello\r\n", b"zz\r\nbroken\r\n0\r\n\r\n"],
            0.1,
        )
        assert status in (400, 408) and closed_after < READ_TIMEOUT_S + LINGER_S + 2
    finally:
        await client.close()
    await assert_still_serves(ingress_port, channel, topology)


# --- a real `fulfillment ingress` process: memory stays flat ------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# aiohttp logs each malformed request it refuses at ERROR; these are all that may appear.
_AIOHTTP_REFUSALS = (
    "BadHttpMessage",
    "BadHttpMethod",
    "BadStatusLine",
    "LineTooLong",
    "InvalidHeader",
    "InvalidURLError",
    "ContentEncodingError",
    "TransferEncodingError",
    "ContentLengthError",
    "RequestPayloadError",
)


async def test_a_real_ingress_process_keeps_its_memory_flat_under_ten_thousand_bad_requests(
    topology: Topology, broker_settings: BrokerSettings, channel: AbstractChannel
) -> None:
    port = free_port()
    process = ingress_process(
        broker_settings,
        SECRET,
        port,
        INGRESS_MAX_BODY_BYTES=str(LIMIT),
        INGRESS_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
        STRIPE_WEBHOOK_TOLERANCE_S=str(TOLERANCE_S),
    )
    await process.start("broker connected")
    try:
        assert process.events("ingress starting")[0]["event_loop"] == "uvloop"
        assert process.process is not None
        pid = process.process.pid
        hostile = Hostile(random.Random(SEED + 2))
        before = rss_kb(pid)
        warm = await fire(port, hostile.cases(2_000))
        warmed = rss_kb(pid)
        tally = await fire(port, hostile.cases(REQUESTS - 2_000))
        after = rss_kb(pid)
        print(
            f"ingress RSS before {before / 1024:.1f} MB, after 2,000 bad requests "
            f"{warmed / 1024:.1f} MB, after {REQUESTS:,} {after / 1024:.1f} MB "
            f"({tally.elapsed_s + warm.elapsed_s:.1f}s)"
        )
        assert_all_refused(Tally(warm.statuses + tally.statuses, warm.failures + tally.failures, 0))
        assert after - before < 30 * 1024, "RSS grew by 30 MB or more"
        assert after - warmed < 10 * 1024, "RSS kept growing after the warm-up"

        assert process.process.returncode is None
        # a stalled body: 408 after the read timeout, the connection closed soon after
        status, closed_after, elapsed = await slow_client(
            port, slow_head(b"Content-Length: 1000\r\n"), [b"{"], 0
        )
        assert status == 408 and elapsed < READ_TIMEOUT_S + 2
        assert closed_after < READ_TIMEOUT_S + LINGER_S + 2
        # clients gone mid-upload: counted and sampled as refusals, no error tracebacks
        head = slow_head(b"Content-Length: 1000\r\n")
        for _ in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b"{" * 100)
            await writer.drain()
            writer.close()
        await asyncio.sleep(0.5)
        await assert_still_serves(port, channel, topology)
        process.signal(signal.SIGTERM)
        assert await process.wait(20) == 0
    finally:
        await process.stop()

    errors = [log for log in process.logs if log.get("level") in ("error", "critical")]
    assert not errors, f"{len(errors)} error lines: {errors[:3]}"
    # what aiohttp could not even parse is one warning line each, no traceback
    refused = process.events("malformed HTTP request refused")
    assert refused and all(log["level"] == "warning" for log in refused)
    assert {log["error"].partition(":")[0] for log in refused} <= set(_AIOHTTP_REFUSALS)
    assert not any("exception" in log for log in refused)
    # ... and sampled like rejections (a scanner's flood of junk was a line per request)
    assert sum(line.get("similar_not_logged") or 0 for line in refused) > 10 * len(refused)
    # every rejection is counted in the metrics, but the log has one line per reason per
    # second, saying how many similar ones it left out: a flood is not a flood of lines
    rejected = process.events("webhook rejected")
    assert rejected and len(rejected) < 300
    [gone, *_] = [line for line in rejected if line["reason"] == "client_disconnected"]
    assert gone["status"] == 499  # nothing was sent: not a 400 it never got
    assert sum(line.get("similar_not_logged") or 0 for line in rejected) > 1_000
    assert not [line for line in process.lines if "Internal Server Error" in line]


@pytest.fixture(autouse=True)
def _quiet_structlog() -> Iterator[None]:
    """The in-process ingress would print 10,000 rejection lines: errors only."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    yield
    structlog.reset_defaults()
