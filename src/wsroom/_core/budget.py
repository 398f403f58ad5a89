"""The error budget: N consecutive bad messages end the connection (sans-I/O)."""

from __future__ import annotations

__all__ = ["ErrorBudget"]


class ErrorBudget:
    """Counts consecutive bad messages; a good message resets the count.

    Args:
        limit: the number of consecutive bad messages that exhausts the budget.

    Raises:
        ValueError: if `limit` is not positive.
    """

    __slots__ = ("consecutive", "limit", "total")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"error budget must be positive, got {limit}")
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def failure(self) -> bool:
        """Record a bad message; return True when the budget is exhausted."""
        self.consecutive += 1
        self.total += 1
        return self.consecutive >= self.limit

    def success(self) -> None:
        """Record a good message."""
        self.consecutive = 0
