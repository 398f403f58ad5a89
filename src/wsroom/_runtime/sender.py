"""The sending half of a connection: its bounded queue, the writer task, the flusher
hand-off and the close frame.

Theory of operation
-------------------
Everyone who has something for the client (broadcasts, replies, pings, close requests)
changes the sender synchronously: frames go to the bounded `OutboundQueue`. While the
writer task is idle, the hub's flusher writes them (`flush`, see `flush.py`): one pass
over every connection with new frames, each send started eagerly and completed without
waiting when the socket can take it. Everything else is the **writer**'s: a send that
must wait (a slow client), the welcome and its replay, a backlog, and finally the close
frame. Sends never overlap: the flusher writes only while no writer task exists, and
starts one and hands it any send that suspends. The writer task exists only while it
has work (on trio, where there is no flusher, it runs for the connection's whole life).
Several queued frames go out as one WebSocket frame.

A close request (`Peer.request_close`) tells the sender (`close_requested`): without flush the
queue is dropped and a send in progress abandoned; with flush the writer gets a
deadline. The writer then sends the close frame and ends the connection.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import TaskGroup

from wsroom._asgi.transport import Transport
from wsroom._core.queue import OutboundQueue, Policy, PushResult, frame_size
from wsroom._core.state import CloseReason, ConnectionStateMachine, ConnState, disposition
from wsroom._runtime.flush import Continuation, Flusher, start_eagerly
from wsroom._runtime.stats import Telemetry

if TYPE_CHECKING:
    from wsroom._backplane.base import Envelope

__all__ = ["Sender"]

log = logging.getLogger("wsroom.connection")

_SEND_FAILURE_GRACE = 1.0
"""Seconds a failed send waits for the reader to report the peer's close."""
_NO_REPLAY: deque[str] = deque(maxlen=0)  # shared while there is no replay (saves a deque)
_FLUSH_FRAMES = 4  # frames the flusher writes for one connection before the writer takes over


class Owner(Protocol):
    """What the sender needs of its connection."""

    @property
    def id(self) -> str: ...
    @property
    def welcomed(self) -> bool: ...
    @property
    def peer_closed(self) -> bool: ...
    @property
    def tg(self) -> TaskGroup | None: ...

    def tag(self) -> str: ...
    def request_close(self, reason: CloseReason, code: int | None = None,
                      text: str = "") -> None: ...
    def finish(self, reason: CloseReason) -> None: ...


class Host(Protocol):
    """Where the hub's flusher is found (None: stopped, or trio)."""

    flusher: Flusher | None


