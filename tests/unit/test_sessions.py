"""Sessions and their resume window (``wsroom._core.sessions``).

The registry has no clock: every detach and expiry is given its ``now``, so these tests
run on a virtual clock. A stateful test drives create/attach/detach/remove/expire and
clock advances against a plain model: the detached count, the next expiry and the
member index must match it, and every session must expire exactly once, never while
live, and exactly when its window has passed. Plain tests pin the boundaries and the
token generations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from wsroom._core.sessions import Session, SessionRegistry

WINDOW = 120.0


class Conn:
    """A stand-in connection (the registry keeps connections opaque)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Conn {self.name}>"


Registry = SessionRegistry[dict[str, str], Conn]


def registry(window: float = WINDOW) -> Registry:
    return SessionRegistry(window)


# ----------------------------------------------------------- create / get / index


def test_create_registers_a_live_session() -> None:
    sessions = registry()
    conn = Conn("c1")
    identity = {"id": "ana"}
    session = sessions.create("ana", identity, conn)
    assert isinstance(session, Session)
    assert (session.member, session.identity, session.connection) == ("ana", identity, conn)
    assert session.detached_at is None
    assert session.generation == 0
    assert session.welcomed is False
    assert isinstance(session.id, str)
    assert len(session.id) >= 16
    assert sessions.get(session.id) is session
    assert session.id in sessions
    assert len(sessions) == 1
    assert sessions.detached == 0
    assert sessions.expiry(session) is None
    assert sessions.next_expiry() is None
    assert sessions.of_member("ana") == [session]
    assert "live" in repr(session)
    assert session.id in repr(session)


def test_session_ids_are_unique_and_the_index_is_per_member() -> None:
    sessions = registry()
    a1 = sessions.create("ana", {}, Conn("1"))
    b1 = sessions.create("bo", {}, Conn("2"))
    a2 = sessions.create("ana", {}, Conn("3"))
    many = [sessions.create("cy", {}, Conn(str(n))) for n in range(50)]
    ids = {s.id for s in (a1, b1, a2, *many)}
    assert len(ids) == 53 == len(sessions)
    assert sessions.of_member("ana") == [a1, a2]  # in creation order
    assert sessions.of_member("bo") == [b1]
    assert sessions.of_member("nobody") == []
    assert sessions.get("nope") is None
    assert "nope" not in sessions
    # of_member returns a copy: editing it does not touch the registry.
    sessions.of_member("ana").clear()
    assert sessions.of_member("ana") == [a1, a2]


def test_remove_keeps_the_member_index_consistent() -> None:
    sessions = registry()
    a1 = sessions.create("ana", {}, Conn("1"))
    a2 = sessions.create("ana", {}, Conn("2"))
    sessions.detach(a2, 5.0)
    assert sessions.remove(a1) is True
    assert sessions.of_member("ana") == [a2]
    assert sessions.get(a1.id) is None
    assert a1.id not in sessions
    assert sessions.remove(a1) is False  # not registered any more
    assert sessions.remove(a2) is True  # a detached one: its expiry goes with it
    assert sessions.of_member("ana") == []
    assert len(sessions) == 0
    assert sessions.detached == 0
    assert sessions.next_expiry() is None
    assert sessions.expire(math.inf) == []
    # The member can come back with a new session.
    a3 = sessions.create("ana", {}, Conn("3"))
    assert sessions.of_member("ana") == [a3]


# ---------------------------------------------------------------- attach / detach


def test_attach_returns_the_replaced_connection() -> None:
    sessions = registry()
    first, second, third = Conn("first"), Conn("second"), Conn("third")
    session = sessions.create("ana", {}, first)
    assert sessions.attach(session, second) is first  # another tab took it over
    assert session.connection is second
    sessions.detach(session, 1.0)
    assert session.connection is None
    assert sessions.attach(session, third) is None  # a resume: nothing replaced
    assert session.connection is third
    assert session.detached_at is None


