"""One client connection's life: a reader in the ASGI task, a writer task (`Sender`), and
a dispatcher task from the first application message on.

Theory of operation
-------------------
`Peer.run` is the whole life of one WebSocket, from the ASGI upgrade to the end; it
never returns before everything the connection held is released. The app sees it as a
`Connection` (``connection.py``); the hub's parts see it through `PeerPort`.

- **Sending** is the `Sender`'s (``sender.py``): a bounded queue, written by the hub's
  flusher or by a writer task that exists only while it has work.
- The **reader** receives frames, checks their size before parsing, answers pongs,
  runs the `hello` handshake (``handshake.py``) beside it, and hands application
  messages to the `Dispatcher` (``dispatch.py``) through a small bounded inbox. While
  that inbox is full the reader waits (TCP backpressure) and the heartbeat deadline is
  paused: the silence is ours.
- **Deadlines** live in the hub's timers (``timers.py``), which call `on_timer`: the
  handshake deadline (the ``hello``), then the app hooks' deadline (``hook_timeout``:
  authenticate, on_connect and snapshots), then the `Heartbeat`.
- **Positions.** From the moment its session is attached, deliveries are buffered
  (`pending`) until the handshake has composed the welcome and merged them behind the
  replay; from then on each delivery is judged by the connection's `StreamCursor`: a
  duplicate is dropped, a hole or a new epoch closes with 3010 so the client resumes.

Every way out funnels into two methods. `request_close(reason)` records the first
reason (the state machine keeps it), drops the queue unless the reason flushes, and has
the writer send the close frame (bounded by ``close_timeout``) and end the connection.
`finish(reason)` is for ends where nothing more can be sent (peer closed, socket
error): it cancels the task group at once. `run`'s ``finally`` then calls `release`
exactly once: the hub forgets the connection, its session is detached or ended, the
``on_disconnect`` hooks run (bounded by ``hook_timeout``), one log line is written.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from wsroom._asgi.transport import Transport
from wsroom._core.budget import ErrorBudget
from wsroom._core.codes import ErrorCode, should_reconnect
from wsroom._core.cursor import Step, StreamCursor
from wsroom._core.errors import BackplaneUnavailable, Reject
from wsroom._core.heartbeat import Beat, Heartbeat
from wsroom._core.protocol import (
    Msg,
    error_frame,
    ping_frame,
    stream_frame,
)
from wsroom._core.queue import OutboundQueue, Policy
from wsroom._core.rate import RateLimiter
from wsroom._core.sessions import INBOX, inbox_key
from wsroom._core.state import CloseReason, ConnectionStateMachine, ConnState, disposition
from wsroom._runtime.connection import Connection
from wsroom._runtime.ports import HubSession, Opening
from wsroom._runtime.runtime import Runtime
from wsroom._runtime.sender import Sender

if TYPE_CHECKING:
    from wsroom._backplane.base import Envelope
    from wsroom._core.identity import Identity

__all__ = ["Delivery", "Peer"]

log = logging.getLogger("wsroom.connection")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A numbered message buffered for a connection until its stream's position is
    known (the handshake, or a room joined after the welcome)."""

    envelope: Envelope
    policy: Policy
    skip: bool

    @property
    def stream(self) -> str:
        return self.envelope.stream

    @property
    def epoch(self) -> str:
        return self.envelope.epoch

    @property
    def offset(self) -> int:
        return self.envelope.offset


