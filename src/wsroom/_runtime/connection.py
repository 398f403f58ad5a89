"""One client connection: a reader in the ASGI task, a writer task, and a dispatcher
task from the first application message on.

Theory of operation
-------------------
`Connection._run` is the whole life of one WebSocket, from the ASGI upgrade to the end;
it never returns before everything the connection held is released.

- **Sending.** Everyone who has something for the client (broadcasts, replies, pings,
  close requests) changes the connection's state synchronously: frames go to the
  bounded `OutboundQueue`. While the writer task is idle, the hub's flusher writes
  them (`_flush`, see `_flush.py`): one pass over every connection with new frames,
  each send started eagerly and completed without waiting when the socket can take it.
  Everything else is the **writer**'s: a send that must wait (a slow client), the
  welcome and its replay, a backlog, and finally the close frame. Sends never
  overlap: the flusher writes only while no writer task exists, and starts one and
  hands it any send that suspends. The writer task exists only while it has work
  (on trio, where there is no flusher, it runs for the connection's whole life).
  Several queued frames go out as one WebSocket frame.
- The **reader** receives frames, checks their size before parsing, answers pongs,
  runs the `hello` handshake, and hands application messages to the dispatcher
  through a small bounded inbox. While that inbox is full the reader waits (TCP
  backpressure) and the heartbeat deadline is paused: the silence is ours.
- The **dispatcher** runs handlers one message at a time, each inside the app's
  per-message scope; a handler that raises costs an `error` frame and a unit of the
  error budget, never the connection's other tasks. It and its inbox are created on
  the first application message (a client that only listens never needs them).
- **Deadlines** live in the hub's timers (`_timers.py`), which call `_on_timer`: the
  handshake deadline (the ``hello``), then the app hooks' deadline (``hook_timeout``:
  authenticate, on_connect and snapshots), then the `Heartbeat`.

The handshake attaches the connection to a session (a new one, or the one its resume
token names) and then composes what the client gets first, race-free against
messages published meanwhile: from the moment of attaching, deliveries are *buffered*
(``_pending``); for each stream it reads what the client missed from the backplane's
history (or, when that is impossible, takes the stream's position and the app's
snapshot); then, synchronously, it merges the buffer behind that by offset (dropping
duplicates, and refusing a hole), queues ``welcome``, the replay and the buffer, and
goes live. From then on every delivery is checked against the stream's last offset:
a duplicate is dropped, a hole closes the connection with 3010 so the client resumes.

Every way out funnels into two methods. `_request_close(reason)` records the first
reason (the state machine keeps it), drops the queue unless the reason flushes, and
has the writer run (waking or starting it; a writer started after a close that does not
flush sends nothing but the close frame), which sends the close frame (bounded by
``close_timeout``) and
cancels the task group. `_finish(reason)` is for ends where nothing more can be sent
(peer closed, socket error): it cancels the task group at once. `_run`'s ``finally``
then calls `_release` exactly once: the hub forgets the connection, its rooms drop it,
the ``on_disconnect`` hooks run (bounded by ``hook_timeout``), one log line is written.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import ValidationError

from wsroom._asgi.transport import Disconnected, Handshake, Transport
from wsroom._core.budget import ErrorBudget
from wsroom._core.codes import CloseCode, ErrorCode, should_reconnect
from wsroom._core.errors import BackplaneUnavailable, ClientError, Reject, check_close
from wsroom._core.heartbeat import Beat, Heartbeat
from wsroom._core.protocol import (
    BadFrame,
    Hello,
    Msg,
    Pong,
    StreamPosition,
    error_frame,
    parse_client_frame,
    ping_frame,
    reply_frame,
    safe_errors,
    snapshot_frame,
    stream_frame,
    welcome_frame,
)
from wsroom._core.queue import OutboundQueue, Policy, PushResult, frame_size
from wsroom._core.rate import RateLimiter, Verdict
from wsroom._core.sessions import INBOX, inbox_key
from wsroom._core.state import CloseReason, ConnectionStateMachine, ConnState, disposition
from wsroom._core.tokens import ResumeClaims, TokenError
from wsroom._runtime.flush import Continuation, start_eagerly
from wsroom._runtime.handlers import MessageContext

if TYPE_CHECKING:
    from wsroom._backplane.base import Envelope
    from wsroom._runtime.hub import Hub, HubSession

__all__ = ["Connection", "Identity"]

log = logging.getLogger("wsroom.connection")

T = TypeVar("T")

_SEND_FAILURE_GRACE = 1.0
"""Seconds a failed send waits for the reader to report the peer's close."""
_NO_REPLAY: deque[str] = deque(maxlen=0)  # shared while there is no replay (saves a deque)
_FLUSH_FRAMES = 4  # frames the flusher writes for one connection before the writer takes over


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection belongs to, as returned by the app's `authenticate` hook.

    Attributes:
        id: a stable member id (e.g. a player id). Logged; must not be a secret.
        info: public metadata about the member (e.g. a display name).
    """

    id: str
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _StreamPlan:
    """What a client gets first on one stream, decided during its handshake."""

    wire: str
    key: str
    epoch: str
    offset: int
    """The position reported in the welcome (the client's own when recovered)."""
    recovered: bool
    frames: tuple[str, ...] = ()
    """Replayed frames (recovered), or the snapshot frame once encoded."""
    snapshot: tuple[Any] | None = None
    """The app's snapshot data (not recovered, with a snapshot hook)."""
    lossy: bool = False
    """The room's policy may discard messages (drop_oldest, coalesce): the client
    must not take a missing offset for a fault."""
    cut: int | None = None
    """The last offset covered by the replay: buffered live messages up to it are
    duplicates. None (not recovered): the client starts with the first message
    buffered since the stream was attached or joined (nothing published while the
    handshake ran is lost, snapshot or not)."""


def _stream_entry(plan: _StreamPlan) -> dict[str, Any]:
    entry: dict[str, Any] = {"epoch": plan.epoch, "offset": plan.offset,
                             "recovered": plan.recovered}
    if plan.lossy:
        entry["lossy"] = True
    return entry


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

    __slots__ = (
        "_accepted",
        "_admission_key",
        "_budget",
        "_close_deadline",
        "_close_reason_text",
        "_close_sent",
        "_dirty",
        "_final_rooms",
        "_heartbeat",
        "_hook_deadline",
        "_hub",
        "_inbox_send",
        "_inflight",
        "_peer_closed",
        "_peer_code",
        "_pending",
        "_pending_bytes",
        "_positions",
        "_queue",
        "_rate",
        "_released",
        "_replay",
        "_resumed",
        "_scope",
        "_send_error",
        "_send_scope",
        "_session",
        "_sm",
        "_started_at",
        "_starting",
        "_tg",
        "_timer_at",
        "_transport",
        "_wakeup",
        "_welcome_event",
        "_welcomed",
        "_writing",
        "client_address",
        "id",
        "identity",
        "meta",
        "state",
    )

    def __init__(self, hub: Hub, transport: Transport) -> None:
        config = hub.config
        self._hub = hub
        self._transport = transport
        self.id = secrets.token_urlsafe(12)
        self.identity: Identity | None = None
        self.state: dict[str, Any] = {}
        self._sm = ConnectionStateMachine()
        self._queue = OutboundQueue(config.max_queue_bytes, config.max_queue_messages)
        self._budget = ErrorBudget(config.error_budget)
        self._rate = (None if config.rate_limit is None else
                      RateLimiter(config.rate_limit, config.rate_burst, config.rate_patience))
        self._heartbeat: Heartbeat | None = None
        self._inbox_send: MemoryObjectSendStream[Msg] | None = None
        self._wakeup: anyio.Event | None = None  # set while the writer is parked
        self._writing = False  # a writer task exists
        self._tg: TaskGroup | None = None  # the connection's, while it runs
        self._dirty = False  # scheduled with the hub's flusher
        self._inflight: Continuation | None = None  # a send the flusher started
        self._send_error: Exception | None = None  # a send the flusher saw fail
        self._welcomed = False
        self._welcome_event: anyio.Event | None = None  # only if someone waits for it
        self._scope: anyio.CancelScope | None = None
        self._send_scope: anyio.CancelScope | None = None
        self.meta: dict[str, Any] = {}
        self._session: HubSession | None = None
        self._resumed = False
        self._pending: list[tuple[Envelope, Policy, bool]] | None = None
        self._pending_bytes = 0
        self._positions: dict[str, tuple[str, int]] = {}  # stream -> (epoch, offset)
        self._starting: dict[str, list[tuple[Envelope, Policy, bool]]] = {}
        self._replay: deque[str] = _NO_REPLAY  # a deque of its own after the welcome
        self._final_rooms: frozenset[str] | None = None
        self._close_reason_text = ""
        self._close_deadline = math.inf
        self._accepted = False
        self._admission_key: str | None = None
        self.client_address = hub._client_address(self)
        self._hook_deadline = math.inf  # set when the hello arrives
        self._timer_at = math.inf  # see _timers.py
        self._close_sent = False
        self._peer_closed = False
        self._peer_code = 1006
        self._released = False
        self._started_at = anyio.current_time()

    def __repr__(self) -> str:
        member = self.identity.id if self.identity else "-"
        return f"<Connection {self.id} member={member} {self._sm.state.value}>"

    # ----------------------------------------------------------------- public API

    @property
    def client(self) -> tuple[str, int] | None:
        """The peer's address as the ASGI server reports it."""
        address = self._transport.request.client
        return (address.host, address.port) if address else None

    @property
    def open(self) -> bool:
        """True from a successful `authenticate` (``on_connect`` hooks see it open)
        until the connection starts closing."""
        return self._sm.state is ConnState.OPEN

    @property
    def session(self) -> str | None:
        """The session id (stable across resumes), once authenticated."""
        return None if self._session is None else self._session.id

    @property
    def resumed(self) -> bool:
        """True if this connection resumed an existing session (its rooms are the
        session's; ``on_connect`` hooks may join more)."""
        return self._resumed

    @property
    def rooms(self) -> frozenset[str]:
        """Names of the rooms this connection's session is in (once the connection
        has ended: the rooms its session was in then)."""
        if self._final_rooms is not None:
            return self._final_rooms
        if self._session is None:
            return frozenset()
        return self._hub._rooms.rooms_of(self._session)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in this connection's outbound queue."""
        return self._queue.bytes

    def _metrics_state(self) -> str:
        if self._sm.closing:
            return "closing"
        return "open" if self._welcomed else "handshake"

    @property
    def close_code(self) -> int | None:
        """The close code chosen for this connection, once it is closing."""
        return self._sm.close_code

    async def join(self, room: str) -> None:
        """Join `room`: from now on, messages published to it reach this connection.

        Raises:
            ValueError: if the room name is invalid.
        """
        await self._hub._join(self, room)

    async def leave(self, room: str) -> None:
        """Leave `room` (no-op if not a member)."""
        await self._hub._leave(self, room)

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
        hub = self._hub
        session = self._session
        if session is None or hub._sessions.get(session.id) is not session:
            await anyio.lowlevel.checkpoint()
            return None
        envelope = await hub._backplane.publish(
            inbox_key(session.id), INBOX, hub._payload(event, data, INBOX),
            limits=hub.config.inbox_history)
        # Let the writer run: a handler sending in a tight loop must not starve it.
        await anyio.lowlevel.checkpoint()
        return envelope.offset

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection after flushing what is queued.

        Args:
            code: the close code (see `CloseCode`; apps use 4000-4999).
            reason: a short reason for the close frame.
        """
        check_close(code, reason)
        self._request_close(CloseReason.APP, code, reason)

    # ----------------------------------------------------------- used by the hub

    def _deliver(self, envelope: Envelope, policy: Policy, skip: bool = False) -> None:
        """Queue a numbered message without awaiting anything (never blocks).

        Before the welcome it is buffered for the handshake to merge; after it, a
        message at or before the stream's last offset is a duplicate (dropped), and
        one beyond the next offset means a hole: the client must resume (3010).
        With `skip` (the publisher excluded this connection) only the stream's
        position moves on.
        """
        if self._sm.closing:
            return
        pending = self._pending
        if pending is None:
            pending = self._starting.get(envelope.stream) if self._starting else None
        if pending is not None:
            pending.append((envelope, policy, skip))
            self._pending_bytes += envelope.size
            if (len(pending) > self._queue.max_messages
                    or self._pending_bytes > self._queue.max_bytes):
                self._request_close(CloseReason.SLOW_CONSUMER)
            return
        position = self._positions.get(envelope.stream)
        if position is not None:
            epoch, last = position
            if envelope.epoch != epoch:
                # The stream was renumbered (its backplane lost it): nothing after the
                # client's position can be vouched for.
                log.warning("%s: stream epoch changed: closing so the client resumes",
                            self._tag())
                self._request_close(CloseReason.GAP)
                return
            if envelope.offset <= last:
                return
            if envelope.offset != last + 1:
                log.warning("%s: stream offset %d after %d: closing so the client "
                            "resumes", self._tag(), envelope.offset, last)
                self._request_close(CloseReason.GAP)
                return
        self._positions[envelope.stream] = (envelope.epoch, envelope.offset)
        if skip:
            # Tell the client its position moved on, or it would see a gap.
            self._push_personal(stream_frame(envelope.stream, envelope.epoch,
                                             envelope.offset))
        else:
            self._enqueue(envelope, policy)

    def _start_stream(self, stream: str, epoch: str, offset: int, lossy: bool,
                      buffered: list[tuple[Envelope, Policy, bool]]) -> None:
        """A room joined after the welcome: announce its position, then deliver what
        was buffered while it was being opened (duplicates dropped, holes refused)."""
        self._pending_bytes -= sum(envelope.size for envelope, _, _ in buffered)
        if self._sm.closing:
            return
        self._positions[stream] = (epoch, offset)
        self._push_personal(stream_frame(stream, epoch, offset, lossy=lossy))
        for envelope, policy, skip in buffered:
            if envelope.epoch == epoch:  # others: from before a re-opening of the room
                self._deliver(envelope, policy, skip)

    def _enqueue(self, envelope: Envelope, policy: Policy) -> None:
        result = self._queue.push(envelope.frame, size=envelope.size, policy=policy,
                                  key=envelope.key)
        if result is PushResult.OVERFLOW:
            self._request_close(CloseReason.SLOW_CONSUMER)
            return
        if result is PushResult.DISCARDED:
            self._hub._stats.discarded += self._queue.last_discarded
            self._hub._metrics.dropped[policy.value] += self._queue.last_discarded
        self._wake()

    def _push_personal(self, frame: str, size: int | None = None) -> bool:
        """Queue a frame for this client only (reply, error, @inbox message)."""
        if self._sm.closing:
            return False
        if self._queue.push(frame, size=size) is PushResult.OVERFLOW:
            self._request_close(CloseReason.SLOW_CONSUMER)
            return False
        self._wake()
        return True

    def _wake(self) -> None:
        """Frames were queued: have them written (by the hub's flusher if the writer
        is not running and the hub has one, else by the writer)."""
        if self._writing:
            wakeup = self._wakeup
            if wakeup is not None:  # parked (a hub without a flusher)
                wakeup.set()
            return  # else it is running: it takes what is queued
        flusher = self._hub._flusher
        if flusher is None:  # the hub stopped its flusher (or never had one: trio)
            self._wake_writer()
            return
        if self._dirty:
            flusher.touch()
        else:
            self._dirty = True
            flusher.schedule(self)

    def _wake_writer(self) -> None:
        """Have the writer task run: wake it, or start one (a close request, the
        welcome and its replay, anything the flusher cannot write at once)."""
        if self._writing:
            wakeup = self._wakeup
            if wakeup is not None:
                wakeup.set()
            return
        tg = self._tg
        if tg is not None and self._sm.state is not ConnState.CLOSED:
            self._writing = True
            try:
                tg.start_soon(self._writer, name=f"wsroom writer {self.id}")
            except RuntimeError:  # the task group is ending (trio closes it to new tasks)
                self._writing = False

    def _flush(self) -> None:
        """Called by the hub's flusher: write what is queued from the flusher's task
        while each send completes without waiting; anything else is the writer's."""
        self._dirty = False
        queue = self._queue
        if self._writing or not queue:
            return  # a running writer takes what is queued
        if (self._sm.state is not ConnState.OPEN or self._replay
                or not self._welcomed):
            self._wake_writer()
            return
        batch_bytes = self._batch_bytes()
        for _ in range(_FLUSH_FRAMES):
            frames = (queue.pop_control() if queue.control_queued else None
                      ) or queue.pop_batch(batch_bytes)
            text = frames[0] if len(frames) == 1 else "\n".join(frames)
            try:
                pending = start_eagerly(self._transport.send(text))
            except Exception as exc:
                self._send_error = exc
                break
            self._count_sent(frames, text, len(queue) + len(frames))
            if pending is not None:  # the socket's buffer is full: the writer waits
                self._inflight = pending
                break
            if not queue:
                return
        self._wake_writer()

    def _batch_bytes(self) -> int:
        config = self._hub.config
        return config.max_batch_bytes if config.batch_frames else 0

    def _count_sent(self, frames: list[str], text: str, depth: int) -> None:
        hub = self._hub
        hub._metrics.queue_depth.observe(depth)
        hub._stats.frames_out += 1
        hub._stats.messages_out += len(frames)
        hub._metrics.sent_bytes += frame_size(text)

    def _tag(self) -> str:
        member = self.identity.id if self.identity else "-"
        if self._session is None:
            return f"conn={self.id} member={member}"
        return f"conn={self.id} member={member} session={self._session.id}"

    def _request_close(self, reason: CloseReason, code: int | None = None,
                       text: str = "") -> None:
        """Ask the writer to close the connection (first request wins).

        Without flush, the writer stops sending data at once (even mid-send to a peer
        that does not read). With flush, it may write what is queued, but for no longer
        than ``close_timeout`` in all, close frame included.
        """
        if not self._sm.close(reason, code):
            return
        self._close_reason_text = text
        self._close_deadline = anyio.current_time() + self._hub.config.close_timeout
        scope = self._send_scope
        if not self._sm.flush:
            self._queue.clear()
            self._replay.clear()
            if scope is not None:
                scope.cancel()
        elif scope is not None:
            scope.deadline = self._close_deadline
        log.log(
            disposition(reason).log_level,
            "%s: closing, reason=%s code=%s", self._tag(), reason, self._sm.close_code,
        )
        self._wake_writer()

    def _finish(self, reason: CloseReason) -> None:
        """End now: nothing more can be sent (the peer is gone or the socket failed)."""
        self._sm.finish(reason)
        if self._scope is not None:
            self._scope.cancel()

    def _abort(self) -> None:
        """Cancel the connection's tasks (used after the shutdown deadline)."""
        self._request_close(CloseReason.SHUTDOWN)
        if self._scope is not None:
            self._scope.cancel()

    # -------------------------------------------------------------------- running

    async def _run(self) -> None:
        """Serve the connection until it ends, then release everything it held."""
        hub = self._hub
        origins = hub._origins
        if origins is not None and not origins.allows(
                self._transport.request.headers.get("origin")):
            hub._metrics.refused[str(CloseReason.FORBIDDEN_ORIGIN)] += 1
            await self._refuse(CloseReason.FORBIDDEN_ORIGIN)
            return
        refused = hub._admit(self)
        rejection = None
        if refused is not None:
            rejection, retry_after = refused
            hub._metrics.refused[str(rejection)] += 1
            if rejection in (CloseReason.IP_LIMIT, CloseReason.IP_RATE
                             ) and self._transport.can_deny:
                await self._refuse(rejection, status=429,
                                   headers=[("retry-after", str(retry_after))])
                return
        try:
            try:
                accepted = await self._transport.accept()
            except Exception as exc:  # e.g. the client left during the upgrade
                log.info("%s: accept failed: %s", self._tag(), type(exc).__name__)
                accepted = False
            if not accepted:
                self._peer_closed = True
                self._sm.finish(CloseReason.CLIENT_CLOSED)
                return
            self._accepted = True
            if not self._sm.closing:  # a shutdown may have asked to close meanwhile
                self._sm.accept()
            if rejection is not None:
                self._request_close(rejection)
            try:
                async with anyio.create_task_group() as tg:
                    self._scope = tg.cancel_scope
                    self._tg = tg
                    self._wake_writer()
                    if rejection is None:
                        # The reader runs in this task: one task less per connection.
                        hub._timers.schedule(
                            self, anyio.current_time() + hub.config.handshake_timeout)
                        await self._reader(tg)
            finally:
                self._tg = None
                if self._inbox_send is not None:
                    self._inbox_send.close()
        except anyio.get_cancelled_exc_class():
            self._request_close(CloseReason.CANCELLED)
            raise
        except BaseException:
            self._request_close(CloseReason.INTERNAL_ERROR)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()

    async def _refuse(self, reason: CloseReason, status: int = 403,
                      headers: list[tuple[str, str]] | None = None) -> None:
        """Refuse the upgrade itself (an HTTP status: 403 unless the server can send
        another): nothing was accepted or registered."""
        self._sm.finish(reason)
        log.log(disposition(reason).log_level, "%s: refused, reason=%s", self._tag(), reason)
        try:
            with anyio.move_on_after(self._hub.config.close_timeout):
                if status == 403:
                    await self._transport.refuse(int(disposition(reason).code or 1008))
                else:
                    await self._transport.deny(status, headers or [])
        except Exception as exc:  # the client left meanwhile
            log.debug("%s: refusal not sent: %s", self._tag(), type(exc).__name__)
        finally:
            self._released = True
            self._hub._detach(self, reason)

    async def _writer(self) -> None:
        """Write until the connection closes (then send the close frame and end it),
        or, with the hub's flusher, until there is nothing to write: the flusher writes
        from then on, and starts a writer again when it must."""
        try:
            result: bool | None = False
            try:
                with anyio.CancelScope() as scope:
                    self._send_scope = scope
                    if self._sm.closing:
                        # Started after the close was requested: honour it as
                        # _request_close would have (a deadline, or stop sending now:
                        # even a send the flusher handed over is abandoned).
                        if self._sm.flush:
                            scope.deadline = self._close_deadline
                        else:
                            scope.cancel()
                    result = await self._write_queued()
            finally:
                self._send_scope = None
                self._wakeup = None
                if self._inflight is not None:
                    self._inflight.close()
                    self._inflight = None
            if result is None or result or self._sm.state is ConnState.CLOSED:
                return
            await self._send_close()
            self._finish(self._sm.reason or CloseReason.APP)
        finally:
            self._writing = False

    async def _write_queued(self) -> bool | None:
        """Write queued frames until the connection closes; True if a send failed,
        None if nothing is left to write and the hub's flusher takes over.

        Runs inside the writer's cancel scope: a close without flush cancels it, a close
        with flush gives it a deadline. A send the flusher started and could not finish
        (`_inflight`) or saw fail (`_send_error`) comes first.
        """
        queue = self._queue
        transport = self._transport
        batch_bytes = self._batch_bytes()
        sm = self._sm
        while True:
            if sm.state is ConnState.CLOSED:
                return False  # the peer is gone: nothing may be sent any more
            if self._inflight is not None or self._send_error is not None:
                inflight, self._inflight = self._inflight, None
                error, self._send_error = self._send_error, None
                try:
                    if error is not None:
                        raise error
                    assert inflight is not None
                    await inflight
                except Exception as exc:
                    await self._send_failed(exc)
                    return True
                continue
            state = sm.state
            if (queue or self._replay) and self._welcomed and (
                    state is ConnState.OPEN or sm.flush):
                # The welcome and the replay go first, but a ping does not wait
                # behind a long replay.
                depth = len(queue) + len(self._replay)
                frames = (queue.pop_control() if queue.control_queued else None) or (
                    self._pop_replay(batch_bytes) if self._replay
                    else queue.pop_batch(batch_bytes))
                text = frames[0] if len(frames) == 1 else "\n".join(frames)
                try:
                    await transport.send(text)
                except Exception as exc:
                    await self._send_failed(exc)
                    return True
                self._count_sent(frames, text, depth)
            elif sm.closing:
                return False
            elif self._hub._flusher is not None:
                return None
            else:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                self._wakeup = None
                if batch_bytes and self._hub._flusher is None:
                    # Let whoever woke us (a publisher in a loop, the other members'
                    # writers) run once more before taking the batch: under load the
                    # next messages join this one frame (one send instead of several);
                    # when idle it costs one scheduling round.
                    await anyio.lowlevel.checkpoint()

    async def _send_failed(self, exc: Exception) -> None:
        # Often the peer has just closed: give the reader a moment to see its close
        # frame (and code, which decides the session's fate); the reader's end
        # cancels this wait.
        await anyio.sleep(_SEND_FAILURE_GRACE)
        log.warning("%s: send failed: %s", self._tag(), type(exc).__name__)
        self._finish(CloseReason.SEND_FAILED)

    def _pop_replay(self, max_bytes: int) -> list[str]:
        replay = self._replay
        out = [replay.popleft()]
        total = frame_size(out[0])
        while replay:
            size = frame_size(replay[0])
            if total + 1 + size > max_bytes:
                break
            out.append(replay.popleft())
            total += 1 + size
        if not replay:
            self._replay = _NO_REPLAY
        return out

    async def _send_close(self) -> None:
        code = self._sm.close_code
        if code is None or self._peer_closed or self._close_sent:
            return
        self._close_sent = True  # attempted: never twice
        deadline = self._close_deadline
        wait = disposition(self._sm.reason).close_wait if self._sm.reason else None
        if wait is not None:
            deadline = min(deadline, anyio.current_time() + wait)
        with anyio.CancelScope(deadline=deadline):
            try:
                await self._transport.close(code, self._close_reason_text)
            except Exception as exc:
                log.debug("%s: close frame not sent: %s", self._tag(), type(exc).__name__)

    async def _reader(self, tg: TaskGroup) -> None:
        hello_seen = False
        transport = self._transport
        limit = self._hub.config.max_message_bytes
        stats = self._hub._stats
        metrics = self._hub._metrics
        message: str | bytes | Disconnected | None = None
        frame: Hello | Pong | Msg | None = None
        while True:
            # Nothing received or parsed stays alive while the next frame is awaited
            # (an idle connection would keep its hello, or its last pong, for good).
            message = frame = None
            try:
                message = await transport.receive()
            except Exception as exc:
                log.warning("%s: receive failed: %s", self._tag(), type(exc).__name__)
                self._finish(CloseReason.RECEIVE_FAILED)
                return
            if isinstance(message, Disconnected):
                self._peer_closed = True
                self._peer_code = message.code
                log.debug("%s: peer closed with %d", self._tag(), message.code)
                self._finish(CloseReason.CLIENT_CLOSED)
                return
            heartbeat = self._heartbeat
            if heartbeat is not None:
                heartbeat.frame_received()
            if self._sm.closing:
                continue  # read on until the peer answers our close
            stats.messages_in += 1
            size = len(message) if isinstance(message, bytes) else frame_size(message)
            metrics.received_bytes += size
            if size > limit:  # before any parsing
                self._request_close(CloseReason.MESSAGE_TOO_BIG)
                continue
            first = not hello_seen
            if isinstance(message, bytes):
                if first:
                    self._request_close(CloseReason.BAD_HANDSHAKE)
                else:
                    self._bad(ErrorCode.BAD_FRAME, "binary frames are not accepted", None)
                continue
            try:
                frame = parse_client_frame(message)
            except BadFrame as exc:
                if first:
                    self._request_close(CloseReason.BAD_HANDSHAKE)
                else:
                    self._bad(exc.code, exc.detail, None)
                continue
            if first:
                if not isinstance(frame, Hello):
                    self._request_close(CloseReason.BAD_HANDSHAKE)
                    continue
                # Authenticate beside the reader, which keeps watching the socket: a
                # client that vanishes mid-authentication is released at once.
                hello_seen = True
                self._hook_deadline = anyio.current_time() + self._hub.config.hook_timeout
                self._hub._timers.schedule(self, self._hook_deadline)
                tg.start_soon(self._handshake, frame, name=f"wsroom handshake {self.id}")
            elif isinstance(frame, Pong):
                self._confirm()
                now = anyio.current_time()
                rtt = None if heartbeat is None else heartbeat.pong_received(frame.id, now)
                if rtt is not None:
                    metrics.heartbeat_rtt.observe(rtt)
                elif self._rate is not None:
                    # An unsolicited pong costs like a message (not answered: an error
                    # frame for each would let a flood amplify itself).
                    verdict = self._rate.check(now)
                    if verdict is Verdict.REFUSE:
                        metrics.dropped["rate_limited"] += 1
                    elif verdict is Verdict.CLOSE:
                        self._request_close(CloseReason.RATE_LIMITED)
            elif isinstance(frame, Msg):
                self._confirm()
                verdict = (Verdict.ALLOW if self._rate is None
                           else self._rate.check(anyio.current_time()))
                if verdict is Verdict.ALLOW:
                    await self._to_dispatcher(frame, tg)
                elif verdict is Verdict.REFUSE:
                    metrics.dropped["rate_limited"] += 1
                    self._push_personal(error_frame(
                        ErrorCode.RATE_LIMITED, "too many messages: slow down", frame.ref))
                else:
                    self._request_close(CloseReason.RATE_LIMITED)
            else:
                self._bad(ErrorCode.BAD_FRAME, "hello was already received", None)

    def _confirm(self) -> None:
        """A frame after the welcome: the client holds the newest resume token."""
        session = self._session
        if (session is not None and session.connection is self and self._welcomed
                and session.confirm() and self._hub._cluster is not None):
            self._hub._cluster.session_changed(session)

    async def _to_dispatcher(self, frame: Msg, tg: TaskGroup) -> None:
        heartbeat = self._heartbeat
        if self._inbox_send is None:
            # On the first message only: a connection that only listens (most of a
            # room) never pays for the dispatcher task and its inbox.
            send, receive = anyio.create_memory_object_stream[Msg](
                self._hub.config.inbox_size)
            self._inbox_send = send
            tg.start_soon(self._dispatcher, receive, name=f"wsroom dispatcher {self.id}")
        if heartbeat is not None:
            heartbeat.message_received(anyio.current_time())
        try:
            try:
                self._inbox_send.send_nowait(frame)
            except anyio.WouldBlock:
                if heartbeat is not None:
                    heartbeat.pause()
                try:
                    await self._inbox_send.send(frame)
                finally:
                    if heartbeat is not None:
                        heartbeat.resume(anyio.current_time())
        except anyio.BrokenResourceError:
            # The dispatcher stopped (and closed its end) because the connection is
            # closing: the message is not handled, as any message read while closing.
            pass

    def _bad(self, code: ErrorCode | str, detail: str, ref: str | int | None) -> None:
        """Answer a bad message with an error frame and charge the error budget."""
        self._push_personal(error_frame(str(code), detail, ref))
        if self._budget.failure():
            self._request_close(CloseReason.ERROR_BUDGET)

    async def _guarded(self, what: str, hook: Awaitable[T]) -> tuple[bool, T | None]:
        """Await an app hook; a `Reject` or an exception closes the connection."""
        try:
            return True, await hook
        except Reject as exc:
            self._request_close(CloseReason.APP, exc.code, exc.reason)
        except BackplaneUnavailable as exc:
            log.warning("%s: %s: %s", self._tag(), what, exc)
            self._request_close(CloseReason.BACKPLANE_UNAVAILABLE)
        except Exception:
            log.exception("%s: %s raised", self._tag(), what)
            self._request_close(CloseReason.INTERNAL_ERROR)
        return False, None

    async def _handshake(self, hello: Hello) -> None:
        hub = self._hub
        claims: ResumeClaims | None = None
        if hello.resume is not None:
            try:
                claims = hub._signer.verify(hello.resume, hub._wall_clock())
            except TokenError as exc:  # the token itself is never logged
                log.info("%s: resume token refused: %s", self._tag(), exc.problem)
                hub._stats.resumes["rejected"] += 1
                self._request_close(CloseReason.RESUME_REJECTED)
                return
        handshake = Handshake(self._transport.request, hello.auth)
        anonymous = claims.member if claims is not None else secrets.token_urlsafe(12)
        ok, identity = await self._guarded(
            "authenticate", hub._authenticate(handshake, anonymous_id=anonymous))
        if not ok or self._sm.closing:
            return
        if identity is None:
            self._request_close(CloseReason.AUTH_FAILED)
            return
        if claims is not None and identity.id != claims.member:
            log.info("%s: resume token of another member refused", self._tag())
            hub._stats.resumes["rejected"] += 1
            self._request_close(CloseReason.RESUME_REJECTED)
            return
        self.identity = identity
        # From the moment the session is attached, deliveries are buffered.
        self._pending = []
        ok, opened = await self._guarded("opening the session",
                                         hub._open_session(self, identity, claims))
        if not ok:
            return
        if opened is None:
            log.info("%s: stale resume token refused", self._tag())
            self._request_close(CloseReason.RESUME_REJECTED)
            return
        session, self._resumed = opened
        self._session = session
        if self._sm.closing:
            return
        self._sm.welcome()
        self._heartbeat = Heartbeat(
            ping_interval=hub.config.ping_interval,
            pong_timeout=hub.config.pong_timeout,
            idle_timeout=hub.config.idle_timeout,
            now=anyio.current_time(),
        )
        ok, _ = await self._guarded("on_connect hook", hub._on_connect(self))
        if not ok or self._sm.closing:
            return  # closed before the welcome: nothing queued is ever sent
        plans = await self._plan_streams(session, hello)
        if plans is None or self._sm.closing:
            return
        self._go_live(session, plans, None if claims is None else claims.generation)

    async def _plan_streams(self, session: HubSession, hello: Hello
                            ) -> list[_StreamPlan] | None:
        """Decide, per stream of the session, replay or snapshot (awaits the
        backplane and the app's snapshot hook; deliveries are buffered meanwhile).

        Rooms may be joined or left by other tasks while this awaits: it plans until
        no stream is missing, and the check that ends the loop runs after the last
        await, so `_go_live` (called at once) sees exactly these streams.
        """
        hub = self._hub
        asked = hello.streams if self._resumed else {}
        planned: dict[str, _StreamPlan] = {}
        while True:
            rooms = hub._rooms.rooms_of(session)
            streams = [(INBOX, inbox_key(session.id))]
            streams += [(room, room) for room in sorted(rooms)]
            todo = [(wire, key) for wire, key in streams if key not in planned]
            if not todo:
                return [planned[key] for _, key in streams]
            for wire, key in todo:
                try:
                    plan = await self._plan_stream(wire, key, asked.get(wire))
                except KeyError:  # the room was left, and its stream closed, meanwhile
                    plan = None
                if self._sm.closing:
                    return None
                if plan is not None:
                    planned[key] = plan

    async def _plan_stream(self, wire: str, key: str, position: StreamPosition | None
                           ) -> _StreamPlan | None:
        """Plan one stream; None if the app's snapshot hook failed (closing)."""
        hub = self._hub
        backplane = hub._backplane
        plan = None
        if position is not None:
            found = await backplane.since(key, position.epoch, position.offset)
            if found.recovered:
                plan = _StreamPlan(wire, key, found.epoch, position.offset, True,
                                   found.frames, cut=found.offset)
        if plan is None:
            epoch, offset = await backplane.position(key)
            plan = _StreamPlan(wire, key, epoch, offset, False)
            if hub._snapshot_hook is not None:
                # Taken now, it reflects at least everything up to `offset`, and so up
                # to the position it is labelled with (`_go_live`), which is `offset`
                # or earlier.
                ok, data = await self._guarded("snapshot hook",
                                               hub._snapshot_hook(self, wire))
                if not ok:
                    return None
                plan.snapshot = (data,)
        room = hub._rooms.get(key)
        plan.lossy = room is not None and room.config.policy is not Policy.DISCONNECT
        return plan

    def _go_live(self, session: HubSession, plans: list[_StreamPlan],
                 presented: int | None) -> None:
        """Merge the buffered deliveries behind the replay, queue the welcome, the
        replay and the buffer, and go live. Synchronous: nothing interleaves."""
        hub = self._hub
        plan_of = {plan.key: plan for plan in plans}
        cuts = {plan.key: plan.cut for plan in plans}
        live = []
        for envelope, policy, skip in self._pending or ():
            if envelope.stream not in cuts:
                continue  # a stream left meanwhile
            cut = cuts[envelope.stream]
            plan = plan_of[envelope.stream]
            if plan.epoch != envelope.epoch:
                # Renumbered while the client was being attached: no exact merge.
                log.warning("%s: stream epoch changed during the handshake", self._tag())
                self._request_close(CloseReason.GAP)
                return
            if cut is None:
                # Everything buffered since the stream was attached is new to the client.
                cut = plan.offset = envelope.offset - 1
            if envelope.offset <= cut:
                continue  # a duplicate of the replay
            if envelope.offset != cut + 1:
                log.warning("%s: hole in a stream during the handshake", self._tag())
                self._request_close(CloseReason.GAP)
                return
            cuts[envelope.stream] = envelope.offset
            live.append((envelope, policy, skip))
        self._pending = None
        self._pending_bytes = 0
        self._positions = {key: (plan_of[key].epoch, plan_of[key].offset if cut is None
                                 else cut) for key, cut in cuts.items()}
        try:
            token = hub._issue_token(session, presented)
        except ValueError:
            log.exception("%s: no resume token can be issued", self._tag())
            self._request_close(CloseReason.INTERNAL_ERROR)
            return
        if self._resumed:
            result = "recovered" if all(p.recovered for p in plans) else "not_recovered"
            hub._stats.resumes[result] += 1
        # The welcome is a frame of its own, ahead of everything: batched with a long
        # replay, it would reach a client on a slow or lossy link only with the whole
        # 64 KiB, and until then the client does not know the heartbeat it is owed.
        self._queue.push_control(welcome_frame(
            session=session.id, resume=token, ping_interval=hub.config.ping_interval,
            pong_timeout=hub.config.pong_timeout,
            streams={p.wire: _stream_entry(p) for p in plans},
        ), front=True)
        replay: deque[str] = deque()
        for plan in plans:
            if plan.snapshot is not None:
                plan.frames = (snapshot_frame(plan.wire, plan.epoch, plan.offset,
                                              plan.snapshot[0]),)
            replay.extend(plan.frames)
        replay.extend(hub._attach_presence(session, self))
        if replay:
            self._replay = replay
        for envelope, policy, skip in live:
            if skip:  # excluded from it: only the position moves on
                self._push_personal(stream_frame(envelope.stream, envelope.epoch,
                                                 envelope.offset))
            else:
                self._enqueue(envelope, policy)
        replayed = sum(len(p.frames) for p in plans if p.recovered)
        log.info("%s: welcomed, resumed=%s rooms=%d replayed=%d", self._tag(),
                 self._resumed, len(plans) - 1, replayed)
        self._welcomed = True
        if self._welcome_event is not None:
            self._welcome_event.set()
        self._wake_writer()
        self._hub._timers.schedule(self, anyio.current_time())  # the heartbeat begins

    def _on_timer(self, now: float) -> float | None:
        """The hub's timers call this when a deadline of this connection is due:
        the hello (``handshake_timeout``), then the app's hooks (``hook_timeout``:
        authenticate, on_connect and snapshots), then the heartbeat. Returns when to
        be called next."""
        try:
            return self._deadline_due(now)
        except Exception:  # a bug: without deadlines the connection must not live on
            log.exception("%s: deadline handling failed", self._tag())
            self._request_close(CloseReason.INTERNAL_ERROR)
            return None

    def _deadline_due(self, now: float) -> float | None:
        if self._sm.closing:
            return None
        heartbeat = self._heartbeat
        if heartbeat is None or not self._welcomed:
            if self._hook_deadline == math.inf:  # no hello yet
                self._request_close(CloseReason.HANDSHAKE_TIMEOUT)
                return None
            if now < self._hook_deadline:
                return self._hook_deadline
            # authenticate and on_connect are the app's: a slow database is not the
            # client's fault, so their bound answers "try again later".
            log.warning("%s: authenticate/on_connect exceeded hook_timeout", self._tag())
            self._request_close(CloseReason.HOOK_TIMEOUT)
            return None
        tick = heartbeat.poll(now)
        if tick.beat is Beat.PING:
            if not self._queue.control_queued:  # else the last ping is still queued
                # Ahead of the backlog: the pong deadline must measure the peer,
                # not how much the room has queued for it.
                self._queue.push_control(ping_frame(tick.ping_id), front=True)
                self._wake()
        elif tick.beat is Beat.NO_PONG:
            self._request_close(CloseReason.NO_PONG)
            return None
        elif tick.beat is Beat.IDLE:
            self._request_close(CloseReason.IDLE_TIMEOUT)
            return None
        return tick.wake_at

    async def _dispatcher(self, inbox: MemoryObjectReceiveStream[Msg]) -> None:
        with inbox:
            if not self._welcomed:  # messages sent before the welcome wait for it
                if self._welcome_event is None:
                    self._welcome_event = anyio.Event()
                await self._welcome_event.wait()
            async for frame in inbox:
                if self._sm.closing:
                    return
                await self._dispatch(frame)

    async def _dispatch(self, frame: Msg) -> None:
        hub = self._hub
        route = hub._handlers.get(frame.event)
        if route is None:
            self._bad(ErrorCode.UNKNOWN_EVENT, f"no handler for event {frame.event!r}",
                      frame.ref)
            return
        data = frame.data
        if route.adapter is not None:
            try:
                data = route.adapter.validate_python(data)
            except ValidationError as exc:
                self._bad(ErrorCode.INVALID_DATA, safe_errors(exc), frame.ref)
                return
            except Exception:  # a validator of the app's model has a bug
                hub._stats.handler_errors += 1
                log.exception("%s: validating the data of event %r raised", self._tag(),
                              frame.event)
                self._bad(ErrorCode.INTERNAL, "internal error", frame.ref)
                return
        ctx = MessageContext(hub, self, frame.event, frame.ref)
        try:
            scope_factory = hub._message_scope
            if scope_factory is None:
                result = await route.handler(ctx, data)
            else:
                async with scope_factory(ctx) as ctx.scope:
                    result = await route.handler(ctx, data)
            reply = None if frame.ref is None else reply_frame(frame.ref, result)
        except ClientError as exc:
            self._push_personal(error_frame(exc.code, exc.detail, frame.ref))
            return
        except Reject as exc:
            self._request_close(CloseReason.APP, exc.code, exc.reason)
            return
        except Exception:
            hub._stats.handler_errors += 1
            log.exception("%s: handler for event %r raised (or returned a value that "
                          "is not JSON-serializable)", self._tag(), frame.event)
            self._bad(ErrorCode.INTERNAL, "internal error", frame.ref)
            return
        self._budget.success()
        if reply is None:
            return
        size = frame_size(reply)
        if size > self._queue.max_bytes:
            log.error("%s: the reply to event %r is %d bytes, over max_queue_bytes=%d",
                      self._tag(), frame.event, size, self._queue.max_bytes)
            reply = error_frame(ErrorCode.INTERNAL, "reply too large", frame.ref)
            size = frame_size(reply)
        self._push_personal(reply, size)

    def _resumable(self, reason: CloseReason) -> bool:
        """Whether the client will come back for its session: decided by the code it
        saw, or, when the server chose none, by how the connection was lost."""
        code = self._sm.close_code
        if code is not None:
            return should_reconnect(code)
        if reason in (CloseReason.SEND_FAILED, CloseReason.RECEIVE_FAILED):
            return True
        # 1005 (no status): uvicorn reports a connection lost without a close frame
        # so, and a close frame without a code says nothing of the client's intent.
        return self._peer_code == 1005 or should_reconnect(self._peer_code)

    async def _release(self) -> None:
        """Release everything the connection holds. Runs exactly once."""
        if self._released:
            return
        self._released = True
        self._hub._timers.cancel(self)
        sm = self._sm
        if self._accepted and not self._peer_closed and not self._close_sent:
            # Ended by cancellation or a crash before the writer could close it.
            if sm.close_code is None and sm.reason is None:
                sm.close(CloseReason.INTERNAL_ERROR)
            await self._send_close()
        reason = sm.reason or CloseReason.CLIENT_CLOSED
        sm.finish(reason)
        code = (sm.close_code if self._close_sent and sm.close_code is not None
                else self._peer_code if self._peer_closed else 1006)
        self._hub._metrics.disconnects[(code, str(reason))] += 1
        self._queue.clear()
        self._replay.clear()
        self._pending = None
        self._hub._detach(self, reason)
        rooms = self.rooms
        self._final_rooms = rooms
        try:
            await self._hub._connection_ended(self, self._resumable(reason))
        except Exception:
            log.exception("%s: releasing the session failed", self._tag())
        level = disposition(reason).log_level
        log.log(
            level, "%s: closed, reason=%s code=%s rooms=%d after=%.1fs", self._tag(), reason,
            sm.close_code, len(rooms), anyio.current_time() - self._started_at,
        )
        if self.identity is not None:
            with anyio.move_on_after(self._hub.config.hook_timeout) as scope:
                try:
                    await self._hub._on_disconnect(self)
                except Exception:
                    log.exception("%s: on_disconnect hook raised", self._tag())
            if scope.cancelled_caught:
                log.error("%s: on_disconnect hook exceeded hook_timeout", self._tag())
