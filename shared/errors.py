"""One error hierarchy: transient errors are retried, permanent ones are not."""

from __future__ import annotations


class FulfillmentError(Exception):
    """Raised when anything in this project fails; the root of every error type here."""


class ConfigError(FulfillmentError):
    """Raised when a setting is missing or malformed; the message names the variable."""


class TransientError(FulfillmentError):
    """Raised when an operation may succeed if tried again later (network, 429/5xx, outage).

    ``retry_after_s``: how long the other side asked us to wait (a ``Retry-After``), if it did.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RetryLater(TransientError):
    """Raised when trying again later may succeed but trying again at once cannot help or
    may do harm (an email whose outcome is unknown, a mail relay that does not answer): the
    in-process retries leave it alone; the delay queues decide."""


class PermanentError(FulfillmentError):
    """Raised when retrying cannot help (malformed input, unknown object, a bug)."""


class MalformedEvent(PermanentError):
    """Raised when a body is not a Stripe event: not JSON, not an object, or missing fields."""


class BrokerUnavailable(TransientError):
    """Raised when the broker cannot take a message now (down, reconnecting, nack, timeout)."""


class Unroutable(BrokerUnavailable):
    """Raised when the broker returned a mandatory publish: no queue is bound for its
    routing key (and the exchange has no alternate exchange to take it)."""


class ConfirmTimeout(BrokerUnavailable):
    """Raised when the broker took a publish but did not confirm it in time (a hung broker,
    or one blocking publishers on a memory or disk alarm): the connection looks fine."""
