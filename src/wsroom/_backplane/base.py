"""The backplane: where streams are numbered, remembered and fanned out.

A hub never numbers a message itself. It hands the message to its backplane, which
assigns the next offset of the stream, keeps the message in the stream's bounded
history, and delivers it to every hub that has members on the stream (in one process:
to the hub that published it, synchronously). The in-memory backplane here serves one
process with zero set-up; a Redis backplane (many workers) implements the same
interface.

The interface is deliberately small:

- `open` a stream before publishing to it (it creates the stream with a fresh epoch if
  it does not exist) and `close` it when no local member needs it any more;
- `publish` assigns the offset, stores and delivers; a stream is only ever delivered
  in offset order, which is what the hub's gap check relies on;
- `position` and `since` answer "where is the stream now" and "what came after
  (epoch, offset)" — all or nothing (`Recovery`);
- a backplane that can lose messages in transit (a network one) calls `lost` for a
  stream whose deliveries it cannot vouch for: the hub closes that stream's clients with
  3010, and they resume from history or a snapshot;
- `start` and `aclose` bracket the hub's run (a network backplane starts its
  subscriber task there); `healthy` reports whether it can publish and deliver now.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio
from anyio.abc import TaskGroup

from wsroom._core.history import HistoryLimits, Recovery, StreamHistory
from wsroom._core.protocol import msg_frame_from
from wsroom._core.queue import frame_size

__all__ = ["Backplane", "Envelope", "MemoryBackplane", "PresenceOp", "SessionRecord",
           "StaleSession", "StateEvents"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """A numbered message on its way to the local members of its stream.

    Attributes:
        stream: the stream's key (a room name, or ``@inbox/<session id>``).
        epoch: the stream's epoch.
        offset: the message's offset.
        frame: the encoded ``msg`` frame, shared by every recipient.
        size: the frame's size in bytes.
        key: the coalescing key (already scoped to the stream), or None.
        exclude: the id of a session that must not receive it, or None.
    """

    stream: str
    epoch: str
    offset: int
    frame: str
    size: int
    key: Hashable | None = None
    exclude: str | None = None


Deliver = Callable[[Envelope], None]
Lost = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What any worker needs to take over a session (shared backplanes only).

    Attributes:
        id: the session id.
        member: the member id.
        generation: the newest resume token's generation.
        accepted: the generations a resume may present (see `Session.accepts`).
        rooms: the rooms the session is in.
        info: the member's public info (for presence).
    """

    id: str
    member: str
    generation: int
    accepted: tuple[int, ...]
    rooms: tuple[str, ...]
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresenceOp:
    """One change of a room's roster, as workers tell each other.

    Attributes:
        room: the room.
        kind: ``attach`` (a connection of the session is online, with `meta`),
            ``detach`` (the session is away) or ``remove`` (it left the room).
        member: the member id.
        session: the session id.
        info: the member's public info (attach).
        meta: the connection's public metadata (attach).
        worker: the worker that made the change (a worker ignores its own).
    """

    room: str
    kind: Literal["attach", "detach", "remove"]
    member: str
    session: str
    info: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    worker: str = ""


class StaleSession(Exception):
    """The session exists, but the token presented is older than one it confirmed."""


class StateEvents(Protocol):
    """What a shared backplane tells the hub about other workers' changes."""

    def presence(self, op: PresenceOp) -> None:
        """Another worker changed a roster (applied to the local mirror)."""

    def session_moved(self, session: str) -> None:
        """Another worker took the session over (a resume there): drop it here."""

    def session_ended(self, session: str) -> None:
        """The session ended elsewhere (expired, or its worker died long ago)."""

    def disconnect(self, session: str, code: int, reason: str) -> None:
        """Another worker's `Hub.disconnect` names a session held here: close its
        connection with `code` and end it."""

    def resynced(self) -> None:
        """The backplane reconnected: what other workers said meanwhile may be lost
        (reload rosters, check who holds this worker's sessions now)."""

    def reannounce(self) -> None:
        """The others had declared this worker dead (it stalled), or it is new:
        announce every live session and roster entry it holds again."""


