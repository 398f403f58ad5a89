"""Budgets per member and per address, in the core: the largest-holder tally
(``_core/tally.py``), the session quotas of ``SessionRegistry`` (``member_victim``,
``address_victim``, ``cap_victim``), the shared history budget (``HistoryBudget``) and
the per-member message rate (``MemberRates``).

Each is checked against a plain model (hypothesis) and on the cases of the abuse table
of issue 15: one member holding many sessions must never cost another member its
session, and one stream must pay for the budget before the others.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsroom._core.history import HistoryBudget, HistoryLimits, StreamHistory
from wsroom._core.rate import MemberRates
from wsroom._core.sessions import SessionRegistry
from wsroom._core.tally import Tally

# ------------------------------------------------------------------ the tally


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=200))
def test_tally_matches_a_counter_and_its_largest_is_a_true_maximum(
        ops: list[tuple[bool, int]]) -> None:
    tally: Tally[int] = Tally()
    model: Counter[int] = Counter()
    for add, key in ops:
        if add:
            assert tally.add(key) == model[key] + 1
            model[key] += 1
        else:
            expected = max(model[key] - 1, 0)
            assert tally.discard(key) == expected
            if expected:
                model[key] = expected
            else:
                model.pop(key, None)
        assert len(tally) == len(model)
        for k in range(6):
            assert tally[k] == model[k]
        largest = tally.largest()
        if not model:
            assert largest is None
        else:
            assert largest is not None
            assert largest[1] == max(model.values())
            assert model[largest[0]] == largest[1]


def test_tally_names_the_first_key_to_reach_the_top() -> None:
    tally: Tally[str] = Tally()
    for key in "abab":
        tally.add(key)
    assert tally.largest() == ("a", 2)
    tally.discard("a")
    assert tally.largest() == ("b", 2)


# --------------------------------------------------------- the session quotas

Registry = SessionRegistry[str, str]


def detached(registry: Registry, member: str, address: str | None, now: float) -> str:
    session = registry.create(member, member, f"conn-{now}")
    registry.detach(session, now, address)
    return session.id


def test_member_victim_is_the_members_oldest_detached_then_its_oldest_live() -> None:
    registry: Registry = SessionRegistry(120.0)
    live = registry.create("m", "m", "c1")
    assert registry.member_victim("m", 2) is None
    first = detached(registry, "m", "1.1.1.1", 1.0)
    assert registry.member_victim("m", 2).id == first  # type: ignore[union-attr]
    assert registry.member_victim("m", 3) is None
    assert registry.member_victim("m", None) is None
    registry.remove(registry.get(first))  # type: ignore[arg-type]
    registry.create("m", "m", "c2")
    assert registry.member_victim("m", 2) is live  # no detached one: the oldest live


def test_address_victim_is_the_oldest_of_that_address_beyond_its_quota() -> None:
    registry: Registry = SessionRegistry(120.0)
    ids = [detached(registry, f"m{i}", "6.6.6.6", float(i)) for i in range(3)]
    other = detached(registry, "victim", "1.1.1.1", 10.0)
    assert registry.address_victim("6.6.6.6", 3) is None
    victim = registry.address_victim("6.6.6.6", 2)
    assert victim is not None
    assert victim.id == ids[0]
    assert registry.address_victim("1.1.1.1", 0).id == other  # type: ignore[union-attr]
    assert registry.address_victim(None, 0) is None
    assert registry.detached_of(("address", "6.6.6.6")) == 3


def test_the_cap_evicts_from_the_largest_holder_never_a_lone_victim() -> None:
    """Issue 15's second row: the victim dropped first (the oldest of all), then one
    credential detached many sessions from many addresses; the cap takes the
    attacker's, not the victim's."""
    registry: Registry = SessionRegistry(120.0)
    victim = detached(registry, "victim", "1.1.1.1", 0.0)
    for i in range(30):
        detached(registry, "attacker", f"10.0.0.{i}", 1.0 + i)
    ended = []
    while (session := registry.cap_victim(10)) is not None:
        ended.append(session.member)
        registry.remove(session)
    assert ended == ["attacker"] * 21
    assert registry.get(victim) is not None
    assert registry.detached == 10


def test_the_cap_takes_the_oldest_of_all_when_nobody_holds_more_than_one() -> None:
    registry: Registry = SessionRegistry(120.0)
    ids = [detached(registry, f"m{i}", f"10.0.0.{i}", float(i)) for i in range(3)]
    session = registry.cap_victim(2)
    assert session is not None
    assert session.id == ids[0]


@given(st.lists(st.tuples(st.sampled_from(["detach", "attach", "remove", "expire"]),
                          st.integers(0, 3), st.integers(0, 2)), max_size=80))
def test_holder_counts_always_match_the_detached_sessions(
        ops: list[tuple[str, int, int]]) -> None:
    registry: Registry = SessionRegistry(5.0)
    now = 0.0
    sessions = [registry.create(f"m{i % 2}", "x", f"c{i}") for i in range(4)]
    for op, index, address in ops:
        now += 1.0
        session = sessions[index]
        if registry.get(session.id) is None:
            continue
        if op == "detach":
            registry.detach(session, now, None if address == 0 else f"a{address}")
        elif op == "attach":
            registry.attach(session, "c")
        elif op == "remove":
            registry.remove(session)
        else:
            registry.expire(now)
        waiting = [s for s in registry.all() if s.connection is None]
        assert registry.detached == len(waiting)
        for member in ("m0", "m1"):
            assert registry.detached_of(("member", member)) == sum(
                s.member == member for s in waiting)
        for a in ("a1", "a2"):
            assert registry.detached_of(("address", a)) == sum(
                s.address == a for s in waiting)


# ------------------------------------------------------------ the history budget

LIMITS = HistoryLimits(max_messages=1000, max_bytes=10_000, max_age=60.0)


def fill(history: StreamHistory, count: int, size: int, now: float = 0.0) -> None:
    for _ in range(count):
        history.append(history.offset + 1, "x" * size, now)


def test_the_budget_is_paid_by_the_largest_history_first() -> None:
    budget = HistoryBudget(1000)
    small = StreamHistory("e", LIMITS, budget=budget)
    big = StreamHistory("e", LIMITS, budget=budget)
    fill(small, 2, 100)
    fill(big, 8, 100)
    assert budget.used == 1000
    fill(big, 1, 100)  # over: the big one sheds down to 900 in all
    assert budget.used <= 900
    assert small.nbytes == 200  # untouched
    assert budget.used == small.nbytes + big.nbytes
    assert budget.shed_messages == 2
    # What was shed is not recoverable: a resume behind it is refused, never partial.
    assert not big.since("e", 0, 0.0).recovered
    assert small.since("e", 0, 0.0).recovered


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 300)), max_size=150),
       st.integers(500, 3000))
def test_the_budget_holds_after_every_append(appends: list[tuple[int, int]],
                                             cap: int) -> None:
    budget = HistoryBudget(cap)
    histories = [StreamHistory("e", LIMITS, budget=budget) for _ in range(5)]
    for index, size in appends:
        fill(histories[index], 1, size)
        assert budget.used == sum(h.nbytes for h in histories)
        assert budget.used <= cap
    histories[0].discard()
    assert budget.used == sum(h.nbytes for h in histories[1:])
    assert len(budget) == 4


def test_the_sweep_applies_max_age_to_idle_histories() -> None:
    budget = HistoryBudget(10**9)
    history = StreamHistory("e", HistoryLimits(max_age=60.0), budget=budget)
    fill(history, 10_000, 700, now=0.0)
    assert budget.used == 7_000_000
    budget.sweep(59.0)
    assert len(history) == 10_000
    budget.sweep(61.0)  # nobody appended or resumed: the timer alone forgets them
    assert len(history) == 0
    assert budget.used == 0


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        HistoryBudget(0)


# ------------------------------------------------------------ the member rate


def test_a_member_has_one_budget_across_its_connections() -> None:
    """Issue 15's third row: twenty connections of one credential share one bucket."""
    rates = MemberRates(rate=10.0, burst=20)
    allowed = sum(rates.allow("m", 0.0) for _ in range(20 * 50))
    assert allowed == 20
    assert rates.allow("other", 0.0)  # another member is not affected
    assert rates.allow("m", 0.1)  # one token back after 0.1 s


