"""The per-connection message rate limit: a token bucket (sans-I/O).

A client may send `rate` application messages per second on average, in bursts of up to
`burst`. A message beyond that is refused (the runtime answers it with a
``rate_limited`` error frame and drops it, so a client that merely bursts learns to slow
down and loses nothing it was told about). A client that keeps going — `patience`
refusals in a row — is closed with 3013 (rate limited), a code it reconnects after, with
backoff.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["MemberRates", "RateLimiter", "Verdict"]


class Verdict(Enum):
    """What to do with a message."""

    ALLOW = "allow"
    REFUSE = "refuse"
    CLOSE = "close"


class RateLimiter:
    """A token bucket with a patience for refusals.

    Args:
        rate: tokens added per second.
        burst: the bucket's size (and its content at the start).
        patience: consecutive refusals after which the verdict is `Verdict.CLOSE`.

    Raises:
        ValueError: if a bound is not positive.
    """

    __slots__ = ("_last", "_refused", "_tokens", "burst", "patience", "rate")

    def __init__(self, rate: float, burst: int, patience: int) -> None:
        if not rate > 0 or burst < 1 or patience < 1:
            raise ValueError("rate, burst and patience must be positive")
        self.rate = rate
        self.burst = burst
        self.patience = patience
        self._tokens = float(burst)
        self._last: float | None = None
        self._refused = 0

    def check(self, now: float) -> Verdict:
        """Account for one message arriving at `now` (a monotonic clock)."""
        if self.take(now):
            self.allowed()
            return Verdict.ALLOW
        return self.refuse()

    def take(self, now: float) -> bool:
        """Take a token for a message at `now` if there is one (the patience is left
        alone: `allowed` or `refuse` settles it, when other budgets have spoken)."""
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= 1 - 1e-9:  # float slack: n / rate seconds bring n tokens
            self._tokens -= 1
            return True
        return False

    def allowed(self) -> None:
        """A message went through: the patience starts again."""
        self._refused = 0

    def refuse(self) -> Verdict:
        """Account for a refused message (by this bucket or by another budget, such as
        the member's): refusals in a row run out of patience."""
        self._refused += 1
        return Verdict.CLOSE if self._refused >= self.patience else Verdict.REFUSE


class MemberRates:
    """One token bucket per member, shared by all of its connections: a member that
    opens twenty connections gets the same budget as one that opens one.

    Buckets are created on a member's first message and forgotten once they are full
    again (the member has been quiet for ``burst / rate`` seconds): the table holds only
    members that sent something lately.

    Args:
        rate: messages per second per member, on average.
        burst: messages a member may send at once above `rate`.
    """

    __slots__ = ("_buckets", "_high", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, list[float]] = {}  # member -> [tokens, last]
        self._high = 1024  # size at which full buckets are swept out

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, member: str, now: float) -> bool:
        """Account for one message of `member` at `now` (a monotonic clock)."""
        bucket = self._buckets.get(member)
        if bucket is None:
            if len(self._buckets) >= self._high:
                self._sweep(now)
            bucket = self._buckets[member] = [float(self.burst), now]
        elif now > bucket[1]:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1 - 1e-9:
            bucket[0] -= 1
            return True
        return False

    def _sweep(self, now: float) -> None:
        """Forget the buckets that have filled up again (their members were quiet)."""
        rate, burst = self.rate, self.burst
        for member, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * rate >= burst:
                del self._buckets[member]
        self._high = max(1024, 2 * len(self._buckets))
