"""What every connection of a hub shares: the `Runtime`.

A `Hub` is a facade over one `Runtime`: its configuration, counters, timers, flusher,
the connection `Registry`, the `Membership` (sessions, rooms, rosters), the handlers
and the application's hooks. Each `Peer` is given the runtime and reaches the hub's
parts only through it; nothing here knows the `Hub` class, so the import graph has no
cycle: ``hub -> peer -> runtime -> membership/registry -> ports -> core``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from wsroom._asgi.transport import Handshake
from wsroom._backplane.base import Backplane
from wsroom._core.config import HubConfig
from wsroom._core.errors import MessageTooLarge
from wsroom._core.identity import Identity
from wsroom._core.protocol import encode, msg_payload
from wsroom._core.queue import frame_size
from wsroom._core.rate import MemberRates
from wsroom._runtime.flush import Flusher
from wsroom._runtime.handlers import Handlers
from wsroom._runtime.membership import Membership
from wsroom._runtime.registry import Registry
from wsroom._runtime.stats import Telemetry
from wsroom._runtime.timers import Timers

if TYPE_CHECKING:
    from wsroom._runtime.connection import Connection

__all__ = ["Context", "Runtime"]

_FRAME_OVERHEAD = 96
"""Upper bound of a ``msg`` frame's bytes besides its payload and stream name."""

Authenticate = Callable[[Handshake], Awaitable[Identity | None]]
ConnectionHook = Callable[["Connection"], Awaitable[None]]
Snapshot = Callable[["Connection", str], Awaitable[Any]]


class Context(Protocol):
    """The per-message context handed to a handler (`MessageContext`)."""

    scope: Any


MakeContext = Callable[["Connection", str, "str | int | None"], Context]
Scope = Callable[[Any], AbstractAsyncContextManager[Any]]


class Runtime:
    """The hub's parts, as its connections reach them (see the module docstring)."""

    def __init__(self, config: HubConfig, backplane: Backplane, membership: Membership,
                 telemetry: Telemetry, *, authenticate: Authenticate | None,
                 snapshot: Snapshot | None, message_scope: Scope | None,
                 make_context: MakeContext) -> None:
        self.config = config
        self.backplane = backplane
        self.membership = membership
        self.telemetry = telemetry
        self.registry = Registry(config, telemetry)
        self.timers = Timers()
        self.handlers = Handlers()
        self.flusher: Flusher | None = None  # the hub's, while it runs (asyncio only)
        self.connect_hooks: list[ConnectionHook] = []
        self.disconnect_hooks: list[ConnectionHook] = []
        self.snapshot = snapshot
        self.message_scope = message_scope
        self.make_context = make_context
        self._authenticate = authenticate
        self.member_rates = (None if config.member_rate_limit is None else
                             MemberRates(config.member_rate_limit, config.member_rate_burst))
        self.batch_bytes = config.max_batch_bytes if config.batch_frames else 0

    @property
    def anonymous(self) -> bool:
        """No `authenticate` hook: members are anonymous, with ids wsroom makes up."""
        return self._authenticate is None

    async def authenticate(self, handshake: Handshake, *, anonymous_id: str
                           ) -> Identity | None:
        if self._authenticate is None:
            return Identity(id=anonymous_id)
        return await self._authenticate(handshake)

    async def on_connect(self, connection: Connection) -> None:
        for hook in self.connect_hooks:
            await hook(connection)

    async def on_disconnect(self, connection: Connection) -> None:
        for hook in self.disconnect_hooks:
            await hook(connection)

    def payload(self, event: str, data: Any, stream: str) -> str:
        """Encode a message once, refusing one that could never fit a client queue."""
        payload = msg_payload(event, data)
        size = frame_size(payload) + frame_size(encode(stream)) + _FRAME_OVERHEAD
        if size > self.config.max_queue_bytes:
            raise MessageTooLarge(
                f"a message of about {size} bytes can never fit a client queue "
                f"(max_queue_bytes={self.config.max_queue_bytes})"
            )
        return payload