class Backplane(ABC):
    """Numbering, history and fan-out of streams (see the module docstring)."""

    _deliver: Deliver
    _lost: Lost

    def bind(self, deliver: Deliver, lost: Lost) -> None:
        """Called once by the hub: `deliver` receives every message of the streams
        this process has open, in offset order per stream, and `lost` the name of a
        stream some of whose messages could not be delivered. Neither may block."""
        self._deliver = deliver
        self._lost = lost

    async def start(self, task_group: TaskGroup) -> None:  # noqa: B027 - optional
        """The hub starts running: start background work in `task_group`."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """The hub stopped: release connections."""

    # -------------------------------------------------- shared state (shared backplanes)
    #
    # A shared backplane also shares sessions (so that a client resumes on any worker)
    # and presence (so that every worker sees the whole roster). The hub calls these
    # only when `shared` is True; each worker applies its own changes at once and
    # announces them, and applies the others' through `StateEvents`.

    worker: str = "local"
    """This process' id among the workers sharing the backplane."""

    def bind_state(self, events: StateEvents) -> None:  # noqa: B027 - optional
        """Called once by the hub (shared backplanes): where to report other workers'
        changes."""

    async def save_session(self, record: SessionRecord, ttl: float) -> bool:
        """Store (or update) a live session's record, owned by this worker; it lives
        `ttl` seconds unless saved or refreshed again. False if another worker has
        taken the session over (this one must let it go)."""
        raise NotImplementedError

    async def claim_session(self, session: str, member: str, generation: int,
                            ttl: float) -> SessionRecord | None:
        """Take over `session` for a resume here (its record then lives `ttl` more
        seconds); None if it does not exist (ended or expired). The worker that held
        it is told (`StateEvents.session_moved`).

        Raises:
            StaleSession: if `generation` was superseded.
        """
        raise NotImplementedError

    async def detach_session(self, session: str, window: float) -> None:
        """The session's client dropped: it ends in `window` seconds unless claimed."""
        raise NotImplementedError

    async def end_session(self, session: str) -> None:
        """The session is over: forget its record and remove it from every roster."""
        raise NotImplementedError

    async def announce(self, op: PresenceOp) -> None:
        """Record a roster change and tell the other workers."""
        raise NotImplementedError

    async def roster(self, room: str) -> list[PresenceOp]:
        """The room's whole roster, as ``attach`` (online) and ``detach`` (away) ops in
        order of arrival."""
        raise NotImplementedError

    async def refresh(self, sessions: list[str], ttl: float, window: float) -> None:
        """This worker is alive and still holds `sessions` (their records live `ttl`
        more seconds). Also: declare workers that stopped refreshing dead (their
        sessions detach, ending `window` seconds later), and end the detached sessions
        whose window has passed."""
        raise NotImplementedError

    async def session_owners(self, sessions: list[str]) -> dict[str, str | None]:
        """Which worker holds each session now: its id, ``""`` while detached, None
        if the session no longer exists."""
        raise NotImplementedError

    async def disconnect_sessions(self, sessions: list[str], code: int, reason: str
                                  ) -> int:
        """End `sessions` (held by other workers, or detached): their workers close
        their connections with `code`; return how many existed."""
        raise NotImplementedError

    async def member_sessions(self, member: str) -> list[str]:
        """The ids of `member`'s sessions on every worker."""
        raise NotImplementedError

    @property
    def shared(self) -> bool:
        """True if other processes publish to and deliver from the same streams (a
        room may have members elsewhere even when it has none here)."""
        return False

    def counters(self) -> Mapping[str, int]:
        """Event counts for metrics (``wsroom_backplane_events_total``), e.g.
        reconnects; none in memory."""
        return {}

    @property
    def healthy(self) -> bool:
        """False while the backplane cannot publish or deliver (a lost connection to
        its server); reported as ``wsroom_backplane_up``. In-process: always True."""
        return True

    @abstractmethod
    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        """Make sure `stream` exists and is delivered here; return its ``(epoch,
        offset)`` (offset 0 before the first message)."""

    @abstractmethod
    async def close(self, stream: str) -> None:
        """This process no longer needs `stream` (no local member is left)."""

    @abstractmethod
    async def publish(self, stream: str, wire_name: str, payload: str, *,
                      key: Hashable | None = None, exclude: str | None = None,
                      limits: HistoryLimits | None = None) -> Envelope:
        """Number, store and deliver a message of a stream.

        Args:
            stream: the stream's key.
            wire_name: the stream's name in the frame (``@inbox`` for inboxes).
            payload: the message's `msg_payload` (event and data, encoded once).
            key: the coalescing key, scoped to the stream: ``(room, key)``.
            exclude: a session id that must not receive it.
            limits: the stream's history limits, for a `shared` backplane publishing
                to a stream this process has not opened.

        Raises:
            KeyError: if the stream is not open (and the backplane is not shared).
            BackplaneUnavailable: if the message cannot be published now.
        """

    @abstractmethod
    async def position(self, stream: str) -> tuple[str, int]:
        """The ``(epoch, last offset)`` of an open stream."""

    @abstractmethod
    async def since(self, stream: str, epoch: str, offset: int) -> Recovery:
        """Everything after ``(epoch, offset)`` on `stream`, or not recovered."""


class MemoryBackplane(Backplane):
    """One process: streams live as long as a local member needs them.

    A stream that is closed is forgotten: if it is opened again it starts a new epoch,
    so no client can mistake the new offsets for the old ones.
    """

    def __init__(self) -> None:
        self._streams: dict[str, StreamHistory] = {}

    def __len__(self) -> int:
        return len(self._streams)

    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        history = self._streams.get(stream)
        if history is None:
            history = self._streams[stream] = StreamHistory(secrets.token_urlsafe(6), limits)
        await anyio.lowlevel.checkpoint()
        return history.epoch, history.offset

    async def close(self, stream: str) -> None:
        self._streams.pop(stream, None)
        await anyio.lowlevel.checkpoint()

    async def publish(self, stream: str, wire_name: str, payload: str, *,
                      key: Hashable | None = None, exclude: str | None = None,
                      limits: HistoryLimits | None = None) -> Envelope:
        history = self._streams[stream]
        offset = history.offset + 1
        frame = msg_frame_from(wire_name, history.epoch, offset, payload)
        history.append(offset, frame, anyio.current_time())
        envelope = Envelope(stream, history.epoch, offset, frame, frame_size(frame), key,
                            exclude)
        # Synchronously: no membership change can interleave with a fan-out.
        self._deliver(envelope)
        return envelope

    async def position(self, stream: str) -> tuple[str, int]:
        history = self._streams[stream]
        await anyio.lowlevel.checkpoint()
        return history.epoch, history.offset

    async def since(self, stream: str, epoch: str, offset: int) -> Recovery:
        history = self._streams.get(stream)
        await anyio.lowlevel.checkpoint()
        if history is None:
            return Recovery(False, (), "", 0)
        return history.since(epoch, offset, anyio.current_time())
