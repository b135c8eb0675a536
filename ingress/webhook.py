"""POST /webhooks/stripe: read the body within its limits, verify it, publish it, and
answer 200 only once the broker confirmed it; every refusal counted and (sampled) logged."""

from __future__ import annotations

import asyncio

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from ingress import metrics
from ingress.guards import BodyAllowance, ReplayGuard
from ingress.keys import BUDGET, PUBLISHER, REPLAYS, SETTINGS
from ingress.settings import IngressSettings
from ingress.signature import InvalidSignature, verify
from shared.envelope import EventEnvelope
from shared.errors import BrokerUnavailable, MalformedEvent
from shared.logging import LogSampler, get_logger

log = get_logger(__name__)

_ACCEPTED = b'{"received":true}'


# A flood of bad requests (a wrong secret after a rotation, a scanner) must not become a
# flood of log lines, costly to render: one line per second per reason. Keys are our own
# reason codes: bounded.
_REJECTIONS_LOGGED = LogSampler(interval_s=1.0)


class Rejected(Exception):
    """Raised when a webhook request is refused; carries the HTTP answer."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": code, "message": message}}, status=status)


def _too_large(limit: int) -> Rejected:
    return Rejected(413, "body_too_large", f"body is over {limit} bytes", close=True)


async def read_body(
    request: web.Request, settings: IngressSettings, allowance: BodyAllowance | None = None
) -> bytes:
    """The raw body, refusing it (413) once it is over the limit (a declared length over it
    was refused before: ``_refuse_before_body``), (408) when too slow and (503) when the
    bodies being received at once are over ``allowance``'s budget."""
    limit = settings.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    try:
        if request.content.is_eof():
            # The whole body came with the headers (a webhook usually does): nothing to
            # wait for, so no timer: setting one up is a visible part of a request's cost.
            body = request.content.read_nowait(-1)
            if len(body) > limit:
                raise _too_large(limit)
            return body
        async with asyncio.timeout(settings.read_timeout_s):
            while chunk := await request.content.read(65536):
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                if allowance is not None and not allowance.cover(size):
                    raise Rejected(
                        503,
                        "overloaded",
                        "too many request bodies in flight, retry later",
                        close=True,
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise Rejected(
            408,
            "read_timeout",
            f"body not received within {settings.read_timeout_s:g}s",
            close=True,
        ) from None
    except ConnectionResetError:
        # the client went away mid-upload (aiohttp's "Connection lost"): nobody to answer,
        # but counted and logged as a refusal is, not as an error with a traceback each
        raise Rejected(
            499,  # nginx's "client closed request": nothing is sent, the log line says so
            "client_disconnected",
            "the client closed the connection before its body was received",
            close=True,
        ) from None
    except (web.RequestPayloadError, HttpProcessingError):
        # The body itself is broken (bad chunked framing after the headers: aiohttp's
        # pure-Python parser raises TransferEncodingError, its C parser lets the read time
        # out): the client's fault, not a 500, and nothing more is read from it, or aiohttp
        # would meet the same error after the answer and log it as unhandled.
        request.content.feed_eof()
        raise Rejected(
            400,
            "malformed_body",
            "body could not be read (bad chunked or content encoding)",
            close=True,
        ) from None
    return b"".join(chunks)


def _refusal(exc: Rejected, settings: IngressSettings) -> web.Response:
    """The answer to a refused request, counted and (sampled) logged."""
    metrics.REQUESTS.labels(exc.code).inc()
    left_out = _REJECTIONS_LOGGED.admit(exc.code)
    if left_out is not None:
        log.warning(
            "webhook rejected",
            status=exc.status,
            reason=exc.code,
            detail=exc.message,
            similar_not_logged=left_out or None,
        )
    response = error_response(exc.status, exc.code, exc.message)
    if exc.status == 503:
        response.headers["Retry-After"] = str(settings.retry_after_s)
    if exc.close:
        response.force_close()
    return response


def _refuse_before_body(request: web.Request, settings: IngressSettings) -> str:
    """What the head alone shows to be refused; else the Stripe-Signature header."""
    header = request.headers.get("Stripe-Signature")
    if not header:
        raise Rejected(400, "missing_signature", "Stripe-Signature header is missing")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        # Stripe signs and sends the body as is; an encoded one could not be verified as
        # sent, nor forwarded as Stripe signed it (the server does not decode bodies)
        raise Rejected(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {encoding[:40]!r} is not accepted: send the body unencoded",
            close=True,
        )
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    return header


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: refuse what the head shows to be refused before inviting
    the client to send the body (aiohttp's default says 100 Continue to every request)."""
    settings = request.app[SETTINGS]
    try:
        _refuse_before_body(request, settings)
        if request.version == HttpVersion11:
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise Rejected(417, "expectation_failed", "only Expect: 100-continue is understood")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
    except Rejected as exc:
        response = _refusal(exc, settings)
        # the client may send the body all the same: on this connection it would be read
        # as the next request, so the connection ends with the answer
        response.force_close()
        return response
    return None


async def receive_webhook(request: web.Request) -> web.StreamResponse:
    """POST /webhooks/stripe: verify, then answer 200 only once the broker confirmed."""
    settings = request.app[SETTINGS]
    metrics.IN_FLIGHT.inc()
    try:
        event, outcome = await _accept(request, settings)
    except Rejected as exc:
        return _refusal(exc, settings)
    finally:
        metrics.IN_FLIGHT.dec()
    metrics.REQUESTS.labels(outcome).inc()
    # DEBUG, not INFO: a line per event is costly at thousands per second, and the worker
    # logs every event it handles while the metrics count what was queued here.
    log.debug(
        "webhook queued" if outcome == "accepted" else "webhook replayed, not queued again",
        event_id=event.id,
        event_type=event.type,
        livemode=event.livemode,
    )
    return web.Response(body=_ACCEPTED, content_type="application/json")


async def _accept(request: web.Request, settings: IngressSettings) -> tuple[EventEnvelope, str]:
    """The event and its outcome (accepted, or replay: queued before, not again)."""
    header = _refuse_before_body(request, settings)
    allowance = BodyAllowance(request.app[BUDGET])
    try:
        return await _verify_and_publish(request, settings, header, allowance)
    finally:
        allowance.release()  # held until published: the body is in memory until then


async def _verify_and_publish(
    request: web.Request, settings: IngressSettings, header: str, allowance: BodyAllowance
) -> tuple[EventEnvelope, str]:
    raw = await read_body(request, settings, allowance)
    try:
        signed_at = verify(raw, header, settings.webhook_secrets, settings.tolerance_s)
    except InvalidSignature as exc:
        raise Rejected(400, exc.code, exc.message) from None
    try:
        event = EventEnvelope.parse(raw)
    except MalformedEvent as exc:
        raise Rejected(400, "malformed_event", str(exc)) from None
    replays, key = request.app[REPLAYS], ReplayGuard.key(signed_at, raw)
    if replays.seen(key):
        return event, "replay"
    try:
        await request.app[PUBLISHER].publish(raw, event)
    except BrokerUnavailable as exc:
        raise Rejected(503, "broker_unavailable", f"event not queued, retry later: {exc}") from None
    replays.remember(key)
    return event, "accepted"
