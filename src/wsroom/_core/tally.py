"""Counts per key, with the largest holder found in O(1) (sans-I/O).

The detached-session quotas evict from the member or address that holds the most
detached sessions; with ten thousand of them, a scan per eviction would make every
drop cost ten thousand steps. Counts change by one at a time, so the largest count
moves by at most one, and keys are kept in buckets by count (the way an LFU cache
keeps its frequencies).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Tally"]

K = TypeVar("K", bound=Hashable)


class Tally(Generic[K]):
    """How many of something each key holds; `largest` is O(1)."""

    __slots__ = ("_buckets", "_counts", "_max")

    def __init__(self) -> None:
        self._counts: dict[K, int] = {}
        # count -> the keys holding that many, in the order they reached it
        self._buckets: dict[int, dict[K, None]] = {}
        self._max = 0

    def __len__(self) -> int:
        return len(self._counts)

    def __getitem__(self, key: K) -> int:
        return self._counts.get(key, 0)

    def add(self, key: K) -> int:
        """Count one more for `key`; return its new count."""
        count = self._counts.get(key, 0)
        if count:
            self._unbucket(key, count)
        count += 1
        self._counts[key] = count
        self._buckets.setdefault(count, {})[key] = None
        if count > self._max:
            self._max = count
        return count

    def discard(self, key: K) -> int:
        """Count one less for `key` (nothing if it holds none); return its new count."""
        count = self._counts.get(key, 0)
        if not count:
            return 0
        self._unbucket(key, count)
        count -= 1
        if count:
            self._counts[key] = count
            self._buckets.setdefault(count, {})[key] = None
        else:
            del self._counts[key]
        if self._max not in self._buckets:
            self._max -= 1  # it was the only key at the top, and it moved down one
        return count

    def largest(self) -> tuple[K, int] | None:
        """The key holding the most (the first to reach that count), and its count."""
        bucket = self._buckets.get(self._max)
        if not bucket:
            return None
        return next(iter(bucket)), self._max

    def _unbucket(self, key: K, count: int) -> None:
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
