"""Rooms and membership (``wsroom._core.rooms``); stream numbering lives in the backplane
(``tests/runtime/test_backplane.py``)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from wsroom._core.config import RoomConfig
from wsroom._core.queue import Policy
from wsroom._core.rooms import Room, Rooms

CONFIG = RoomConfig()


# --------------------------------------------------------------------------- units


def test_join_creates_the_room_with_its_config() -> None:
    rooms: Rooms[str] = Rooms()
    config = RoomConfig(policy=Policy.COALESCE)
    assert rooms.join("lobby", "alice", config=config) is True
    room = rooms.get("lobby")
    assert isinstance(room, Room)
    assert room.name == "lobby"
    assert room.config is config
    assert room.members == ("alice",)
    assert "lobby" in rooms
    assert len(rooms) == 1


def test_joining_an_existing_room_keeps_its_config() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("lobby", "alice", config=CONFIG)
    rooms.join("lobby", "bob", config=RoomConfig(policy=Policy.DROP_OLDEST))
    room = rooms.get("lobby")
    assert room is not None
    assert room.config is CONFIG
    assert room.members == ("alice", "bob")


def test_join_twice_is_a_no_op() -> None:
    rooms: Rooms[str] = Rooms()
    assert rooms.join("lobby", "alice", config=CONFIG) is True
    assert rooms.join("lobby", "alice", config=CONFIG) is False
    room = rooms.get("lobby")
    assert room is not None
    assert room.members == ("alice",)
    assert len(room) == 1


def test_the_last_leave_removes_the_room_and_a_new_join_starts_a_new_room() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("lobby", "alice", config=CONFIG)
    old = rooms.get("lobby")
    assert old is not None
    assert rooms.leave("lobby", "alice") is True
    assert rooms.get("lobby") is None
    assert "lobby" not in rooms
    assert len(rooms) == 0
    assert rooms.member_count() == 0
    other = RoomConfig(policy=Policy.DROP_OLDEST)
    rooms.join("lobby", "bob", config=other)
    new = rooms.get("lobby")
    assert new is not None
    assert new is not old
    assert new.members == ("bob",)
    assert new.config is other  # a new room: the old one's settings are gone
    assert old.members == ()


def test_leaving_what_one_is_not_in_changes_nothing() -> None:
    rooms: Rooms[str] = Rooms()
    assert rooms.leave("nowhere", "alice") is False
    assert "nowhere" not in rooms
    rooms.join("lobby", "alice", config=CONFIG)
    assert rooms.leave("lobby", "bob") is False
    assert rooms.rooms_of("bob") == frozenset()
    assert rooms.leave_all("bob") == []
    assert rooms.names() == ["lobby"]
    assert rooms.member_count() == 1


def test_leave_all_returns_the_rooms_left_sorted() -> None:
    rooms: Rooms[str] = Rooms()
    for name in ("b", "c", "a"):
        rooms.join(name, "alice", config=CONFIG)
    rooms.join("b", "bob", config=CONFIG)
    assert rooms.rooms_of("alice") == frozenset({"a", "b", "c"})
    assert rooms.leave_all("alice") == ["a", "b", "c"]
    assert rooms.rooms_of("alice") == frozenset()
    assert rooms.names() == ["b"]
    assert rooms.member_count() == 1


def test_rooms_of_is_a_snapshot() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("a", "alice", config=CONFIG)
    before = rooms.rooms_of("alice")
    rooms.join("b", "alice", config=CONFIG)
    rooms.leave("a", "alice")
    assert before == frozenset({"a"})
    assert rooms.rooms_of("alice") == frozenset({"b"})


def test_members_snapshot_is_reused_until_membership_changes() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("lobby", "alice", config=CONFIG)
    room = rooms.get("lobby")
    assert room is not None
    first = room.members
    assert room.members is first  # a broadcast does not rebuild it
    rooms.join("lobby", "bob", config=CONFIG)
    second = room.members
    assert second == ("alice", "bob")
    assert first == ("alice",)
    rooms.join("lobby", "bob", config=CONFIG)  # no change
    assert room.members is second


def test_membership_can_change_while_a_broadcast_iterates() -> None:
    """The audit's failure 1: no 'changed size during iteration' during fan-out."""
    rooms: Rooms[int] = Rooms()
    for member in range(5):
        rooms.join("lobby", member, config=CONFIG)
    room = rooms.get("lobby")
    assert room is not None
    visited = []
    for member in room.members:
        visited.append(member)
        rooms.leave("lobby", member)  # e.g. its send failed
        rooms.join("lobby", member + 10, config=CONFIG)  # someone joins
    assert visited == [0, 1, 2, 3, 4]
    assert room.members == (10, 11, 12, 13, 14)