class Sender:
    """Everything that writes to one client (see the module docstring).

    Args:
        owner: the connection.
        sm: the connection's state machine (shared with it).
        transport: the socket.
        queue: the bounded queue.
        host: holds the hub's flusher, or None (stopped, or trio).
        batch_bytes: the most bytes joined into one frame (0: one message a frame).
        telemetry: where sends are counted.
    """

    __slots__ = (
        "_batch_bytes", "_host", "_inflight", "_owner", "_send_error", "_send_scope",
        "_sm", "_telemetry", "_transport", "_wakeup", "close_deadline", "close_sent",
        "close_text", "dirty", "queue", "replay", "writing",
    )

    def __init__(self, owner: Owner, sm: ConnectionStateMachine, transport: Transport,
                 queue: OutboundQueue, host: Host,
                 batch_bytes: int, telemetry: Telemetry) -> None:
        self._owner = owner
        self._sm = sm
        self._transport = transport
        self.queue = queue
        self._host = host
        self._batch_bytes = batch_bytes
        self._telemetry = telemetry
        self.replay: deque[str] = _NO_REPLAY  # a deque of its own after the welcome
        self._wakeup: anyio.Event | None = None  # set while the writer is parked
        self.writing = False  # a writer task exists
        self.dirty = False  # scheduled with the hub's flusher
        self._inflight: Continuation | None = None  # a send the flusher started
        self._send_error: Exception | None = None  # a send the flusher saw fail
        self._send_scope: anyio.CancelScope | None = None
        self.close_deadline = math.inf
        self.close_text = ""
        self.close_sent = False

    # ------------------------------------------------------------------ queueing

    def enqueue(self, envelope: Envelope, policy: Policy) -> None:
        """Queue a room's (or an inbox's) numbered message under `policy`."""
        queue = self.queue
        result = queue.push(envelope.frame, size=envelope.size, policy=policy,
                            key=envelope.key)
        if result is PushResult.OVERFLOW:
            self._owner.request_close(CloseReason.SLOW_CONSUMER)
            return
        if result is PushResult.DISCARDED:
            self._telemetry.counters.discarded += queue.last_discarded
            self._telemetry.metrics.dropped[policy.value] += queue.last_discarded
        self.wake()

    def push(self, frame: str, size: int | None = None) -> bool:
        """Queue a frame for this client only (reply, error, presence, position)."""
        if self._sm.closing:
            return False
        if self.queue.push(frame, size=size) is PushResult.OVERFLOW:
            self._owner.request_close(CloseReason.SLOW_CONSUMER)
            return False
        self.wake()
        return True

    def push_control(self, frame: str) -> None:
        """Queue a control frame (welcome, ping) ahead of the backlog."""
        self.queue.push_control(frame, front=True)

    def start_replay(self, replay: deque[str]) -> None:
        """Frames that go out right after the welcome, before the queue."""
        if replay:
            self.replay = replay

    def clear(self) -> None:
        """Drop everything not sent yet."""
        self.queue.clear()
        self.replay.clear()

    # ------------------------------------------------------------------- waking

    def wake(self) -> None:
        """Frames were queued: have them written (by the hub's flusher if the writer
        is not running and the hub has one, else by the writer)."""
        if self.writing:
            wakeup = self._wakeup
            if wakeup is not None:  # parked (a hub without a flusher)
                wakeup.set()
            return  # else it is running: it takes what is queued
        flusher = self._host.flusher
        if flusher is None:  # the hub stopped its flusher (or never had one: trio)
            self.wake_writer()
            return
        if self.dirty:
            flusher.touch()
        else:
            self.dirty = True
            flusher.schedule(self)

    def wake_writer(self) -> None:
        """Have the writer task run: wake it, or start one (a close request, the
        welcome and its replay, anything the flusher cannot write at once)."""
        if self.writing:
            wakeup = self._wakeup
            if wakeup is not None:
                wakeup.set()
            return
        tg = self._owner.tg
        if tg is not None and self._sm.state is not ConnState.CLOSED:
            self.writing = True
            try:
                tg.start_soon(self._writer, name=f"wsroom writer {self._owner.id}")
            except RuntimeError:  # the task group is ending (trio closes it to new tasks)
                self.writing = False

    def unscheduled(self) -> None:
        """The flusher stopped before writing this connection: the writer's again."""
        self.dirty = False
        self.wake_writer()

    def close_requested(self) -> None:
        """A close was requested (`sm` says whether what is queued is flushed)."""
        scope = self._send_scope
        if not self._sm.flush:
            self.clear()
            if scope is not None:
                scope.cancel()
        elif scope is not None:
            scope.deadline = self.close_deadline
        self.wake_writer()

    # ------------------------------------------------------------- the flusher

    def flush(self) -> None:
        """Called by the hub's flusher: write what is queued from the flusher's task
        while each send completes without waiting; anything else is the writer's."""
        self.dirty = False
        queue = self.queue
        if self.writing or not queue:
            return  # a running writer takes what is queued
        if (self._sm.state is not ConnState.OPEN or self.replay
                or not self._owner.welcomed):
            self.wake_writer()
            return
        batch_bytes = self._batch_bytes
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
        self.wake_writer()

    def flush_failed(self) -> None:
        self._owner.request_close(CloseReason.INTERNAL_ERROR)

    def _count_sent(self, frames: list[str], text: str, depth: int) -> None:
        telemetry = self._telemetry
        telemetry.metrics.queue_depth.observe(depth)
        counters = telemetry.counters
        counters.frames_out += 1
        counters.messages_out += len(frames)
        telemetry.metrics.sent_bytes += frame_size(text)

    # --------------------------------------------------------------- the writer

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
                        # `close_requested` would have (a deadline, or stop sending now: even
                        # a send the flusher handed over is abandoned).
                        if self._sm.flush:
                            scope.deadline = self.close_deadline
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
            await self.send_close()
            self._owner.finish(self._sm.reason or CloseReason.APP)
        finally:
            self.writing = False

    async def _write_queued(self) -> bool | None:
        """Write queued frames until the connection closes; True if a send failed,
        None if nothing is left to write and the hub's flusher takes over.

        Runs inside the writer's cancel scope: a close without flush cancels it, a close
        with flush gives it a deadline. A send the flusher started and could not finish
        (`_inflight`) or saw fail (`_send_error`) comes first.
        """
        queue = self.queue
        transport = self._transport
        batch_bytes = self._batch_bytes
        sm = self._sm
        owner = self._owner
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
            if (queue or self.replay) and owner.welcomed and (
                    state is ConnState.OPEN or sm.flush):
                # The welcome and the replay go first, but a ping does not wait
                # behind a long replay.
                depth = len(queue) + len(self.replay)
                frames = (queue.pop_control() if queue.control_queued else None) or (
                    self._pop_replay(batch_bytes) if self.replay
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
            elif self._host.flusher is not None:
                return None
            else:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                self._wakeup = None
                if batch_bytes and self._host.flusher is None:
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
        log.warning("%s: send failed: %s", self._owner.tag(), type(exc).__name__)
        self._owner.finish(CloseReason.SEND_FAILED)

    def _pop_replay(self, max_bytes: int) -> list[str]:
        replay = self.replay
        out = [replay.popleft()]
        total = frame_size(out[0])
        while replay:
            size = frame_size(replay[0])
            if total + 1 + size > max_bytes:
                break
            out.append(replay.popleft())
            total += 1 + size
        if not replay:
            self.replay = _NO_REPLAY
        return out

    async def send_close(self) -> None:
        """Send the close frame chosen by the state machine, once, within the close
        deadline (and the reason's own wait, if shorter)."""
        code = self._sm.close_code
        if code is None or self._owner.peer_closed or self.close_sent:
            return
        self.close_sent = True  # attempted: never twice
        deadline = self.close_deadline
        wait = disposition(self._sm.reason).close_wait if self._sm.reason else None
        if wait is not None:
            deadline = min(deadline, anyio.current_time() + wait)
        with anyio.CancelScope(deadline=deadline):
            try:
                await self._transport.close(code, self.close_text)
            except Exception as exc:
                log.debug("%s: close frame not sent: %s", self._owner.tag(),
                          type(exc).__name__)
