"""What the hub's side asks of a connection: the `PeerPort` protocol.

The runtime is two halves that meet here. A `Peer` (``peer.py``) is one client
connection's life; the hub's parts (`Membership`, `Roster`, `Registry`) hold peers in
their registries and talk to them only through these methods. A peer reaches the hub's
parts through the `Runtime` it was given (``runtime.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from wsroom._core.identity import Identity
from wsroom._core.queue import Policy
from wsroom._core.sessions import Session
from wsroom._core.state import CloseReason

if TYPE_CHECKING:
    from wsroom._backplane.base import Envelope
    from wsroom._runtime.connection import Connection

__all__ = ["HubSession", "Opening", "PeerPort"]


@dataclass(eq=False, slots=True)
class Opening:
    """A room being joined after the welcome: the deliveries buffered until its
    position is known."""

    stream: str
    items: list[Any] = field(default_factory=list)
    size: int = 0


class PeerPort(Protocol):
    """A connection, as the hub's registries see it."""

    @property
    def id(self) -> str: ...
    @property
    def connection(self) -> Connection:
        """The public `Connection` handed to the app."""
    @property
    def meta(self) -> dict[str, Any]: ...
    @property
    def client_address(self) -> str: ...

    admission_key: str | None
    """The per-address slot this connection holds (set and cleared by `Registry`)."""
    @property
    def welcomed(self) -> bool:
        """The welcome was queued: the connection is live on its streams."""
    @property
    def in_handshake(self) -> bool:
        """Attached to its session, welcome not composed yet (deliveries buffered)."""
    @property
    def closing(self) -> bool: ...
    @property
    def queued_bytes(self) -> int: ...

    def attach(self, session: HubSession) -> None:
        """The connection now holds `session` (set before any await: if the client
        vanishes, its release ends or detaches the session)."""

    def metrics_state(self) -> str:
        """``handshake``, ``open`` or ``closing``."""

    def deliver(self, envelope: Envelope, policy: Policy, skip: bool = False) -> None:
        """Queue a numbered message (never blocks; see `Peer.deliver`)."""

    def push(self, frame: str, size: int | None = None) -> bool:
        """Queue a frame for this client only."""

    def request_close(self, reason: CloseReason, code: int | None = None,
                      text: str = "") -> None:
        """Close (first request wins)."""

    def abort(self) -> None:
        """Cancel the connection's tasks (after the shutdown deadline)."""

    def begin_stream(self, stream: str) -> Opening:
        """A room is being joined after the welcome: buffer its deliveries until
        `start_stream` (a later join of the same room supersedes this one)."""

    def start_stream(self, opening: Opening, epoch: str, offset: int, lossy: bool
                     ) -> bool:
        """The joined room's position is known: announce it, deliver the buffer.
        False (nothing done) if the opening was superseded or the connection closes."""

    def end_stream(self, opening: Opening) -> None:
        """The opening is abandoned (it failed, or the room was left meanwhile): drop
        its buffer."""

    def forget_stream(self, stream: str) -> bool:
        """The room was left: forget its position (False if it had none)."""


HubSession = Session[Identity, PeerPort]
