"""Admission control (sans-I/O): who is the client, and may it open one more connection.

The client's address is the TCP peer's, unless that peer is one of the configured
trusted proxies: then it is read from the proxy's header (``X-Forwarded-For`` or RFC
7239 ``Forwarded``), walking the list of hops from the right — each proxy appends the
address it received the request from — past every trusted proxy, to the first address
that is not one. Entries further left were written by the client itself and are never
believed; a header that arrives straight from an untrusted peer is ignored altogether.

Limits are per client key: an IPv4 address, or an IPv6 /64 network (one subscriber
usually holds a whole /64, so counting single IPv6 addresses would be no limit at all).
Two limits apply, both checked before the WebSocket is accepted:

- at most `max_per_ip` connections open at once;
- new connections at `rate` per second on average, in bursts of `burst` (a token
  bucket; refused attempts take no token, so a client that backs off gets back in).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

__all__ = ["Admission", "Decision", "Refusal", "TrustedProxies", "client_key", "network_key"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_ip(text: str) -> IPAddress | None:
    """An address from a header or scope entry: quotes, brackets and ports removed;
    None for anything that is not an IP address (``unknown``, ``_hidden``, garbage)."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_key(address: str) -> str:
    """The key limits count under: the IPv4 address, or the IPv6 address's /64."""
    parsed = _parse_ip(address)
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return _same_or(address, parsed)


def network_key(address: str) -> str | None:
    """The network `address` belongs to, as the detached-session cap tells holders
    apart: its IPv4 /24 or its IPv6 /48 (None for anything that is not an address)."""
    parsed = _parse_ip(address)
    if parsed is None:
        return None
    prefix = 48 if isinstance(parsed, ipaddress.IPv6Address) else 24
    return str(ipaddress.ip_network((parsed, prefix), strict=False))


def _same_or(text: str, address: IPAddress) -> str:
    """`address` as text: `text` itself when it is already that (one string per
    connection, not two copies of it)."""
    canonical = str(address)
    return text if canonical == text else canonical


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of an RFC 7239 ``Forwarded`` header, left to right (an
    element without one yields an empty string, which is not an address)."""
    hops = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            name, _, content = pair.partition("=")
            if name.strip().lower() == "for":
                found = content.strip()
        hops.append(found)
    return hops


class TrustedProxies:
    """Which peers may tell the client's address, and in which header.

    Args:
        proxies: IP addresses or networks (``"10.0.0.0/8"``) of the reverse proxies, and
            ``"unix"`` for a proxy on a Unix socket (a peer without an address).
        header: ``"x-forwarded-for"`` or ``"forwarded"`` (RFC 7239).

    Raises:
        ValueError: if an entry is not an address or network, or the header is unknown.
    """

    __slots__ = ("_header", "_networks", "_unix")

    def __init__(self, proxies: Iterable[str], header: str = "x-forwarded-for") -> None:
        header = header.lower()
        if header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(f"proxy_header must be 'x-forwarded-for' or 'forwarded', "
                             f"got {header!r}")
        self._header = header
        networks = []
        self._unix = False
        for proxy in proxies:
            if proxy.strip().lower() == "unix":
                self._unix = True
                continue
            try:
                networks.append(ipaddress.ip_network(proxy.strip(), strict=False))
            except ValueError:
                raise ValueError(f"trusted_proxies: not an IP address or network: "
                                 f"{proxy!r}") from None
        self._networks = tuple(networks)

    def trusts(self, address: IPAddress | None) -> bool:
        """True if `address` is one of the trusted proxies."""
        return address is not None and any(address in net for net in self._networks)

    def client_address(self, peer: str | None,
                       headers: Mapping[str, str] | list[str] | Callable[[], list[str]]
                       ) -> str:
        """The client's address, given the TCP peer's and the request's header values.

        Args:
            peer: the TCP peer's address (None for a Unix socket).
            headers: every value of the configured header, in order (a list, or a
                function returning it: called only for a trusted peer), or a mapping
                from which the configured header is read (one value).
        """
        peer_ip = None if peer is None else _parse_ip(peer)
        unix_proxy = peer is None and self._unix
        if not unix_proxy and not self.trusts(peer_ip):
            if peer_ip is None:
                return peer or "unknown"
            assert peer is not None
            return _same_or(peer, peer_ip)
        if callable(headers):
            headers = headers()
        if isinstance(headers, list):
            values = headers
        else:
            single = headers.get(self._header)
            values = [] if single is None else [single]
        hops: list[str] = []
        for value in values:
            hops.extend(_forwarded_for(value) if self._header == "forwarded"
                        else value.split(","))
        current = peer_ip
        for hop in reversed(hops):
            address = _parse_ip(hop)
            if address is None:
                break  # not an address: the hop that wrote it is the best we know
            current = address
            if not self.trusts(address):
                break
        return "unknown" if current is None else str(current)


class Refusal(str, Enum):
    """Why admission refused a connection (also the metrics label)."""

    IP_LIMIT = "ip_limit"
    IP_RATE = "ip_rate"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one connection attempt.

    Attributes:
        refusal: None if admitted, else why not.
        retry_after: seconds after which an attempt would be admitted by the rate
            limit (whole seconds, at least 1), for a ``Retry-After`` header.
    """

    refusal: Refusal | None = None
    retry_after: int = 1


