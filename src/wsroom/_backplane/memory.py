"""The in-memory backplane: one process, zero set-up (the hub's default)."""

from __future__ import annotations

import secrets
from collections.abc import Hashable, Mapping

import anyio
from anyio.abc import TaskGroup

from wsroom._backplane.base import Backplane, Envelope
from wsroom._core.history import HistoryBudget, HistoryLimits, Recovery, StreamHistory
from wsroom._core.protocol import msg_frame_from
from wsroom._core.queue import frame_size
from wsroom._core.sessions import INBOX, inbox_owner

__all__ = ["MemoryBackplane"]

SWEEP_INTERVAL = 5.0
"""Seconds between two passes applying ``max_age`` to idle streams: a message may be
kept up to this much longer than its stream's ``max_age``."""


class MemoryBackplane(Backplane):
    """One process: streams live as long as a local member needs them.

    A stream that is closed is forgotten: if it is opened again it starts a new epoch,
    so no client can mistake the new offsets for the old ones.

    The histories share one budget (`limit_history`: ``HubConfig.max_history_bytes``),
    and while the hub runs a timer applies their ``max_age`` even to idle streams.
    """

    def __init__(self) -> None:
        self._streams: dict[str, StreamHistory] = {}
        self._budget: HistoryBudget | None = None
        self._sweeper: anyio.CancelScope | None = None  # the max_age timer's, once started

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def history_bytes(self) -> int:
        """The summed sizes of every retained frame (what the budget counts)."""
        if self._budget is not None:
            return self._budget.used
        return sum(history.nbytes for history in self._streams.values())

    def limit_history(self, max_bytes: int | None) -> None:
        if self._streams:
            raise RuntimeError("limit_history: call it before any stream is opened")
        self._budget = None if max_bytes is None else HistoryBudget(max_bytes)

    def counters(self) -> Mapping[str, int]:
        if self._budget is None:
            return {}
        return {"history_shed_messages": self._budget.shed_messages}

    async def start(self, task_group: TaskGroup) -> None:
        self._sweeper = sweeper = anyio.CancelScope()
        task_group.start_soon(self._sweep, sweeper, name="wsroom history max_age")
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._sweeper is not None:  # whoever started it need not cancel its tasks
            self._sweeper.cancel()
        await anyio.lowlevel.checkpoint()

    async def _sweep(self, sweeper: anyio.CancelScope) -> None:
        with sweeper:
            while True:
                await anyio.sleep(SWEEP_INTERVAL)
                now = anyio.current_time()
                if self._budget is not None:
                    self._budget.sweep(now)
                else:
                    for history in list(self._streams.values()):
                        history.prune(now)

    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        history = self._streams.get(stream)
        if history is None:
            history = self._streams[stream] = StreamHistory(
                secrets.token_urlsafe(6), limits, budget=self._budget)
        await anyio.lowlevel.checkpoint()
        return history.epoch, history.offset

    async def close(self, stream: str) -> None:
        history = self._streams.pop(stream, None)
        if history is not None:
            history.discard()
        await anyio.lowlevel.checkpoint()

    async def publish(self, stream: str, wire_name: str, payload: str, *,
                      key: Hashable | None = None, exclude: str | None = None,
                      limits: HistoryLimits | None = None) -> Envelope:
        history = self._streams[stream]
        offset = history.offset + 1
        frame = msg_frame_from(wire_name, history.epoch, offset, payload)
        size = frame_size(frame)
        # The history keeps the payload, not the frame: `Hub.send_to` publishes one
        # payload object to each session of the member, and it is stored once.
        history.append(offset, payload, anyio.current_time(), size=size)
        envelope = Envelope(stream, history.epoch, offset, frame, size, key, exclude)
        # Synchronously: no membership change can interleave with a fan-out.
        self._deliver(envelope)
        return envelope

    async def position(self, stream: str) -> tuple[str, int]:
        history = self._streams[stream]
        await anyio.lowlevel.checkpoint()
        return history.epoch, history.offset

    async def since(self, stream: str, epoch: str, offset: int) -> Recovery:
        history = self._streams.get(stream)
        await anyio.lowlevel.checkpoint()
        if history is None:
            return Recovery(False, (), "", 0)
        recovery = history.since(epoch, offset, anyio.current_time())
        if not recovery.frames:
            return recovery
        wire = INBOX if inbox_owner(stream) is not None else stream
        frames = tuple(msg_frame_from(wire, recovery.epoch, first, payload)
                       for first, payload in enumerate(recovery.frames, offset + 1))
        return Recovery(True, frames, recovery.epoch, recovery.offset)