def test_detach_keeps_the_session_for_the_window() -> None:
    sessions = registry()
    session = sessions.create("ana", {}, Conn("c"))
    sessions.detach(session, 10.0)
    assert session.connection is None
    assert session.detached_at == 10.0
    assert "detached" in repr(session)
    assert sessions.detached == 1
    assert sessions.expiry(session) == 10.0 + WINDOW
    assert sessions.next_expiry() == 10.0 + WINDOW
    assert sessions.get(session.id) is session
    assert sessions.of_member("ana") == [session]


def test_expiry_happens_exactly_at_the_end_of_the_window_not_before() -> None:
    sessions = registry()
    session = sessions.create("ana", {}, Conn("c"))
    sessions.detach(session, 10.0)
    deadline = 10.0 + WINDOW
    for now in (10.0, 60.0, math.nextafter(deadline, 0.0)):
        assert sessions.expire(now) == []
        assert sessions.get(session.id) is session
    assert sessions.expire(deadline) == [session]
    assert sessions.get(session.id) is None
    assert sessions.of_member("ana") == []
    assert sessions.detached == 0
    assert sessions.next_expiry() is None
    assert sessions.expire(deadline + 1000) == []  # exactly once


def test_expire_returns_every_passed_session_in_detach_order() -> None:
    sessions = registry(10.0)
    a, b, c, d = (sessions.create(m, {}, Conn(m)) for m in ("a", "b", "c", "d"))
    sessions.detach(b, 1.0)
    sessions.detach(a, 2.0)
    sessions.detach(d, 2.0)
    sessions.detach(c, 5.0)
    assert sessions.next_expiry() == 11.0
    assert sessions.expire(12.0) == [b, a, d]
    assert sessions.detached == 1
    assert sessions.next_expiry() == 15.0
    assert sessions.expire(15.0) == [c]
    assert len(sessions) == 0


def test_reattach_cancels_the_expiry() -> None:
    sessions = registry(10.0)
    a = sessions.create("ana", {}, Conn("1"))
    b = sessions.create("bo", {}, Conn("2"))
    sessions.detach(a, 0.0)
    sessions.detach(b, 3.0)
    sessions.attach(a, Conn("1b"))
    assert sessions.detached == 1
    assert sessions.expiry(a) is None
    assert sessions.next_expiry() == 13.0
    assert sessions.expire(100.0) == [b]
    assert sessions.get(a.id) is a
    assert sessions.expire(1e9) == []


def test_a_second_detach_restarts_the_window_and_moves_to_the_back() -> None:
    sessions = registry(10.0)
    a = sessions.create("ana", {}, Conn("1"))
    b = sessions.create("bo", {}, Conn("2"))
    sessions.detach(a, 0.0)
    sessions.detach(b, 1.0)
    sessions.attach(a, Conn("1b"))
    sessions.detach(a, 4.0)  # dropped again, later
    assert sessions.next_expiry() == 11.0  # b is now first
    assert sessions.expire(12.0) == [b]
    assert sessions.expire(13.9) == []  # 13.9 < 4 + 10
    assert sessions.expire(14.0) == [a]
    # Detached twice without an attach in between (a no-op drop): also the back.
    c = sessions.create("cy", {}, Conn("3"))
    d = sessions.create("di", {}, Conn("4"))
    sessions.detach(c, 20.0)
    sessions.detach(d, 21.0)
    sessions.detach(c, 22.0)
    assert sessions.detached == 2
    assert sessions.next_expiry() == 31.0
    assert sessions.expire(31.0) == [d]
    assert sessions.expire(32.0) == [c]


@pytest.mark.parametrize("window", [0, 0.0, -1.0, math.nan])
def test_an_invalid_window_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="resume window"):
        SessionRegistry(window)


