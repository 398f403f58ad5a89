"""The hub: rooms, connections, handlers, publishing and the hub's lifetime.

Theory of operation
-------------------
A `Hub` is used from one event loop. Its registries (connections, rooms, members) are
changed only by synchronous code: `publish` assigns an offset, encodes the frame once
and pushes it onto every member's queue without awaiting, so no membership change can
interleave with a fan-out, and no client can make a broadcast wait.

`Hub.run()` owns the hub-level task group (background work) and, on exit, the graceful
shutdown: stop admitting (1013), tell clients to reconnect (1012) in batches spread over
half of ``shutdown_timeout`` while their queues are flushed, then cancel whatever is
left at the deadline. Connections themselves run in the ASGI server's tasks (one task
group each, see `_connection.py`), and always release their slot on the way out.
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from ._config import HubConfig, RoomConfig
from ._connection import Connection, Identity
from ._errors import HubNotRunning, MessageTooLarge
from ._handlers import Handler, Handlers, MessageScope
from ._protocol import msg_frame
from ._queue import frame_size
from ._rooms import Rooms
from ._signals import drain_on_signals
from ._state import CloseReason
from ._transport import AsgiTransport, Handshake

__all__ = ["Hub", "HubStats"]

log = logging.getLogger("wsroom.hub")

Authenticate = Callable[[Handshake], Awaitable[Identity | None]]
ConnectionHook = Callable[[Connection], Awaitable[None]]
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


@dataclass(frozen=True)
class HubStats:
    """A snapshot of a hub's registries and counters (see `Hub.stats`).

    Attributes:
        connections: connections currently registered (including handshakes).
        rooms: rooms that currently exist.
        members: distinct connections that are in at least one room.
        queued_bytes: bytes waiting in all outbound queues.
        connections_total: connections admitted since the hub started.
        closes: connections ended, by close reason.
        messages_in: frames received from clients.
        messages_out: messages written to clients.
        frames_out: WebSocket frames written (a batch counts once).
        discarded: messages discarded by `drop_oldest` or `coalesce` policies.
        handler_errors: messages whose handler, or payload validator, raised (or whose
            reply could not be encoded).
    """

    connections: int
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
            client is accepted as an anonymous member named after its session id.
        message_scope: ``(MessageContext) -> async context manager``; entered around
            every handler call, its value is ``ctx.scope`` (e.g. a DB session).
        room_config: ``(room name) -> RoomConfig`` for per-room settings; rooms it
            returns None for use ``config.default_room``.

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
    ) -> None:
        self.config = config or HubConfig()
        self._authenticate_hook = authenticate
        self._message_scope = message_scope
        self._room_config = room_config
        self._handlers = Handlers()
        self._connect_hooks: list[ConnectionHook] = []
        self._disconnect_hooks: list[ConnectionHook] = []
        self._connections: dict[str, Connection] = {}
        self._rooms: Rooms[Connection] = Rooms()
        self._stats = _Counters()
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
        ends, after it has left its rooms (``connection.rooms`` still names them)."""
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
        """The connections in `room` (empty if the room does not exist)."""
        found = self._rooms.get(room)
        return found.members if found is not None else ()

    def rooms(self) -> list[str]:
        """Names of the rooms that exist."""
        return self._rooms.names()

    def stats(self) -> HubStats:
        """Current registry sizes and counters."""
        counters = self._stats
        return HubStats(
            connections=len(self._connections),
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
        )

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
                members (nothing was delivered).

        Raises:
            HubNotRunning: outside `Hub.run()`.
            MessageTooLarge: if the encoded frame exceeds ``max_queue_bytes``.
        """
        self._check_running()
        target = self._rooms.get(room)
        if target is None:
            await anyio.lowlevel.checkpoint()
            return None
        stream = target.stream
        frame = msg_frame(room, stream.epoch, stream.offset + 1, event, data)
        size = frame_size(frame)
        if size > self.config.max_queue_bytes:
            raise MessageTooLarge(
                f"a message of {size} bytes can never fit a client queue "
                f"(max_queue_bytes={self.config.max_queue_bytes})"
            )
        offset = stream.next_offset()
        policy = target.config.policy
        scoped = None if key is None else (room, key)  # rooms never coalesce each other
        for member in target.members:
            if member is not exclude:
                member._enqueue(frame, size, policy, scoped)
        # Let writers run: a publisher in a tight loop must not starve them.
        await anyio.lowlevel.checkpoint()
        return offset

    # ----------------------------------------------------------- ASGI and lifetime

    async def endpoint(self, websocket: WebSocket) -> None:
        """Serve a Starlette/FastAPI ``WebSocket`` that has not been accepted yet.

        Starlette: ``WebSocketRoute("/ws", hub.endpoint)``. FastAPI:
        ``app.add_api_websocket_route("/ws", hub.endpoint)``, or call
        ``await hub.endpoint(websocket)`` from your own ``@app.websocket`` route.
        """
        await Connection(
            self, AsgiTransport(websocket.scope, websocket.receive, websocket.send)
        )._run()

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
            self._phase = _Phase.RUNNING
            log.info("hub running")
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tg.cancel_scope.cancel()
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

    def _admit(self, conn: Connection) -> CloseReason | None:
        """Register a new connection, or tell why it must be refused."""
        if self._phase is not _Phase.RUNNING:
            if self._phase is _Phase.IDLE:
                log.error("connection refused: the hub is not running; pass "
                          "lifespan=hub.lifespan to your app")
                return CloseReason.INTERNAL_ERROR
            return CloseReason.OVER_CAPACITY
        cap = self.config.max_connections
        if cap is not None and len(self._connections) >= cap:
            return CloseReason.OVER_CAPACITY
        self._connections[conn.id] = conn
        self._stats.connections_total += 1
        return None

    def _detach(self, conn: Connection, reason: CloseReason) -> list[str]:
        """Forget `conn` everywhere (called once per connection, refused ones too);
        return the rooms it was in."""
        rooms = self._rooms.leave_all(conn)
        self._connections.pop(conn.id, None)
        self._stats.closes[str(reason)] += 1
        if not self._connections and self._empty is not None:
            self._empty.set()
        return rooms

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

    async def _join(self, conn: Connection, room: str) -> None:
        _check_room_name(room)
        if conn._sm.closing or conn._released:
            return
        config = None if self._room_config is None else self._room_config(room)
        # A new room starts a new stream: a new epoch.
        epoch = "" if room in self._rooms else secrets.token_urlsafe(6)
        joined = self._rooms.join(room, conn, config=config or self.config.default_room,
                                  epoch=epoch)
        if joined and not conn._welcomed.is_set():
            stream = self._rooms.get(room).stream  # type: ignore[union-attr]
            conn._join_positions[room] = (stream.epoch, stream.offset)
        await anyio.lowlevel.checkpoint()

    async def _leave(self, conn: Connection, room: str) -> None:
        if self._rooms.leave(room, conn):
            conn._join_positions.pop(room, None)
        await anyio.lowlevel.checkpoint()


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
