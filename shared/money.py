"""Amounts as people read them: the worker's emails and the Checkout page both show them."""

from __future__ import annotations

# Stripe's amounts are in the currency's minor unit: whole units for its zero-decimal
# currencies, thousandths for its three-decimal ones, hundredths for all others.
ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())


def format_amount(amount: int, currency: str) -> str:
    code, lower = currency.upper(), currency.lower()
    if lower in ZERO_DECIMAL:
        return f"{amount:,} {code}"
    if lower in THREE_DECIMAL:
        return f"{amount / 1000:,.3f} {code}"
    return f"{amount / 100:,.2f} {code}"
