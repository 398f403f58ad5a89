"""The hub: rooms, connections, handlers, publishing and the hub's lifetime.

Theory of operation
-------------------
A `Hub` is used from one event loop. Its registries (connections, sessions, rooms,
presence) are changed only by synchronous code. `publish` encodes the message once and
hands it to the backplane, which assigns the offset, keeps it in the stream's history
and delivers it (`_deliver`): the frame is pushed onto every live member's queue
without awaiting, so no membership change can interleave with a fan-out, and no client
can make a broadcast wait.

Rooms are held by *sessions*, not connections (see `_sessions.py`): a connection that
drops for a reason its client recovers from leaves its session detached for
``resume_window`` — rooms held, presence *away* — and a resume attaches the new
connection to it. A background task in the hub's task group expires the sessions whose
window passed: they leave their rooms, which is the only time presence says *leave*
for a member that did not leave on purpose.

`Hub.run()` owns the hub-level task group (background work) and, on exit, the graceful
shutdown: stop admitting (1013), tell clients to reconnect (1012) in batches spread over
half of ``shutdown_timeout`` while their queues are flushed, then cancel whatever is
left at the deadline. Connections themselves run in the ASGI server's tasks (one task
group each, see `_connection.py`), and always release their slot on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar

import anyio
from anyio.abc import TaskGroup
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from wsroom._asgi.signals import drain_on_signals
from wsroom._asgi.transport import AsgiTransport, Handshake
from wsroom._backplane.base import Backplane, Envelope, MemoryBackplane, PresenceOp, StaleSession
from wsroom._core.admission import Admission, TrustedProxies, client_key
from wsroom._core.config import HubConfig, RoomConfig
from wsroom._core.errors import HubNotRunning, MessageTooLarge, check_close
from wsroom._core.metrics import Metrics
from wsroom._core.origin import OriginPolicy
from wsroom._core.presence import PresenceEntry, RoomPresence
from wsroom._core.protocol import (
    encode,
    left_frame,
    msg_payload,
    presence_diff_frame,
    presence_state_frame,
)
from wsroom._core.queue import Policy, frame_size
from wsroom._core.rooms import Rooms
from wsroom._core.sessions import INBOX, Session, SessionRegistry, inbox_key, inbox_owner
from wsroom._core.state import CloseReason
from wsroom._core.tokens import ResumeClaims, TokenSigner
from wsroom._runtime.cluster import Cluster
from wsroom._runtime.connection import Connection, Identity
from wsroom._runtime.flush import Flusher
from wsroom._runtime.handlers import Handler, Handlers, MessageScope
from wsroom._runtime.timers import Timers

__all__ = ["Hub", "HubStats"]

log = logging.getLogger("wsroom.hub")

Authenticate = Callable[[Handshake], Awaitable[Identity | None]]
ConnectionHook = Callable[[Connection], Awaitable[None]]
Snapshot = Callable[[Connection, str], Awaitable[Any]]
HubSession = Session[Identity, Connection]

_FRAME_OVERHEAD = 96
"""Upper bound of a ``msg`` frame's bytes besides its payload and stream name."""
H = TypeVar("H", bound=Handler)
C = TypeVar("C", bound=ConnectionHook)


class _Phase(Enum):
    IDLE = "idle"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class _Counters:
    messages_in: int = 0
    messages_out: int = 0
    frames_out: int = 0
    discarded: int = 0
    handler_errors: int = 0
    connections_total: int = 0
    closes: Counter[str] = field(default_factory=Counter)
    resumes: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class HubStats:
    """A snapshot of a hub's registries and counters (see `Hub.stats`).

    Attributes:
        connections: connections currently registered (including handshakes).
        sessions: sessions that exist (live, and detached ones awaiting a resume).
        detached_sessions: sessions waiting for their client to resume.
        rooms: rooms that currently exist.
        members: distinct sessions that are in at least one room.
        queued_bytes: bytes waiting in all outbound queues.
        connections_total: connections admitted since the hub started.
        closes: connections ended, by close reason.
        messages_in: frames received from clients.
        messages_out: messages written to clients.
        frames_out: WebSocket frames written (a batch counts once).
        discarded: messages discarded by `drop_oldest` or `coalesce` policies.
        handler_errors: messages whose handler, or payload validator, raised (or whose
            reply could not be encoded).
        resumes: resume attempts by result: ``recovered`` (every stream replayed),
            ``not_recovered`` (some stream got a snapshot instead), ``new_session``
            (valid token, but the session had expired), ``rejected`` (3500).
    """

    connections: int
    sessions: int
    detached_sessions: int
    rooms: int
    members: int
    queued_bytes: int
    connections_total: int
    closes: dict[str, int]
    messages_in: int
    messages_out: int
    frames_out: int
    discarded: int
    handler_errors: int
    resumes: dict[str, int]


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _check_room_name(room: str) -> None:
    if not isinstance(room, str) or not 0 < len(room) <= 200 or room.startswith("@"):
        raise ValueError(
            f"invalid room name {room!r}: 1 to 200 characters, not starting with '@'"
        )


