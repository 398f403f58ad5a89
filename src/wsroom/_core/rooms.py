"""Rooms and membership (sans-I/O).

A room is a named set of members (sessions) and its settings; its messages are
numbered by the backplane (see `_backplane/base.py`). Membership
changes and fan-out never interleave: joins and leaves are synchronous, and each room
hands out an immutable tuple of its members that is rebuilt only when membership
changes. A broadcast iterates that tuple, so nothing it calls can change what it
iterates (the audit's failure 1, "dictionary changed size during iteration").
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from wsroom._core.config import RoomConfig

__all__ = ["Room", "Rooms"]

M = TypeVar("M", bound=Hashable)


class Room(Generic[M]):
    """A named set of members and its settings."""

    __slots__ = ("_members", "_snapshot", "config", "name")

    def __init__(self, name: str, config: RoomConfig) -> None:
        self.name = name
        self.config = config
        self._members: dict[M, None] = {}
        self._snapshot: tuple[M, ...] | None = ()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    @property
    def members(self) -> tuple[M, ...]:
        """The members in join order, as an immutable snapshot."""
        if self._snapshot is None:
            self._snapshot = tuple(self._members)
        return self._snapshot


class Rooms(Generic[M]):
    """All rooms of a hub and the reverse index member -> room names.

    Empty rooms are removed at once, so the registry's size is bounded by membership.
    """

    __slots__ = ("_by_member", "_rooms")

    def __init__(self) -> None:
        self._rooms: dict[str, Room[M]] = {}
        self._by_member: dict[M, set[str]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, name: object) -> bool:
        return name in self._rooms

    def get(self, name: str) -> Room[M] | None:
        """Return the room called `name`, if it exists (has members)."""
        return self._rooms.get(name)

    def names(self) -> list[str]:
        """Names of the rooms that exist."""
        return list(self._rooms)

    def rooms_of(self, member: M) -> frozenset[str]:
        """Names of the rooms `member` is in."""
        return frozenset(self._by_member.get(member, ()))

    def join(self, name: str, member: M, *, config: RoomConfig) -> bool:
        """Add `member` to room `name`, creating the room (with `config`) if needed.
        Return False if it was already a member."""
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, config)
        if member in room._members:
            return False
        room._members[member] = None
        room._snapshot = None
        self._by_member.setdefault(member, set()).add(name)
        return True

    def leave(self, name: str, member: M) -> bool:
        """Remove `member` from room `name`. Return False if it was not a member."""
        room = self._rooms.get(name)
        if room is None or member not in room._members:
            return False
        del room._members[member]
        room._snapshot = None
        if not room._members:
            del self._rooms[name]
        names = self._by_member[member]
        names.discard(name)
        if not names:
            del self._by_member[member]
        return True

    def leave_all(self, member: M) -> list[str]:
        """Remove `member` from every room; return the names it left."""
        names = sorted(self._by_member.get(member, ()))
        for name in names:
            self.leave(name, member)
        return names

    def member_count(self) -> int:
        """Number of distinct members in any room."""
        return len(self._by_member)
