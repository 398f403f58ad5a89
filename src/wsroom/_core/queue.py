"""The per-client outbound queue: bounded in bytes and in messages (sans-I/O).

Theory of operation
-------------------
A broadcast encodes its frame once and pushes the same ``str`` object onto every
member's queue; the queue never copies it. Its consumer (the hub's flusher, or the
connection's writer task for a send that must wait, a backlog, the welcome and the close:
never both at once) pops everything that is queued (up to a byte budget) and writes it as
one WebSocket frame, so a backlog costs one syscall instead of one per message.

The bound is checked on every push. When a frame does not fit, the *pushing stream's*
policy decides what happens, and a frame is only ever discarded under the policy of the
stream it belongs to:

- ``disconnect``: nothing is discarded; the push reports ``OVERFLOW`` and the runtime
  closes the connection with 3008 (the client resumes and recovers what it missed).
- ``drop_oldest``: the oldest queued frames that were themselves pushed under
  ``drop_oldest`` are discarded until the new frame fits.
- ``coalesce``: queued frames that carry a key and were superseded by a newer frame with
  the same key (including the incoming one) are discarded.

If the policy cannot make room, the push reports ``OVERFLOW`` and leaves the queue as
it was: the connection must be closed, because a silent gap is never an option.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum

__all__ = ["OutboundQueue", "Policy", "PushResult", "frame_size"]


class Policy(str, Enum):
    """What a room does when a member's outbound queue is full."""

    DISCONNECT = "disconnect"
    """Close the slow client with 3008; it resumes and recovers (default)."""
    DROP_OLDEST = "drop_oldest"
    """Discard the oldest queued messages of this policy to make room."""
    COALESCE = "coalesce"
    """Discard queued messages superseded by a newer one with the same key."""

    def __str__(self) -> str:
        return self.value


class PushResult(Enum):
    """Outcome of `OutboundQueue.push`."""

    QUEUED = "queued"
    """The frame was queued and nothing was discarded."""
    DISCARDED = "discarded"
    """The frame was queued after discarding older frames (see `last_discarded`)."""
    OVERFLOW = "overflow"
    """The frame does not fit and the policy could not make room; queue unchanged."""


def frame_size(frame: str) -> int:
    """Size of a text frame on the wire, in bytes (UTF-8)."""
    return len(frame) if frame.isascii() else len(frame.encode())


@dataclass(slots=True)
class _Entry:
    frame: str
    size: int
    policy: Policy
    key: Hashable | None
    control: bool = False