class Hub:
    """Rooms of WebSocket clients, served by an ASGI endpoint.

    Args:
        config: limits and timings; defaults are production-safe.
        authenticate: ``async (Handshake) -> Identity | None``. Return None to refuse
            (close 3500) or raise `Reject` for another close code. Without it every
            client is accepted as an anonymous member with a random id (kept when its
            session is resumed).
        message_scope: ``(MessageContext) -> async context manager``; entered around
            every handler call, its value is ``ctx.scope`` (e.g. a DB session).
        room_config: ``(room name) -> RoomConfig`` for per-room settings; rooms it
            returns None for use ``config.default_room``.
        snapshot: ``async (connection, stream) -> data``: the app's current state of a
            stream (a room name, or ``"@inbox"``), sent as a ``snapshot`` frame to a
            client that cannot be sent what it missed (a new session, or a resume
            whose gap history no longer covers). See
            [recovery](../topics/recovery.md).
        backplane: where streams are numbered and kept; default: in memory (one
            process).

    Example:
        ```python
        hub = Hub()

        @hub.on("chat")
        async def chat(ctx: MessageContext, data: Chat) -> None:
            await ctx.publish("lobby", "chat", data)

        app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint)], lifespan=hub.lifespan)
        ```
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        authenticate: Authenticate | None = None,
        message_scope: MessageScope | None = None,
        room_config: Callable[[str], RoomConfig | None] | None = None,
        snapshot: Snapshot | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        self.config = config = config or HubConfig()
        self._authenticate_hook = authenticate
        self._message_scope = message_scope
        self._room_config = room_config
        self._snapshot_hook = snapshot
        self._handlers = Handlers()
        self._connect_hooks: list[ConnectionHook] = []
        self._disconnect_hooks: list[ConnectionHook] = []
        self._connections: dict[str, Connection] = {}
        self._rooms: Rooms[HubSession] = Rooms()
        self._presence: dict[str, RoomPresence] = {}
        self._sessions: SessionRegistry[Identity, Connection] = SessionRegistry(
            config.resume_window)
        self._signer = TokenSigner(config.resume_secrets or [secrets.token_bytes(32)])
        self._wall_clock: Callable[[], float] = time.time
        self._expiry_wakeup: anyio.Event | None = None
        self._origins = (None if config.allowed_origins is None
                         else OriginPolicy(config.allowed_origins))
        self._proxies = TrustedProxies(config.trusted_proxies or (), config.proxy_header)
        self._warned_unknown = False
        self._admission = Admission(config.max_connections_per_ip,
                                    config.connect_rate_per_ip, config.connect_burst_per_ip)
        self._backplane = backplane if backplane is not None else MemoryBackplane()
        self._backplane.bind(self._deliver, self._lost)
        self._cluster: Cluster | None = None
        self._roster_loading: dict[str, list[PresenceOp]] = {}
        if self._backplane.shared:
            if config.resume_secrets is None:
                raise ValueError("a shared backplane needs HubConfig.resume_secrets (the "
                                 "same on every worker), or no client could resume on "
                                 "another worker")
            self._cluster = Cluster(self)
            self._backplane.bind_state(_StateEvents(self))
        self._stats = _Counters()
        self._metrics = Metrics()
        self._flusher: Flusher | None = None
        self._timers = Timers()
        self._phase = _Phase.IDLE
        self._empty: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._drained: anyio.Event | None = None
        self._asgi_app = _HubAsgi(self)

    # ------------------------------------------------------------ registration

    def on(self, event: str, *, model: Any = None) -> Callable[[H], H]:
        """Register the decorated ``async (ctx, data)`` function as `event`'s handler.

        The payload is validated against `model`, or the annotation of ``data``. The
        handler's return value is sent as a ``reply`` when the client gave a ``ref``.
        """

        def decorator(handler: H) -> H:
            # The caller's locals resolve payload models defined inside a function.
            caller = sys._getframe(1).f_locals
            self._handlers.add(event, handler, model, localns=caller)
            return handler

        return decorator

    def on_connect(self, hook: C) -> C:
        """Register ``async (connection)`` run after a successful ``hello``, before the
        ``welcome`` is sent; join rooms here. Raising `Reject` closes the connection."""
        self._connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: C) -> C:
        """Register ``async (connection)`` run once when an authenticated connection
        ends, whether its session ends, waits for a resume, or was taken over
        (``connection.rooms`` names the session's rooms at that moment)."""
        self._disconnect_hooks.append(hook)
        return hook

    # ------------------------------------------------------------------- queries

    @property
    def running(self) -> bool:
        """True between entering `run` and the start of its shutdown."""
        return self._phase is _Phase.RUNNING

    def connections(self) -> list[Connection]:
        """The connections currently registered."""
        return list(self._connections.values())

    def members(self, room: str) -> tuple[Connection, ...]:
        """The live connections in `room` (members whose session is detached, waiting
        for a resume, are not included; see `presence` for the whole roster)."""
        found = self._rooms.get(room)
        if found is None:
            return ()
        return tuple(s.connection for s in found.members if s.connection is not None)

    def presence(self, room: str) -> tuple[PresenceEntry, ...]:
        """The roster of `room`: every member with a session in it, online or away
        (empty if the room does not exist or has presence turned off)."""
        roster = self._presence.get(room)
        return roster.state() if roster is not None else ()

    def rooms(self) -> list[str]:
        """Names of the rooms that exist."""
        return self._rooms.names()

    def stats(self) -> HubStats:
        """Current registry sizes and counters."""
        counters = self._stats
        return HubStats(
            connections=len(self._connections),
            sessions=len(self._sessions),
            detached_sessions=self._sessions.detached,
            rooms=len(self._rooms),
            members=self._rooms.member_count(),
            queued_bytes=sum(c.queued_bytes for c in self._connections.values()),
            connections_total=counters.connections_total,
            closes=dict(counters.closes),
            messages_in=counters.messages_in,
            messages_out=counters.messages_out,
            frames_out=counters.frames_out,
            discarded=counters.discarded,
            handler_errors=counters.handler_errors,
            resumes=dict(counters.resumes),
        )

    def _connection_states(self) -> dict[str, int]:
        """Connections by metrics state: ``handshake`` (before the welcome), ``open``,
        ``closing``."""
        states = dict.fromkeys(("handshake", "open", "closing"), 0)
        for conn in self._connections.values():
            states[conn._metrics_state()] += 1
        return states

    # ----------------------------------------------------------------- publishing

    async def publish(
        self,
        room: str,
        event: str,
        data: Any = None,
        *,
        key: str | None = None,
        exclude: Connection | None = None,
    ) -> int | None:
        """Send an event to every member of `room`.

        The frame is encoded once and queued for every member without waiting for
        any of them; a member whose queue is full is handled by the room's policy.

        Args:
            room: the room name.
            event: the event name the clients see.
            data: a JSON-serializable value (pydantic models and dataclasses too).
            key: the coalescing key, for rooms with the ``coalesce`` policy.
            exclude: a connection that should not receive it (e.g. the sender).

        Returns:
            The message's offset in the room's stream, or None if the room has no
                members (nothing was delivered; with a shared backplane, such as
                Redis, the members may be in other processes: it is always published).

        Raises:
            HubNotRunning: outside `Hub.run()`.
            MessageTooLarge: if the encoded frame exceeds ``max_queue_bytes``.
            BackplaneUnavailable: if the backplane cannot publish now.
        """
        self._check_running()
        _check_room_name(room)
        backplane = self._backplane
        if room not in self._rooms and not backplane.shared:
            await anyio.lowlevel.checkpoint()
            return None
        payload = self._payload(event, data, room)
        envelope = await backplane.publish(
            room, room, payload,
            key=None if key is None else (room, key),  # rooms never coalesce each other
            exclude=None if exclude is None or exclude._session is None
            else exclude._session.id,
            limits=self._room_settings(room).history,
        )
        # Let writers run: a publisher in a tight loop must not starve them.
        await anyio.lowlevel.checkpoint()
        return envelope.offset

    async def send_to(self, member: str, event: str, data: Any = None) -> int:
        """Send a message to every session of `member`, on its ``@inbox`` stream.

        Sessions that are detached (their client is reconnecting) keep the message in
        their inbox history and get it when they resume.

        Returns:
            The number of sessions the message was sent to (0: no such member).

        Raises:
            HubNotRunning: outside `Hub.run()`.
            MessageTooLarge: if the encoded frame exceeds ``max_queue_bytes``.
        """
        self._check_running()
        ids = [session.id for session in self._sessions.of_member(member)]
        if self._cluster is not None:  # and the member's sessions on other workers
            ids = sorted({*ids, *await self._backplane.member_sessions(member)})
        if not ids:
            await anyio.lowlevel.checkpoint()
            return 0
        payload = self._payload(event, data, INBOX)
        for session_id in ids:
            await self._backplane.publish(inbox_key(session_id), INBOX, payload,
                                          limits=self.config.inbox_history)
        await anyio.lowlevel.checkpoint()
        return len(ids)

    async def disconnect(self, member: str, code: int = 1000, reason: str = "") -> int:
        """End every session of `member` now (e.g. a kick, a ban, a logout elsewhere).

        Its live connections are closed with `code` after what is already queued for
        them (use a terminal code, 4500-4999, so that its clients do not come back),
        and its sessions, detached ones included, end at once: they leave their rooms
        (presence: *leave*) and their tokens can no longer resume them.

        Returns:
            The number of sessions ended (0: the member has none).

        Raises:
            ValueError: if `code` or `reason` may not be sent in a close frame.
            BackplaneUnavailable: with a shared backplane that is down, after ending
                the member's sessions on this worker (not on the others).
        """
        check_close(code, reason)
        sessions = self._sessions.of_member(member)
        ended: list[tuple[HubSession, list[str]]] = []
        for session in sessions:  # here first: even with the backplane down
            self._end_now(session, code, reason, ended)
        for session, rooms in ended:
            await self._close_streams(session, rooms)
        elsewhere = 0
        if self._cluster is not None:  # then the member's sessions on other workers
            local = {session.id for session in sessions}
            elsewhere = await self._backplane.disconnect_sessions(
                [sid for sid in await self._backplane.member_sessions(member)
                 if sid not in local], code, reason)
        await anyio.lowlevel.checkpoint()
        return len(sessions) + elsewhere

    def _end_now(self, session: HubSession, code: int, reason: str,
                 ended: list[tuple[HubSession, list[str]]]) -> None:
        if session.connection is not None:
            session.connection._request_close(CloseReason.APP, code, reason)
        ended.append((session, self._forget_session(session, "disconnected")))

    def _disconnect_here(self, session_id: str, code: int, reason: str) -> None:
        """Another worker's `disconnect` names a session held here."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        ended: list[tuple[HubSession, list[str]]] = []
        self._end_now(session, code, reason, ended)
        if self._tg is not None:
            for ended_session, rooms in ended:
                self._tg.start_soon(self._close_streams, ended_session, rooms)

    def _payload(self, event: str, data: Any, stream: str) -> str:
        payload = msg_payload(event, data)
        size = frame_size(payload) + frame_size(encode(stream)) + _FRAME_OVERHEAD
        if size > self.config.max_queue_bytes:
            raise MessageTooLarge(
                f"a message of about {size} bytes can never fit a client queue "
                f"(max_queue_bytes={self.config.max_queue_bytes})"
            )
        return payload

    # ----------------------------------------------------------- ASGI and lifetime

    async def endpoint(self, websocket: WebSocket) -> None:
        """Serve a Starlette/FastAPI ``WebSocket`` that has not been accepted yet.

        Starlette: ``WebSocketRoute("/ws", hub.endpoint)``. FastAPI:
        ``app.add_api_websocket_route("/ws", hub.endpoint)``, or call
        ``await hub.endpoint(websocket)`` from your own ``@app.websocket`` route.
        """
        # The raw ASGI callables: the connection keeps its own state, and Starlette's
        # WebSocket checks would cost on every frame.
        receive = getattr(websocket, "_receive", websocket.receive)
        send = getattr(websocket, "_send", websocket.send)
        await Connection(self, AsgiTransport(websocket.scope, receive, send))._run()

    @property
    def asgi(self) -> ASGIApp:
        """The hub as a complete ASGI app (WebSocket on every path, lifespan included),
        to mount under any framework or to serve alone: ``uvicorn module:hub.asgi``.
        HTTP requests get 426 Upgrade Required."""
        return self._asgi_app

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Hub]:
        """Run the hub: ``async with hub.run(): ...``; on exit, shut down gracefully.

        Raises:
            RuntimeError: if the hub is already running or has run before.
        """
        if self._phase is not _Phase.IDLE:
            raise RuntimeError(f"the hub is {self._phase.value}; a hub runs only once")
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self._backplane.start(tg)
            try:
                self._phase = _Phase.RUNNING
                tg.start_soon(self._expire_sessions, name="wsroom session expiry")
                tg.start_soon(self._timers.run, name="wsroom timers")
                if _on_asyncio():
                    tg.start_soon(self._run_flusher, name="wsroom flusher")
                if self._cluster is not None:
                    tg.start_soon(self._cluster.run, name="wsroom shared state")
                log.info("hub running")
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.shutdown()
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._backplane.aclose()
        self._phase = _Phase.STOPPED

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """A Starlette/FastAPI ``lifespan``: runs the hub for the app's lifetime.

        In the main thread it also chains SIGINT/SIGTERM so that the hub drains
        *before* the ASGI server closes the sockets (uvicorn closes every WebSocket
        with 1012 at once and only then runs the lifespan shutdown).
        """
        async with self.run(), drain_on_signals(self.shutdown):
            yield

    async def _run_flusher(self) -> None:
        flusher = self._flusher = Flusher()
        try:
            await flusher.run()
        finally:
            # Whatever it had not written yet is the writers' again.
            self._flusher = None
            for conn in flusher.take_dirty():
                conn._dirty = False
                conn._wake_writer()

    async def shutdown(self) -> None:
        """Drain: refuse new connections (1013), close the others with 1012 in
        batches, flushing their queues, within ``shutdown_timeout``.

        Idempotent: every caller waits for the same drain. It runs in the hub's task
        group, so a handler may call it: the drain is not cancelled along with the
        handler's own connection.
        """
        if self._tg is None or self._phase is _Phase.STOPPED:
            return
        if self._drained is None:
            self._drained = anyio.Event()
            self._phase = _Phase.DRAINING
            self._tg.start_soon(self._drain, name="wsroom drain")
        await self._drained.wait()

    async def _drain(self) -> None:
        assert self._drained is not None
        try:
            with anyio.CancelScope(shield=True):
                await self._drain_connections()
        finally:
            self._drained.set()

    async def _drain_connections(self) -> None:
        config = self.config
        targets = list(self._connections.values())
        log.info("hub draining %d connection(s)", len(targets))
        with anyio.move_on_after(config.shutdown_timeout):
            batch = config.shutdown_batch_size
            batches = math.ceil(len(targets) / batch)
            pause = config.shutdown_timeout / 2 / batches if batches > 1 else 0.0
            for start in range(0, len(targets), batch):
                if start:
                    await anyio.sleep(pause)
                for conn in targets[start:start + batch]:
                    conn._request_close(CloseReason.SHUTDOWN)
            await self._wait_empty()
        if self._connections:
            log.warning("shutdown deadline passed; cancelling %d connection(s)",
                        len(self._connections))
            for conn in list(self._connections.values()):
                conn._abort()
            with anyio.move_on_after(config.close_timeout + config.hook_timeout + 1):
                await self._wait_empty()
        # With a shared backplane the sessions live on for other workers: hand over
        # their detaches.
        if self._cluster is not None and not await self._cluster.flush(config.close_timeout):
            log.warning("shutdown: %d shared-state change(s) not announced",
                            len(self._cluster))
        # Nobody can resume here any more: the sessions end with the hub (with a
        # shared backplane, only here: their clients resume on another worker).
        ended = [(session, self._forget_session(session, "shutdown"))
                 for session in self._sessions.all()]
        for session, rooms in ended:
            await self._close_streams(session, rooms)
        log.info("hub stopped")

    async def _wait_empty(self) -> None:
        while self._connections:
            self._empty = anyio.Event()
            await self._empty.wait()

    # ---------------------------------------------------- used by the connections

    def _check_running(self) -> None:
        if self._phase is _Phase.IDLE or self._phase is _Phase.STOPPED:
            raise HubNotRunning(
                "the hub is not running: pass lifespan=hub.lifespan to your app "
                "(or enter 'async with hub.run()')"
            )

    def _client_address(self, conn: Connection) -> str:
        request = conn._transport.request
        peer = request.client.host if request.client is not None else None
        header = self.config.proxy_header
        # The headers only for a trusted proxy: parsed, they would stay with the
        # connection's request for its lifetime.
        return self._proxies.client_address(peer, lambda: request.headers.getlist(header))

    def _admit(self, conn: Connection) -> tuple[CloseReason, int] | None:
        """Register a new connection, or tell why it must be refused (and after how
        many seconds a retry may succeed)."""
        if self._phase is not _Phase.RUNNING:
            if self._phase is _Phase.IDLE:
                log.error("connection refused: the hub is not running; pass "
                          "lifespan=hub.lifespan to your app")
                return CloseReason.INTERNAL_ERROR, 0
            return CloseReason.OVER_CAPACITY, 0
        cap = self.config.max_connections
        if cap is not None and len(self._connections) >= cap:
            return CloseReason.OVER_CAPACITY, 0
        key = client_key(conn.client_address)
        if key == "unknown":
            # No address (a Unix socket without a trusted proxy header): every client
            # would share one per-address limit. Not limited; said once.
            if not self._warned_unknown:
                self._warned_unknown = True
                log.warning("a client without an address (a Unix socket?): per-address "
                            "limits do not apply to such clients; see the deploy guide")
            self._connections[conn.id] = conn
            self._stats.connections_total += 1
            return None
        decision = self._admission.admit(key, anyio.current_time())
        if decision.refusal is not None:
            return CloseReason(decision.refusal.value), decision.retry_after
        conn._admission_key = key
        self._connections[conn.id] = conn
        self._stats.connections_total += 1
        return None

    def _detach(self, conn: Connection, reason: CloseReason) -> None:
        """Forget `conn` (called once per connection, refused ones too)."""
        if (self._connections.pop(conn.id, None) is not None
                and conn._admission_key is not None):
            self._admission.release(conn._admission_key)
        self._stats.closes[str(reason)] += 1
        if not self._connections and self._empty is not None:
            self._empty.set()

    async def _authenticate(self, handshake: Handshake, *, anonymous_id: str
                            ) -> Identity | None:
        if self._authenticate_hook is None:
            return Identity(id=anonymous_id)
        return await self._authenticate_hook(handshake)

    async def _on_connect(self, conn: Connection) -> None:
        for hook in self._connect_hooks:
            await hook(conn)

    async def _on_disconnect(self, conn: Connection) -> None:
        for hook in self._disconnect_hooks:
            await hook(conn)

    # ------------------------------------------------------- sessions and rooms

    def _room_settings(self, room: str) -> RoomConfig:
        config = None if self._room_config is None else self._room_config(room)
        return config or self.config.default_room

    async def _open_session(self, conn: Connection, identity: Identity,
                            claims: ResumeClaims | None) -> tuple[HubSession, bool] | None:
        """Attach `conn` to the session its token names, or to a new session.

        Returns ``(session, resumed)``, or None if the token is stale (a newer one was
        issued and confirmed since): the caller closes with 3500.
        """
        session = None if claims is None else self._sessions.get(claims.session)
        if session is None and claims is not None and self._cluster is not None:
            adopted = await self._adopt_session(conn, identity, claims)
            if adopted == "here":  # another connection took it over here meanwhile
                session = self._sessions.get(claims.session)
            elif adopted != "absent":
                return adopted
        if session is not None and claims is not None and session.member == identity.id:
            if not session.accepts(claims.generation):
                self._stats.resumes["rejected"] += 1
                return None
            session.identity = identity
            replaced = self._sessions.attach(session, conn)
            conn._session, conn._resumed = session, True
            if replaced is not None:
                replaced._request_close(CloseReason.REPLACED)
            await anyio.lowlevel.checkpoint()
            return session, True
        if claims is not None:
            self._stats.resumes["new_session"] += 1
        session = self._sessions.create(identity.id, identity, conn)
        # Before any await: if the client vanishes now, the release ends the session.
        conn._session = session
        await self._backplane.open(inbox_key(session.id), self.config.inbox_history)
        return session, False

    async def _adopt_session(self, conn: Connection, identity: Identity,
                             claims: ResumeClaims
                             ) -> tuple[HubSession, bool] | Literal["absent", "here"] | None:
        """Resume a session another worker held (shared backplane): its record gives
        the token state and rooms. None: refused (3500); "absent": no such session
        exists anywhere (a new one is created); "here": a concurrent resume made it
        local meanwhile (resume it as a local one)."""
        try:
            assert self._cluster is not None
            record = await self._backplane.claim_session(
                claims.session, identity.id, claims.generation, self._cluster.ttl)
        except StaleSession:
            self._stats.resumes["rejected"] += 1
            return None
        if record is None or record.member != identity.id:
            return "absent"
        if self._sessions.get(record.id) is not None:
            return "here"
        # Claimed: from now on this worker holds it, even if the client has just left
        # (the release then detaches it, for a resume anywhere).
        session = self._sessions.create(identity.id, identity, conn, session_id=record.id)
        conn._session = session
        session.restore(max(record.generation, claims.generation),
                        (*record.accepted, claims.generation))
        await self._backplane.open(inbox_key(session.id), self.config.inbox_history)
        for room in record.rooms:
            if session.connection is not conn or self._sessions.get(session.id) is not session:
                break
            await self._join_rooms_of(session, room)
        log.info("%s: session=%s taken over from another worker", conn._tag(), session.id)
        return session, True

    async def _join_rooms_of(self, session: HubSession, room: str) -> None:
        """Re-enter `room` for an adopted session (before its welcome)."""
        config = self._room_settings(room)
        created = room not in self._rooms
        if not self._rooms.join(room, session, config=config):
            return
        await self._backplane.open(room, config.history)
        if created and config.presence:
            await self._load_roster(room)

    def _issue_token(self, session: HubSession, presented: int | None) -> str:
        generation = session.rotate(presented)
        if self._cluster is not None:
            self._cluster.session_changed(session)
        expires = self._wall_clock() + self.config.resume_token_ttl
        return self._signer.issue(ResumeClaims(session.id, session.member, generation,
                                               expires))

    def _attach_presence(self, session: HubSession, conn: Connection) -> list[str]:
        """The session's connection is welcomed: it is online in its rooms. Tell the
        others; return the roster frames for `conn` itself."""
        frames = []
        for room in sorted(self._rooms.rooms_of(session)):
            roster = self._presence.get(room)
            if roster is None:
                continue
            diff = roster.attach(session.member, session.id,
                                 info=session.identity.info, meta=conn.meta)
            self._broadcast_presence(room, diff, skip=conn)
            self._announce(room, "attach", session, conn.meta)
            frames.append(presence_state_frame(room, [e.to_wire() for e in roster.state()]))
        return frames

    def _announce(self, room: str, kind: Any, session: HubSession,
                  meta: Any = None) -> None:
        """Tell the other workers about a roster change made here."""
        if self._cluster is None or not self._room_settings(room).presence:
            return
        self._cluster.presence(PresenceOp(
            room, kind, session.member, session.id,
            dict(session.identity.info) if kind == "attach" else {},
            dict(meta or {}) if kind == "attach" else {}, self._backplane.worker))

    async def _load_roster(self, room: str) -> None:
        """A room opened here (shared backplane): build its roster mirror from the
        backplane, then apply what other workers announced meanwhile."""
        if self._cluster is None or room in self._roster_loading:
            return
        buffered: list[PresenceOp] = []
        self._roster_loading[room] = buffered
        try:
            ops = await self._backplane.roster(room)
        except Exception as exc:
            log.warning("room=%s: roster not loaded (%s); it fills in as members "
                        "change", room, type(exc).__name__)
            ops = []
        finally:
            self._roster_loading.pop(room, None)
        me = self._backplane.worker
        for op in ops:
            if op.worker != me:  # this worker's own sessions are known here first-hand
                self._apply_presence(op)
        for op in buffered:
            self._apply_presence(op)

    def _remote_presence(self, op: PresenceOp) -> None:
        """Another worker changed a roster."""
        if op.worker == self._backplane.worker:
            return
        buffered = self._roster_loading.get(op.room)
        if buffered is not None:
            buffered.append(op)
        else:
            self._apply_presence(op)

    def _apply_presence(self, op: PresenceOp) -> None:
        roster = self._presence.get(op.room)
        if roster is None:
            return
        local = self._sessions.get(op.session)
        if local is not None and local.connection is not None and op.kind != "attach":
            return  # the session is live here: a late word from its previous worker
        if op.kind == "attach":
            diff = roster.attach(op.member, op.session, info=op.info, meta=op.meta)
        elif op.kind == "detach":
            diff = roster.detach(op.member, op.session, info=op.info)
        else:
            diff = roster.remove(op.member, op.session)
        self._broadcast_presence(op.room, diff)

    def _reannounce(self) -> None:
        """Announce again every live session here and its presence (the others had
        declared this worker dead while it stalled, or it is new)."""
        assert self._cluster is not None
        for session in self._sessions.all():
            conn = session.connection
            if conn is None or not conn._welcomed:
                continue
            self._cluster.session_changed(session)
            for room in sorted(self._rooms.rooms_of(session)):
                self._announce(room, "attach", session, conn.meta)

    async def _after_resync(self) -> None:
        """The backplane reconnected: messages from other workers may have been lost.
        Drop the sessions that moved or ended meanwhile, save the live ones again,
        and reload the rosters of the rooms open here."""
        assert self._cluster is not None
        try:
            # First what this worker itself still has to say (saves, detaches), or its
            # own sessions would look ended.
            await self._cluster.flush(self.config.close_timeout)
            owners = await self._backplane.session_owners(
                [session.id for session in self._sessions.all()])
            me = self._backplane.worker
            for session_id, owner in owners.items():
                session = self._sessions.get(session_id)
                if session is None:
                    continue
                if owner is None and session.connection is None:
                    self._drop_local(session_id, "ended_elsewhere")
                elif owner not in (None, "", me):
                    self._drop_local(session_id, "moved")
                elif session.connection is not None:
                    self._cluster.session_changed(session)
            for room in list(self._presence):
                await self._reload_roster(room)
        except Exception as exc:
            log.warning("shared state: resync failed: %s", type(exc).__name__)

    async def _reload_roster(self, room: str) -> None:
        """Bring the mirror of `room` in line with the backplane's roster (other
        workers' sessions only; this worker's own are known first-hand). Changes
        announced while the roster is read are applied after it, as on a first load."""
        if room in self._roster_loading:
            return
        buffered: list[PresenceOp] = []
        self._roster_loading[room] = buffered
        try:
            ops = await self._backplane.roster(room)
        finally:
            self._roster_loading.pop(room, None)
        roster = self._presence.get(room)
        if roster is None:
            return
        me = self._backplane.worker
        remote = [op for op in ops if op.worker != me and not self._is_live_here(op.session)]
        known = {op.session for op in remote} | {op.session for op in buffered}
        for entry in roster.state():
            for session_id in roster.sessions_of(entry.member):
                if session_id not in known and self._sessions.get(session_id) is None:
                    self._broadcast_presence(room, roster.remove(entry.member, session_id))
        for op in (*remote, *buffered):
            self._apply_presence(op)

    def _is_live_here(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.connection is not None

    def _drop_local(self, session_id: str, why: str) -> None:
        """Another worker took the session over, or ended it: forget it here without
        announcing anything (its rosters are updated by whoever holds it now)."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        if session.connection is not None:
            # Moved: a newer connection elsewhere replaced this one (3503). Ended
            # elsewhere while connected here: resume (3010), which gives a new session.
            session.connection._request_close(
                CloseReason.REPLACED if why == "moved" else CloseReason.GAP)
        self._sessions.remove(session)
        self._metrics.sessions_ended[why] += 1
        rooms = sorted(self._rooms.rooms_of(session))
        for room in rooms:
            self._rooms.leave(room, session)
            if room not in self._rooms:
                self._presence.pop(room, None)
        if self._tg is not None:
            self._tg.start_soon(self._close_streams, session, rooms)

    def _broadcast_presence(self, room: str, diff: Any, skip: Connection | None = None
                            ) -> None:
        if not diff:
            return
        target = self._rooms.get(room)
        if target is None:
            return
        frame = presence_diff_frame(room, [e.to_wire() for e in diff.joins],
                                    list(diff.leaves))
        size = frame_size(frame)
        for session in target.members:
            conn = session.connection
            if conn is not None and conn is not skip and conn._welcomed:
                conn._push_personal(frame, size)

    def _deliver(self, envelope: Envelope) -> None:
        """The backplane delivers a numbered message: queue it for the live members
        of its stream. Synchronous: never waits for a client."""
        stream = envelope.stream
        owner = inbox_owner(stream)
        if owner is not None:
            session = self._sessions.get(owner)
            if session is not None and session.connection is not None:
                # Personal messages are never discarded by a policy.
                session.connection._deliver(envelope, Policy.DISCONNECT)
            return
        room = self._rooms.get(stream)
        if room is None:
            return
        policy = room.config.policy
        exclude = envelope.exclude
        started = time.perf_counter()
        for session in room.members:
            conn = session.connection
            if conn is not None:
                conn._deliver(envelope, policy, session.id == exclude)
        self._metrics.broadcast_duration.observe(time.perf_counter() - started)

    def _lost(self, stream: str) -> None:
        """The backplane could not deliver some messages of `stream`: its live clients
        must resume (3010) to recover them from history, or get a snapshot."""
        owner = inbox_owner(stream)
        if owner is not None:
            session = self._sessions.get(owner)
            sessions = [] if session is None else [session]
        else:
            room = self._rooms.get(stream)
            sessions = [] if room is None else list(room.members)
        log.warning("stream=%s: messages may have been lost in transit; %d client(s) told "
                    "to resume", stream, sum(s.connection is not None for s in sessions))
        for session in sessions:
            if session.connection is not None:
                session.connection._request_close(CloseReason.GAP)

    @property
    def ready(self) -> bool:
        """True while the hub runs and its backplane can publish and deliver: a
        readiness probe (a load balancer sends new clients elsewhere while False)."""
        return self._phase is _Phase.RUNNING and self._backplane.healthy

    async def readiness(self, request: Request) -> Response:
        """A Starlette endpoint for the load balancer's readiness probe: 200 while
        `ready`, else 503. ``Route("/ready", hub.readiness)``."""
        ready = self.ready
        return PlainTextResponse("ready\n" if ready else "not ready\n",
                                 status_code=200 if ready else 503)

    async def _join(self, conn: Connection, room: str) -> None:
        _check_room_name(room)
        session = conn._session
        if session is None or session.connection is not conn or conn._sm.closing:
            await anyio.lowlevel.checkpoint()
            return
        config = self._room_settings(room)
        created = room not in self._rooms
        if not self._rooms.join(room, session, config=config):
            await anyio.lowlevel.checkpoint()
            return
        if created and config.presence:
            self._presence[room] = RoomPresence()
        if self._cluster is not None:
            self._cluster.session_changed(session)
        if conn._pending is not None:
            # During the handshake: the welcome will report the stream.
            await self._backplane.open(room, config.history)
            if created and config.presence:
                await self._load_roster(room)
            return
        # Welcomed already: buffer the room's deliveries until its position is known,
        # then announce the stream (a `stream` frame) and deliver what follows it.
        conn._starting[room] = []
        try:
            # A room that did not exist starts a stream (a new epoch in memory).
            epoch, offset = await self._backplane.open(room, config.history)
            if created and config.presence:
                await self._load_roster(room)
        finally:
            buffered = conn._starting.pop(room, [])
        if session.connection is not conn or room not in self._rooms.rooms_of(session):
            return  # replaced, or left again meanwhile
        conn._start_stream(room, epoch, offset, config.policy is not Policy.DISCONNECT,
                           buffered)
        roster = self._presence.get(room)
        if roster is not None:
            diff = roster.attach(session.member, session.id,
                                 info=session.identity.info, meta=conn.meta)
            self._broadcast_presence(room, diff, skip=conn)
            self._announce(room, "attach", session, conn.meta)
            conn._push_personal(
                presence_state_frame(room, [e.to_wire() for e in roster.state()]))

    async def _leave(self, conn: Connection, room: str) -> None:
        session = conn._session
        if session is None or not self._leave_room(session, room):
            await anyio.lowlevel.checkpoint()
            return
        if conn._positions.pop(room, None) is not None:
            conn._push_personal(left_frame(room))  # the client forgets its position
        await self._close_unused(room)

    def _leave_room(self, session: HubSession, room: str) -> bool:
        if not self._rooms.leave(room, session):
            return False
        roster = self._presence.get(room)
        if room not in self._rooms:
            self._presence.pop(room, None)
        elif roster is not None:
            self._broadcast_presence(room, roster.remove(session.member, session.id))
        self._announce(room, "remove", session)
        if self._cluster is not None and self._sessions.get(session.id) is session:
            self._cluster.session_changed(session)
        return True

    async def _connection_ended(self, conn: Connection, resumable: bool) -> None:
        """`conn` was released: detach its session for the window, or end it."""
        session = conn._session
        if (session is None or session.connection is not conn
                or self._sessions.get(session.id) is not session):
            return  # no session yet, a newer connection took it over, or it ended
        if resumable and session.welcomed:
            self._sessions.detach(session, anyio.current_time())
            if self._cluster is not None:
                self._cluster.session_detached(session)
            for room in sorted(self._rooms.rooms_of(session)):
                roster = self._presence.get(room)
                if roster is not None:
                    self._broadcast_presence(room, roster.detach(session.member, session.id))
                self._announce(room, "detach", session)
            if self._expiry_wakeup is not None:
                self._expiry_wakeup.set()
            await self._enforce_detached_cap()
        else:
            await self._end_session(session)

    async def _enforce_detached_cap(self) -> None:
        """End the sessions detached longest ago while more than
        ``max_detached_sessions`` wait for a resume."""
        cap = self.config.max_detached_sessions
        ended = []
        while cap is not None and self._sessions.detached > cap:
            oldest = self._sessions.oldest_detached()
            assert oldest is not None
            log.warning("session=%s member=%s: ended before its resume window, "
                        "max_detached_sessions=%d reached", oldest.id, oldest.member, cap)
            ended.append((oldest, self._forget_session(oldest, "evicted")))
        for session, rooms in ended:
            await self._close_streams(session, rooms)
        await anyio.lowlevel.checkpoint()

    async def _end_session(self, session: HubSession) -> None:
        """The session is over: it leaves its rooms (presence: leave) and is forgotten."""
        await self._close_streams(session, self._forget_session(session, "closed"))

    def _forget_session(self, session: HubSession, why: str) -> list[str]:
        """The synchronous part of ending a session; return the rooms it left. Ending
        several sessions forgets them all before any await, so that nobody sees the
        registries half-updated (sessions gone, their rooms not)."""
        if self._sessions.remove(session):
            self._metrics.sessions_ended[why] += 1
        rooms = sorted(self._rooms.rooms_of(session))
        if self._cluster is not None and why == "shutdown":
            # Shared: the session lives on for a resume on another worker.
            for room in rooms:
                self._rooms.leave(room, session)
                if room not in self._rooms:
                    self._presence.pop(room, None)
            return rooms
        for room in rooms:
            self._leave_room(session, room)
        if self._cluster is not None:
            self._cluster.session_ended(session.id)
        return rooms

    async def _close_streams(self, session: HubSession, rooms: list[str]) -> None:
        await self._backplane.close(inbox_key(session.id))
        for room in rooms:
            await self._close_unused(room)

    async def _close_unused(self, room: str) -> None:
        """Close a room's stream if the room is gone. Checked at the moment of closing:
        someone may have joined (re-creating the room) while we awaited."""
        if room in self._rooms:
            await anyio.lowlevel.checkpoint()
        else:
            await self._backplane.close(room)

    async def _expire_sessions(self) -> None:
        """Background task: end the detached sessions whose window has passed."""
        sessions = self._sessions
        while True:
            self._expiry_wakeup = wakeup = anyio.Event()
            deadline = sessions.next_expiry()
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
                await wakeup.wait()
            ended = [(session, self._forget_session(session, "expired"))
                     for session in sessions.expire(anyio.current_time())]
            for session, rooms in ended:
                log.info("session=%s member=%s: resume window expired", session.id,
                         session.member)
                try:
                    await self._close_streams(session, rooms)
                except Exception:
                    log.exception("closing the streams of an expired session failed")


