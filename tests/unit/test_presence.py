"""Room presence (``wsroom._core.presence``): online, away while detached, gone on removal.

A stateful test drives a roster through random attaches, detaches and removals of
sessions, against a plain model; every returned diff must describe exactly the change
(an upsert of the member's new entry, a leave, or nothing when nothing changed), and a
client that applies the diffs must end up with the roster itself. Plain tests pin the
user-visible promises (no churn on a quick reconnect, exactly one leave when the last
session goes, online while any session is live) and the wire shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from wsroom._core.presence import PresenceDiff, PresenceEntry, PresenceStatus, RoomPresence

ONLINE, AWAY = PresenceStatus.ONLINE, PresenceStatus.AWAY

MEMBER_IDS = ("ana", "bo", "cy")
MEMBERS = st.sampled_from(MEMBER_IDS)
SESSIONS = st.sampled_from(["s1", "s2", "s3"])
INFOS = st.none() | st.dictionaries(st.sampled_from(["name", "role"]), st.text(max_size=2),
                                    max_size=2)
METAS = st.none() | st.dictionaries(st.sampled_from(["device"]), st.sampled_from(["a", "b"]),
                                    max_size=1)


@dataclass
class ModelMember:
    info: Mapping[str, Any]
    sessions: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)
    """Session -> metadata while live, None while detached; in order of arrival."""

    def entry(self, member: str) -> PresenceEntry:
        live = tuple(meta for meta in self.sessions.values() if meta is not None)
        return PresenceEntry(member, ONLINE if live else AWAY, self.info, live)


class PresenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.roster = RoomPresence()
        self.model: dict[str, ModelMember] = {}  # insertion order = order of arrival
        self.client: dict[str, PresenceEntry] = {}  # what a client applying diffs sees

    def _entry_or_none(self, member: str) -> PresenceEntry | None:
        record = self.model.get(member)
        return None if record is None else record.entry(member)

    def _check(self, diff: PresenceDiff, member: str, before: PresenceEntry | None) -> None:
        """`diff` is exactly the change of `member` from `before` to the model's now."""
        after = self._entry_or_none(member)
        if after == before:
            assert diff == PresenceDiff()
        elif after is not None:
            assert diff == PresenceDiff(joins=(after,))
            assert self.roster.entry(member) == after
        else:
            assert diff == PresenceDiff(leaves=(member,))
            assert member not in self.roster
        assert bool(diff) == (after != before)
        for entry in diff.joins:
            self.client[entry.member] = entry
        for gone in diff.leaves:
            assert gone in self.client
            del self.client[gone]

    # ------------------------------------------------------------------- rules

    @rule(member=MEMBERS, session=SESSIONS, info=INFOS, meta=METAS)
    def attach(self, member: str, session: str, info: Mapping[str, Any] | None,
               meta: Mapping[str, Any] | None) -> None:
        before = self._entry_or_none(member)
        diff = self.roster.attach(member, session, info=info, meta=meta)
        record = self.model.get(member)
        if record is None:
            record = self.model[member] = ModelMember(dict(info or {}))
        elif info is not None:
            record.info = dict(info)
        record.sessions[session] = dict(meta or {})
        assert record.entry(member).status is ONLINE
        self._check(diff, member, before)

    @rule(member=MEMBERS, session=SESSIONS)
    def detach(self, member: str, session: str) -> None:
        before = self._entry_or_none(member)
        diff = self.roster.detach(member, session)
        record = self.model.get(member)
        if record is not None and session in record.sessions:
            record.sessions[session] = None
        self._check(diff, member, before)

    @rule(member=MEMBERS, session=SESSIONS)
    def remove(self, member: str, session: str) -> None:
        before = self._entry_or_none(member)
        diff = self.roster.remove(member, session)
        record = self.model.get(member)
        if record is not None and session in record.sessions:
            del record.sessions[session]
            if not record.sessions:
                del self.model[member]
        self._check(diff, member, before)

    def _live(self) -> list[tuple[str, str]]:
        return [(m, s) for m, r in self.model.items() for s, meta in r.sessions.items()
                if meta is not None]

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data())
    def detach_a_live_session(self, data: st.DataObject) -> None:
        """Like `detach`, but always of a live session (so members go away often)."""
        self.detach(*data.draw(st.sampled_from(self._live()), label="live session"))

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove_an_existing_session(self, data: st.DataObject) -> None:
        """Like `remove`, but always of a session in the room (so members leave often)."""
        known = [(m, s) for m, r in self.model.items() for s in r.sessions]
        self.remove(*data.draw(st.sampled_from(known), label="session"))

    # -------------------------------------------------------------- invariants

    @invariant()
    def roster_equals_the_model(self) -> None:
        expected = tuple(record.entry(member) for member, record in self.model.items())
        assert self.roster.state() == expected
        assert len(self.roster) == len(self.model)
        for member in MEMBER_IDS:
            assert (member in self.roster) == (member in self.model)
            assert self.roster.entry(member) == self._entry_or_none(member)

    @invariant()
    def online_iff_a_live_session(self) -> None:
        for entry in self.roster.state():
            record = self.model[entry.member]
            assert record.sessions  # nobody is in the roster without a session
            live = [meta for meta in record.sessions.values() if meta is not None]
            assert (entry.status is ONLINE) == bool(live)
            assert len(entry.connections) == len(live)

    @invariant()
    def diffs_rebuild_the_roster(self) -> None:
        assert self.client == {entry.member: entry for entry in self.roster.state()}


