"""The connections of one hub: admission (capacity, per-address limits) and the registry
that the drain waits to see empty."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from enum import Enum

import anyio
from starlette.requests import HTTPConnection

from wsroom._core.admission import Admission, TrustedProxies, client_key
from wsroom._core.config import HubConfig
from wsroom._core.origin import OriginPolicy
from wsroom._core.state import CloseReason
from wsroom._runtime.ports import PeerPort
from wsroom._runtime.stats import Telemetry

__all__ = ["Phase", "Registry"]

log = logging.getLogger("wsroom.hub")


class Phase(Enum):
    """A hub's lifetime: it runs once."""

    IDLE = "idle"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Registry:
    """Who is connected, and who may connect (see the module docstring)."""

    __slots__ = ("_admission", "_config", "_empty", "_peers", "_proxies",
                 "_telemetry", "_warned_unknown", "origins", "phase")

    def __init__(self, config: HubConfig, telemetry: Telemetry) -> None:
        self._config = config
        self._telemetry = telemetry
        self._peers: dict[str, PeerPort] = {}
        self.origins = (None if config.allowed_origins is None
                        else OriginPolicy(config.allowed_origins))
        self._proxies = TrustedProxies(config.trusted_proxies or (), config.proxy_header)
        self._admission = Admission(config.max_connections_per_ip,
                                    config.connect_rate_per_ip, config.connect_burst_per_ip)
        self._warned_unknown = False
        self._empty: anyio.Event | None = None
        self.phase = Phase.IDLE

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[PeerPort]:
        return iter(list(self._peers.values()))

    @property
    def admission(self) -> Admission:
        """The per-address limits (their counters feed the metrics)."""
        return self._admission

    def client_address(self, request: HTTPConnection) -> str:
        peer = request.client.host if request.client is not None else None
        header = self._config.proxy_header
        # The headers only for a trusted proxy: parsed, they would stay with the
        # connection's request for its lifetime.
        return self._proxies.client_address(peer, lambda: request.headers.getlist(header))

    def states(self) -> dict[str, int]:
        """Connections by metrics state: ``handshake`` (before the welcome), ``open``,
        ``closing``."""
        states = dict.fromkeys(("handshake", "open", "closing"), 0)
        for peer in self._peers.values():
            states[peer.metrics_state()] += 1
        return states

    def admit(self, peer: PeerPort) -> tuple[CloseReason, int] | None:
        """Register a new connection, or tell why it must be refused (and after how
        many seconds a retry may succeed)."""
        if self.phase is not Phase.RUNNING:
            if self.phase is Phase.IDLE:
                log.error("connection refused: the hub is not running; pass "
                          "lifespan=hub.lifespan to your app")
                return CloseReason.INTERNAL_ERROR, 0
            return CloseReason.OVER_CAPACITY, 0
        cap = self._config.max_connections
        if cap is not None and len(self._peers) >= cap:
            return CloseReason.OVER_CAPACITY, 0
        key = client_key(peer.client_address)
        if key == "unknown":
            # No address (a Unix socket without a trusted proxy header): every client
            # would share one per-address limit. Not limited; said once.
            if not self._warned_unknown:
                self._warned_unknown = True
                log.warning("a client without an address (a Unix socket?): per-address "
                            "limits do not apply to such clients; see the deploy guide")
            self._peers[peer.id] = peer
            self._telemetry.counters.connections_total += 1
            return None
        decision = self._admission.admit(key, anyio.current_time())
        if decision.refusal is not None:
            return CloseReason(decision.refusal.value), decision.retry_after
        peer.admission_key = key
        self._peers[peer.id] = peer
        self._telemetry.counters.connections_total += 1
        return None

    def forget(self, peer: PeerPort, reason: CloseReason) -> None:
        """Forget `peer` (called once per connection, refused ones too)."""
        if self._peers.pop(peer.id, None) is not None:
            key, peer.admission_key = peer.admission_key, None
            if key is not None:
                self._admission.release(key)
        self._telemetry.counters.closes[str(reason)] += 1
        if not self._peers and self._empty is not None:
            self._empty.set()

    async def wait_empty(self) -> None:
        while self._peers:
            self._empty = anyio.Event()
            await self._empty.wait()