def test_members_may_be_any_hashable() -> None:
    class Conn:
        pass

    a, b = Conn(), Conn()
    rooms: Rooms[Conn] = Rooms()
    rooms.join("x", a, config=CONFIG)
    rooms.join("x", b, config=CONFIG)
    room = rooms.get("x")
    assert room is not None
    assert room.members == (a, b)
    assert a in room
    assert Conn() not in room


# ------------------------------------------------------------------ stateful machine


NAMES = st.sampled_from(["lobby", "t1", "t2", "t3"])
MEMBERS = st.integers(0, 5)


class RoomsMachine(RuleBasedStateMachine):
    """join / leave / leave_all (eviction) against a dict-of-lists model."""

    def __init__(self) -> None:
        super().__init__()
        self.rooms: Rooms[int] = Rooms()
        self.model: dict[str, list[int]] = {}  # room -> members in join order
        self.snapshots: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def _join(self, name: str, member: int) -> None:
        fresh = member not in self.model.get(name, [])
        assert self.rooms.join(name, member, config=CONFIG) is fresh
        if fresh:
            self.model.setdefault(name, []).append(member)

    def _leave(self, name: str, member: int) -> None:
        present = member in self.model.get(name, [])
        assert self.rooms.leave(name, member) is present
        if present:
            self.model[name].remove(member)
            if not self.model[name]:
                del self.model[name]

    @rule(name=NAMES, member=MEMBERS)
    def join(self, name: str, member: int) -> None:
        self._join(name, member)

    @rule(name=NAMES, member=MEMBERS)
    def leave(self, name: str, member: int) -> None:
        self._leave(name, member)

    @rule(member=MEMBERS)
    def evict(self, member: int) -> None:
        expected = sorted(name for name, members in self.model.items() if member in members)
        assert self.rooms.leave_all(member) == expected
        for name in expected:
            self.model[name].remove(member)
            if not self.model[name]:
                del self.model[name]

    @rule(name=NAMES)
    def take_snapshot(self, name: str) -> None:
        room = self.rooms.get(name)
        if room is not None:
            members = room.members
            self.snapshots.append((members, tuple(self.model[name])))

    @rule(name=NAMES, data=st.data())
    def broadcast_with_churn(self, name: str, data: st.DataObject) -> None:
        """Iterate a room's members while every step changes membership."""
        room = self.rooms.get(name)
        if room is None:
            return
        expected = tuple(self.model[name])
        visited = []
        for member in room.members:
            visited.append(member)
            if data.draw(st.booleans(), label="leave (else join)"):
                self._leave(name, data.draw(MEMBERS, label="leaver"))
            else:
                self._join(name, data.draw(MEMBERS, label="joiner"))
        assert tuple(visited) == expected

    @invariant()
    def rooms_match_the_model(self) -> None:
        assert sorted(self.rooms.names()) == sorted(self.model)
        assert len(self.rooms) == len(self.model)
        for name, members in self.model.items():
            room = self.rooms.get(name)
            assert room is not None
            assert name in self.rooms
            assert room.name == name
            assert room.members == tuple(members)
            assert isinstance(room.members, tuple)
            assert len(room) == len(members)
            assert all(member in room for member in members)

    @invariant()
    def no_empty_room_exists(self) -> None:
        for name in self.rooms.names():
            room = self.rooms.get(name)
            assert room is not None
            assert len(room) > 0
            assert room.members

    @invariant()
    def reverse_index_matches(self) -> None:
        everyone: set[int] = set()
        for member in range(6):
            expected = {name for name, members in self.model.items() if member in members}
            assert self.rooms.rooms_of(member) == frozenset(expected)
            if expected:
                everyone.add(member)
        assert self.rooms.member_count() == len(everyone)

    @invariant()
    def old_snapshots_are_unchanged(self) -> None:
        for snapshot, at_the_time in self.snapshots:
            assert isinstance(snapshot, tuple)
            assert snapshot == at_the_time


TestRoomsMachine = RoomsMachine.TestCase
TestRoomsMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