class OutboundQueue:
    """A FIFO of encoded text frames bounded by total bytes and by count.

    Args:
        max_bytes: upper bound of the summed frame sizes.
        max_messages: upper bound of the number of queued frames.

    Raises:
        ValueError: if a bound is not positive.
    """

    __slots__ = ("_bytes", "_items", "control_queued", "discarded_total", "last_discarded",
                 "max_bytes", "max_messages")

    def __init__(self, max_bytes: int, max_messages: int) -> None:
        if max_bytes <= 0 or max_messages <= 0:
            raise ValueError(
                f"queue bounds must be positive, got max_bytes={max_bytes}, "
                f"max_messages={max_messages}"
            )
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        # A list, not a deque: an empty deque keeps a 528-byte block, and most queues
        # are empty most of the time (batches leave from the front with one `del`).
        self._items: list[_Entry] = []
        self._bytes = 0
        self.control_queued = 0
        """Control frames waiting (the heartbeat queues a ping only when this is 0)."""
        self.discarded_total = 0
        """Frames discarded by `drop_oldest` or `coalesce` over the queue's life."""
        self.last_discarded = 0
        """Frames discarded by the most recent push."""

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Summed size of the queued frames."""
        return self._bytes

    def _fits(self, size: int) -> bool:
        return (
            self._bytes + size <= self.max_bytes and len(self._items) < self.max_messages
        )

    def push(
        self,
        frame: str,
        *,
        size: int | None = None,
        policy: Policy = Policy.DISCONNECT,
        key: Hashable | None = None,
    ) -> PushResult:
        """Queue `frame`, applying `policy` if the queue is full.

        Args:
            frame: an encoded text frame (shared, never copied).
            size: its size in bytes if already known (saves recomputing it per member).
            policy: the policy of the stream the frame belongs to.
            key: the coalescing key, for `Policy.COALESCE`; opaque to the queue. The
                hub scopes it by stream (``(room, key)``), so rooms never supersede
                each other's frames.

        Returns:
            What happened; on `PushResult.OVERFLOW` the queue is unchanged.
        """
        if size is None:
            size = frame_size(frame)
        self.last_discarded = 0
        if not self._fits(size):
            if policy is Policy.DROP_OLDEST:
                self._drop_oldest(size)
            elif policy is Policy.COALESCE:
                self._coalesce(size, key)
            if not self._fits(size):
                return PushResult.OVERFLOW
        self._items.append(_Entry(frame, size, policy, key))
        self._bytes += size
        self.discarded_total += self.last_discarded
        return PushResult.DISCARDED if self.last_discarded else PushResult.QUEUED

    def _drop_oldest(self, size: int) -> None:
        # Only frames pushed under DROP_OLDEST may go. Work on a plan first, so that a
        # push that cannot succeed leaves the queue untouched.
        need_bytes = self._bytes + size - self.max_bytes
        need_count = len(self._items) + 1 - self.max_messages
        victims: list[int] = []
        freed = 0
        for index, item in enumerate(self._items):
            if freed >= need_bytes and len(victims) >= need_count:
                break
            if item.policy is Policy.DROP_OLDEST:
                victims.append(index)
                freed += item.size
        if freed >= need_bytes and len(victims) >= need_count:
            self._remove(victims)

    def _coalesce(self, size: int, key: Hashable | None) -> None:
        # Keep, for every key, only its newest frame; the incoming frame supersedes
        # queued frames with its own key.
        seen: set[Hashable] = set() if key is None else {key}
        victims: list[int] = []
        freed = 0
        for index in range(len(self._items) - 1, -1, -1):
            item = self._items[index]
            if item.policy is not Policy.COALESCE or item.key is None:
                continue
            if item.key in seen:
                victims.append(index)
                freed += item.size
            else:
                seen.add(item.key)
        if (
            self._bytes - freed + size <= self.max_bytes
            and len(self._items) - len(victims) < self.max_messages
        ):
            self._remove(sorted(victims))

    def _remove(self, sorted_indices: list[int]) -> None:
        if not sorted_indices:
            return
        doomed = set(sorted_indices)
        kept: list[_Entry] = []
        for index, item in enumerate(self._items):
            if index in doomed:
                self._bytes -= item.size
            else:
                kept.append(item)
        self._items = kept
        self.last_discarded = len(sorted_indices)

    def push_control(self, frame: str, *, front: bool = False) -> None:
        """Queue a small control frame (``ping``, ``welcome``) regardless of the bounds.

        Control frames are never discarded: a ping stuck behind a full queue would make
        a live but slow client look dead. The heartbeat queues a ping only when no
        control frame is waiting, so the queue exceeds `max_bytes` by at most one
        small control frame.

        Args:
            frame: the encoded frame.
            front: queue it ahead of all data, behind control frames already at the
                front (a ``welcome`` stays first, a ``ping`` jumps the backlog).
        """
        item = _Entry(frame, frame_size(frame), Policy.DISCONNECT, None, control=True)
        items = self._items
        if front:
            index = 0
            while index < len(items) and items[index].control:
                index += 1
            items.insert(index, item)
        else:
            items.append(item)
        self.control_queued += 1
        self._bytes += item.size

    def pop_batch(self, max_bytes: int) -> list[str]:
        """Remove and return queued frames, oldest first.

        At least one frame is returned if the queue is not empty; further frames are
        added while their summed size, plus one separator byte between frames (the
        writer joins them with newlines), stays within `max_bytes`.
        """
        items = self._items
        if not items:
            return []
        first = items[0]
        out = [first.frame]
        total = first.size
        control = int(first.control)
        count = len(items)
        taken = 1
        while taken < count:
            item = items[taken]
            if total + 1 + item.size > max_bytes:
                break
            out.append(item.frame)
            total += 1 + item.size
            control += item.control
            taken += 1
        del items[:taken]
        self._bytes -= total - (taken - 1)
        self.control_queued -= control
        return out

    def pop_control(self) -> list[str]:
        """Remove and return the control frames at the front of the queue (a ``ping``
        must not wait behind a long replay)."""
        items = self._items
        out: list[str] = []
        for item in items:
            if not item.control:
                break
            out.append(item.frame)
            self._bytes -= item.size
        if out:
            del items[:len(out)]
            self.control_queued -= len(out)
        return out

    def clear(self) -> int:
        """Drop everything queued (the connection is closing); return how many."""
        count = len(self._items)
        self._items.clear()
        self._bytes = 0
        self.control_queued = 0
        return count
