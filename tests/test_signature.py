"""Stripe-Signature verification, and our test signer checked against stripe-python's."""

from __future__ import annotations

import time

import pytest
import stripe

from devkit import signing as sh
from ingress.signature import InvalidSignature, verify

TOLERANCE_S = 300
SECRET = sh.new_secret()
PAYLOAD = sh.body(sh.event())


def refused(payload: bytes, header: str | None, secrets: tuple[str, ...] = (SECRET,)) -> str:
    """The refusal code verify gives (failing the test if it accepts)."""
    with pytest.raises(InvalidSignature) as caught:
        verify(payload, header, secrets, TOLERANCE_S)
    assert caught.value.message == str(caught.value)
    return caught.value.code


def test_a_body_signed_with_the_one_configured_secret_is_accepted() -> None:
    verify(PAYLOAD, sh.signature_header(PAYLOAD, SECRET), (SECRET,), TOLERANCE_S)


def test_a_header_with_two_v1_signatures_is_accepted_when_either_matches() -> None:
    header = sh.signature_header(PAYLOAD, [sh.new_secret(), SECRET])

    assert header.count("v1=") == 2
    verify(PAYLOAD, header, (SECRET,), TOLERANCE_S)


def test_a_signature_by_the_second_configured_secret_is_accepted() -> None:
    old, new = sh.new_secret(), sh.new_secret()

    verify(PAYLOAD, sh.signature_header(PAYLOAD, new), (old, new), TOLERANCE_S)


def test_unknown_schemes_and_items_in_the_header_are_ignored() -> None:
    header = sh.signature_header(PAYLOAD, SECRET) + ",v0=6ffbb59b2300aae63f27,x"

    verify(PAYLOAD, header, (SECRET,), TOLERANCE_S)


def test_a_timestamp_slightly_in_the_future_within_the_tolerance_is_accepted() -> None:
    header = sh.signature_header(PAYLOAD, SECRET, timestamp=int(time.time()) + 60)

    verify(PAYLOAD, header, (SECRET,), TOLERANCE_S)


def test_a_tampered_body_is_refused_as_an_invalid_signature() -> None:
    header = sh.signature_header(PAYLOAD, SECRET)
    tampered = PAYLOAD.replace(b'"livemode": false', b'"livemode": true')

    assert tampered != PAYLOAD
    assert refused(tampered, header) == "invalid_signature"
    assert refused(PAYLOAD + b"\n", header) == "invalid_signature"


def test_a_signature_by_a_secret_not_configured_is_refused_as_an_invalid_signature() -> None:
    header = sh.signature_header(PAYLOAD, sh.new_secret())

    assert refused(PAYLOAD, header, (SECRET, sh.new_secret())) == "invalid_signature"


def test_a_signature_over_another_timestamp_is_refused_as_an_invalid_signature() -> None:
    now = int(time.time())
    signature = sh.signature_header(PAYLOAD, SECRET, timestamp=now).split(",", 1)[1]

    assert refused(PAYLOAD, f"t={now - 1},{signature}") == "invalid_signature"


@pytest.mark.parametrize("header", [None, ""])
def test_a_missing_header_is_refused_as_a_missing_signature(header: str | None) -> None:
    assert refused(PAYLOAD, header) == "missing_signature"


def _v1() -> str:
    return sh.signature_header(PAYLOAD, SECRET).split(",", 1)[1]


@pytest.mark.parametrize(
    "make_header",
    [
        pytest.param(lambda: "garbage", id="no-items"),
        pytest.param(lambda: ",,,", id="only-commas"),
        pytest.param(lambda: f"t={int(time.time())}", id="no-v1"),
        pytest.param(lambda: f"t={int(time.time())},v1=", id="empty-v1"),
        pytest.param(lambda: f"t={int(time.time())},v0=abcdef", id="only-another-scheme"),
        pytest.param(lambda: _v1(), id="no-timestamp"),
        pytest.param(lambda: f"t=,{_v1()}", id="empty-timestamp"),
        pytest.param(lambda: f"t=abc,{_v1()}", id="non-numeric-timestamp"),
        pytest.param(lambda: f"t={time.time()},{_v1()}", id="fractional-timestamp"),
        pytest.param(lambda: f"T={int(time.time())},{_v1()}", id="upper-case-t"),
        pytest.param(lambda: f"t {int(time.time())} {_v1()}", id="spaces-not-commas"),
    ],
)
def test_a_malformed_header_is_refused_as_a_malformed_signature(make_header) -> None:  # type: ignore[no-untyped-def]
    assert refused(PAYLOAD, make_header()) == "malformed_signature"


def test_a_correctly_signed_but_stale_timestamp_is_refused_as_out_of_tolerance() -> None:
    header = sh.signature_header(PAYLOAD, SECRET, timestamp=int(time.time()) - TOLERANCE_S - 5)

    assert refused(PAYLOAD, header) == "timestamp_out_of_tolerance"
    assert refused(PAYLOAD, header, (sh.new_secret(), SECRET)) == "timestamp_out_of_tolerance"


def test_a_stale_timestamp_signed_by_an_unknown_secret_is_refused_as_an_invalid_signature() -> None:
    header = sh.signature_header(
        PAYLOAD, sh.new_secret(), timestamp=int(time.time()) - TOLERANCE_S - 5
    )

    assert refused(PAYLOAD, header) == "invalid_signature"


def test_a_correctly_signed_timestamp_beyond_the_tolerance_in_the_future_is_refused() -> None:
    header = sh.signature_header(PAYLOAD, SECRET, timestamp=int(time.time()) + TOLERANCE_S + 60)

    with pytest.raises(InvalidSignature, match="future") as caught:
        verify(PAYLOAD, header, (SECRET,), TOLERANCE_S)
    assert caught.value.code == "timestamp_out_of_tolerance"


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe{}", b'{"id": "evt_\xc3"}', b"\xed\xa0\x80"],
    ids=["bom-like-bytes", "truncated-sequence", "encoded-surrogate"],
)
def test_a_body_that_is_not_utf8_is_refused_even_when_its_bytes_are_signed(
    payload: bytes,
) -> None:
    assert refused(payload, sh.signature_header(payload, SECRET)) == "invalid_signature"


# --- our test signer signs exactly like Stripe ------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        PAYLOAD,
        b"",
        b'{"object": "event", "note": "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x8e\x89"}',
        b"line one\r\nline two\n",
    ],
    ids=["event", "empty", "non-ascii", "newlines"],
)
@pytest.mark.parametrize("timestamp", [1_700_000_000, 0, 4_102_444_800])
def test_the_test_signer_produces_the_header_stripe_python_generates(
    payload: bytes, timestamp: int
) -> None:
    ours = sh.signature_header(payload, SECRET, timestamp=timestamp)
    stripes = stripe.WebhookSignature.generate_signature_header(
        payload.decode("utf-8"), SECRET, timestamp=timestamp
    )

    assert ours == stripes


def test_stripe_python_accepts_headers_from_the_test_signer_for_every_secret_in_them() -> None:
    other = sh.new_secret()
    header = sh.signature_header(PAYLOAD, [other, SECRET])

    for secret in (SECRET, other):
        assert stripe.WebhookSignature.verify_header(PAYLOAD, header, secret, TOLERANCE_S)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(PAYLOAD, header, sh.new_secret(), TOLERANCE_S)


def test_verify_accepts_a_header_generated_by_stripe_python() -> None:
    header = stripe.WebhookSignature.generate_signature_header(PAYLOAD.decode(), SECRET)

    verify(PAYLOAD, header, (SECRET,), TOLERANCE_S)
