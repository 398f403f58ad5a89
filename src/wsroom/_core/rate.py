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

__all__ = ["RateLimiter", "Verdict"]


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
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= 1 - 1e-9:  # float slack: n / rate seconds bring n tokens
            self._tokens -= 1
            self._refused = 0
            return Verdict.ALLOW
        self._refused += 1
        return Verdict.CLOSE if self._refused >= self.patience else Verdict.REFUSE
