"""Bounded stream history, the basis of exact replay on resume (sans-I/O).

A stream keeps its most recent messages, bounded by count, bytes and age. A client
that comes back with its last ``(epoch, offset)`` either gets every message after that
offset, in order, or an explicit "not recovered" — never a partial answer: if the
oldest retained message is not the one right after the client's offset, the gap is not
covered and the whole recovery fails (the client then takes a fresh snapshot).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from itertools import islice

from wsroom._core.queue import frame_size

__all__ = ["HistoryBudget", "HistoryLimits", "Recovery", "StreamHistory"]


_EMPTY: deque[tuple[int, float, str, int]] = deque(maxlen=0)  # shared, always empty


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """How much of a stream is kept for replay.

    The defaults cover a 2-minute outage of a busy game room (50 messages/s).

    Attributes:
        max_messages: messages kept per stream.
        max_bytes: summed frame sizes kept per stream.
        max_age: seconds a message is kept.
    """

    max_messages: int = 10_000
    max_bytes: int = 8 * 1024 * 1024
    max_age: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_messages", "max_bytes", "max_age"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HistoryLimits.{name} must be positive")


@dataclass(frozen=True, slots=True)
class Recovery:
    """The answer to "what did I miss since (epoch, offset)?"."""

    recovered: bool
    """True if `frames` is exactly everything after the client's offset."""
    frames: tuple[str, ...]
    """The missed frames in order (empty when not recovered)."""
    epoch: str
    """The stream's current epoch."""
    offset: int
    """The stream's last offset."""


class StreamHistory:
    """The retained tail of one stream.

    Args:
        epoch: the stream's epoch; a client with another epoch cannot be recovered.
        limits: the bounds.
        offset: the stream's last offset when the history starts (nothing before it
            is retained).
    """

    __slots__ = ("_budget", "_bytes", "_items", "epoch", "limits", "offset")

    def __init__(self, epoch: str, limits: HistoryLimits, offset: int = 0,
                 budget: HistoryBudget | None = None) -> None:
        self.epoch = epoch
        self.limits = limits
        self.offset = offset
        # A deque of its own from the first message: most personal streams stay empty.
        self._items: deque[tuple[int, float, str, int]] = _EMPTY
        self._bytes = 0
        self._budget = budget
        if budget is not None:
            budget.add(self)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The summed sizes of the retained frames."""
        return self._bytes

    def discard(self) -> None:
        """The stream is closed: give its bytes back to the budget."""
        if self._budget is not None:
            self._budget.remove(self)
            self._budget = None

    @property
    def first_offset(self) -> int:
        """The oldest retained offset (``offset + 1`` when nothing is retained)."""
        return self._items[0][0] if self._items else self.offset + 1

    def append(self, offset: int, frame: str, now: float, *, size: int | None = None
               ) -> None:
        """Retain the message `offset` (the next one of the stream).

        Args:
            frame: what `since` returns for it (a frame, or what a frame is made from).
            size: its size for the limits, if not ``frame_size(frame)`` (the size of
                the frame it stands for).

        Raises:
            ValueError: if `offset` does not follow the last one.
        """
        if offset != self.offset + 1:
            raise ValueError(f"offset {offset} does not follow {self.offset}")
        if size is None:
            size = frame_size(frame)
        if self._items is _EMPTY:
            self._items = deque()
        self._items.append((offset, now, frame, size))
        self._bytes += size
        self.offset = offset
        budget = self._budget
        if budget is not None:
            budget.used += size
        self.prune(now)
        if budget is not None and budget.used > budget.max_bytes:
            budget.shed()

    def prune(self, now: float) -> None:
        """Forget what is beyond the bounds at `now`."""
        limits = self.limits
        items = self._items
        horizon = now - limits.max_age
        before = self._bytes
        while items and (
            len(items) > limits.max_messages
            or self._bytes > limits.max_bytes
            or items[0][1] < horizon
        ):
            self._bytes -= items.popleft()[3]
        if self._budget is not None:
            self._budget.used -= before - self._bytes

    def shed(self, target: int) -> tuple[int, int]:
        """Forget the oldest messages until at most `target` bytes are retained (the
        budget is over); return how many messages and bytes went."""
        items = self._items
        before, count = self._bytes, len(items)
        while items and self._bytes > target:
            self._bytes -= items.popleft()[3]
        freed = before - self._bytes
        if self._budget is not None:
            self._budget.used -= freed
        return count - len(items), freed

    def since(self, epoch: str, offset: int, now: float) -> Recovery:
        """Everything after ``(epoch, offset)``, or not recovered.

        Not recovered when the epoch differs, the offset is beyond the stream's last
        one (the client saw a stream this history does not know), or the messages
        right after the offset were already forgotten.
        """
        self.prune(now)
        if epoch != self.epoch or offset > self.offset or offset < 0:
            return Recovery(False, (), self.epoch, self.offset)
        if offset == self.offset:
            return Recovery(True, (), self.epoch, self.offset)
        first = self.first_offset
        if offset + 1 < first:
            return Recovery(False, (), self.epoch, self.offset)
        frames = tuple(item[2] for item in islice(self._items, offset + 1 - first, None))
        return Recovery(True, frames, self.epoch, self.offset)


class HistoryBudget:
    """A cap on the bytes that many histories retain together (one hub's streams).

    When an append takes the total over `max_bytes`, the largest histories forget their
    oldest messages until the total is 10% under the cap: the largest first, down to
    the size of the next largest, and so on, so that one busy room (or one member's
    flood of inboxes) pays before anybody else does. A client that resumes behind
    what was forgotten gets ``recovered: false`` and a snapshot, never a silent gap.

    Args:
        max_bytes: the cap, in summed frame sizes.
    """

    __slots__ = ("_histories", "max_bytes", "shed_bytes", "shed_messages", "used")

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the history budget must be positive, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.used = 0
        self.shed_messages = 0
        """Messages forgotten because the budget was reached (not by their limits)."""
        self.shed_bytes = 0
        self._histories: dict[int, StreamHistory] = {}

    def __len__(self) -> int:
        return len(self._histories)

    def add(self, history: StreamHistory) -> None:
        self._histories[id(history)] = history
        self.used += history.nbytes

    def remove(self, history: StreamHistory) -> None:
        if self._histories.pop(id(history), None) is not None:
            self.used -= history.nbytes

    def sweep(self, now: float) -> None:
        """Apply every history's `max_age` at `now` (a timer calls it: an idle stream
        appends nothing that would prune it)."""
        for history in list(self._histories.values()):
            history.prune(now)

    def shed(self) -> None:
        """Bring the total 10% under the cap, from the largest histories first."""
        low = self.max_bytes - self.max_bytes // 10
        heap = [(-history.nbytes, key, history)
                for key, history in self._histories.items() if history.nbytes]
        heapq.heapify(heap)
        while self.used > low and heap:
            _, key, history = heapq.heappop(heap)
            # Down to the next largest (or as far as needed), then compare again.
            floor = -heap[0][0] if heap else 0
            target = max(floor, history.nbytes - (self.used - low))
            if target >= history.nbytes:
                target = history.nbytes - 1  # always forget at least one message
            messages, freed = history.shed(target)
            self.shed_messages += messages
            self.shed_bytes += freed
            if history.nbytes:
                heapq.heappush(heap, (-history.nbytes, key, history))
