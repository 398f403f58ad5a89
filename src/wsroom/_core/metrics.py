"""The hub's measurements (sans-I/O): counters and fixed-bucket histograms.

A hub always keeps these (plain integer and float additions on the paths that already
do the work); `wsroom.metrics` exposes them to Prometheus when the ``prometheus`` extra is
installed, and nothing else reads them. Histograms use fixed buckets so that observing
is a bisect and an increment, and their memory never grows.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Histogram", "Metrics"]

_RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FANOUT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 1.0)
_DEPTH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histogram:
    """Counts of observations in fixed buckets (upper bounds, inclusive), plus their sum.

    Args:
        bounds: increasing upper bounds; values above the last go to ``+Inf``.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bucket bounds must be increasing and not empty")
        self.bounds = tuple(float(bound) for bound in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ending with ``+Inf``."""
        total = 0
        result = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            result.append((bound, total))
        return result


@dataclass(slots=True)
class Metrics:
    """What a hub measures beyond its registries (see `wsroom.metrics`).

    Counters keyed by a label (a reason, a close code) are `collections.Counter`s.
    """

    received_bytes: int = 0
    sent_bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Upgrades refused before a connection was admitted, by reason."""
    disconnects: Counter[tuple[int, str]] = field(default_factory=Counter)
    """Connections ended, by (close code, close reason); 1006 where none was sent."""
    sessions_ended: Counter[str] = field(default_factory=Counter)
    """Sessions ended, by reason: ``closed`` (the client left, or a terminal close),
    ``expired`` (no resume within the window), ``evicted`` (``max_detached_sessions``),
    ``disconnected`` (`Hub.disconnect`), ``shutdown``."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Messages not delivered or not handled, by reason."""
    queue_depth: Histogram = field(default_factory=lambda: Histogram(_DEPTH_BUCKETS))
    """Messages in a client's queue when its writer takes a batch."""
    heartbeat_rtt: Histogram = field(default_factory=lambda: Histogram(_RTT_BUCKETS))
    """Seconds from a ping to its pong."""
    broadcast_duration: Histogram = field(default_factory=lambda: Histogram(_FANOUT_BUCKETS))
    """Seconds one publish spent delivering to the room's members in this process."""
