"""The in-memory backplane: one process, zero set-up (the hub's default)."""

from __future__ import annotations

import secrets
from collections.abc import Hashable

import anyio

from wsroom._backplane.base import Backplane, Envelope
from wsroom._core.history import HistoryLimits, Recovery, StreamHistory
from wsroom._core.protocol import msg_frame_from
from wsroom._core.queue import frame_size

__all__ = ["MemoryBackplane"]


class MemoryBackplane(Backplane):
    """One process: streams live as long as a local member needs them.

    A stream that is closed is forgotten: if it is opened again it starts a new epoch,
    so no client can mistake the new offsets for the old ones.
    """

    def __init__(self) -> None:
        self._streams: dict[str, StreamHistory] = {}

    def __len__(self) -> int:
        return len(self._streams)

    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        history = self._streams.get(stream)
        if history is None:
            history = self._streams[stream] = StreamHistory(secrets.token_urlsafe(6), limits)
        await anyio.lowlevel.checkpoint()
        return history.epoch, history.offset

    async def close(self, stream: str) -> None:
        self._streams.pop(stream, None)
        await anyio.lowlevel.checkpoint()

    async def publish(self, stream: str, wire_name: str, payload: str, *,
                      key: Hashable | None = None, exclude: str | None = None,
                      limits: HistoryLimits | None = None) -> Envelope:
        history = self._streams[stream]
        offset = history.offset + 1
        frame = msg_frame_from(wire_name, history.epoch, offset, payload)
        history.append(offset, frame, anyio.current_time())
        envelope = Envelope(stream, history.epoch, offset, frame, frame_size(frame), key,
                            exclude)
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
        return history.since(epoch, offset, anyio.current_time())
