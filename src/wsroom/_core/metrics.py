"""The hub's measurements (sans-I/O): counters and fixed-bucket histograms.

A hub always keeps these (plain integer and float additions on the paths that already
do the work); `wsroom.metrics` exposes them to Prometheus when the ``prometheus`` extra is
installed, and nothing else reads them. Histograms use fixed buckets so that observing
is a bisect and an increment, and their memory never grows.

No label value comes from a client. The close code of a disconnect is the one number a
client picks (its own close frame), so it is bucketed (`close_code_label`): wsroom's own
codes and the standard codes of RFC 6455 (1000-1015) keep their number, any other code
of 3000-3999 is counted as ``"3xxx"``, of 4000-4999 (the applications' range, e.g. their
kick codes) as ``"4xxx"``, and anything else as ``"other"``. Every other label is a
value of a fixed set (a close reason, a queue policy, a resume result).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import ItemsView, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from wsroom._core.codes import CloseCode

__all__ = ["CLOSE_CODE_LABELS", "CloseCodeCounter", "Histogram", "Metrics", "close_code_label"]

# Codes that keep their number: wsroom's own, and those RFC 6455 (and the IANA registry
# it set up) assigns in 1000-1015 (1005, 1006 and 1015 are never sent but are reported).
_NAMED_CODES = frozenset({*(int(code) for code in CloseCode), *range(1000, 1016)})
CLOSE_CODE_LABELS = frozenset({*(str(code) for code in _NAMED_CODES), "3xxx", "4xxx", "other"})
"""Every value `close_code_label` can return: the ``code`` label's bound."""

_RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FANOUT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 1.0)
_DEPTH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def close_code_label(code: int | str) -> str:
    """The ``code`` label of a close code: its number for wsroom's codes and the standard
    ones (1000-1015), else ``"3xxx"`` (3000-3999), ``"4xxx"`` (4000-4999, the applications'
    range) or ``"other"``. A label already bucketed is returned as is."""
    if isinstance(code, str):
        return code if code in CLOSE_CODE_LABELS else "other"
    if code in _NAMED_CODES:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


class CloseCodeCounter:
    """Counts by ``(close code label, close reason)``.

    A code given as a number is bucketed by `close_code_label` on the way in, so a client
    choosing its close code adds at most ``len(CLOSE_CODE_LABELS)`` keys per reason:
    ``counter[(4321, "client_closed")] += 1`` counts under ``("4xxx", "client_closed")``.
    """

    __slots__ = ("_counts",)

    def __init__(self, counts: Mapping[tuple[int | str, str], int] | None = None) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        if counts is not None:
            self.update(counts)

    def __getitem__(self, key: tuple[int | str, str]) -> int:
        return self._counts[(close_code_label(key[0]), key[1])]

    def __setitem__(self, key: tuple[int | str, str], value: int) -> None:
        self._counts[(close_code_label(key[0]), key[1])] = value

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._counts)

    def update(self, counts: Mapping[tuple[int | str, str], int]) -> None:
        """Add `counts` (codes as numbers or labels)."""
        for key, count in counts.items():
            self[key] += count

    def items(self) -> ItemsView[tuple[str, str], int]:
        """``((code label, reason), count)`` pairs."""
        return self._counts.items()


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

    Counters keyed by a label (a reason, a close code) are `collections.Counter`s, and
    every key comes from a fixed set (see the module's docstring).
    """

    received_bytes: int = 0
    sent_bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Upgrades refused before a connection was admitted, by reason."""
    disconnects: CloseCodeCounter = field(default_factory=CloseCodeCounter)
    """Connections ended, by (close code label, close reason); 1006 where none was sent.
    Add with the code as a number: ``disconnects[(code, reason)] += 1`` buckets it."""
    sessions_ended: Counter[str] = field(default_factory=Counter)
    """Sessions ended, by reason: ``closed`` (the client left, or a terminal close),
    ``expired`` (no resume within the window), ``evicted`` (``max_detached_sessions``),
    ``address_quota`` (``max_detached_per_ip``), ``member_limit``
    (``max_sessions_per_member``), ``disconnected`` (`Hub.disconnect`), ``shutdown``."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Messages not delivered or not handled, by reason."""
    queue_depth: Histogram = field(default_factory=lambda: Histogram(_DEPTH_BUCKETS))
    """Messages in a client's queue when its writer takes a batch."""
    heartbeat_rtt: Histogram = field(default_factory=lambda: Histogram(_RTT_BUCKETS))
    """Seconds from a ping to its pong."""
    broadcast_duration: Histogram = field(default_factory=lambda: Histogram(_FANOUT_BUCKETS))
    """Seconds one publish spent delivering to the room's members in this process."""
