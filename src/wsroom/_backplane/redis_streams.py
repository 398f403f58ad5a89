"""The streams a worker has open on the `RedisBackplane`, and their delivery in order.

Each open stream keeps its position (a `StreamCursor`: the one epoch/offset check) and
whether some task is processing it. A message of the channel is judged against the
position: the next one is delivered, a duplicate (delivered by its publish, or by a
catch-up) dropped, a new epoch reported lost; a hole makes the stream catch up from its
Redis history first, and when the history no longer covers what it missed the stream is
reported lost (its clients resume). While a task processes a stream (opening it, or
catching it up) the subscriber stashes its messages: they are processed after.

Nothing here touches the subscriber connection (`wsroom._backplane.redis_subscriber`).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterator

import anyio

from wsroom._backplane.base import Envelope
from wsroom._backplane.redis_commands import Commands, Item, parse_items
from wsroom._core.cursor import Step, StreamCursor
from wsroom._core.history import HistoryLimits
from wsroom._core.protocol import msg_frame_from
from wsroom._core.queue import frame_size
from wsroom._core.sessions import INBOX, inbox_owner

__all__ = ["OpenStream", "Streams"]

log = logging.getLogger("wsroom.redis")


class OpenStream:
    """This process's view of one open stream."""

    __slots__ = ("busy", "channel", "cursor", "limits", "name", "opened", "ready",
                 "stash", "wire")

    def __init__(self, name: str, channel: str, limits: HistoryLimits) -> None:
        self.name = name
        self.channel = channel
        self.wire = INBOX if inbox_owner(name) is not None else name
        self.limits = limits
        # The position (epoch, last offset delivered), once known (`ready`).
        self.cursor = StreamCursor()
        # ready: the position is known; busy: some task is processing the stream
        # (opening or catching up): the reader stashes its messages meanwhile.
        self.ready = False
        self.busy = True
        self.stash: deque[Item] = deque()
        self.opened = anyio.Event()  # created in a running event loop (by open)

    def position(self) -> tuple[str, int]:
        """The stream's epoch and last offset (``("", 0)`` before it is known)."""
        return self.cursor.get(self.name) or ("", 0)

    def move(self, epoch: str, offset: int) -> None:
        self.cursor.set(self.name, epoch, offset)

    def advance(self, epoch: str, offset: int) -> Step:
        """Judge a message of the stream against the position (see `StreamCursor`)."""
        return self.cursor.advance(self.name, epoch, offset)


