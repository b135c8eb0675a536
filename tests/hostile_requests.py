"""Hostile HTTP requests for the ingress: a raw HTTP/1.1 client and a seeded generator.

The generator draws bad requests of many kinds from a ``random.Random``, each with the
answers it calls for; the client sends raw bytes over sockets, so headers and framing can
be as broken as we like. :func:`fire` sends them over many connections and judges each
answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import hmac
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from devkit import signing as sh
from ingress.main import SERVER_ARGS

SECRET = sh.new_secret()
URL = "/webhooks/stripe"
LIMIT = 64 * 1024
READ_TIMEOUT_S = 0.5
TOLERANCE_S = 300
LINGER_S = float(SERVER_ARGS["lingering_time"])
REQUESTS = 10_000
CONCURRENCY = 32
ANSWER_TIMEOUT_S = 10.0
SEED = int(os.environ.get("HOSTILE_SEED", "20261128"))
# 1700000000 in Arabic-Indic digits: int() reads it, but it is no ASCII timestamp
ARABIC_DIGITS = "\u0661\u0667" + "\u0660" * 8


# --- a raw HTTP/1.1 client ---------------------------------------------------------------


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status of the next final answer and whether the connection stays usable."""
    while True:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        version, status_text = status_line.split(" ", 2)[:2]
        status = int(status_text)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if 100 <= status < 200:
            continue  # 100 Continue: the final answer follows
        keep = version == "HTTP/1.1" and headers.get("connection") != "close"
        try:
            if "content-length" in headers:
                await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.read()
                keep = False
        except (asyncio.IncompleteReadError, ConnectionError):
            keep = False
        return status, keep


