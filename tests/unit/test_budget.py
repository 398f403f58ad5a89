"""The error budget (``wsroom._core.budget``): N consecutive bad messages close."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsroom._core.budget import ErrorBudget


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(limit: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        ErrorBudget(limit)


def test_n_consecutive_failures_exhaust_the_budget() -> None:
    budget = ErrorBudget(3)
    assert budget.failure() is False
    assert budget.failure() is False
    assert budget.failure() is True
    assert (budget.consecutive, budget.total) == (3, 3)


def test_a_limit_of_one_closes_on_the_first_failure() -> None:
    assert ErrorBudget(1).failure() is True


def test_success_resets_the_count_but_not_the_total() -> None:
    budget = ErrorBudget(3)
    budget.failure()
    budget.failure()
    budget.success()
    assert budget.consecutive == 0
    assert budget.failure() is False
    assert budget.failure() is False
    assert budget.failure() is True
    assert budget.total == 5


def test_an_exhausted_budget_stays_exhausted_until_a_success() -> None:
    budget = ErrorBudget(2)
    budget.failure()
    assert budget.failure() is True
    assert budget.failure() is True
    budget.success()
    assert budget.failure() is False


@given(limit=st.integers(1, 8), outcomes=st.lists(st.booleans(), max_size=60))
def test_exhausted_exactly_after_limit_consecutive_failures(
    limit: int, outcomes: list[bool]
) -> None:
    budget = ErrorBudget(limit)
    run = 0
    for ok in outcomes:
        if ok:
            budget.success()
            run = 0
        else:
            run += 1
            assert budget.failure() is (run >= limit)
        assert budget.consecutive == run
    assert budget.total == outcomes.count(False)
