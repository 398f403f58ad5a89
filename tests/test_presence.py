"""Room presence (``wsroom._presence``): online, away for the window, then gone.

A stateful test drives a roster through random connects, disconnects, leaves, expiries
and clock advances, against a plain model; every returned diff must describe exactly the
change. Plain tests pin the user-visible promises (no churn on quick reconnect, exactly
one leave on expiry) and the wire shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from wsroom._presence import PresenceDiff, PresenceEntry, RoomPresence, Status

MEMBERS = st.sampled_from(["ana", "bo", "cy"])
CONNECTIONS = st.sampled_from(["c1", "c2", "c3"])
INFOS = st.none() | st.dictionaries(st.sampled_from(["name", "role"]), st.text(max_size=3),
                                    max_size=2)
METAS = st.none() | st.dictionaries(st.sampled_from(["device"]), st.text(max_size=3),
                                    max_size=1)
# Whole seconds: exact arithmetic, so the model and the roster cannot disagree by a
# rounding error (see test_expire_at_next_expiry_with_fractional_times for that case).
STEPS = st.integers(0, 6)


@dataclass
class ModelMember:
    info: Mapping[str, Any]
    connections: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    away_since: float | None = None

    def entry(self, member: str) -> PresenceEntry:
        status = Status.ONLINE if self.connections else Status.AWAY
        return PresenceEntry(member, status, self.info, tuple(self.connections.values()))


class PresenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.roster = RoomPresence()
        self.model: dict[str, ModelMember] = {}  # insertion order = order of arrival
        self.now = 0.0
        self.window = 1.0

    @initialize(window=st.integers(1, 8), start=st.integers(0, 1000))
    def setup(self, window: int, start: int) -> None:
        self.window = float(window)
        self.now = float(start)

    def current(self, member: str) -> PresenceEntry:
        (entry,) = (e for e in self.roster.state() if e.member == member)
        return entry

    # ------------------------------------------------------------------- rules

    @rule(member=MEMBERS, connection=CONNECTIONS, info=INFOS, meta=METAS)
    def connect(self, member: str, connection: str, info: Mapping[str, Any] | None,
                meta: Mapping[str, Any] | None) -> None:
        diff = self.roster.connect(member, connection, info=info, meta=meta)
        record = self.model.get(member)
        if record is None:
            record = self.model[member] = ModelMember(info if info is not None else {})
        elif info is not None:
            record.info = info
        record.connections[connection] = meta if meta is not None else {}
        record.away_since = None
        expected = record.entry(member)
        assert expected.status is Status.ONLINE
        assert diff == PresenceDiff(joins=(expected,))
        assert diff.joins[0] == self.current(member)

    @rule(member=MEMBERS, connection=CONNECTIONS)
    def disconnect(self, member: str, connection: str) -> None:
        diff = self.roster.disconnect(member, connection, self.now)
        record = self.model.get(member)
        if record is None or connection not in record.connections:
            assert diff == PresenceDiff()
            assert not diff
            return
        del record.connections[connection]
        if not record.connections:
            record.away_since = self.now
        assert diff == PresenceDiff(joins=(record.entry(member),))
        assert diff.joins[0] == self.current(member)

    @precondition(lambda self: any(r.connections for r in self.model.values()))
    @rule(data=st.data())
    def drop_a_live_connection(self, data: st.DataObject) -> None:
        """Like `disconnect`, but always of a live connection (so members go away often)."""
        live = [(m, c) for m, r in self.model.items() for c in r.connections]
        member, connection = data.draw(st.sampled_from(live), label="live connection")
        self.disconnect(member, connection)

    @rule(member=MEMBERS)
    def leave(self, member: str) -> None:
        diff = self.roster.leave(member)
        if self.model.pop(member, None) is None:
            assert diff == PresenceDiff()
            assert not diff
        else:
            assert diff == PresenceDiff(leaves=(member,))
            assert member not in self.roster

    @rule(seconds=STEPS)
    def advance(self, seconds: int) -> None:
        self.now += seconds

    def _expire(self) -> PresenceDiff:
        deadline = self.roster.next_expiry(self.window)
        diff = self.roster.expire(self.now, self.window)
        gone = tuple(
            member for member, record in self.model.items()
            if record.away_since is not None and self.now - record.away_since >= self.window
        )
        for member in gone:
            del self.model[member]
        assert diff == PresenceDiff(leaves=gone)
        assert bool(diff) == bool(gone)
        if deadline is None or self.now < deadline:
            assert gone == ()
        else:
            assert gone  # the earliest away member at least
        # Everyone still away is within its window.
        for record in self.model.values():
            if record.away_since is not None:
                assert self.now - record.away_since < self.window
        return diff

    @rule()
    def expire(self) -> None:
        self._expire()

    @precondition(lambda self: self.roster.next_expiry(self.window) is not None)
    @rule()
    def expire_at_the_deadline(self) -> None:
        deadline = self.roster.next_expiry(self.window)
        assert deadline is not None
        if deadline > self.now:
            self.now = deadline  # time only moves forward
        assert self._expire().leaves

    @precondition(lambda self: self.roster.next_expiry(self.window) is not None)
    @rule()
    def expire_just_before_the_deadline(self) -> None:
        deadline = self.roster.next_expiry(self.window)
        assert deadline is not None
        if deadline - 1 > self.now:
            self.now = deadline - 1
            assert not self._expire()

    # -------------------------------------------------------------- invariants

    @invariant()
    def roster_equals_the_model(self) -> None:
        expected = tuple(record.entry(member) for member, record in self.model.items())
        assert self.roster.state() == expected
        assert len(self.roster) == len(self.model)
        for member in ("ana", "bo", "cy"):
            assert (member in self.roster) == (member in self.model)

    @invariant()
    def online_iff_a_live_connection(self) -> None:
        for entry in self.roster.state():
            record = self.model[entry.member]
            assert (entry.status is Status.ONLINE) == bool(record.connections)
            assert (record.away_since is None) == bool(record.connections)
            if entry.status is Status.AWAY:
                assert entry.connections == ()

    @invariant()
    def next_expiry_is_right(self) -> None:
        away = [r.away_since for r in self.model.values() if r.away_since is not None]
        expected = min(away) + self.window if away else None
        assert self.roster.next_expiry(self.window) == expected


TestPresenceMachine = PresenceMachine.TestCase
TestPresenceMachine.settings = settings(max_examples=150, stateful_step_count=40)


# ------------------------------------------------------------------------ units

WINDOW = 120.0


def test_quick_reconnect_within_the_window_produces_no_leave() -> None:
    roster = RoomPresence()
    diffs = [roster.connect("ana", "c1", info={"name": "Ana"}, meta={"device": "phone"})]
    diffs.append(roster.disconnect("ana", "c1", 10.0))
    assert roster.state()[0].status is Status.AWAY
    assert roster.next_expiry(WINDOW) == 130.0
    diffs.append(roster.expire(100.0, WINDOW))
    diffs.append(roster.connect("ana", "c2", meta={"device": "laptop"}))  # 30 s later
    diffs.append(roster.expire(10.0 + WINDOW, WINDOW))
    diffs.append(roster.expire(10_000.0, WINDOW))
    assert [leave for diff in diffs for leave in diff.leaves] == []
    assert roster.state() == (
        PresenceEntry("ana", Status.ONLINE, {"name": "Ana"}, ({"device": "laptop"},)),
    )
    assert roster.next_expiry(WINDOW) is None
    # The reconnect is an upsert back to online, not a leave/join pair.
    assert diffs[3].joins[0].status is Status.ONLINE
    assert diffs[3].leaves == ()


def test_the_window_restarts_at_the_last_disconnect() -> None:
    roster = RoomPresence()
    roster.connect("ana", "c1")
    roster.disconnect("ana", "c1", 10.0)
    roster.connect("ana", "c1")
    roster.disconnect("ana", "c1", 110.0)
    assert roster.next_expiry(WINDOW) == 230.0
    assert not roster.expire(200.0, WINDOW)  # 190 s after the first drop, 90 s after the last
    assert roster.expire(230.0, WINDOW) == PresenceDiff(leaves=("ana",))


def test_window_expiry_produces_exactly_one_leave() -> None:
    roster = RoomPresence()
    roster.connect("ana", "c1")
    roster.connect("bo", "c9")
    roster.disconnect("ana", "c1", 0.0)
    leaves = []
    for now in (0.0, 60.0, 119.5, 120.0, 120.5, 121.0, 500.0):
        diff = roster.expire(now, WINDOW)
        assert diff.joins == ()
        if now < WINDOW:
            assert not diff
        leaves.extend(diff.leaves)
    assert leaves == ["ana"]
    assert "ana" not in roster
    assert [e.member for e in roster.state()] == ["bo"]
    assert roster.next_expiry(WINDOW) is None
    # A late disconnect of the gone member's connection changes nothing.
    assert not roster.disconnect("ana", "c1", 600.0)


def test_a_second_connection_does_not_change_status() -> None:
    roster = RoomPresence()
    first = roster.connect("ana", "c1", meta={"device": "phone"})
    second = roster.connect("ana", "c2", meta={"device": "laptop"})
    assert first.joins[0].status is second.joins[0].status is Status.ONLINE
    assert second.joins[0].connections == ({"device": "phone"}, {"device": "laptop"})
    dropped = roster.disconnect("ana", "c1", 5.0)
    assert dropped.joins == (
        PresenceEntry("ana", Status.ONLINE, {}, ({"device": "laptop"},)),
    )
    assert roster.next_expiry(WINDOW) is None
    assert not roster.expire(10_000.0, WINDOW)
    assert roster.disconnect("ana", "c2", 7.0).joins[0].status is Status.AWAY
    assert roster.next_expiry(WINDOW) == 127.0


def test_leave_and_unknown_members() -> None:
    roster = RoomPresence()
    assert not roster.leave("nobody")
    assert not roster.disconnect("nobody", "c1", 0.0)
    roster.connect("ana", "c1")
    assert not roster.disconnect("ana", "c-unknown", 0.0)
    roster.disconnect("ana", "c1", 0.0)
    assert not roster.disconnect("ana", "c1", 1.0)  # already away: no second diff
    assert roster.leave("ana") == PresenceDiff(leaves=("ana",))
    assert roster.next_expiry(WINDOW) is None
    assert not roster.expire(10_000.0, WINDOW)
    assert len(roster) == 0


def test_info_is_kept_unless_replaced_and_order_is_first_arrival() -> None:
    roster = RoomPresence()
    roster.connect("bo", "c1", info={"name": "Bo"})
    roster.connect("ana", "c1")
    roster.connect("bo", "c2")  # no info: keeps "Bo"
    assert [(e.member, dict(e.info)) for e in roster.state()] == [
        ("bo", {"name": "Bo"}), ("ana", {}),
    ]
    roster.connect("bo", "c3", info={"name": "Bobby"})
    assert roster.state()[0].info == {"name": "Bobby"}
    roster.leave("bo")
    roster.connect("bo", "c1")
    assert [e.member for e in roster.state()] == ["ana", "bo"]
    assert roster.state()[1].info == {}


def test_to_wire_shape() -> None:
    roster = RoomPresence()
    roster.connect("ana", "c1", info=MappingProxyType({"name": "Ana"}),
                   meta=MappingProxyType({"device": "phone"}))
    roster.connect("ana", "c2", meta={"device": "laptop"})
    roster.connect("bo", "c3")
    roster.disconnect("bo", "c3", 1.0)
    ana, bo = (entry.to_wire() for entry in roster.state())
    assert ana == {
        "id": "ana",
        "status": "online",
        "info": {"name": "Ana"},
        "connections": [{"device": "phone"}, {"device": "laptop"}],
    }
    assert bo == {"id": "bo", "status": "away", "info": {}, "connections": []}
    for wire in (ana, bo):
        assert list(wire) == ["id", "status", "info", "connections"]
        assert type(wire["info"]) is dict
        assert type(wire["connections"]) is list
        assert all(type(meta) is dict for meta in wire["connections"])
        assert json.loads(json.dumps(wire)) == wire
    # The wire form is a copy: editing it does not touch the roster.
    ana["info"]["name"] = "Mallory"
    ana["connections"][0]["device"] = "x"
    assert roster.state()[0].info == {"name": "Ana"}
    assert roster.state()[0].connections[0] == {"device": "phone"}


def test_status_strings_and_diff_truthiness() -> None:
    assert str(Status.ONLINE) == "online"
    assert str(Status.AWAY) == "away"
    assert not PresenceDiff()
    assert PresenceDiff(leaves=("a",))
    assert PresenceDiff(joins=(PresenceEntry("a", Status.AWAY, {}, ()),))


def test_expire_at_next_expiry_with_fractional_times() -> None:
    roster = RoomPresence()
    roster.connect("ana", "c1")
    roster.disconnect("ana", "c1", 6.9)
    deadline = roster.next_expiry(0.3)
    assert deadline is not None
    assert roster.expire(deadline, 0.3) == PresenceDiff(leaves=("ana",))
