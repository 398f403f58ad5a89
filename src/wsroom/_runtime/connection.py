"""`Connection`: a client connection as the application sees it.

A thin facade: the connection's life (reader, writer, handshake, deadlines) is a
`Peer`'s (``peer.py``); this object is what hooks and handlers get, with the public
API only. It reaches its peer through the small `Backing` protocol below, so this
module imports nothing else of the runtime.
"""

from __future__ import annotations

from typing import Any, Protocol

from wsroom._core.codes import CloseCode
from wsroom._core.errors import check_close
from wsroom._core.identity import Identity

__all__ = ["Backing", "Connection", "Identity"]


class Backing(Protocol):
    """What a `Connection` asks of the connection's runtime side."""

    @property
    def id(self) -> str: ...
    @property
    def client_address(self) -> str: ...
    @property
    def peer_address(self) -> tuple[str, int] | None: ...
    @property
    def is_open(self) -> bool: ...
    @property
    def session_id(self) -> str | None: ...
    @property
    def resumed(self) -> bool: ...
    @property
    def rooms(self) -> frozenset[str]: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def close_code(self) -> int | None: ...

    async def join(self, room: str) -> None: ...
    async def leave(self, room: str) -> None: ...
    async def send(self, event: str, data: Any) -> int | None: ...
    def close(self, code: int, reason: str) -> None: ...


class Connection:
    """A client connection. Handlers reach it as ``ctx.connection``.

    Attributes:
        id: this connection's id, random, unique per connection (a resumed session
            gets a new connection id, and keeps its `session` id).
        identity: the member, once authenticated (None before).
        state: a dict for the application's per-connection state.
        client_address: the client's IP address (from the trusted proxy's header when
            the peer is one of ``HubConfig.trusted_proxies``; ``"unknown"`` on a Unix
            socket without one).
        meta: public metadata of this connection, shown in presence (e.g. a device
            name); set it in an ``on_connect`` hook: presence reads it when the
            connection is welcomed (or joins a room afterwards).
    """

    __slots__ = ("_backing", "client_address", "id", "identity", "meta", "state")

    def __init__(self, backing: Backing) -> None:
        self._backing = backing
        self.id = backing.id
        self.identity: Identity | None = None
        self.state: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.client_address = backing.client_address

    def __repr__(self) -> str:
        return repr(self._backing)

    @property
    def client(self) -> tuple[str, int] | None:
        """The peer's address as the ASGI server reports it."""
        return self._backing.peer_address

    @property
    def open(self) -> bool:
        """True from a successful `authenticate` (``on_connect`` hooks see it open)
        until the connection starts closing."""
        return self._backing.is_open

    @property
    def session(self) -> str | None:
        """The session id (stable across resumes), once authenticated."""
        return self._backing.session_id

    @property
    def resumed(self) -> bool:
        """True if this connection resumed an existing session (its rooms are the
        session's; ``on_connect`` hooks may join more)."""
        return self._backing.resumed

    @property
    def rooms(self) -> frozenset[str]:
        """Names of the rooms this connection's session is in (once the connection
        has ended: the rooms its session was in then)."""
        return self._backing.rooms

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in this connection's outbound queue."""
        return self._backing.queued_bytes

    @property
    def close_code(self) -> int | None:
        """The close code chosen for this connection, once it is closing."""
        return self._backing.close_code

    async def join(self, room: str) -> None:
        """Join `room`: from now on, messages published to it reach this connection.

        Raises:
            ValueError: if the room name is invalid.
        """
        await self._backing.join(room)

    async def leave(self, room: str) -> None:
        """Leave `room` (no-op if not a member)."""
        await self._backing.leave(room)

    async def send(self, event: str, data: Any = None) -> int | None:
        """Send a message on this connection's session inbox (the ``@inbox`` stream).

        The inbox belongs to the session: if the connection drops, the message is
        kept in the inbox's history and replayed when the client resumes.

        Returns:
            The message's offset in the inbox, or None if the session has ended (or
                the connection was never authenticated).

        Raises:
            MessageTooLarge: if the encoded frame exceeds ``max_queue_bytes``.
        """
        return await self._backing.send(event, data)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection after flushing what is queued.

        Args:
            code: the close code (see `CloseCode`; apps use 4000-4999).
            reason: a short reason for the close frame.
        """
        check_close(code, reason)
        self._backing.close(code, reason)
