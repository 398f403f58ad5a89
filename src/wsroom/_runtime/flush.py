"""Writing queued frames from one hub task, without waking a task per connection.

Theory of operation
-------------------
A broadcast to N members used to set N events and run N writer tasks, each for one
small write: on a 2-core machine the wake-ups cost about as much as the writes. Now a
delivery only marks its connection *dirty* (`Flusher.schedule`); one hub task, the
flusher, wakes once, lets the publisher run a few more rounds while it keeps adding
messages (so they share frames: `max_rounds`), then writes every dirty connection's
queue in one pass.

The write itself is the ASGI ``send`` coroutine, *started eagerly* (`start_eagerly`):
the flusher runs it until it first suspends. With uvicorn (and any server whose send
only waits when the socket's buffer is full) it does not suspend: the frame is in the
kernel and nothing was scheduled. If it does suspend (the client is slow: its
transport paused writing), the started coroutine is handed to that connection's own
writer task as a `Continuation`, which the writer awaits before anything else, so
order is kept and only the slow client waits.

This is asyncio-only: a coroutine suspended by trio's traps belongs to the task that
ran it. Elsewhere the hub wakes the writer tasks as before.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

import anyio
import anyio.lowlevel


class Flushable(Protocol):
    """What the flusher writes: a connection's sender."""

    def flush(self) -> None:
        """Write what is queued while each send completes without waiting."""

    def flush_failed(self) -> None:
        """`flush` raised (a bug): close the connection."""

    def unscheduled(self) -> None:
        """The flusher stopped before writing it: the connection's writer takes over."""

__all__ = ["Continuation", "Flushable", "Flusher", "start_eagerly"]

log = logging.getLogger("wsroom")


class Continuation:
    """A coroutine that was started elsewhere and suspended: awaiting this resumes it
    in the awaiting task (the yielded future is handed on to that task unchanged)."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def close(self) -> None:
        """Abandon the coroutine (the connection ends before resuming it)."""
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        coro = self._coro
        yielded = self._yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation: into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration:
                    return


def start_eagerly(coro: Coroutine[Any, Any, None]) -> Continuation | None:
    """Run `coro` until it suspends; None if it finished, else its `Continuation`.

    Raises:
        Exception: whatever `coro` raised before suspending.
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return Continuation(coro, yielded)


class Flusher:
    """The hub task that writes dirty connections' queues (see the module docstring).

    Args:
        max_rounds: how many scheduling rounds to wait, at most, while messages keep
            being queued, before writing (more rounds = more messages per frame under
            load; an idle room is written after one round).
    """

    __slots__ = ("_dirty", "_queued", "_wakeup", "max_rounds")

    def __init__(self, max_rounds: int = 4) -> None:
        self.max_rounds = max_rounds
        self._dirty: list[Flushable] = []
        self._queued = 0
        self._wakeup = anyio.Event()

    def schedule(self, target: Flushable) -> None:
        """`target` has frames to write (called once until it is flushed)."""
        if not self._dirty:
            self._wakeup.set()
        self._dirty.append(target)

    def touch(self) -> None:
        """A frame was queued for a connection that is already scheduled."""
        self._queued += 1

    def take_dirty(self) -> list[Flushable]:
        """Remove and return the connections waiting to be flushed."""
        dirty, self._dirty = self._dirty, []
        return dirty

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            rounds = 0
            while True:
                seen = self._queued + len(self._dirty)
                await anyio.lowlevel.checkpoint()
                rounds += 1
                if rounds >= self.max_rounds or self._queued + len(self._dirty) == seen:
                    break
            for target in self.take_dirty():
                try:
                    target.flush()
                except Exception:  # a bug: that connection must not stop the others
                    log.exception("flushing a connection failed")
                    target.flush_failed()
