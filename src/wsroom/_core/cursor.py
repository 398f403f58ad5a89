"""Stream positions: the one check behind exact delivery.

Every stream (a room, or a session's ``@inbox``) is numbered by its backplane: an
*epoch* (renamed whenever the stream's numbering restarts) and an *offset* that grows by
one per message. Whoever reads a stream — the server for each connection, the Python
client, the load test, and `static/wsroom.js` in the same way — keeps the last position
it saw and judges each numbered message against it:

- no position yet: the message starts the stream (`Step.NEW`);
- another epoch: the stream was renumbered; nothing after the position can be vouched
  for (`Step.EPOCH`: the client resumes, 3010);
- at or before the position: a duplicate (`Step.DUPLICATE`: dropped);
- the next offset: `Step.NEW`, and the position moves on;
- beyond it: a hole (`Step.HOLE`: resume), unless the stream is *lossy* (its room's
  policy may discard messages, ``drop_oldest`` or ``coalesce``): then `Step.NEW`.

The server's input (from the backplane) is never lossy; a client learns which streams
are lossy from the ``welcome`` and ``stream`` frames. The cases in
``tests/cases/cursor.json`` are run against this class and against ``wsroom.js``.

`merge_buffered` is the handshake's half: what a connection buffered while its welcome
was being prepared is merged behind the replay by the same rules.

Sans-I/O: nothing here awaits, reads a clock or logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, TypeVar

__all__ = ["Numbered", "Start", "Step", "StreamCursor", "merge_buffered"]


class Step(Enum):
    """How a numbered message relates to the reader's position on its stream."""

    NEW = "new"
    """The next message (or the first one seen): deliver it; the position moved on."""
    DUPLICATE = "duplicate"
    """At or before the position: already delivered, drop it."""
    HOLE = "hole"
    """Beyond the next offset of an exact stream: messages are missing (resume)."""
    EPOCH = "epoch"
    """Another epoch: the stream was renumbered (resume)."""


class StreamCursor:
    """The last ``(epoch, offset)`` a reader has of each stream, and the check.

    Positions are plain tuples in one dict (a server keeps one cursor per connection).
    """

    __slots__ = ("_lossy", "_positions")

    def __init__(self) -> None:
        self._positions: dict[str, tuple[str, int]] = {}
        self._lossy: set[str] | None = None  # created on the first lossy stream

    def __contains__(self, stream: object) -> bool:
        return stream in self._positions

    def __len__(self) -> int:
        return len(self._positions)

    def __iter__(self) -> Iterator[str]:
        return iter(self._positions)

    def get(self, stream: str) -> tuple[str, int] | None:
        """The stream's position, or None if it has none."""
        return self._positions.get(stream)

    def positions(self) -> dict[str, tuple[str, int]]:
        """A copy of every position."""
        return dict(self._positions)

    def lossy(self, stream: str) -> bool:
        """Whether a hole in `stream` is expected (its room may discard messages)."""
        return self._lossy is not None and stream in self._lossy

    def set(self, stream: str, epoch: str, offset: int, *, lossy: bool | None = None
            ) -> None:
        """Move the position of `stream` (a ``stream``/``snapshot`` frame, a join);
        `lossy`, when given, says whether holes are expected from now on."""
        self._positions[stream] = (epoch, offset)
        if lossy is not None:
            self._mark(stream, lossy)

    def forget(self, stream: str) -> bool:
        """Drop the stream's position (the room was left); False if it had none."""
        if self._lossy is not None:
            self._lossy.discard(stream)
        return self._positions.pop(stream, None) is not None

    def clear(self) -> None:
        self._positions.clear()
        self._lossy = None

    def advance(self, stream: str, epoch: str, offset: int) -> Step:
        """Judge a numbered message; on `Step.NEW` the position is now its own."""
        position = self._positions.get(stream)
        if position is not None:
            known_epoch, last = position
            if offset == last + 1 and epoch == known_epoch:  # the common case, first
                self._positions[stream] = (epoch, offset)
                return Step.NEW
            if epoch != known_epoch:
                return Step.EPOCH
            if offset <= last:
                return Step.DUPLICATE
            if offset != last + 1 and not self.lossy(stream):
                return Step.HOLE
        self._positions[stream] = (epoch, offset)
        return Step.NEW

    def welcome(self, streams: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply a ``welcome`` frame's ``streams``: the session's streams are exactly
        these (the others were left); a recovered stream keeps the reader's position
        when the epoch matches (the replay that follows is deduplicated against it),
        every other stream starts at the welcome's position."""
        for name in [name for name in self._positions if name not in streams]:
            self.forget(name)
        for name, entry in streams.items():
            epoch, offset = str(entry["epoch"]), int(entry["offset"])
            self._mark(name, bool(entry.get("lossy")))
            known = self._positions.get(name)
            if entry.get("recovered") and known is not None and known[0] == epoch:
                continue
            self._positions[name] = (epoch, offset)

    def _mark(self, stream: str, lossy: bool) -> None:
        if lossy:
            if self._lossy is None:
                self._lossy = set()
            self._lossy.add(stream)
        elif self._lossy is not None:
            self._lossy.discard(stream)


class Numbered(Protocol):
    """What `merge_buffered` needs of a buffered message."""

    @property
    def stream(self) -> str: ...
    @property
    def epoch(self) -> str: ...
    @property
    def offset(self) -> int: ...


@dataclass(slots=True)
class Start:
    """Where a connection's stream starts, as decided by its handshake.

    Attributes:
        epoch: the stream's epoch (the replay's, or the position taken).
        offset: the position reported in the welcome (updated by the merge when the
            stream is not recovered and messages were buffered).
        cut: the last offset the replay covers (recovered), or None: then the first
            message buffered starts the stream (nothing published while the
            handshake ran is lost).
    """

    epoch: str
    offset: int
    cut: int | None


N = TypeVar("N", bound=Numbered)


def merge_buffered(starts: Mapping[str, Start], buffered: Iterable[N],
                   cursor: StreamCursor) -> tuple[Step, list[N]]:
    """Merge the messages buffered during a handshake behind the replay.

    `buffered` holds the messages in arrival order; those of streams not in `starts`
    (left meanwhile) are ignored, duplicates of the replay are dropped. On success
    returns ``(Step.NEW, live)``: `cursor` holds every stream's position after the
    merge, and `starts` the offsets to report. Otherwise returns the first `Step.EPOCH`
    or `Step.HOLE` met (the client must resume).
    """
    cursor.clear()
    for key, start in starts.items():
        if start.cut is not None:
            cursor.set(key, start.epoch, start.cut)
    live: list[N] = []
    for message in buffered:
        begin = starts.get(message.stream)
        if begin is None:
            continue
        if message.epoch != begin.epoch:
            return Step.EPOCH, []
        if message.stream not in cursor:
            # Not recovered: everything buffered since the stream was attached is new.
            begin.offset = message.offset - 1
            cursor.set(message.stream, begin.epoch, begin.offset)
        step = cursor.advance(message.stream, message.epoch, message.offset)
        if step is Step.DUPLICATE:
            continue
        if step is not Step.NEW:
            return step, []
        live.append(message)
    for key, start in starts.items():
        if key not in cursor:
            cursor.set(key, start.epoch, start.offset)
    return Step.NEW, live