class RawClient:
    """One keep-alive connection sending raw bytes; reconnects when the server closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def send(self, data: bytes, *, alone: bool = False) -> int | None:
        """The answer's status, or None when the server closed the connection without one.

        ``alone``: the request gets a connection of its own, closed afterwards (its framing
        may leave the connection unusable).
        """
        if alone:
            await self.close()
        for _ in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                self.used = False
            reused, self.used = self.used, True
            status, keep = await self._exchange(data)
            if status is None and reused:
                await self.close()  # closed between two requests: try once on a fresh one
                continue
            if not keep or alone:
                await self.close()
            return status
        return None

    async def _exchange(self, data: bytes) -> tuple[int | None, bool]:
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            pass  # answered and closed before it took the whole body; the answer may be read
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                return await read_answer(self.reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None, False
        except TimeoutError:
            raise AssertionError(
                f"no answer within {ANSWER_TIMEOUT_S}s to {data[:200]!r}"
            ) from None


# --- the generator -----------------------------------------------------------------------

Headers = Sequence[tuple[bytes | str, bytes | str]]


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def http(
    body: bytes = b"",
    headers: Headers = (),
    *,
    method: str = "POST",
    target: bytes | str = URL,
    framing: str = "length",
    chunks: Sequence[int] = (),
) -> bytes:
    """A raw request; ``framing``: "length", "chunked" (split at ``chunks``) or "none"."""
    lines = [b"%s %s HTTP/1.1" % (_b(method), _b(target)), b"Host: 127.0.0.1"]
    lines += [_b(name) + b": " + _b(value) for name, value in headers]
    payload = body
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = b""
        start = 0
        for end in [*sorted(c for c in chunks if 0 < c < len(body)), len(body)]:
            if end > start:
                payload += b"%x\r\n%s\r\n" % (end - start, body[start:end])
                start = end
        payload += b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


@dataclass(frozen=True)
class Case:
    kind: str
    data: bytes
    expect: frozenset[int]
    may_close: bool = False  # refusing by closing the connection is a fine answer too
    alone: bool = False  # needs a connection of its own


BAD_REQUEST = frozenset({400})
UNSUPPORTED = frozenset({415})
TOO_LARGE = frozenset({413})
HEADER_REFUSED = frozenset({400, 431})


def sign(raw: bytes, timestamp: int | None = None, secret: str = SECRET) -> str:
    """A Stripe-Signature header for ``raw`` (with the ingress's secret unless told)."""
    return sh.signature_header(raw, secret, timestamp=timestamp)


class Hostile:
    """Bad requests of many kinds, drawn from a seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.events = [sh.body(sh.event()) for _ in range(4)]
        # a gzip bomb: ~16 KB on the wire, 16 MB once inflated
        self.bomb = gzip.compress(b"\0" * (16 * 1024 * 1024), 9)
        self.kinds: list[Callable[[], Case]] = [
            getattr(self, name) for name in sorted(dir(self)) if name.startswith("k_")
        ]

    def cases(self, n: int) -> Iterator[Case]:
        for _ in range(n):
            yield self.rng.choice(self.kinds)()

    # helpers

    def event(self) -> bytes:
        return self.rng.choice(self.events)

    def text(self, low: int = 0, high: int = 40) -> str:
        """Random text from ASCII, Latin-1, other planes and emoji (no surrogates)."""
        rng = self.rng
        pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x1FFF), (0x3000, 0xD7FF), (0x1F300, 0x1FAFF)]
        out = []
        for _ in range(rng.randint(low, high)):
            lo, hi = rng.choice(pools)
            out.append(chr(rng.randint(lo, hi)))
        return "".join(out)

    def header_bytes(self, low: int, high: int) -> bytes:
        """Random bytes that are not CR or LF (those would end the header)."""
        return bytes(self.rng.choice(_HEADER_BYTES) for _ in range(self.rng.randint(low, high)))

    def hex64(self) -> str:
        return self.rng.randbytes(32).hex()

    def json_value(self, depth: int = 0) -> Any:
        rng = self.rng
        r = rng.random()
        if depth > 3 or r < 0.35:
            return rng.choice(
                [
                    None,
                    True,
                    False,
                    rng.randint(-(10**20), 10**20),
                    rng.uniform(-1e300, 1e300),
                    self.text(0, 20),
                ]
            )
        if r < 0.6:
            return [self.json_value(depth + 1) for _ in range(rng.randint(0, 5))]
        keys = ["id", "type", "object", "data", "created", "livemode", "api_version"]
        return {
            rng.choice([*keys, self.text(1, 8)]): self.json_value(depth + 1)
            for _ in range(rng.randint(0, 6))
        }

    def signed(self, kind: str, raw: bytes, **kw: Any) -> Case:
        """A body signed with the right secret: what is wrong is the body itself."""
        headers = [("Content-Type", "application/json"), ("Stripe-Signature", sign(raw))]
        return Case(kind, http(raw, headers), kw.pop("expect", BAD_REQUEST), **kw)

    def with_signature(self, kind: str, value: bytes | str, **kw: Any) -> Case:
        """A valid event with ``value`` as its Stripe-Signature header."""
        headers = [("Content-Type", "application/json"), ("Stripe-Signature", value)]
        return Case(kind, http(self.event(), headers), kw.pop("expect", BAD_REQUEST), **kw)

    # wrong, missing and garbled signatures

    def k_missing_signature(self) -> Case:
        return Case("missing signature", http(self.event()), BAD_REQUEST)

    def k_empty_signature(self) -> Case:
        return self.with_signature("empty signature", self.rng.choice(["", " ", "\t", ",", "="]))

    def k_ascii_garbage_signature(self) -> Case:
        value = "".join(chr(self.rng.randint(0x21, 0x7E)) for _ in range(self.rng.randint(1, 300)))
        return self.with_signature("ascii garbage signature", value)

    def k_byte_garbage_signature(self) -> Case:
        value = self.header_bytes(1, 300)
        return self.with_signature("byte garbage signature", value, may_close=True)

    def k_unicode_signature(self) -> Case:
        return self.with_signature("unicode signature", self.text(1, 200).strip() or "é")

    def k_unicode_v1(self) -> Case:
        value = f"t={int(time.time())},v1={self.text(1, 64).strip() or 'é'}"
        return self.with_signature("unicode v1", value)

    def k_wrong_secret(self) -> Case:
        raw = self.event()
        return self.with_signature("wrong secret", sign(raw, secret=sh.new_secret()))

    def k_signature_of_another_body(self) -> Case:
        return self.with_signature("signature of another body", sign(self.event() + b" "))

    def k_many_v1(self) -> Case:
        raw = self.event()
        entries = [f"v1={self.hex64()}" for _ in range(self.rng.randint(20, 110))]
        other = sign(raw, secret=sh.new_secret()).split(",", 1)[1]
        entries.insert(self.rng.randrange(len(entries)), other)
        return self.with_signature("many v1 entries", f"t={int(time.time())}," + ",".join(entries))

    def k_repeated_t(self) -> Case:
        now = int(time.time())
        raw = self.event()
        first = self.rng.choice([str(now - 10_000), "", "x", str(now + 10_000), "-1"])
        v1 = sign(raw, now).split(",", 1)[1]  # right for t=now, but the first t counts
        return self.with_signature("t= repeated", f"t={first},t={now},{v1}")

    def k_negative_timestamp(self) -> Case:
        raw = self.event()
        return self.with_signature("negative timestamp", sign(raw, -self.rng.randint(0, 10**12)))

    def k_huge_timestamp(self) -> Case:
        raw = self.event()
        t = self.rng.choice(
            [
                str(self.rng.randint(10**11, 10**18)),
                str(2**63),
                str(2**64 + 1),
                str(10**100),
                "9" * self.rng.randint(4000, 7000),  # int() refuses over 4300 digits
            ]
        )
        signed = f"{t}.".encode() + raw
        v1 = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
        return self.with_signature("huge timestamp", f"t={t},v1={v1}")

    def k_stale_timestamp(self) -> Case:
        raw = self.event()
        t = int(time.time()) - self.rng.randint(TOLERANCE_S + 60, 10**9)
        return self.with_signature("timestamp too old", sign(raw, t))

    def k_future_timestamp(self) -> Case:
        raw = self.event()
        t = int(time.time()) + self.rng.randint(TOLERANCE_S + 60, 10**9)
        return self.with_signature("timestamp in the future", sign(raw, t))

    def k_timestamp_not_an_integer(self) -> Case:
        t = self.rng.choice(["", "abc", "1.5", "0x10", "1e9", "--1", ARABIC_DIGITS, "NaN", "∞"])
        return self.with_signature("timestamp not an integer", f"t={t},v1={self.hex64()}")

    def k_incomplete_header(self) -> Case:
        now = int(time.time())
        raw = self.event()
        v1 = sign(raw, now).split(",", 1)[1]
        value = self.rng.choice(
            [
                v1,
                f"t={now}",
                f"t={now},v0={v1[3:]}",
                f"t={now},v1=",
                f"t={now};{v1}",
                f"T={now},V1={v1[3:]}",
                ",,,,",
                f"t={now},,,,",
                f"{v1},{v1}",
            ]
        )
        return self.with_signature("incomplete header", value)

    def k_huge_signature_header(self) -> Case:
        value = "t=1,v1=" + "a" * self.rng.randint(8200, 70_000)
        return self.with_signature(
            "huge signature header", value, expect=HEADER_REFUSED, may_close=True, alone=True
        )

    # truncated, empty, not UTF-8, deeply nested, not an event (each correctly signed)

    def k_truncated_body(self) -> Case:
        raw = self.event()
        return self.signed("truncated body", raw[: self.rng.randrange(len(raw))])

    def k_empty_body(self) -> Case:
        return self.signed("empty body", b"")

    def k_invalid_utf8(self) -> Case:
        raw = bytearray(self.rng.choice([self.event(), self.rng.randbytes(200)]))
        bad = self.rng.choice([b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80"])
        at = self.rng.randrange(len(raw) + 1)
        return self.signed("invalid utf-8", bytes(raw[:at]) + bad + bytes(raw[at:]))

    def k_deeply_nested(self) -> Case:
        rng = self.rng
        shape = rng.randrange(5)
        if shape == 0:
            raw = b"[" * rng.randint(1000, LIMIT)
        elif shape == 1:
            n = rng.randint(20_000, LIMIT // 2)
            raw = b"[" * n + b"]" * n
        elif shape == 2:
            n = rng.randint(5_000, (LIMIT - 1) // 6)
            raw = b'{"a":' * n + b"1" + b"}" * n
        elif shape == 3:  # an event whose data is nested far too deep to parse
            n = rng.randint(20_000, 30_000)
            raw = b'{"object":"event","id":"evt_1","type":"x","data":' + b"[" * n + b"]" * n + b"}"
        else:  # nested shallow enough to parse, but not an event
            n = rng.randint(1, 500)
            raw = b"[" * n + b"]" * n
        return self.signed("deeply nested", raw)

    def k_random_json(self) -> Case:
        doc = self.json_value()
        if isinstance(doc, dict) and doc.get("object") == "event":
            doc["object"] = "charge"
        return self.signed("json but not an event", json.dumps(doc).encode())

    def k_event_fields_wrong(self) -> Case:
        rng = self.rng
        doc: dict[str, Any] = {
            "id": "evt_" + self.hex64()[:24],
            "object": "event",
            "type": "checkout.session.completed",
            "created": int(time.time()),
            "data": {"object": {"id": "cs_test_1", "object": "checkout.session"}},
        }
        field = rng.choice(["id", "type", "object"])
        wrong: list[Any] = [None, 0, 12, 1.5, [], {}, "", True, ["evt_1"], {"id": "evt_1"}]
        if field != "object":
            wrong += [
                "x" * rng.randint(256, 2000),
                "€" * rng.randint(86, 400),  # over 255 bytes in UTF-8 (3 bytes each)
                "evt_\ud800",  # a lone surrogate, sent as the JSON escape \ud800
                "\udfff" + "x" * rng.randint(0, 10),
            ]
        else:
            wrong += ["charge", "Event", "event ", " event", "events", "\u0435vent"]
        if rng.random() < 0.1:
            del doc[field]
        else:
            doc[field] = rng.choice(wrong)
        return self.signed("event fields wrong", json.dumps(doc).encode())

    def k_unparseable_event(self) -> Case:
        good = '{"object":"event","id":"evt_1","type":"checkout.session.completed"'
        raw = self.rng.choice(
            [
                good + ',"created":' + "9" * self.rng.randint(4301, 20_000) + "}",
                good + ',"data":' + "1" * 5000 + "}",
                good + ',"data":NaN,' + "}",
                good + "}}",
                good + "," + "}",
                json.dumps(good + "}"),  # a JSON string holding the event
                good + '}{"object":"event"}',
                '{"object":"event","id":"evt_1","type":"x","object":"charge"}',
                good.replace('"', "'") + "}",
            ]
        )
        return self.signed("unparseable event", raw.encode())

    def k_valid_utf8_garbage(self) -> Case:
        return self.signed("utf-8 garbage", self.text(0, 500).encode())

    # oversized bodies: with Content-Length, chunked, a gzip bomb

    def k_oversized_content_length(self) -> Case:
        length = self.rng.choice([LIMIT + 1, self.rng.randint(LIMIT + 1, 10**12)])
        sent = self.rng.randint(0, 2048)
        head = http(
            b"", [("Stripe-Signature", f"t=1,v1={self.hex64()}")], framing="none"
        ).removesuffix(b"\r\n\r\n")
        data = head + b"\r\nContent-Length: %d\r\n\r\n" % length + b"x" * sent
        return Case("oversized (Content-Length)", data, TOO_LARGE, may_close=True, alone=True)

    def k_oversized_body(self) -> Case:
        raw = b" " * self.rng.randint(LIMIT + 1, 2 * LIMIT)
        headers = [("Content-Type", "application/json"), ("Stripe-Signature", sign(raw))]
        return Case("oversized body", http(raw, headers), TOO_LARGE, may_close=True)

    def k_oversized_chunked(self) -> Case:
        size = self.rng.randint(LIMIT + 1, 2 * LIMIT)
        raw = self.rng.randbytes(size)
        cuts = [self.rng.randrange(size) for _ in range(self.rng.randint(0, 40))]
        headers = [("Stripe-Signature", f"t=1,v1={self.hex64()}")]
        data = http(raw, headers, framing="chunked", chunks=cuts)
        return Case("oversized (chunked)", data, TOO_LARGE, may_close=True)

    def k_small_chunked(self) -> Case:
        raw = self.event()
        cuts = [self.rng.randrange(len(raw)) for _ in range(self.rng.randint(0, 20))]
        headers = [("Stripe-Signature", sign(raw, secret=sh.new_secret()))]
        return Case(
            "chunked, wrong secret", http(raw, headers, framing="chunked", chunks=cuts), BAD_REQUEST
        )

    def k_oversized_without_signature(self) -> Case:
        raw = b"{" * self.rng.randint(LIMIT + 1, 2 * LIMIT)
        return Case("oversized, no signature", http(raw), frozenset({400, 413}), may_close=True)

    def k_gzip_bomb(self) -> Case:
        # the ingress inflates no body: an encoded one is refused from its head alone
        headers = [("Stripe-Signature", sign(self.bomb)), ("Content-Encoding", "gzip")]
        return Case("gzip bomb", http(self.bomb, headers), UNSUPPORTED, may_close=True)

    def k_content_encoding(self) -> Case:
        encodings = ["gzip", "deflate", "br", "zstd", "identity", "bogus", "gzip, gzip"]
        raw = self.event()
        body = self.rng.choice([self.rng.randbytes(self.rng.randint(1, 500)), gzip.compress(raw)])
        # a compressed event signed over its inflated bytes: not the bytes that came
        signature = self.rng.choice([f"t=1,v1={self.hex64()}", sign(raw)])
        encoding = self.rng.choice(encodings)
        headers = [("Stripe-Signature", signature), ("Content-Encoding", encoding)]
        # identity is no encoding: then the bytes that came are checked, and fail
        expected = BAD_REQUEST if encoding == "identity" else UNSUPPORTED
        return Case("content encoding", http(body, headers), expected, may_close=True)

    # wrong content types

    def k_content_type(self) -> Case:
        content_type = self.rng.choice(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=----hostile",
                "application/json; charset=utf-16",
                "application/octet-stream",
                "*/*",
                "application/xml",
                self.text(1, 60),
            ]
        )
        raw = self.rng.choice([self.event(), b"id=evt_1&type=x&object=event", b"<event/>"])
        # the ingress accepts a signed event whatever its content type: sign events wrongly
        secret = sh.new_secret() if raw in self.events else SECRET
        signature = sign(raw, secret=secret)
        headers = [("Content-Type", content_type), ("Stripe-Signature", signature)]
        return Case("wrong content type", http(raw, headers), BAD_REQUEST, may_close=True)

    # header tricks

    def k_duplicate_signature_headers(self) -> Case:
        raw = self.event()
        bad = self.rng.choice(["garbage", sign(raw, secret=sh.new_secret()), ""])
        headers = [("Stripe-Signature", bad), ("Stripe-Signature", sign(raw))]
        return Case("duplicate Stripe-Signature", http(raw, headers), BAD_REQUEST)

    def k_many_headers(self) -> Case:
        n = self.rng.randint(50, 400)
        headers = [(f"X-Hostile-{i}", self.hex64()[: self.rng.randint(0, 64)]) for i in range(n)]
        headers.append(("Stripe-Signature", "t=1,v1=00"))
        self.rng.shuffle(headers)
        return Case("many headers", http(self.event(), headers), HEADER_REFUSED, may_close=True)

    def k_long_header_line(self) -> Case:
        long = "x" * self.rng.randint(8191, 40_000)
        headers = self.rng.choice([[(long, "1")], [("X-Long", long)], [("Stripe-Signature", long)]])
        data = http(self.event(), headers)
        return Case("very long header line", data, HEADER_REFUSED, may_close=True, alone=True)

    def k_bad_header_name(self) -> Case:
        name = self.rng.choice(["Bad Name", "X-\x01", "X:Y", "Ünïcode", "(x)", " X", "X\x7f"])
        headers = [(name, "v"), ("Stripe-Signature", "t=1,v1=00")]
        data = http(self.event(), headers)
        return Case("bad header name", data, BAD_REQUEST, may_close=True, alone=True)

    def k_header_framing(self) -> Case:
        raw = self.event()
        sig = f"Stripe-Signature: t=1,v1={self.hex64()}\r\n".encode()
        head = b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + sig
        data = self.rng.choice(
            [
                head + b"X-Folded: a\r\n  b\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw,
                head + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % 5,
                head + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
                head
                + b"Content-Length: "
                + self.rng.choice([b"abc", b"-1", b"1, 2", b"+5", b"0x10", b"9" * 30])
                + b"\r\n\r\n{}",
                head + b"Transfer-Encoding: bogus\r\n\r\n0\r\n\r\n",
                head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n",
                head + b"X-A: a\nX-B: b\r\nContent-Length: 0\r\n\r\n",
                head + b"X-A: a\rX-B: b\r\nContent-Length: 0\r\n\r\n",
                head + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (LIMIT * 4),
                head + b"Expect: hostile\r\nContent-Length: 2\r\n\r\n{}",
            ]
        )
        return Case("header framing", data, frozenset({400, 413, 417}), may_close=True, alone=True)

    # methods, targets, not HTTP at all

    def k_wrong_method(self) -> Case:
        method = self.rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
        data = http(self.event(), [("Stripe-Signature", "t=1,v1=00")], method=method)
        return Case("wrong method", data, frozenset({405}))

    def k_wrong_target(self) -> Case:
        target = self.rng.choice(
            [
                URL + "/",
                URL.upper(),
                URL + "/x",
                "/webhooks",
                "/",
                "/healthz",
                "/metrics",
                "/readyz",
                "/%zz",
                "/" + "a" * self.rng.randint(100, 4000),
                "http://127.0.0.1" + URL,
                URL + "?" + "x=" * self.rng.randint(1, 1000),
                URL + "#frag",
            ]
        )
        data = http(self.event(), [("Stripe-Signature", "t=1,v1=00")], target=target)
        return Case("wrong target", data, frozenset({400, 404, 405}), may_close=True)

    def k_not_http(self) -> Case:
        rng = self.rng
        data = rng.choice(
            [
                self.header_bytes(1, 2000) + b"\r\n\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(40) + b"\r\n\r\n",
                b"POST "
                + URL.encode()
                + b" HTTP/"
                + rng.choice([b"1.2", b"3.0", b"x"])
                + b"\r\n\r\n",
                b"FOO " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST " + URL.encode() + b"\r\n\r\n",
            ]
        )
        return Case("not HTTP", data, BAD_REQUEST, may_close=True, alone=True)


_HEADER_BYTES = [b for b in range(256) if b not in (0x0A, 0x0D)]


@dataclass
class Tally:
    statuses: Counter[tuple[str, int | None]]
    failures: list[str]
    elapsed_s: float

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> str:
        by_kind: dict[str, Counter[int | None]] = {}
        for (kind, status), count in self.statuses.items():
            by_kind.setdefault(kind, Counter())[status] += count
        lines = [f"{self.total} requests in {self.elapsed_s:.1f}s"]
        for kind in sorted(by_kind):
            answers = ", ".join(
                f"{'closed' if s is None else s}: {n}" for s, n in by_kind[kind].most_common()
            )
            lines.append(f"  {kind}: {answers}")
        return "\n".join(lines)


async def fire(port: int, cases: Iterable[Case], concurrency: int = CONCURRENCY) -> Tally:
    """Send every case over ``concurrency`` connections; judge each answer."""
    statuses: Counter[tuple[str, int | None]] = Counter()
    failures: list[str] = []
    pending = iter(cases)
    started = time.perf_counter()

    async def connection() -> None:
        client = RawClient(port)
        try:
            for case in pending:
                status = await client.send(case.data, alone=case.alone)
                statuses[case.kind, status] += 1
                if status is None and case.may_close:
                    continue
                if status is None or status not in case.expect:
                    failures.append(
                        f"{case.kind}: got {status}, expected {sorted(case.expect)}"
                        f"{' or a close' if case.may_close else ''}: {case.data[:300]!r}"
                    )
        finally:
            await client.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return Tally(statuses, failures, time.perf_counter() - started)


def assert_all_refused(tally: Tally) -> None:
    assert tally.total >= REQUESTS
    five_hundreds = [f for f in tally.failures if ": got 5" in f]
    assert not five_hundreds, f"{len(five_hundreds)} answers were 5xx:\n" + "\n".join(
        five_hundreds[:20]
    )
    assert not tally.failures, f"{len(tally.failures)} unexpected answers:\n" + "\n".join(
        tally.failures[:20]
    )


async def slow_client(
    port: int, head: bytes, parts: Sequence[bytes], gap_s: float, *, wait_close: bool = True
) -> tuple[int, float, float]:
    """Send ``head``, then ``parts`` ``gap_s`` apart, then stall.

    The answer's status, the seconds until the server closed the connection after it (0 if
    not ``wait_close``) and the seconds until the answer.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(head)

    async def trickle() -> None:
        for part in parts:
            await asyncio.sleep(gap_s)
            writer.write(part)
            await writer.drain()

    feeding = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(READ_TIMEOUT_S + 5):
            status, _ = await read_answer(reader)
            elapsed = time.monotonic() - started
            if wait_close:
                try:
                    assert await reader.read() == b""
                except ConnectionResetError:
                    pass  # closed while our trickle was still arriving: reset, also closed
        return status, (time.monotonic() - started if wait_close else 0.0), elapsed
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await feeding
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def slow_head(framing: bytes, *, signature: bool = True) -> bytes:
    sig = f"Stripe-Signature: t={int(time.time())},v1={'0' * 64}\r\n" if signature else ""
    return f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\n{sig}".encode() + framing + b"\r\n"
