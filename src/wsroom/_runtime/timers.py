"""Every connection's deadlines (hello, hooks, heartbeat) in one hub task.

A task and a loop timer per connection just to sleep until its next ping cost about
5 KiB and a task switch per ping each; at 10,000 idle connections they were most of
the server's idle CPU. Here a connection only records when it wants to be called
(`Timers.schedule`); one task keeps a heap of those times and calls
``target.on_timer(now)`` when one is due, which returns the next time (or None).

Rescheduling never searches the heap: the target remembers its current time
(``timer_at``) and entries that no longer match it are skipped when they come up.
The task sleeps until `RESOLUTION` after the earliest due time, so that due times close
to each other are served by one wake-up; nothing is served before its time (a ping's
send time is its RTT's start).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import Protocol

import anyio

__all__ = ["RESOLUTION", "Timed", "Timers"]

log = logging.getLogger("wsroom")

RESOLUTION = 0.01
"""Seconds a due time may be served late, so that close ones share a wake-up."""


class Timed(Protocol):
    """What `Timers` schedules."""

    timer_at: float

    def on_timer(self, now: float) -> float | None:
        """A scheduled time has come: act, and return the next time (None: no more)."""
        ...


class Timers:
    """The heap of due times and the task that serves them (see the module docstring)."""

    __slots__ = ("_counter", "_heap", "_stale", "_until", "_wakeup")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        self._counter = itertools.count()
        self._wakeup: anyio.Event | None = None
        self._until = -math.inf  # when the task will look next (-inf: it is looking)
        self._stale = 0  # entries that no longer match their target's time

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, target: Timed, when: float) -> None:
        """Call ``target.on_timer`` at `when` (replacing its previous time)."""
        if target.timer_at != math.inf:
            self._stale += 1
        target.timer_at = when
        heapq.heappush(self._heap, (when, next(self._counter), target))
        if when < self._until and self._wakeup is not None:
            self._wakeup.set()

    def cancel(self, target: Timed) -> None:
        """Forget `target`'s time (its entry is dropped when it comes up, or sooner:
        the heap is compacted when stale entries are most of it, so that closed
        connections are not kept alive until their next ping time)."""
        if target.timer_at != math.inf:
            target.timer_at = math.inf
            self._stale += 1
            if self._stale > 64 and self._stale * 2 > len(self._heap):
                self._heap[:] = [entry for entry in self._heap
                                 if entry[2].timer_at == entry[0]]
                heapq.heapify(self._heap)
                self._stale = 0

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = anyio.current_time()
            self._until = -math.inf
            while heap and heap[0][0] <= now:
                when, _, target = heapq.heappop(heap)
                if target.timer_at != when:
                    self._stale = max(0, self._stale - 1)
                    continue  # rescheduled or cancelled since
                target.timer_at = math.inf
                try:
                    following = target.on_timer(now)
                except Exception:  # a bug: the other connections' deadlines must go on
                    log.exception("a connection's timer failed")
                    continue
                if following is not None:
                    # Never again within this pass: this loop always ends.
                    self.schedule(target, max(following, now + RESOLUTION))
            self._until = heap[0][0] if heap else math.inf
            self._wakeup = anyio.Event()
            with anyio.CancelScope(deadline=self._until + RESOLUTION):
                await self._wakeup.wait()
