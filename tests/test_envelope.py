"""The routing fields read from an event's body: what is accepted, and what is malformed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.envelope import EventEnvelope
from shared.errors import MalformedEvent


def event(**fields: Any) -> bytes:
    doc = {"object": "event", "id": "evt_1", "type": "checkout.session.completed", "data": {}}
    return json.dumps({**doc, **fields}).encode()


@pytest.mark.parametrize("field", ["id", "type"])
def test_an_id_or_type_of_255_bytes_is_accepted_and_of_256_is_malformed(field: str) -> None:
    """They travel as AMQP short strings (headers, the routing key): 255 bytes at most."""
    longest = "é" * 127 + "x"  # 255 bytes in UTF-8, 128 characters
    assert getattr(EventEnvelope.parse(event(**{field: longest})), field) == longest
    with pytest.raises(MalformedEvent):
        EventEnvelope.parse(event(**{field: "é" * 128}))


@pytest.mark.parametrize("account", ["acct_1Abc\r\nX-Evil: 1", "acct_1Abc/../acct_2", "acct_1 "])
def test_an_account_with_anything_after_its_id_is_malformed(account: str) -> None:
    """It becomes the Stripe-Account header of the worker's API calls, and a message header."""
    with pytest.raises(MalformedEvent):
        EventEnvelope.parse(event(account=account))


@pytest.mark.parametrize("value", ["false", "true", 1, {"x": 1}])
def test_an_event_is_live_only_when_livemode_is_true_itself(value: object) -> None:
    assert EventEnvelope.parse(event(livemode=value)).livemode is False
    assert EventEnvelope.parse(event(livemode=True)).livemode is True


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_though_pythons_parser_reads_them(constant: str) -> None:
    raw = b'{"object": "event", "id": "evt_1", "type": "t", "created": %s}' % constant.encode()

    with pytest.raises(MalformedEvent, match=f"not valid JSON: {constant} is not JSON"):
        EventEnvelope.parse(raw)