@settings(max_examples=200)
@given(
    window=st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False),
    gaps=st.lists(st.floats(0, 1e3, allow_nan=False, allow_infinity=False),
                  min_size=1, max_size=6),
    start=st.floats(0, 1e9, allow_nan=False, allow_infinity=False),
)
def test_expire_at_next_expiry_always_removes(window: float, gaps: list[float],
                                              start: float) -> None:
    """With arbitrary float times: the deadline next_expiry() announces is never early
    (waking up at it always removes a session), and nothing expires before it."""
    sessions = registry(window)
    now = start
    detached = []
    for n, gap in enumerate(gaps):
        now += gap
        session = sessions.create(f"m{n}", {}, Conn(str(n)))
        sessions.detach(session, now)
        detached.append(session)
    gone = []
    while sessions.detached:
        deadline = sessions.next_expiry()
        assert deadline is not None
        assert sessions.expire(math.nextafter(deadline, -math.inf)) == []
        batch = sessions.expire(deadline)
        assert batch
        for session in batch:
            assert session.detached_at is not None
            assert session.detached_at + window <= deadline
        gone.extend(batch)
    assert gone == detached
    assert sessions.next_expiry() is None


# ------------------------------------------------------------- token generations


def test_a_new_session_accepts_only_generation_one() -> None:
    session = registry().create("ana", {}, Conn("c"))
    assert not any(session.accepts(g) for g in range(-1, 4))  # no token issued yet
    assert session.rotate() == 1
    assert session.welcomed is True
    assert session.generation == 1
    assert [g for g in range(-1, 5) if session.accepts(g)] == [1]
    session.confirm()
    assert [g for g in range(-1, 5) if session.accepts(g)] == [1]


def test_a_resume_accepts_the_presented_and_the_new_generation_until_confirmed() -> None:
    session = registry().create("ana", {}, Conn("c"))
    assert session.rotate() == 1  # the first welcome
    assert session.rotate(presented=1) == 2  # resumed with 1
    assert [g for g in range(6) if session.accepts(g)] == [1, 2]
    # The connection died before the client read welcome 2: it resumes with 1 again.
    assert session.rotate(presented=1) == 3
    assert [g for g in range(6) if session.accepts(g)] == [1, 3]
    session.confirm()  # the client sent a frame after welcome 3
    assert [g for g in range(6) if session.accepts(g)] == [3]
    session.confirm()
    assert [g for g in range(6) if session.accepts(g)] == [3]
    # It did read welcome 3 this time, but died before sending anything.
    assert session.rotate(presented=3) == 4
    assert [g for g in range(6) if session.accepts(g)] == [3, 4]
    assert session.rotate(presented=4) == 5
    assert [g for g in range(7) if session.accepts(g)] == [4, 5]
    session.confirm()
    assert [g for g in range(7) if session.accepts(g)] == [5]
    assert session.generation == 5


def test_generations_are_per_session() -> None:
    sessions = registry()
    a = sessions.create("ana", {}, Conn("1"))
    b = sessions.create("ana", {}, Conn("2"))
    a.rotate()
    a.rotate(presented=1)
    assert b.generation == 0
    assert not b.accepts(1)
    assert b.rotate() == 1
    assert a.accepts(1)
    assert a.accepts(2)


# ----------------------------------------------------------------- stateful model


MEMBERS = st.sampled_from(["ana", "bo", "cy"])


@dataclass
class ModelSession:
    member: str
    connection: Conn | None
    detached_at: int | None = None
    detach_serial: int = 0


class SessionsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.window = 10
        self.sessions: Registry = registry(10.0)
        self.now = 0
        self.serial = 0
        self.model: dict[str, ModelSession] = {}  # id -> state; creation order
        self.objects: dict[str, Session[dict[str, str], Conn]] = {}
        self.expired: list[str] = []

    @initialize(window=st.integers(1, 10), start=st.integers(0, 1000))
    def setup(self, window: int, start: int) -> None:
        self.window = window
        self.sessions = registry(float(window))
        self.now = start

    def _conn(self) -> Conn:
        self.serial += 1
        return Conn(f"c{self.serial}")

    def _pick(self, data: st.DataObject, live: bool | None = None) -> str:
        ids = [sid for sid, s in self.model.items()
               if live is None or (s.connection is not None) == live]
        return data.draw(st.sampled_from(ids), label="session")

    def _any(self, live: bool) -> bool:
        return any((s.connection is not None) == live for s in self.model.values())

    # ------------------------------------------------------------------- rules

    @rule(member=MEMBERS)
    def create(self, member: str) -> None:
        conn = self._conn()
        session = self.sessions.create(member, {"id": member}, conn)
        assert session.id not in self.model
        assert session.id not in self.expired
        self.model[session.id] = ModelSession(member, conn)
        self.objects[session.id] = session

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        sid = self._pick(data)
        conn = self._conn()
        replaced = self.sessions.attach(self.objects[sid], conn)
        state = self.model[sid]
        assert replaced is state.connection
        state.connection, state.detached_at = conn, None

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        # Mostly live sessions, sometimes an already detached one (a re-detach).
        sid = self._pick(data, live=True if self._any(True) and data.draw(
            st.booleans(), label="a live one") else None)
        self.sessions.detach(self.objects[sid], float(self.now))
        self.serial += 1
        state = self.model[sid]
        state.connection, state.detached_at, state.detach_serial = None, self.now, self.serial

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        sid = self._pick(data)
        assert self.sessions.remove(self.objects[sid]) is True
        del self.model[sid]
        assert self.sessions.remove(self.objects[sid]) is False

    @rule(seconds=st.integers(0, 8))
    def advance(self, seconds: int) -> None:
        self.now += seconds

    def _expire(self) -> list[str]:
        due = sorted(
            (s.detach_serial, sid) for sid, s in self.model.items()
            if s.detached_at is not None and s.detached_at + self.window <= self.now
        )
        gone = self.sessions.expire(float(self.now))
        expected = [sid for _, sid in due]
        assert [s.id for s in gone] == expected  # exactly those, in detach order
        for session in gone:
            assert session is self.objects[session.id]
            assert session.connection is None  # never while live
            assert session.id not in self.expired  # exactly once
            assert self.sessions.get(session.id) is None
            self.expired.append(session.id)
            del self.model[session.id]
        return expected

    @rule()
    def expire(self) -> None:
        self._expire()

    @precondition(lambda self: self.sessions.next_expiry() is not None)
    @rule()
    def sleep_until_the_next_expiry(self) -> None:
        """What the hub's expiry task does: wake up at next_expiry() and expire."""
        deadline = self.sessions.next_expiry()
        assert deadline is not None
        if deadline - 1 >= self.now:
            self.now = int(deadline) - 1
            assert self._expire() == []
        self.now = max(self.now, int(deadline))
        assert self._expire()

    # -------------------------------------------------------------- invariants

    @invariant()
    def registry_matches_the_model(self) -> None:
        assert len(self.sessions) == len(self.model)
        detached = [s for s in self.model.values() if s.detached_at is not None]
        assert self.sessions.detached == len(detached)
        expected = min((s.detached_at + self.window for s in detached), default=None)
        assert self.sessions.next_expiry() == expected
        for sid, state in self.model.items():
            session = self.sessions.get(sid)
            assert session is self.objects[sid]
            assert session.connection is state.connection
            assert session.detached_at == state.detached_at
            assert self.sessions.expiry(session) == (
                None if state.detached_at is None else state.detached_at + self.window
            )

    @invariant()
    def member_index_matches(self) -> None:
        for member in ("ana", "bo", "cy"):
            expected = [sid for sid, s in self.model.items() if s.member == member]
            assert [s.id for s in self.sessions.of_member(member)] == expected

    @invariant()
    def expired_sessions_stay_gone(self) -> None:
        for sid in self.expired:
            assert sid not in self.sessions
            assert sid not in self.model

    def teardown(self) -> None:
        # The end of time: every detached session expires now, exactly once; no live one.
        live = {sid for sid, s in self.model.items() if s.connection is not None}
        self.now += self.window + 10_000
        self._expire()
        assert set(self.model) == live
        assert self.sessions.detached == 0
        assert len(self.expired) == len(set(self.expired))


TestSessionsMachine = SessionsMachine.TestCase
TestSessionsMachine.settings = settings(max_examples=150, stateful_step_count=40)