TestPresenceMachine = PresenceMachine.TestCase
TestPresenceMachine.settings = settings(max_examples=150, stateful_step_count=40)


# ------------------------------------------------------------------------ units


def test_quick_detach_and_reattach_produces_no_leave() -> None:
    roster = RoomPresence()
    diffs = [roster.attach("ana", "s1", info={"name": "Ana"}, meta={"device": "phone"})]
    diffs.append(roster.detach("ana", "s1"))
    assert roster.entry("ana") == PresenceEntry("ana", AWAY, {"name": "Ana"}, ())
    diffs.append(roster.attach("ana", "s1", meta={"device": "laptop"}))  # resumed
    assert [leave for diff in diffs for leave in diff.leaves] == []
    assert [diff.joins[0].status for diff in diffs] == [ONLINE, AWAY, ONLINE]
    assert roster.state() == (
        PresenceEntry("ana", ONLINE, {"name": "Ana"}, ({"device": "laptop"},)),
    )


def test_a_new_session_before_the_old_one_expires_produces_no_leave() -> None:
    roster = RoomPresence()
    roster.attach("ana", "s1", meta={"device": "phone"})
    roster.detach("ana", "s1")
    back = roster.attach("ana", "s2", meta={"device": "phone"})  # a fresh session
    assert back == PresenceDiff(joins=(PresenceEntry("ana", ONLINE, {}, ({"device": "phone"},)),))
    # The old session's window ends later: the member stays, nothing visible changes.
    assert roster.remove("ana", "s1") == PresenceDiff()
    assert "ana" in roster
    assert roster.entry("ana") == PresenceEntry("ana", ONLINE, {}, ({"device": "phone"},))


def test_removing_the_last_session_produces_exactly_one_leave() -> None:
    roster = RoomPresence()
    roster.attach("ana", "s1")
    roster.attach("ana", "s2")
    roster.attach("bo", "s9")
    roster.detach("ana", "s1")
    roster.detach("ana", "s2")
    diffs = [roster.remove("ana", "s1")]  # still away through s2: no visible change
    diffs.append(roster.remove("ana", "s2"))
    diffs.append(roster.remove("ana", "s2"))  # again: nothing
    diffs.append(roster.remove("ana", "s1"))
    diffs.append(roster.detach("ana", "s2"))  # a late detach of the gone member
    assert [leave for diff in diffs for leave in diff.leaves] == ["ana"]
    assert diffs[1] == PresenceDiff(leaves=("ana",))
    assert all(not diff.joins for diff in diffs)
    assert "ana" not in roster
    assert roster.entry("ana") is None
    assert [entry.member for entry in roster.state()] == ["bo"]


def test_removing_a_live_last_session_also_leaves() -> None:
    roster = RoomPresence()
    roster.attach("ana", "s1")
    assert roster.remove("ana", "s1") == PresenceDiff(leaves=("ana",))
    assert len(roster) == 0


def test_a_member_with_two_sessions_stays_online_while_one_is_detached() -> None:
    roster = RoomPresence()
    first = roster.attach("ana", "s1", meta={"device": "phone"})
    second = roster.attach("ana", "s2", meta={"device": "laptop"})
    assert first.joins[0].status is second.joins[0].status is ONLINE
    assert second.joins[0].connections == ({"device": "phone"}, {"device": "laptop"})
    dropped = roster.detach("ana", "s1")
    # Still online; only the live connection is listed.
    assert dropped == PresenceDiff(
        joins=(PresenceEntry("ana", ONLINE, {}, ({"device": "laptop"},)),)
    )
    assert roster.entry("ana") == dropped.joins[0]
    assert roster.detach("ana", "s2").joins[0] == PresenceEntry("ana", AWAY, {}, ())
    # s1 comes back: online again, s1 keeps its place among the sessions.
    roster.attach("ana", "s2", meta={"device": "laptop"})
    assert roster.attach("ana", "s1", meta={"device": "tablet"}).joins[0].connections == (
        {"device": "tablet"}, {"device": "laptop"},
    )


