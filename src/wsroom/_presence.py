"""Presence: who is in a room, online or away (sans-I/O).

Keyed by member id, with the metadata of each of the member's connections. A member
whose last connection drops is *away*, not gone: it stays in the roster for the resume
window, so a quick reconnect produces no leave/join churn. Only an explicit leave, or
the window expiring, produces a leave. Every change is returned as a `PresenceDiff`
for the runtime to broadcast: a member entry in ``joins`` is an upsert (new member,
status change, connections changed), a member id in ``leaves`` is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["PresenceDiff", "PresenceEntry", "RoomPresence", "Status"]


class Status(str, Enum):
    """A member's presence status."""

    ONLINE = "online"
    AWAY = "away"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One member of a room's roster."""

    member: str
    status: Status
    info: Mapping[str, Any]
    connections: tuple[Mapping[str, Any], ...]
    """Metadata of the member's live connections (empty while away)."""

    def to_wire(self) -> dict[str, Any]:
        """The entry as sent in ``presence`` frames."""
        return {"id": self.member, "status": self.status.value, "info": dict(self.info),
                "connections": [dict(meta) for meta in self.connections]}


@dataclass(frozen=True, slots=True)
class PresenceDiff:
    """Changes to broadcast: upserted entries and ids that left."""

    joins: tuple[PresenceEntry, ...] = ()
    leaves: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joins or self.leaves)


@dataclass(slots=True)
class _Member:
    info: Mapping[str, Any]
    connections: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    away_since: float | None = None


class RoomPresence:
    """The roster of one room."""

    __slots__ = ("_members",)

    def __init__(self) -> None:
        self._members: dict[str, _Member] = {}

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def _entry(self, member: str) -> PresenceEntry:
        record = self._members[member]
        status = Status.AWAY if record.away_since is not None else Status.ONLINE
        return PresenceEntry(member, status, record.info, tuple(record.connections.values()))

    def state(self) -> tuple[PresenceEntry, ...]:
        """The whole roster, in order of first arrival."""
        return tuple(self._entry(member) for member in self._members)

    def connect(self, member: str, connection: str, *, info: Mapping[str, Any] | None = None,
                meta: Mapping[str, Any] | None = None) -> PresenceDiff:
        """A connection of `member` is in the room (joined, or came back)."""
        record = self._members.get(member)
        if record is None:
            record = self._members[member] = _Member(dict(info or {}))
        elif info is not None:
            record.info = dict(info)
        record.connections[connection] = dict(meta or {})
        record.away_since = None
        return PresenceDiff(joins=(self._entry(member),))

    def disconnect(self, member: str, connection: str, now: float) -> PresenceDiff:
        """A connection dropped; with its member's last one gone, the member is away."""
        record = self._members.get(member)
        if record is None or record.connections.pop(connection, None) is None:
            return PresenceDiff()
        if not record.connections:
            record.away_since = now
        return PresenceDiff(joins=(self._entry(member),))

    def leave(self, member: str) -> PresenceDiff:
        """The member left the room for good (explicitly, or its session ended)."""
        if self._members.pop(member, None) is None:
            return PresenceDiff()
        return PresenceDiff(leaves=(member,))

    def expire(self, now: float, window: float) -> PresenceDiff:
        """Members away for `window` seconds or more leave."""
        # The same expression as next_expiry(): expire(next_expiry()) always removes.
        gone = tuple(member for member, record in self._members.items()
                     if record.away_since is not None and now >= record.away_since + window)
        for member in gone:
            del self._members[member]
        return PresenceDiff(leaves=gone)

    def next_expiry(self, window: float) -> float | None:
        """When the next away member would leave, if any is away."""
        times = [r.away_since for r in self._members.values() if r.away_since is not None]
        return min(times) + window if times else None
