"""The Checkout routes' HTML pages and the headers every answer of the ingress carries.

A page's only style is inline and allowed by its hash in a strict Content-Security-Policy;
no page has a script. Pages may not be framed (clickjacking a Checkout button), send no
Referer (a signed link in the URL stays ours), and are not cached (they name a customer's
order or carry their link).
"""

from __future__ import annotations

import base64
import hashlib
import html
import math

from aiohttp import web

STYLE = "body{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto}"
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()

# No form-action: the Checkout form's answer redirects to Stripe's page, and browsers hold
# a form's redirects to form-action too.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page(title: str, body: str, status: int = 200) -> web.Response:
    """A page: ``title`` is escaped here, ``body`` is HTML its caller escaped."""
    text = f"""<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    return web.Response(text=text, status=status, content_type="text/html", headers=PAGE_HEADERS)


def too_many_requests(wait_s: float) -> web.Response:
    """429 with Retry-After: this client asked for more than its share."""
    seconds = max(1, math.ceil(wait_s))
    response = page(
        "Too many requests",
        f"<p>Please wait {seconds} second{'s' if seconds != 1 else ''} and try again.</p>",
        status=429,
    )
    response.headers["Retry-After"] = str(seconds)
    return response


async def nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, the webhook's JSON too: browsers take its Content-Type as it is."""
    response.headers["X-Content-Type-Options"] = "nosniff"