def test_diffs_are_empty_when_nothing_changed() -> None:
    roster = RoomPresence()
    assert roster.detach("nobody", "s1") == PresenceDiff()
    assert roster.remove("nobody", "s1") == PresenceDiff()
    roster.attach("ana", "s1", info={"name": "Ana"}, meta={"device": "phone"})
    # The same session attached again with the same metadata (and no new info).
    assert roster.attach("ana", "s1", meta={"device": "phone"}) == PresenceDiff()
    # The same info again.
    assert roster.attach("ana", "s1", info={"name": "Ana"}, meta={"device": "phone"}) == (
        PresenceDiff()
    )
    assert roster.detach("ana", "unknown") == PresenceDiff()
    assert roster.remove("ana", "unknown") == PresenceDiff()
    roster.detach("ana", "s1")
    assert roster.detach("ana", "s1") == PresenceDiff()  # already away
    for diff in (PresenceDiff(), roster.detach("ana", "s1")):
        assert not diff
    # But any change is an upsert: new info, new metadata.
    assert roster.attach("ana", "s1", meta={"device": "phone"})
    assert roster.attach("ana", "s1", info={"name": "Anna"}, meta={"device": "phone"})
    assert roster.attach("ana", "s1", meta={"device": "laptop"})
    assert roster.attach("ana", "s1", meta=None) == PresenceDiff(
        joins=(PresenceEntry("ana", ONLINE, {"name": "Anna"}, ({},)),)
    )


def test_info_is_kept_unless_replaced_and_order_is_first_arrival() -> None:
    roster = RoomPresence()
    roster.attach("bo", "s1", info={"name": "Bo"})
    roster.attach("ana", "s2")
    roster.attach("bo", "s3")  # no info: keeps "Bo"
    assert [(e.member, dict(e.info)) for e in roster.state()] == [
        ("bo", {"name": "Bo"}), ("ana", {}),
    ]
    roster.attach("bo", "s4", info={"name": "Bobby"})
    assert roster.state()[0].info == {"name": "Bobby"}
    roster.remove("bo", "s1")
    roster.remove("bo", "s3")
    roster.remove("bo", "s4")
    roster.attach("bo", "s5")
    assert [e.member for e in roster.state()] == ["ana", "bo"]
    assert roster.state()[1].info == {}  # a new arrival: the old info is gone


def test_the_roster_keeps_copies_of_info_and_metadata() -> None:
    roster = RoomPresence()
    info = {"name": "Ana"}
    meta = {"device": "phone"}
    roster.attach("ana", "s1", info=info, meta=meta)
    info["name"] = "Mallory"
    meta["device"] = "x"
    assert roster.entry("ana") == PresenceEntry("ana", ONLINE, {"name": "Ana"},
                                                ({"device": "phone"},))


def test_entry() -> None:
    roster = RoomPresence()
    assert roster.entry("ana") is None
    roster.attach("ana", "s1", info={"name": "Ana"}, meta={"device": "phone"})
    roster.attach("bo", "s2")
    entry = roster.entry("ana")
    assert entry == PresenceEntry("ana", ONLINE, {"name": "Ana"}, ({"device": "phone"},))
    assert entry == roster.state()[0]
    assert roster.entry("bo") == roster.state()[1]
    roster.detach("ana", "s1")
    assert roster.entry("ana") == PresenceEntry("ana", AWAY, {"name": "Ana"}, ())
    roster.remove("ana", "s1")
    assert roster.entry("ana") is None


def test_to_wire_shape() -> None:
    roster = RoomPresence()
    roster.attach("ana", "s1", info=MappingProxyType({"name": "Ana"}),
                  meta=MappingProxyType({"device": "phone"}))
    roster.attach("ana", "s2", meta={"device": "laptop"})
    roster.attach("bo", "s3")
    roster.detach("bo", "s3")
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
        assert type(wire["status"]) is str
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
    assert str(ONLINE) == "online"
    assert str(AWAY) == "away"
    assert PresenceStatus("away") is AWAY
    assert ONLINE == "online"  # a str enum
    assert f"{AWAY}" == "away"
    assert not PresenceDiff()
    assert PresenceDiff(leaves=("a",))
    assert PresenceDiff(joins=(PresenceEntry("a", AWAY, {}, ()),))
