"""The hub: the public facade over a `Runtime` (registration, publishing, the ASGI
endpoint, the hub's lifetime and its drain).

Theory of operation
-------------------
A `Hub` is used from one event loop. Its parts live in ``_runtime``: the `Registry` of
connections (admission), the `Membership` (sessions, rooms, rosters and the fan-out),
the timers, the flusher. `publish` encodes the message once and hands it to the
backplane, which assigns the offset, keeps it in the stream's history and delivers it
(`Membership.deliver`): the frame is pushed onto every live member's queue without
awaiting, so no membership change can interleave with a fan-out, and no client can
make a broadcast wait.

`Hub.run()` owns the hub-level task group (background work) and, on exit, the graceful
shutdown: stop admitting (1013), tell clients to reconnect (1012) in batches spread over
half of ``shutdown_timeout`` while their queues are flushed, then cancel whatever is
left at the deadline. Connections themselves run in the ASGI server's tasks (one task
group each, see ``peer.py``), and always release their slot on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from wsroom._asgi.signals import drain_on_signals
from wsroom._asgi.transport import AsgiTransport, Handshake
from wsroom._backplane.base import Backplane, PresenceOp, SharedState
from wsroom._backplane.memory import MemoryBackplane
from wsroom._core.config import HubConfig, RoomConfig
from wsroom._core.errors import HubNotRunning, check_close
from wsroom._core.identity import Identity
from wsroom._core.presence import PresenceEntry
from wsroom._core.sessions import INBOX, inbox_key
from wsroom._core.state import CloseReason
from wsroom._core.tokens import TokenSigner
from wsroom._runtime.connection import Connection
from wsroom._runtime.flush import Flusher
from wsroom._runtime.membership import Ended, Membership, check_room_name
from wsroom._runtime.peer import Peer
from wsroom._runtime.registry import Phase
from wsroom._runtime.runtime import Runtime
from wsroom._runtime.serve import serve
from wsroom._runtime.stats import HubStats, Telemetry

__all__ = ["Hub", "HubStats", "MessageContext"]

log = logging.getLogger("wsroom.hub")

Authenticate = Callable[[Handshake], Awaitable[Identity | None]]
ConnectionHook = Callable[[Connection], Awaitable[None]]
Snapshot = Callable[[Connection, str], Awaitable[Any]]


class MessageContext:
    """What a handler knows about the message it handles.

    Attributes:
        hub: the hub.
        connection: the connection the message came from.
        event: the event name.
        ref: the client's request reference, if it expects a reply.
        scope: the value yielded by the hub's `message_scope` for this message
            (e.g. a database session), or None.
    """

    __slots__ = ("connection", "event", "hub", "ref", "scope")

    def __init__(
        self, hub: Hub, connection: Connection, event: str, ref: str | int | None
    ) -> None:
        self.hub = hub
        self.connection = connection
        self.event = event
        self.ref = ref
        self.scope: Any = None

    async def publish(
        self,
        room: str,
        event: str,
        data: Any = None,
        *,
        key: str | None = None,
        exclude_self: bool = False,
    ) -> int | None:
        """Publish to `room`; shorthand for `Hub.publish`."""
        return await self.hub.publish(
            room, event, data, key=key, exclude=self.connection if exclude_self else None
        )


Handler = Callable[[MessageContext, Any], Awaitable[Any]]
MessageScope = Callable[[MessageContext], AbstractAsyncContextManager[Any]]
H = TypeVar("H", bound=Handler)
C = TypeVar("C", bound=ConnectionHook)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


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
        clock: the wall clock (seconds since the epoch) that resume tokens' expiry is
            checked against; default `time.time` (tests pass their own).

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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config = config or HubConfig()
        self._room_config = room_config
        backplane = backplane if backplane is not None else MemoryBackplane()
        shared = backplane if isinstance(backplane, SharedState) else None
        if shared is not None and config.resume_secrets is None:
            raise ValueError("a shared backplane needs HubConfig.resume_secrets (the "
                             "same on every worker), or no client could resume on "
                             "another worker")
        self._backplane = backplane
        self._shared = shared
        self._telemetry = telemetry = Telemetry()
        signer = TokenSigner(config.resume_secrets or [secrets.token_bytes(32)])
        self._membership = membership = Membership(
            config, self._room_settings, backplane, shared, telemetry, signer, clock)
        self._runtime = Runtime(
            config, backplane, membership, telemetry, authenticate=authenticate,
            snapshot=snapshot, message_scope=message_scope,
            make_context=lambda conn, event, ref: MessageContext(self, conn, event, ref))
        self._registry = self._runtime.registry
        backplane.bind(membership.deliver, membership.lost)
        backplane.limit_history(config.max_history_bytes)
        if shared is not None:
            shared.bind_state(_StateEvents(self, membership))
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
            self._runtime.handlers.add(event, handler, model, localns=caller)
            return handler

        return decorator

    def on_connect(self, hook: C) -> C:
        """Register ``async (connection)`` run after a successful ``hello``, before the
        ``welcome`` is sent; join rooms here. Raising `Reject` closes the connection."""
        self._runtime.connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: C) -> C:
        """Register ``async (connection)`` run once when an authenticated connection
        ends, whether its session ends, waits for a resume, or was taken over
        (``connection.rooms`` names the session's rooms at that moment)."""
        self._runtime.disconnect_hooks.append(hook)
        return hook

    # ------------------------------------------------------------------- queries

    @property
    def running(self) -> bool:
        """True between entering `run` and the start of its shutdown."""
        return self._registry.phase is Phase.RUNNING

    @property
    def telemetry(self) -> Telemetry:
        """The hub's counters and histograms, live (read them; `stats` is the
        snapshot for programs, ``wsroom.metrics`` the Prometheus export)."""
        return self._telemetry

    def connections(self) -> list[Connection]:
        """The connections currently registered."""
        return [peer.connection for peer in self._registry]

    def members(self, room: str) -> tuple[Connection, ...]:
        """The live connections in `room` (members whose session is detached, waiting
        for a resume, are not included; see `presence` for the whole roster)."""
        found = self._membership.rooms.get(room)
        if found is None:
            return ()
        return tuple(s.connection.connection for s in found.members
                     if s.connection is not None)

    def presence(self, room: str) -> tuple[PresenceEntry, ...]:
        """The roster of `room`: every member with a session in it, online or away
        (empty if the room does not exist or has presence turned off)."""
        return self._membership.roster.state(room)

    def rooms(self) -> list[str]:
        """Names of the rooms that exist."""
        return self._membership.rooms.names()

    def stats(self) -> HubStats:
        """Current registry sizes and counters."""
        counters = self._telemetry.counters
        membership = self._membership
        return HubStats(
            connections=len(self._registry),
            sessions=len(membership.sessions),
            detached_sessions=membership.sessions.detached,
            rooms=len(membership.rooms),
            members=membership.rooms.member_count(),
            queued_bytes=sum(peer.queued_bytes for peer in self._registry),
            connections_total=counters.connections_total,
            closes=dict(counters.closes),
            messages_in=counters.messages_in,
            messages_out=counters.messages_out,
            frames_out=counters.frames_out,
            discarded=counters.discarded,
            handler_errors=counters.handler_errors,
            resumes=dict(counters.resumes),
        )

    def connection_states(self) -> dict[str, int]:
        """Connections by state: ``handshake`` (before the welcome), ``open``,
        ``closing`` (the ``wsroom_connections`` gauge)."""
        return self._registry.states()

    @property
    def backplane(self) -> Backplane:
        """The hub's backplane."""
        return self._backplane

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
        check_room_name(room)
        backplane = self._backplane
        if room not in self._membership.rooms and self._shared is None:
            await anyio.lowlevel.checkpoint()
            return None
        payload = self._runtime.payload(event, data, room)
        envelope = await backplane.publish(
            room, room, payload,
            key=None if key is None else (room, key),  # rooms never coalesce each other
            exclude=None if exclude is None else exclude.session,
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
        ids = [session.id for session in self._membership.sessions.of_member(member)]
        if self._shared is not None:  # and the member's sessions on other workers
            ids = sorted({*ids, *await self._shared.member_sessions(member)})
        if not ids:
            await anyio.lowlevel.checkpoint()
            return 0
        payload = self._runtime.payload(event, data, INBOX)
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
        membership = self._membership
        sessions = membership.sessions.of_member(member)
        ended: Ended = []
        for session in sessions:  # here first: even with the backplane down
            membership.kick(session, code, reason, ended)
        for session, rooms in ended:
            await membership.close_streams(session, rooms)
        elsewhere = 0
        if self._shared is not None:  # then the member's sessions on other workers
            local = {session.id for session in sessions}
            elsewhere = await self._shared.disconnect_sessions(
                [sid for sid in await self._shared.member_sessions(member)
                 if sid not in local], code, reason)
        await anyio.lowlevel.checkpoint()
        return len(sessions) + elsewhere

    def _room_settings(self, room: str) -> RoomConfig:
        config = None if self._room_config is None else self._room_config(room)
        return config or self.config.default_room

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
        await self._serve(websocket.scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI ``websocket`` connection (the raw form of `endpoint`)."""
        await serve(Peer(self._runtime, AsgiTransport(scope, receive, send)))

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
        registry = self._registry
        if registry.phase is not Phase.IDLE:
            raise RuntimeError(f"the hub is {registry.phase.value}; a hub runs only once")
        membership = self._membership
        async with anyio.create_task_group() as tg:
            self._tg = membership.tg = tg
            await self._backplane.start(tg)
            try:
                registry.phase = Phase.RUNNING
                tg.start_soon(membership.expire, name="wsroom session expiry")
                tg.start_soon(self._runtime.timers.run, name="wsroom timers")
                if _on_asyncio():
                    tg.start_soon(self._run_flusher, name="wsroom flusher")
                if membership.outbox is not None:
                    tg.start_soon(membership.outbox.run, name="wsroom shared state")
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
        registry.phase = Phase.STOPPED

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
        runtime = self._runtime
        flusher = runtime.flusher = Flusher()
        try:
            await flusher.run()
        finally:
            # Whatever it had not written yet is the writers' again.
            runtime.flusher = None
            for sender in flusher.take_dirty():
                sender.unscheduled()

    async def shutdown(self) -> None:
        """Drain: refuse new connections (1013), close the others with 1012 in
        batches, flushing their queues, within ``shutdown_timeout``.

        Idempotent: every caller waits for the same drain. It runs in the hub's task
        group, so a handler may call it: the drain is not cancelled along with the
        handler's own connection.
        """
        if self._tg is None or self._registry.phase is Phase.STOPPED:
            return
        if self._drained is None:
            self._drained = anyio.Event()
            self._registry.phase = Phase.DRAINING
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
        registry = self._registry
        targets = list(registry)
        log.info("hub draining %d connection(s)", len(targets))
        with anyio.move_on_after(config.shutdown_timeout):
            batch = config.shutdown_batch_size
            batches = math.ceil(len(targets) / batch)
            pause = config.shutdown_timeout / 2 / batches if batches > 1 else 0.0
            for start in range(0, len(targets), batch):
                if start:
                    await anyio.sleep(pause)
                for peer in targets[start:start + batch]:
                    peer.request_close(CloseReason.SHUTDOWN)
            await registry.wait_empty()
        if len(registry):
            log.warning("shutdown deadline passed; cancelling %d connection(s)",
                        len(registry))
            for peer in registry:
                peer.abort()
            with anyio.move_on_after(config.close_timeout + config.hook_timeout + 1):
                await registry.wait_empty()
        # With a shared backplane the sessions live on for other workers: hand over
        # their detaches.
        outbox = self._membership.outbox
        if outbox is not None and not await outbox.flush(config.close_timeout):
            log.warning("shutdown: %d shared-state change(s) not announced", len(outbox))
        # Nobody can resume here any more: the sessions end with the hub (with a
        # shared backplane, only here: their clients resume on another worker).
        await self._membership.end_all("shutdown")
        log.info("hub stopped")

    def _check_running(self) -> None:
        phase = self._registry.phase
        if phase is Phase.IDLE or phase is Phase.STOPPED:
            raise HubNotRunning(
                "the hub is not running: pass lifespan=hub.lifespan to your app "
                "(or enter 'async with hub.run()')"
            )

    @property
    def ready(self) -> bool:
        """True while the hub runs and its backplane can publish and deliver: a
        readiness probe (a load balancer sends new clients elsewhere while False)."""
        return self._registry.phase is Phase.RUNNING and self._backplane.healthy

    async def readiness(self, request: Request) -> Response:
        """A Starlette endpoint for the load balancer's readiness probe: 200 while
        `ready`, else 503. ``Route("/ready", hub.readiness)``."""
        ready = self.ready
        return PlainTextResponse("ready\n" if ready else "not ready\n",
                                 status_code=200 if ready else 503)

    def _background(self, job: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        if self._tg is not None:
            self._tg.start_soon(job, name=name)


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
            await self._hub._serve(scope, receive, send)
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

    __slots__ = ("_hub", "_membership")

    def __init__(self, hub: Hub, membership: Membership) -> None:
        self._hub = hub
        self._membership = membership

    def presence(self, op: PresenceOp) -> None:
        self._membership.roster.remote(op)

    def session_moved(self, session: str) -> None:
        self._membership.drop(session, "moved")

    def session_ended(self, session: str) -> None:
        self._membership.drop(session, "ended_elsewhere")

    def reannounce(self) -> None:
        self._membership.reannounce()

    def disconnect(self, session: str, code: int, reason: str) -> None:
        self._membership.kick_here(session, code, reason)

    def resynced(self) -> None:
        self._hub._background(self._membership.resync, "wsroom shared state resync")