_ADMITTED = Decision()


class Admission:
    """Per-client connection counts and connection-rate buckets.

    Memory is bounded by the clients seen recently: a client's count is forgotten when
    it reaches zero, and its bucket once it would be full again.

    Args:
        max_per_ip: connections a client key may hold at once, or None.
        rate: new connections per second per client key, or None.
        burst: new connections a client key may open at once.
    """

    __slots__ = ("_buckets", "_next_sweep", "_open", "burst", "max_per_ip", "rate")

    def __init__(self, max_per_ip: int | None, rate: float | None, burst: int) -> None:
        if (max_per_ip is not None and max_per_ip < 1) or (rate is not None and not rate > 0
                                                           ) or burst < 1:
            raise ValueError("admission limits must be positive")
        self.max_per_ip = max_per_ip
        self.rate = rate
        self.burst = burst
        self._open: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._next_sweep = 1024

    def open_count(self, key: str) -> int:
        """Connections currently admitted for `key`."""
        return self._open.get(key, 0)

    def __len__(self) -> int:
        """Client keys remembered (open counts and rate buckets)."""
        return len(self._open.keys() | self._buckets.keys())

    def admit(self, key: str, now: float) -> Decision:
        """Account for a connection attempt by `key` at `now` (a monotonic clock); if
        admitted, the caller must `release` it when the connection ends."""
        if self.max_per_ip is not None and self._open.get(key, 0) >= self.max_per_ip:
            return Decision(Refusal.IP_LIMIT, retry_after=1)
        if self.rate is not None:
            tokens = self._tokens(key, now)
            if tokens < 1 - 1e-9:
                wait = (1 - tokens) / self.rate
                return Decision(Refusal.IP_RATE, retry_after=max(1, math.ceil(wait)))
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) >= self._next_sweep:
                self._sweep(now)
        self._open[key] = self._open.get(key, 0) + 1
        return _ADMITTED

    def release(self, key: str) -> None:
        """A connection admitted for `key` ended."""
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def _tokens(self, key: str, now: float) -> float:
        state = self._buckets.get(key)
        if state is None:
            return float(self.burst)
        tokens, at = state
        assert self.rate is not None
        return min(float(self.burst), tokens + max(0.0, now - at) * self.rate)

    def _sweep(self, now: float) -> None:
        """Forget the buckets that have refilled (amortized: the next sweep waits
        until the table has doubled)."""
        full = [key for key in self._buckets if self._tokens(key, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        self._next_sweep = max(1024, 2 * len(self._buckets))
