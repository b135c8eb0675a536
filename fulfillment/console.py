"""How ``fulfillment up`` speaks: each line prefixed with who said it, as its children's are."""

from __future__ import annotations


def prefix(name: str) -> str:
    return f"{name:<8} | "


def show(name: str, line: str) -> None:
    print(prefix(name) + line, flush=True)


def say(line: str) -> None:
    """A line of ``up``'s own."""
    show("up", line)