@given(st.lists(st.floats(0, 0.5), min_size=1, max_size=300))
def test_member_allowances_never_exceed_burst_plus_rate_times_elapsed(
        gaps: list[float]) -> None:
    rates = MemberRates(rate=5.0, burst=3)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += rates.allow("m", now)
    assert allowed <= 3 + 5.0 * now + 1e-6


def test_quiet_members_are_forgotten_when_the_table_grows() -> None:
    rates = MemberRates(rate=10.0, burst=5)
    for i in range(5000):
        rates.allow(f"m{i}", float(i))  # each one is quiet a second later
    assert len(rates) <= 1024


def test_many_identities_on_one_network_go_before_a_lone_victim() -> None:
    """The red team's case: one detached session per member and per address, many
    addresses of one network. Nobody holds more than one session as a member or an
    address, so the cap turns to networks: the crowd's network pays, not the victim
    that dropped first on another network."""
    registry: Registry = SessionRegistry(120.0)
    victim = registry.create("victim", "victim", "c")
    registry.detach(victim, 0.0, "192.0.2.7", "192.0.2.0/24")
    for i in range(60):
        session = registry.create(f"bot{i}", "x", f"c{i}")
        registry.detach(session, 1.0 + i, f"198.51.100.{i}", "198.51.100.0/24")
    ended = []
    while (session := registry.cap_victim(40)) is not None:
        ended.append(session.member)
        registry.remove(session)
    assert ended == [f"bot{i}" for i in range(21)]
    assert registry.get(victim.id) is victim
    assert registry.detached_of(("network", "198.51.100.0/24")) == 39


def test_network_keys() -> None:
    from wsroom._core.admission import network_key

    assert network_key("198.51.100.77") == "198.51.100.0/24"
    assert network_key("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert network_key("::ffff:198.51.100.77") == "198.51.100.0/24"
    assert network_key("unknown") is None
