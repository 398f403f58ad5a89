"""A reconnecting Python client for wsroom servers (AnyIO; the ``client`` extra).

Theory of operation
-------------------
`Client` runs one background task (inside ``async with``) that owns the socket: it
connects, sends the ``hello`` (with the stored stream positions), answers pings,
and routes frames: ``msg`` frames to the message stream (after dropping duplicates by
``(stream, epoch, offset)``), ``reply``/``error`` frames to pending requests. When the
connection ends with a code that means "reconnect" (1001, 1006, 1011-1013,
3000-3499, 4000-4499) it waits a full-jitter backoff (0.5 s doubling up to 20 s) and
connects again; any other code is terminal and ends the client. A server that sends
nothing for ``ping_interval + pong_timeout`` (as announced in its ``welcome``) is
presumed dead: the client drops the socket and reconnects. A gap in a stream's offsets
is treated the same way, so that the next ``hello`` can ask for what is missing.
Positions, duplicates and gaps are judged by `wsroom._core.cursor.StreamCursor`, the
same check the server makes (and ``static/wsroom.js`` mirrors).

Every reconnect presents the last ``welcome``'s resume token and the positions: the
server replays what was missed (``recovered: true``; duplicates are dropped here by
offset), or says ``recovered: false`` and sends a `Snapshot` of the stream, which
`messages()` yields in its place in the sequence. A token the server refuses (3500: it
expired, or the server's secret changed) is dropped and the client connects once more
as a new session; a second refusal is final. ``presence`` frames keep `presence`
current.

Tools that need more than messages (a load test, a test that records what a client lived
through) observe the connection through two callbacks, ``on_frame`` (every frame, before
the client acts on it) and ``on_disconnect`` (how each connection attempt ended), and can
cut a connection with `Client.drop`: no subclassing of private methods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from wsroom._core.codes import should_reconnect
from wsroom._core.cursor import Step, StreamCursor
from wsroom.client._websocket import ConnectionClosed, HandshakeRejected, WebSocket, connect

__all__ = ["Client", "ClientClosed", "Message", "RequestError", "Snapshot",
           "backoff_delay"]

log = logging.getLogger("wsroom.client")

_NO_DEFAULT: Any = object()

_STABLE_AFTER = 10.0
"""Seconds a connection must last for the backoff to start over: a server that welcomes
and then sheds the client (3008, 3013, 1013) must not get a reconnect storm."""


@dataclass(frozen=True, slots=True)
class Message:
    """A message received on a stream."""

    stream: str
    epoch: str
    offset: int
    event: str
    data: Any


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The server's state of a stream as of ``offset``, sent instead of the missed
    messages when they could not be replayed (or to a new session). Messages after
    ``offset`` follow it; the snapshot may already reflect some of them, so apply
    them idempotently (e.g. keyed by id)."""

    stream: str
    epoch: str
    offset: int
    data: Any


class ClientClosed(Exception):
    """The client stopped for good: a terminal close code, or it was closed."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"client closed: {code} {reason}".strip())
        self.code = code
        self.reason = reason


class RequestError(Exception):
    """The server answered a request with an ``error`` frame, or the connection was
    lost before the reply (`code` ``"connection_lost"``)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 20.0,
                  rng: random.Random | None = None) -> float:
    """Full-jitter backoff: uniform in ``[0, min(cap, base * 2**attempt)]``."""
    ceiling = min(cap, base * 2 ** min(attempt, 32))
    return (rng or random).uniform(0.0, ceiling)


class _Messages:
    __slots__ = ("_inbox",)

    def __init__(self, inbox: MemoryObjectReceiveStream[Message | Snapshot]) -> None:
        self._inbox = inbox

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> Message | Snapshot:
        try:
            return await self._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None


class _Pending:
    __slots__ = ("done", "error", "result", "sent_on")

    def __init__(self) -> None:
        self.sent_on = 0  # the connection number it was sent on (0: not yet)
        self.done = anyio.Event()
        self.result: Any = None
        self.error: RequestError | None = None