class Peer:
    """A client connection's life (see the module docstring)."""

    __slots__ = (
        "accepted",
        "admission_key",
        "budget",
        "client_address",
        "connection",
        "cursor",
        "final_rooms",
        "heartbeat",
        "hook_deadline",
        "id",
        "identity",
        "inbox",
        "peer_closed",
        "peer_code",
        "pending",
        "pending_bytes",
        "rate",
        "released",
        "resumed",
        "runtime",
        "scope",
        "sender",
        "session",
        "sm",
        "started_at",
        "starting",
        "tg",
        "timer_at",
        "transport",
        "welcome_event",
        "welcomed",
    )

    def __init__(self, runtime: Runtime, transport: Transport) -> None:
        config = runtime.config
        self.runtime = runtime
        self.transport = transport
        self.id = secrets.token_urlsafe(12)
        self.identity: Identity | None = None
        self.sm = ConnectionStateMachine()
        self.sender = Sender(
            self, self.sm, transport,
            OutboundQueue(config.max_queue_bytes, config.max_queue_messages),
            runtime, runtime.batch_bytes, runtime.telemetry)
        self.budget = ErrorBudget(config.error_budget)
        self.rate = (None if config.rate_limit is None else
                     RateLimiter(config.rate_limit, config.rate_burst, config.rate_patience))
        self.heartbeat: Heartbeat | None = None
        self.inbox: MemoryObjectSendStream[Msg] | None = None  # the dispatcher's
        self.tg: TaskGroup | None = None  # the connection's, while it runs
        self.welcomed = False
        self.welcome_event: anyio.Event | None = None  # only if someone waits for it
        self.scope: anyio.CancelScope | None = None
        self.session: HubSession | None = None
        self.resumed = False
        self.pending: list[Delivery] | None = None
        self.pending_bytes = 0
        self.cursor = StreamCursor()
        self.starting: dict[str, Opening] = {}  # rooms joined after the welcome
        self.final_rooms: frozenset[str] | None = None
        self.accepted = False
        self.admission_key: str | None = None  # the per-address slot held (Registry)
        self.client_address = runtime.registry.client_address(transport.request)
        self.hook_deadline = math.inf  # set when the hello arrives
        self.timer_at = math.inf  # see timers.py
        self.peer_closed = False
        self.peer_code = 1006
        self.released = False
        self.started_at = anyio.current_time()
        self.connection = Connection(self)

    def __repr__(self) -> str:
        member = self.identity.id if self.identity else "-"
        return f"<Connection {self.id} member={member} {self.sm.state.value}>"

    # -------------------------------------------------------- what others read

    @property
    def meta(self) -> dict[str, Any]:
        return self.connection.meta

    @property
    def in_handshake(self) -> bool:
        return self.pending is not None

    @property
    def closing(self) -> bool:
        return self.sm.closing

    @property
    def queued_bytes(self) -> int:
        return self.sender.queue.bytes

    @property
    def rooms(self) -> frozenset[str]:
        if self.final_rooms is not None:
            return self.final_rooms
        if self.session is None:
            return frozenset()
        return self.runtime.membership.rooms_of(self.session)

    @property
    def peer_address(self) -> tuple[str, int] | None:
        address = self.transport.request.client
        return (address.host, address.port) if address else None

    @property
    def is_open(self) -> bool:
        return self.sm.state is ConnState.OPEN

    @property
    def session_id(self) -> str | None:
        return None if self.session is None else self.session.id

    @property
    def close_code(self) -> int | None:
        return self.sm.close_code

    # -------------------------------------------------- what the app calls

    async def join(self, room: str) -> None:
        await self.runtime.membership.join(self, self.session, room)

    async def leave(self, room: str) -> None:
        await self.runtime.membership.leave(self, self.session, room)

    async def send(self, event: str, data: Any) -> int | None:
        """Publish on the session's inbox (see `Connection.send`)."""
        runtime = self.runtime
        session = self.session
        if session is None or not runtime.membership.is_current(session):
            await anyio.lowlevel.checkpoint()
            return None
        envelope = await runtime.backplane.publish(
            inbox_key(session.id), INBOX, runtime.payload(event, data, INBOX),
            limits=runtime.config.inbox_history)
        # Let the writer run: a handler sending in a tight loop must not starve it.
        await anyio.lowlevel.checkpoint()
        return envelope.offset

    def close(self, code: int, reason: str) -> None:
        self.request_close(CloseReason.APP, code, reason)

    def metrics_state(self) -> str:
        if self.sm.closing:
            return "closing"
        return "open" if self.welcomed else "handshake"

    def tag(self) -> str:
        member = self.identity.id if self.identity else "-"
        if self.session is None:
            return f"conn={self.id} member={member}"
        return f"conn={self.id} member={member} session={self.session.id}"

    # ------------------------------------------------ what the hub's parts call

    def attach(self, session: HubSession) -> None:
        self.session = session

    def deliver(self, envelope: Envelope, policy: Policy, skip: bool = False) -> None:
        """Queue a numbered message without awaiting anything (never blocks).

        Before the welcome it is buffered for the handshake to merge; after it, the
        cursor judges it: a duplicate is dropped, a hole or a new epoch means the
        client must resume (3010). With `skip` (the publisher excluded this
        connection) only the stream's position moves on.
        """
        if self.sm.closing:
            return
        pending = self.pending
        if pending is None and self.starting:
            opening = self.starting.get(envelope.stream)
            if opening is not None:
                opening.size += envelope.size
                pending = opening.items
        if pending is not None:
            pending.append(Delivery(envelope, policy, skip))
            self.pending_bytes += envelope.size
            queue = self.sender.queue
            if len(pending) > queue.max_messages or self.pending_bytes > queue.max_bytes:
                self.request_close(CloseReason.SLOW_CONSUMER)
            return
        step = self.cursor.advance(envelope.stream, envelope.epoch, envelope.offset)
        if step is Step.NEW:
            if skip:
                # Tell the client its position moved on, or it would see a gap.
                self.push(stream_frame(envelope.stream, envelope.epoch, envelope.offset))
            else:
                self.sender.enqueue(envelope, policy)
        elif step is Step.EPOCH:
            # The stream was renumbered (its backplane lost it): nothing after the
            # client's position can be vouched for.
            log.warning("%s: stream epoch changed: closing so the client resumes",
                        self.tag())
            self.request_close(CloseReason.GAP)
        elif step is Step.HOLE:
            known = self.cursor.get(envelope.stream)
            log.warning("%s: stream offset %d after %d: closing so the client resumes",
                        self.tag(), envelope.offset, -1 if known is None else known[1])
            self.request_close(CloseReason.GAP)

    def _live(self, envelope: Envelope, policy: Policy, skip: bool) -> None:
        if skip:
            # Tell the client its position moved on, or it would see a gap.
            self.push(stream_frame(envelope.stream, envelope.epoch, envelope.offset))
        else:
            self.sender.enqueue(envelope, policy)

    def deliver_merged(self, live: list[Delivery]) -> None:
        """The handshake merged these behind the replay: queue them."""
        for item in live:
            self._live(item.envelope, item.policy, item.skip)

    def push(self, frame: str, size: int | None = None) -> bool:
        return self.sender.push(frame, size)

    def begin_stream(self, stream: str) -> Opening:
        superseded = self.starting.get(stream)
        if superseded is not None:  # joined, left and joined again meanwhile
            self.pending_bytes -= superseded.size
        opening = self.starting[stream] = Opening(stream)
        return opening

    def end_stream(self, opening: Opening) -> None:
        if self.starting.get(opening.stream) is opening:
            del self.starting[opening.stream]
            self.pending_bytes -= opening.size

    def start_stream(self, opening: Opening, epoch: str, offset: int, lossy: bool
                     ) -> bool:
        """A room joined after the welcome: announce its position, then deliver what
        was buffered while it was being opened (duplicates dropped, holes refused).
        A superseded opening does nothing: its position may be older than the newer
        join's, and the client's cursor must never move back."""
        stream = opening.stream
        if self.starting.get(stream) is not opening:
            return False
        self.end_stream(opening)
        if self.sm.closing:
            return False
        self.cursor.set(stream, epoch, offset)
        self.push(stream_frame(stream, epoch, offset, lossy=lossy))
        for item in opening.items:
            if item.epoch == epoch:  # others: from before a re-opening of the room
                self.deliver(item.envelope, item.policy, item.skip)
        return True

    def forget_stream(self, stream: str) -> bool:
        return self.cursor.forget(stream)

    def request_close(self, reason: CloseReason, code: int | None = None,
                      text: str = "") -> None:
        """Ask the writer to close the connection (first request wins).

        Without flush, the writer stops sending data at once (even mid-send to a peer
        that does not read). With flush, it may write what is queued, but for no longer
        than ``close_timeout`` in all, close frame included.
        """
        if not self.sm.close(reason, code):
            return
        sender = self.sender
        sender.close_text = text
        sender.close_deadline = anyio.current_time() + self.runtime.config.close_timeout
        log.log(disposition(reason).log_level, "%s: closing, reason=%s code=%s",
                self.tag(), reason, self.sm.close_code)
        sender.close_requested()

    def finish(self, reason: CloseReason) -> None:
        """End now: nothing more can be sent (the peer is gone or the socket failed)."""
        self.sm.finish(reason)
        if self.scope is not None:
            self.scope.cancel()

    def abort(self) -> None:
        """Cancel the connection's tasks (used after the shutdown deadline)."""
        self.request_close(CloseReason.SHUTDOWN)
        if self.scope is not None:
            self.scope.cancel()

    def bad(self, code: ErrorCode | str, detail: str, ref: str | int | None) -> None:
        """Answer a bad message with an error frame and charge the error budget."""
        self.push(error_frame(str(code), detail, ref))
        if self.budget.failure():
            self.request_close(CloseReason.ERROR_BUDGET)

    async def guarded(self, what: str, hook: Awaitable[T]) -> tuple[bool, T | None]:
        """Await an app hook; a `Reject` or an exception closes the connection."""
        try:
            return True, await hook
        except Reject as exc:
            self.request_close(CloseReason.APP, exc.code, exc.reason)
        except BackplaneUnavailable as exc:
            log.warning("%s: %s: %s", self.tag(), what, exc)
            self.request_close(CloseReason.BACKPLANE_UNAVAILABLE)
        except Exception:
            log.exception("%s: %s raised", self.tag(), what)
            self.request_close(CloseReason.INTERNAL_ERROR)
        return False, None

    def went_live(self) -> None:
        """The handshake queued the welcome: live from now on."""
        self.welcomed = True
        if self.welcome_event is not None:
            self.welcome_event.set()
        self.sender.wake_writer()
        self.runtime.timers.schedule(self, anyio.current_time())  # the heartbeat begins

    # --------------------------------------------------------------- deadlines

    def on_timer(self, now: float) -> float | None:
        """The hub's timers call this when a deadline of this connection is due:
        the hello (``handshake_timeout``), then the app's hooks (``hook_timeout``:
        authenticate, on_connect and snapshots), then the heartbeat. Returns when to
        be called next."""
        try:
            return self._deadline_due(now)
        except Exception:  # a bug: without deadlines the connection must not live on
            log.exception("%s: deadline handling failed", self.tag())
            self.request_close(CloseReason.INTERNAL_ERROR)
            return None

    def _deadline_due(self, now: float) -> float | None:
        if self.sm.closing:
            return None
        heartbeat = self.heartbeat
        if heartbeat is None or not self.welcomed:
            if self.hook_deadline == math.inf:  # no hello yet
                self.request_close(CloseReason.HANDSHAKE_TIMEOUT)
                return None
            if now < self.hook_deadline:
                return self.hook_deadline
            # authenticate and on_connect are the app's: a slow database is not the
            # client's fault, so their bound answers "try again later".
            log.warning("%s: authenticate/on_connect exceeded hook_timeout", self.tag())
            self.request_close(CloseReason.HOOK_TIMEOUT)
            return None
        tick = heartbeat.poll(now)
        if tick.beat is Beat.PING:
            queue = self.sender.queue
            if not queue.control_queued:  # else the last ping is still queued
                # Ahead of the backlog: the pong deadline must measure the peer,
                # not how much the room has queued for it.
                self.sender.push_control(ping_frame(tick.ping_id))
                self.sender.wake()
        elif tick.beat is Beat.NO_PONG:
            self.request_close(CloseReason.NO_PONG)
            return None
        elif tick.beat is Beat.IDLE:
            self.request_close(CloseReason.IDLE_TIMEOUT)
            return None
        return tick.wake_at

    # ----------------------------------------------------------------- release

    def _resumable(self, reason: CloseReason) -> bool:
        """Whether the client will come back for its session: decided by the code it
        saw, or, when the server chose none, by how the connection was lost."""
        code = self.sm.close_code
        if code is not None:
            return should_reconnect(code)
        if reason in (CloseReason.SEND_FAILED, CloseReason.RECEIVE_FAILED):
            return True
        # 1005 (no status): uvicorn reports a connection lost without a close frame
        # so, and a close frame without a code says nothing of the client's intent.
        return self.peer_code == 1005 or should_reconnect(self.peer_code)

    async def release(self) -> None:
        """Release everything the connection holds. Runs exactly once."""
        if self.released:
            return
        self.released = True
        runtime = self.runtime
        runtime.timers.cancel(self)
        sm = self.sm
        sender = self.sender
        if self.accepted and not self.peer_closed and not sender.close_sent:
            # Ended by cancellation or a crash before the writer could close it.
            if sm.close_code is None and sm.reason is None:
                sm.close(CloseReason.INTERNAL_ERROR)
            await sender.send_close()
        reason = sm.reason or CloseReason.CLIENT_CLOSED
        sm.finish(reason)
        code = (sm.close_code if sender.close_sent and sm.close_code is not None
                else self.peer_code if self.peer_closed else 1006)
        runtime.telemetry.metrics.disconnects[(code, str(reason))] += 1
        sender.clear()
        self.pending = None
        runtime.registry.forget(self, reason)
        rooms = self.rooms
        self.final_rooms = rooms
        try:
            await runtime.membership.connection_ended(self, self.session,
                                                      self._resumable(reason))
        except Exception:
            log.exception("%s: releasing the session failed", self.tag())
        level = disposition(reason).log_level
        log.log(
            level, "%s: closed, reason=%s code=%s rooms=%d after=%.1fs", self.tag(), reason,
            sm.close_code, len(rooms), anyio.current_time() - self.started_at,
        )
        if self.identity is not None:
            with anyio.move_on_after(runtime.config.hook_timeout) as scope:
                try:
                    await runtime.on_disconnect(self.connection)
                except Exception:
                    log.exception("%s: on_disconnect hook raised", self.tag())
            if scope.cancelled_caught:
                log.error("%s: on_disconnect hook exceeded hook_timeout", self.tag())