class _HubAsgi:
    """`Hub.asgi`: an object, not a bound method, so that servers that inspect the
    app (uvicorn's ASGI 2/3 detection) recognise an ASGI 3 callable."""

    __slots__ = ("_hub",)

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await Connection(self._hub, AsgiTransport(scope, receive, send))._run()
        else:
            body = b"This endpoint speaks WebSocket only.\n"
            await send({"type": "http.response.start", "status": 426, "headers": [
                (b"content-type", b"text/plain"), (b"upgrade", b"websocket"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        phase = "startup"
        try:
            async with self._hub.lifespan():
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
                phase = "shutdown"
        except Exception as exc:
            log.exception("hub lifespan %s failed", phase)
            await send({"type": f"lifespan.{phase}.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


class _StateEvents:
    """What a shared backplane reports to the hub (`StateEvents`)."""

    __slots__ = ("_hub",)

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def presence(self, op: PresenceOp) -> None:
        self._hub._remote_presence(op)

    def session_moved(self, session: str) -> None:
        self._hub._drop_local(session, "moved")

    def session_ended(self, session: str) -> None:
        self._hub._drop_local(session, "ended_elsewhere")

    def reannounce(self) -> None:
        self._hub._reannounce()

    def disconnect(self, session: str, code: int, reason: str) -> None:
        self._hub._disconnect_here(session, code, reason)

    def resynced(self) -> None:
        hub = self._hub
        if hub._tg is not None:
            hub._tg.start_soon(hub._after_resync, name="wsroom shared state resync")