class Streams:
    """The open streams of this process: by name and by channel, their positions, and
    the delivery of their messages (with catch-up from the Redis history).

    Args:
        commands: the Redis commands (`Commands.sync` reads the history).
        deliver: receives every message, in offset order per stream.
        lost: receives the name of a stream some of whose messages cannot be delivered.
        stats: the backplane's counters (``caught_up`` and ``lost`` are counted here).
    """

    __slots__ = ("_by_channel", "_commands", "_deliver", "_lost", "_streams", "stats")

    def __init__(self, commands: Commands, deliver: Callable[[Envelope], None],
                 lost: Callable[[str], None], stats: dict[str, int]) -> None:
        self._commands = commands
        self._deliver = deliver
        self._lost = lost
        self._streams: dict[str, OpenStream] = {}
        self._by_channel: dict[str, OpenStream] = {}
        self.stats = stats

    # ------------------------------------------------------------------ the registry

    def get(self, name: str) -> OpenStream | None:
        return self._streams.get(name)

    def on_channel(self, channel: str) -> OpenStream | None:
        return self._by_channel.get(channel)

    def __iter__(self) -> Iterator[OpenStream]:
        """The open streams (a snapshot: streams may open and close meanwhile)."""
        return iter(list(self._streams.values()))

    def names(self) -> list[str]:
        return list(self._streams)

    def is_open(self, st: OpenStream) -> bool:
        """Whether `st` is the stream open under its name (not closed, not replaced)."""
        return self._streams.get(st.name) is st

    def add(self, name: str, limits: HistoryLimits) -> OpenStream:
        st = OpenStream(name, self._commands.channel(name), limits)
        self._streams[name] = st
        self._by_channel[st.channel] = st
        return st

    def forget(self, st: OpenStream) -> None:
        if self._streams.get(st.name) is st:
            del self._streams[st.name]
            del self._by_channel[st.channel]

    # ----------------------------------------------------------------- the messages

    async def start(self, st: OpenStream) -> None:
        """Take the position of `st` (held by the caller) from Redis, and process what
        was stashed meanwhile."""
        epoch, last, _ = await self._commands.sync(st.name, "", -1)
        st.move(epoch, last)
        st.ready = True
        await self.drain(st)

    def published(self, envelope: Envelope) -> None:
        """A message this worker just published: delivered now if it is the next one
        of an open stream nobody is processing (its echo from the channel is then a
        duplicate)."""
        st = self._streams.get(envelope.stream)
        if (st is not None and st.ready and not st.busy
                and st.advance(envelope.epoch, envelope.offset) is Step.NEW):
            self._deliver(envelope)

    async def on_message(self, st: OpenStream, data: str) -> None:
        """A message of the channel of `st`: processed now, or stashed if the stream
        is busy."""
        offset, epoch, exclude, key, payload = data.split("\n", 4)
        item = (int(offset), epoch, exclude, key, payload)
        if not st.ready or st.busy:
            st.stash.append(item)
            return
        st.busy = True
        try:
            await self._process(st, item)
        finally:
            st.busy = False

    async def resync(self) -> None:
        """After a (re)connection: catch every open stream up from history."""
        for st in self:
            if not st.ready or st.busy or not self.is_open(st):
                continue  # an open in progress does its own
            st.busy = True
            try:
                await self.catch_up(st)
                await self.drain(st)
            finally:
                st.busy = False

    async def drain(self, st: OpenStream) -> None:
        """Process what the reader stashed while `st` was busy (the caller holds it)."""
        while st.stash:
            await self._process(st, st.stash.popleft())

    async def _process(self, st: OpenStream, item: Item) -> None:
        """Deliver a message of the channel, after catching up a hole before it."""
        if self._apply(st, item):
            return
        await self.catch_up(st)
        if not self._apply(st, item):
            self._declare_lost(st, item[1], item[0],
                               f"offset {item[0]} after {st.position()[1]}")

    def _apply(self, st: OpenStream, item: Item) -> bool:
        """Deliver or drop `item`; False if it comes after a hole."""
        offset, epoch, exclude, key, payload = item
        step = st.advance(epoch, offset)
        if step is Step.EPOCH:
            self._declare_lost(st, epoch, offset, "was renumbered (new epoch)")
        elif step is Step.HOLE:
            return False
        elif step is Step.NEW:
            self._emit(st, epoch, offset, exclude, key, payload)
        return True  # delivered, lost, or a duplicate (delivered by publish or catch-up)

    async def catch_up(self, st: OpenStream) -> None:
        """Deliver what `st` missed from the Redis history, or report it lost."""
        known, last = st.position()
        epoch, top, entries = await self._commands.sync(st.name, known, last)
        known, last = st.position()  # (unchanged: the caller holds the stream)
        if epoch != known:
            self._declare_lost(st, epoch, top, "was renumbered (new epoch)")
            return
        if top <= last:
            return
        items = parse_items(entries, last + 1, epoch)
        if items is None or len(items) != top - last:
            self._declare_lost(st, epoch, top,
                               f"missed offsets after {last} that its history no "
                               "longer holds")
            return
        log.info("redis backplane: stream=%s caught up %d message(s) from history",
                 st.name, len(items))
        self.stats["caught_up"] += 1
        for offset, _, exclude, key, payload in items:
            # Consecutive from the position (the range is checked above): the cursor
            # takes each as the next one.
            step = st.advance(epoch, offset)
            if step is not Step.NEW:
                self._declare_lost(st, epoch, top, f"history entry {offset} is {step.value}")
                return
            self._emit(st, epoch, offset, exclude, key, payload)

    def _emit(self, st: OpenStream, epoch: str, offset: int, exclude: str, key: str,
              payload: str) -> None:
        frame = msg_frame_from(st.wire, epoch, offset, payload)
        self._deliver(Envelope(st.name, epoch, offset, frame, frame_size(frame),
                               None if not key else (st.name, json.loads(key)),
                               exclude or None))

    def _declare_lost(self, st: OpenStream, epoch: str, offset: int, why: str) -> None:
        log.warning("redis backplane: stream=%s %s: its clients must resume", st.name, why)
        self.stats["lost"] += 1
        st.move(epoch, offset)
        self._lost(st.name)
