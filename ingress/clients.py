"""Who a request comes from, for per-client limits: the peer, or what a trusted proxy says.

As uvicorn and gunicorn do with ``FORWARDED_ALLOW_IPS``: ``X-Forwarded-For`` is read only
when the peer is a proxy named there, and then the client is its right-most entry that is
not itself a trusted proxy (each proxy appends the address it saw, so entries to the left
of that one are whatever the client chose to send). Without trusted proxies the header is
ignored, so rotating it changes nothing. ``*`` trusts every peer, and then the last entry
(what that peer appended) is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# An IPv6 client is limited by its /64: one host is usually given a whole /64, so
# counting single addresses would let it take a fresh bucket per address.
IPV6_CLIENT_PREFIX = 64
_MAX_ENTRY_CHARS = 64


def parse_trusted(entries: Sequence[str]) -> tuple[IPNetwork, ...] | None:
    """The networks of ``FORWARDED_ALLOW_IPS`` entries (addresses or CIDR blocks); None for
    ``*`` (every peer trusted). ValueError naming the first entry that is neither."""
    if "*" in entries:
        return None
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or a CIDR block") from None
    return tuple(networks)


class ClientAddress:
    """Finds the client of a request from its peer and its ``X-Forwarded-For`` headers."""

    def __init__(self, trusted: tuple[IPNetwork, ...] | None = ()) -> None:
        self._trusted = trusted  # None: every address

    @property
    def reads_forwarded(self) -> bool:
        return self._trusted is None or bool(self._trusted)

    def _trusts(self, address: IPAddress | None) -> bool:
        if self._trusted is None:
            return True
        return address is not None and any(address in net for net in self._trusted)

    def of(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> str:
        """The client's key: its address (an IPv6 one as its /64), or the raw entry a
        trusted proxy gave when that is no address."""
        address = _address(peer or "")
        if not self.reads_forwarded or not forwarded_for or not self._trusts(address):
            return _key(address, peer or "unknown")
        hops = [h.strip() for header in forwarded_for for h in header.split(",") if h.strip()]
        if not hops:
            return _key(address, peer or "unknown")
        if self._trusted is None:
            # "*": any peer is the proxy, and what it appended (the last entry) is the
            # client; uvicorn takes the first, which a client can write itself
            return _key(_address(hops[-1]), hops[-1])
        for hop in reversed(hops):
            hop_address = _address(hop)
            if not self._trusts(hop_address):
                return _key(hop_address, hop)
        # every hop a trusted proxy: the client is inside; the left-most, as uvicorn has it
        return _key(_address(hops[0]), hops[0])


def _address(text: str) -> IPAddress | None:
    """An address from a peer or a forwarded entry, which may carry a port
    (``1.2.3.4:5678``, ``[2001:db8::1]:443``)."""
    text = text[:_MAX_ENTRY_CHARS]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text.startswith("["):
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        host = text.partition(":")[0]
    else:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _key(address: IPAddress | None, raw: str) -> str:
    if address is None:
        return raw[:_MAX_ENTRY_CHARS]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False)
        return str(network)
    return str(address)
