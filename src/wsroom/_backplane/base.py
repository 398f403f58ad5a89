"""The backplane interfaces: where streams are numbered, remembered and fanned out, and
where a shared backplane keeps the state that several workers share.

A hub never numbers a message itself. It hands the message to its backplane, which
assigns the next offset of the stream, keeps the message in the stream's bounded
history, and delivers it to every hub that has members on the stream (in one process:
to the hub that published it, synchronously). The in-memory backplane
(`wsroom._backplane.memory`) serves one process with zero set-up; a Redis backplane
(many workers) implements the same interface.

Two interfaces, kept apart:

`Backplane`, the streams, is deliberately small:

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

`SharedState`, the sessions and presence rosters that several workers share (so that a
client resumes on any worker, and every worker sees the whole roster). A backplane whose
streams other processes also publish to and deliver from implements both:
``class RedisBackplane(Backplane, SharedState)``; `Backplane.shared` is True exactly
for those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from anyio.abc import TaskGroup

from wsroom._core.history import HistoryLimits, Recovery

__all__ = ["Backplane", "Envelope", "PresenceOp", "SessionRecord", "SharedState",
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
    """Numbering, history and fan-out of streams (see the module docstring).

    A backplane whose streams other processes share (a room may have members elsewhere
    even when it has none here) also implements `SharedState`.
    """

    _deliver: Deliver
    _lost: Lost

    worker: str = "local"
    """This process' id among the workers sharing the backplane (`SharedState`);
    ``"local"`` for a backplane that is not shared."""

    def bind(self, deliver: Deliver, lost: Lost) -> None:
        """Called once by the hub: `deliver` receives every message of the streams
        this process has open, in offset order per stream, and `lost` the name of a
        stream some of whose messages could not be delivered. Neither may block.

        Raises:
            TypeError: if `shared` disagrees with the class: a backplane that says it
                is shared must implement `SharedState` (and one that does is shared).
        """
        _check_shared(self)
        self._deliver = deliver
        self._lost = lost

    async def start(self, task_group: TaskGroup) -> None:  # noqa: B027 - optional
        """The hub starts running: start background work in `task_group`."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """The hub stopped: release connections."""

    def limit_history(self, max_bytes: int | None) -> None:  # noqa: B027 - optional
        """Called once by the hub with ``HubConfig.max_history_bytes``: the most that
        the histories this backplane keeps in this process may hold together (None:
        no cap). A backplane that keeps its histories elsewhere (Redis) ignores it."""

    @property
    def shared(self) -> bool:
        """True if other processes publish to and deliver from the same streams (a
        room may have members elsewhere even when it has none here): exactly when the
        backplane also implements `SharedState`. Read-only; derived from the class."""
        return isinstance(self, SharedState)

    @property
    def history_bytes(self) -> int | None:
        """Bytes of stream history this process holds (``wsroom_history_bytes``), or
        None when the histories live elsewhere (Redis)."""
        return None

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


class SharedState(ABC):
    """Sessions and presence rosters shared by the workers of one backplane.

    Implemented, beside `Backplane`, by a backplane that several workers share (such
    as `wsroom.redis.RedisBackplane`), so that a client resumes on any worker and every
    worker sees the whole roster. Each worker applies its own changes at once and
    announces them here; it learns the others' through the `StateEvents` it binds.
    The hub calls these methods only on a backplane that implements this interface.
    Provisional: it may change before 1.0.

    Every method may raise `BackplaneUnavailable` when the shared store cannot be
    reached (the hub retries the changes it must not lose).
    """

    worker: str
    """This process' id among the workers sharing the backplane."""

    @abstractmethod
    def bind_state(self, events: StateEvents) -> None:
        """Called once by the hub: where to report other workers' changes."""

    @abstractmethod
    async def save_session(self, record: SessionRecord, ttl: float) -> bool:
        """Store (or update) a live session's record, owned by this worker; it lives
        `ttl` seconds unless saved or refreshed again. False if another worker has
        taken the session over (this one must let it go)."""

    @abstractmethod
    async def claim_session(self, session: str, member: str, generation: int,
                            ttl: float) -> SessionRecord | None:
        """Take over `session` for a resume here (its record then lives `ttl` more
        seconds); None if it does not exist (ended or expired). The worker that held
        it is told (`StateEvents.session_moved`).

        Raises:
            StaleSession: if `generation` was superseded.
        """

    @abstractmethod
    async def detach_session(self, session: str, window: float) -> None:
        """The session's client dropped: it ends in `window` seconds unless claimed."""

    @abstractmethod
    async def end_session(self, session: str) -> None:
        """The session is over: forget its record and remove it from every roster."""

    @abstractmethod
    async def announce(self, op: PresenceOp) -> None:
        """Record a roster change and tell the other workers."""

    @abstractmethod
    async def roster(self, room: str) -> list[PresenceOp]:
        """The room's whole roster, as ``attach`` (online) and ``detach`` (away) ops in
        order of arrival."""

    @abstractmethod
    async def refresh(self, sessions: list[str], ttl: float, window: float) -> None:
        """This worker is alive and still holds `sessions` (their records live `ttl`
        more seconds). Also: declare workers that stopped refreshing dead (their
        sessions detach, ending `window` seconds later), and end the detached sessions
        whose window has passed."""

    @abstractmethod
    async def session_owners(self, sessions: list[str]) -> dict[str, str | None]:
        """Which worker holds each session now: its id, ``""`` while detached, None
        if the session no longer exists."""

    @abstractmethod
    async def disconnect_sessions(self, sessions: list[str], code: int, reason: str
                                  ) -> int:
        """End `sessions` (held by other workers, or detached): their workers close
        their connections with `code`; return how many existed."""

    @abstractmethod
    async def member_sessions(self, member: str) -> list[str]:
        """The ids of `member`'s sessions on every worker."""


def _check_shared(backplane: Backplane) -> None:
    """`shared` must say what the class is (it is a property, but a subclass written
    for older versions may set it as a class attribute)."""
    implements = isinstance(backplane, SharedState)
    if bool(backplane.shared) == implements:
        return
    name = type(backplane).__qualname__
    if implements:
        raise TypeError(f"{name} implements SharedState, so it is shared: remove its "
                        "'shared' override (Backplane.shared is derived from the class)")
    raise TypeError(f"{name} says shared = True but does not implement "
                    "wsroom.SharedState: subclass it too (class "
                    f"{name}(Backplane, SharedState)) and implement its methods "
                    "(sessions and presence shared by the workers), or drop 'shared'")

