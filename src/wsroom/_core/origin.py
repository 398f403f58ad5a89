"""The Origin allowlist (sans-I/O): which web pages may open a WebSocket to the hub.

Browsers send the page's origin (``scheme://host[:port]``) with every WebSocket upgrade,
and a page cannot forge it; WebSocket upgrades are not covered by the same-origin policy,
so without this check any site a user visits can connect as that user (cross-site
WebSocket hijacking, see OWASP's WebSocket cheat sheet). Matching is exact, on the
normalized origin: no prefixes, suffixes, substrings or wildcards, the usual pitfalls of
hand-written checks (``evil-example.com``, ``example.com.evil.net``). A request without
an Origin header is not from a browser page, and is allowed: clients outside a browser
can send any header anyway, so they are authenticated, not origin-checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["OriginPolicy", "normalize_origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str:
    """Return `origin` as ``scheme://host[:port]``, lower case, without a default port.

    Raises:
        ValueError: if it is not an http(s) origin (a path, a query, user info...).
    """
    problem = ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
    try:
        parts = urlsplit(origin.strip())
        port = parts.port  # a bad port raises ValueError
    except ValueError:
        raise problem from None
    scheme = parts.scheme.lower()
    if (scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None
            or parts.password is not None or parts.path not in ("", "/") or parts.query
            or parts.fragment):
        raise problem
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else (
        f"{scheme}://{host}:{port}")


class OriginPolicy:
    """An exact allowlist of origins.

    Args:
        allowed: origins such as ``"https://game.example.com"``.

    Raises:
        ValueError: if one is not an http(s) origin.
    """

    __slots__ = ("_allowed",)

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = frozenset(normalize_origin(origin) for origin in allowed)

    def allows(self, origin: str | None) -> bool:
        """True if a request with this Origin header (None: none) may connect."""
        if origin is None:
            return True
        try:
            return normalize_origin(origin) in self._allowed
        except ValueError:
            return False  # "null" (sandboxed pages, file://) and garbage
