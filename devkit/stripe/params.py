"""Stripe's request parameters as stripe-python sends them, its list object and ``expand[]``."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from devkit.stripe.errors import StripeError

MAX_LIMIT = 100
DEFAULT_LIMIT = 10


def list_param(query: Mapping[str, str], name: str) -> list[str]:
    """``name``, ``name[]`` or ``name[0]``, ``name[1]``... (stripe-python sends indexed keys)."""
    indexed: list[tuple[int, str]] = []
    plain: list[str] = []
    pattern = re.compile(re.escape(name) + r"\[(\d*)\]")
    for key, value in query.items():
        if key == name:
            plain.append(value)
        elif match := pattern.fullmatch(key):
            indexed.append((int(match.group(1) or 0), value))
    return plain + [value for _, value in sorted(indexed, key=lambda kv: kv[0])]


def int_param(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise StripeError.invalid(name, f"Invalid integer: {raw}") from None


def bool_param(query: Mapping[str, str], name: str) -> bool | None:
    raw = query.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise StripeError.invalid(name, f"Invalid boolean: {raw}")
    return raw == "true"


def paginate(
    items: Sequence[dict[str, Any]], query: Mapping[str, str], url: str, kind: str
) -> dict[str, Any]:
    """Stripe's list object over ``items`` (already in list order), cursor-paginated by id."""
    limit = int_param(query, "limit")
    limit = DEFAULT_LIMIT if limit is None else limit
    if not 1 <= limit <= MAX_LIMIT:
        raise StripeError.invalid("limit", f"This value must be between 1 and {MAX_LIMIT}.")
    ids = [item["id"] for item in items]

    def position(param: str) -> int:
        cursor = query[param]
        if cursor not in ids:
            raise StripeError.missing(kind, cursor, param)
        return ids.index(cursor)

    if "starting_after" in query:
        rest = list(items[position("starting_after") + 1 :])
        page, has_more = rest[:limit], len(rest) > limit
    elif "ending_before" in query:
        rest = list(items[: position("ending_before")])
        page, has_more = rest[-limit:], len(rest) > limit
    else:
        page, has_more = list(items[:limit]), len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def expand_field(obj: dict[str, Any], path: list[str], lookup: Callable[[str], Any]) -> None:
    """Replace the id at ``path`` (``data`` walks a list's items) with the object it names."""
    if not path:
        return
    key, rest = path[0], path[1:]
    value = obj.get(key)
    if key == "data" and isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                expand_field(item, rest, lookup)
        return
    if isinstance(value, str) and (found := lookup(value)) is not None:
        obj[key] = value = copy.deepcopy(found)
    if isinstance(value, dict):
        expand_field(value, rest, lookup)