class Client:
    """A wsroom client that reconnects by itself.

    Args:
        url: the server's ``ws://`` URL.
        auth: the ``auth`` value of every ``hello``.
        headers: extra upgrade request headers (e.g. a cookie).
        min_backoff: base of the full-jitter backoff, in seconds.
        max_backoff: its cap, in seconds.
        buffer: messages held for the application before the client stops reading
            (the server then sees a slow consumer, which is the right signal).
        rng: a random generator for the backoff (tests pass a seeded one).
        on_frame: called with every frame the server sends (a dict; batches unpacked),
            before the client acts on it: the client's attributes (`session`,
            `connects`, `positions`...) are still those from before the frame. For tools
            that observe a client (logging, load tests); it runs in the client's reading
            task, so it must be quick and must not raise (an exception is logged and the
            connection dropped, like a bad frame).
        on_disconnect: called with the close code and reason each time a connection
            attempt ends, welcomed or not: a close from the server, a connection lost or
            dropped (1006), an upgrade refused (1013 after HTTP 429 or 5xx, 1008
            otherwise, reason ``"HTTP <status>"``), a failed connect (1006, ``"connect
            failed"``). It is called before the client decides whether to reconnect,
            and before it lets go of a socket it gives up on (a gap, a silent server):
            `extra` still answers then.

    Example:
        ```python
        async with Client("ws://127.0.0.1:8000/ws", auth={"name": "ann"}) as client:
            await client.request("chat", {"text": "hi"})
            async for message in client.messages():
                print(message.event, message.data)
        ```
    """

    def __init__(
        self,
        url: str,
        *,
        auth: Any = None,
        headers: Sequence[tuple[str, str]] = (),
        min_backoff: float = 0.5,
        max_backoff: float = 20.0,
        buffer: int = 1024,
        rng: random.Random | None = None,
        on_frame: Callable[[dict[str, Any]], None] | None = None,
        on_disconnect: Callable[[int, str], None] | None = None,
    ) -> None:
        self.url = url
        self.auth = auth
        self.headers = tuple(headers)
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._rng = rng or random.Random()
        self._retry_after = 0.0  # seconds a 429 asked us to wait
        self.on_frame = on_frame
        """See the argument of the same name (may be set before ``async with``)."""
        self.on_disconnect = on_disconnect
        """See the argument of the same name (may be set before ``async with``)."""
        self._cursor = StreamCursor()  # the position per stream, and the check
        self.session: str | None = None
        """The current session id (from the last ``welcome``)."""
        self.connects = 0
        """How many times a ``welcome`` was received."""
        self.attempts = 0
        """How many connections were attempted."""
        self.welcome: dict[str, Any] | None = None
        """The last ``welcome`` frame (its ``streams`` say what was recovered)."""
        self.presence: dict[str, dict[str, dict[str, Any]]] = {}
        """Per room, the roster: member id -> ``{"id", "status", "info",
        "connections"}``, kept current from ``presence`` frames."""
        self._connection_number = 0
        self.closed: ClientClosed | None = None
        self._resume: str | None = None
        self._ws: WebSocket | None = None
        self._is_connected = False
        self._stopping = False
        self._done = anyio.Event()
        self._changed = anyio.Event()  # set (and replaced) on every state change
        self._pending: dict[str, _Pending] = {}
        self._next_ref = 0
        self._tg: TaskGroup | None = None
        send, receive = anyio.create_memory_object_stream[Message | Snapshot](buffer)
        self._inbox_send: MemoryObjectSendStream[Message | Snapshot] = send
        self._inbox: MemoryObjectReceiveStream[Message | Snapshot] = receive

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Client:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run, name="wsroom client")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._tg is not None
        self._stopping = True
        ws = self._ws
        if ws is not None:
            # Leave politely: a close frame; the reader sees the server's answer (1000,
            # terminal) and the connection loop ends by itself.
            with anyio.move_on_after(2, shield=True):
                await ws.send_close(1000)
                await self._done.wait()
        if self.closed is None:  # no connection, or the server did not answer in time
            self.closed = (ClientClosed(1000, "client closed") if ws is None
                           else ClientClosed(1006, "closed without the server's answer"))
        self._tg.cancel_scope.cancel()
        try:
            # The body's own exception is not handed to the task group: it propagates
            # unwrapped (no ExceptionGroup around the caller's error).
            await self._tg.__aexit__(None, None, None)
        finally:
            self._inbox_send.close()
            self._inbox.close()

    @property
    def positions(self) -> dict[str, tuple[str, int]]:
        """Last ``(epoch, offset)`` seen per stream (a copy)."""
        return self._cursor.positions()

    @property
    def connected(self) -> bool:
        """True between a ``welcome`` and the end of that connection."""
        return self._is_connected

    async def wait_connected(self) -> None:
        """Wait for a ``welcome``.

        Raises:
            ClientClosed: if the client stopped for good.
        """
        while not self._is_connected:
            if self.closed is not None:
                raise self.closed
            await self._changed.wait()

    async def drop(self) -> None:
        """Cut the current connection abruptly, as a lost network would (TCP reset, no
        close frame); the client then reconnects and resumes as after any loss. Does
        nothing while disconnected. For tests and load tests."""
        ws = self._ws
        if ws is not None and ws.closed is None:
            await ws.abort()

    def extra(self, attribute: Any, default: Any = _NO_DEFAULT) -> Any:
        """An attribute of the current connection's socket stream, as AnyIO's
        ``extra()`` gives it (e.g. ``anyio.abc.SocketAttribute.raw_socket``), or
        `default` while disconnected, once the socket is closed, or when the stream
        lacks it (without a default: `anyio.TypedAttributeLookupError`)."""
        ws = self._ws
        try:
            if ws is None:
                raise anyio.TypedAttributeLookupError("not connected")
            return ws.extra(attribute)
        except (anyio.TypedAttributeLookupError, OSError):
            if default is _NO_DEFAULT:
                raise anyio.TypedAttributeLookupError("not available") from None
            return default

    def _set_connected(self, value: bool) -> None:
        self._is_connected = value
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # ---------------------------------------------------------------- messaging

    async def send(self, event: str, data: Any = None) -> None:
        """Send an event (waits for a connection).

        Raises:
            ClientClosed: if the client stopped for good.
        """
        await self._send_frame({"type": "msg", "event": event, "data": data})

    async def request(
        self, event: str, data: Any = None, *, timeout: float = 30.0  # noqa: ASYNC109
    ) -> Any:
        """Send an event and wait for its ``reply``; return the reply's data.

        Raises:
            RequestError: on an ``error`` frame, or if the connection it was sent on
                was lost before the answer (``connection_lost``: the server may or may
                not have handled it).
            ClientClosed: if the client stopped for good.
            TimeoutError: if no answer came within `timeout` seconds.
        """
        self._next_ref += 1
        ref = f"r{self._next_ref}"
        pending = self._pending[ref] = _Pending()
        try:
            with anyio.fail_after(timeout):
                frame = {"type": "msg", "event": event, "data": data, "ref": ref}
                pending.sent_on = await self._send_frame(frame)
                await pending.done.wait()
        finally:
            self._pending.pop(ref, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def recovered(self, stream: str) -> bool | None:
        """Whether the last ``welcome`` said `stream` was recovered (None if it did
        not name the stream)."""
        streams = (self.welcome or {}).get("streams", {})
        return bool(streams[stream]["recovered"]) if stream in streams else None

    def messages(self) -> AsyncIterator[Message | Snapshot]:
        """All messages, in order per stream, each once (``message.stream`` says
        which), and a `Snapshot` where a stream could not be recovered; one sequence
        across reconnects. Ends when the client stops. (A plain iterator, not an
        async generator: breaking out of ``async for`` is safe.)"""
        return _Messages(self._inbox)

    async def _send_frame(self, frame: dict[str, Any]) -> int:
        """Send on the current connection (waiting for one); return its number."""
        while True:
            await self.wait_connected()
            ws, number = self._ws, self._connection_number
            if ws is not None:
                try:
                    await ws.send(json.dumps(frame))
                    return number
                except ConnectionClosed:
                    pass
            # The connection is ending: wait until the reader has noticed.
            while self._is_connected and self._connection_number == number:
                await self._changed.wait()

    # ------------------------------------------------------------- connection loop

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                presented = self._resume is not None
                code, reason, lasted = await self._connect_once()
                if lasted >= _STABLE_AFTER:
                    attempt = 0  # a connection that held resets the backoff
                if code == 3500 and presented and not self._stopping:
                    # The resume token was refused, not our credentials: start over
                    # as a new session (a second refusal is final).
                    log.info("resume token refused: connecting as a new session")
                    self._resume = None
                    self._cursor.clear()
                    self.presence.clear()
                    continue
                if self._stopping or not should_reconnect(code):
                    self.closed = ClientClosed(code, reason)
                    log.info("closed for good: %d", code)
                    return
                delay = max(backoff_delay(attempt, base=self.min_backoff,
                                          cap=self.max_backoff, rng=self._rng),
                            self._retry_after)
                self._retry_after = 0.0
                attempt += 1
                log.info("connection ended (%d); reconnecting in %.2fs", code, delay)
                await anyio.sleep(delay)
        finally:
            if self.closed is None:
                self.closed = ClientClosed(1000, "client closed")
            self._fail_pending(None)
            self._set_connected(False)  # wakes every waiter: they see `closed`
            self._inbox_send.close()
            self._done.set()

    async def _connect_once(self) -> tuple[int, str, float]:
        """One connection: the close code (1006 when lost), reason, and for how long
        it was welcomed."""
        self.attempts += 1
        try:
            ws = await connect(self.url, headers=self.headers)
        except HandshakeRejected as exc:
            # 429 and 5xx: come back later (not before Retry-After); any other refusal
            # of the upgrade is final.
            retry = exc.status == 429 or exc.status >= 500
            with contextlib.suppress(ValueError):
                self._retry_after = min(60.0, float(exc.headers.get("retry-after", 0)))
            code, reason = (1013 if retry else 1008), exc.reason
            self._disconnected(code, reason)
            return code, reason, 0.0
        except Exception as exc:  # refused, reset, timed out, garbage HTTP...
            log.info("connect failed: %s", type(exc).__name__)
            self._disconnected(1006, "connect failed")
            return 1006, "connect failed", 0.0
        self._connection_number += 1
        self._ws = ws
        welcomed_at: float | None = None
        ended_at: float | None = None
        try:
            try:
                hello: dict[str, Any] = {"type": "hello", "v": 1}
                if self.auth is not None:
                    hello["auth"] = self.auth
                if self._resume is not None:
                    hello["resume"] = self._resume
                if self._cursor:
                    hello["streams"] = {
                        name: {"epoch": epoch, "offset": offset}
                        for name, (epoch, offset) in self._cursor.positions().items()}
                await ws.send(json.dumps(hello))
                welcomed_at = await self._read(ws)
                code, reason = 1006, "dropped"
            except ConnectionClosed as closed:
                code, reason = closed.code, closed.reason
            ended_at = anyio.current_time()  # before the callback and the drop
            self._ended()
            self._disconnected(code, reason)  # before the socket is let go
        finally:
            self._ended()
            await self._drop()
        if ended_at is None:
            ended_at = anyio.current_time()
        lasted = 0.0 if welcomed_at is None else ended_at - welcomed_at
        return code, reason, lasted

    def _ended(self) -> None:
        if self._is_connected:
            self._set_connected(False)
        self._fail_pending(self._connection_number)

    def _disconnected(self, code: int, reason: str) -> None:
        if self.on_disconnect is not None:
            try:
                self.on_disconnect(code, reason)
            except Exception:
                log.exception("on_disconnect failed")

    async def _read(self, ws: WebSocket) -> float | None:
        """Read until the connection must be dropped (silence, a gap, a bad frame);
        return when the welcome came. Raises ConnectionClosed when the server closes."""
        silence = 30.0  # until the welcome announces the server's heartbeat
        welcomed_at: float | None = None
        while True:
            # Silence is no bytes at all: a large frame still arriving on a slow link
            # is not silence (`recv` is cancel-safe: nothing read is lost).
            with anyio.CancelScope(deadline=ws.last_received + silence) as scope:
                raw = await ws.recv()
            if scope.cancelled_caught:
                if anyio.current_time() < ws.last_received + silence:
                    continue
                log.warning("nothing from the server for %.1fs: reconnecting", silence)
                return welcomed_at
            if not isinstance(raw, str):
                continue
            for line in raw.split("\n"):
                if not line:
                    continue
                try:
                    frame = json.loads(line)
                    kind = frame["type"]
                except (ValueError, KeyError, TypeError):
                    log.warning("a frame from the server is not valid: reconnecting")
                    return welcomed_at
                if self.on_frame is not None:
                    try:
                        self.on_frame(frame)
                    except Exception:
                        log.exception("on_frame failed: reconnecting")
                        return welcomed_at
                try:
                    if kind == "ping":
                        # The server may be closing already: read on for its code.
                        with contextlib.suppress(ConnectionClosed):
                            await ws.send(json.dumps({"type": "pong", "id": frame["id"]}))
                    elif kind == "msg":
                        if not await self._on_msg(frame):
                            return welcomed_at  # a gap: reconnect and ask again
                    elif kind in ("reply", "error"):
                        self._on_answer(frame)
                    elif kind == "snapshot":
                        await self._on_snapshot(frame)
                    elif kind == "stream":
                        # A room joined after the welcome, or a message we were
                        # excluded from: our position on the stream is the frame's.
                        self._cursor.set(str(frame["stream"]), str(frame["epoch"]),
                                         int(frame["offset"]), lossy=bool(frame.get("lossy")))
                    elif kind == "left":
                        stream = str(frame["stream"])
                        self._cursor.forget(stream)
                        self.presence.pop(stream, None)
                    elif kind == "presence":
                        self._on_presence(frame)
                    elif kind == "welcome":
                        silence = float(frame["ping_interval"]) + float(frame["pong_timeout"])
                        self._on_welcome(frame)
                        welcomed_at = anyio.current_time()
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("a frame from the server is not valid: reconnecting")
                    return welcomed_at

    def _on_welcome(self, frame: dict[str, Any]) -> None:
        self.welcome = frame
        self.session = frame.get("session")
        self._resume = frame.get("resume")
        # The session's streams are exactly those (the others were left); a recovered
        # stream keeps our position, to dedupe the replay that follows against it.
        self._cursor.welcome(frame.get("streams", {}))
        self.connects += 1
        self._set_connected(True)

    async def _on_msg(self, frame: dict[str, Any]) -> bool:
        stream, epoch, offset = frame["stream"], str(frame["epoch"]), int(frame["offset"])
        known = self._cursor.get(stream)
        step = self._cursor.advance(stream, epoch, offset)
        if step is Step.DUPLICATE:
            return True
        if step is Step.EPOCH:
            log.warning("stream %r changed epoch without a welcome: reconnecting", stream)
            return False
        if step is Step.HOLE:
            log.warning("gap in stream %r: %d after %d", stream, offset,
                        known[1] if known else 0)
            return False
        await self._inbox_send.send(
            Message(stream, epoch, offset, frame.get("event", ""), frame.get("data")))
        return True

    async def _on_snapshot(self, frame: dict[str, Any]) -> None:
        stream, epoch, offset = frame["stream"], str(frame["epoch"]), int(frame["offset"])
        self._cursor.set(stream, epoch, offset)
        await self._inbox_send.send(Snapshot(stream, epoch, offset, frame.get("data")))

    def _on_presence(self, frame: dict[str, Any]) -> None:
        room = str(frame["room"])
        if "state" in frame:
            self.presence[room] = {str(e["id"]): e for e in frame["state"]}
            return
        roster = self.presence.setdefault(room, {})
        for entry in frame.get("joins", ()):
            roster[str(entry["id"])] = entry
        for member in frame.get("leaves", ()):
            roster.pop(str(member), None)

    def _on_answer(self, frame: dict[str, Any]) -> None:
        pending = self._pending.get(str(frame.get("ref")))
        if pending is None:
            if frame.get("type") == "error":
                log.warning("server error: %s", frame.get("code"))
            return
        if frame["type"] == "reply":
            pending.result = frame.get("data")
        else:
            pending.error = RequestError(str(frame.get("code")), str(frame.get("detail", "")))
        pending.done.set()

    def _fail_pending(self, connection: int | None) -> None:
        """Fail the requests sent on `connection` (all of them if None): their answer
        can no longer come. Requests not sent yet wait for the next connection."""
        for pending in self._pending.values():
            if not pending.done.is_set() and (connection is None
                                              or pending.sent_on == connection):
                pending.error = RequestError("connection_lost", "the connection ended")
                pending.done.set()

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None and ws.closed is None:
            with anyio.move_on_after(2, shield=True):
                await ws.drop()
