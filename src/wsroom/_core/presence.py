"""Presence: who is in a room, online or away (sans-I/O).

Keyed by member id; each member has one record per session in the room. A session is
*live* while it has a connection and *away* while it is detached and may still resume.
A member is online if one of its sessions is live, away if all of them are detached,
and gone when it has no session left in the room. Sessions leave only explicitly, or
when the session registry expires them at the end of the resume window, so a quick
reconnect produces no leave/join churn, and a window expiry exactly one leave.

There is no clock here: the session registry decides when a session is gone. Every
change is returned as a `PresenceDiff` for the runtime to broadcast: a member entry in
``joins`` is an upsert (new member, status change, connections changed), a member id in
``leaves`` is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["PresenceDiff", "PresenceEntry", "PresenceStatus", "RoomPresence"]


class PresenceStatus(str, Enum):
    """A member's presence status."""

    ONLINE = "online"
    AWAY = "away"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One member of a room's roster.

    Attributes:
        member: the member id.
        status: online if one of its sessions is connected, else away.
        info: the member's public info (``Identity.info``).
        connections: the metadata of each live connection (empty while away).
    """

    member: str
    status: PresenceStatus
    info: Mapping[str, Any]
    connections: tuple[Mapping[str, Any], ...]

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
    sessions: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)
    """Session id -> metadata of its live connection, or None while detached."""


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
        live = tuple(meta for meta in record.sessions.values() if meta is not None)
        status = PresenceStatus.ONLINE if live else PresenceStatus.AWAY
        return PresenceEntry(member, status, record.info, live)

    def entry(self, member: str) -> PresenceEntry | None:
        """The roster entry of `member`, if it is in the room."""
        return self._entry(member) if member in self._members else None

    def state(self) -> tuple[PresenceEntry, ...]:
        """The whole roster, in order of first arrival."""
        return tuple(self._entry(member) for member in self._members)

    def _upsert(self, member: str, before: PresenceEntry | None) -> PresenceDiff:
        after = self._entry(member)
        return PresenceDiff() if after == before else PresenceDiff(joins=(after,))

    def attach(self, member: str, session: str, *, info: Mapping[str, Any] | None = None,
               meta: Mapping[str, Any] | None = None) -> PresenceDiff:
        """A session of `member` is connected in the room (joined, or came back)."""
        record = self._members.get(member)
        before = None if record is None else self._entry(member)
        if record is None:
            record = self._members[member] = _Member(dict(info or {}))
        elif info is not None:
            record.info = dict(info)
        record.sessions[session] = dict(meta or {})
        return self._upsert(member, before)

    def sessions_of(self, member: str) -> frozenset[str]:
        """The ids of `member`'s sessions in the room."""
        record = self._members.get(member)
        return frozenset(() if record is None else record.sessions)

    def detach(self, member: str, session: str, *,
               info: Mapping[str, Any] | None = None) -> PresenceDiff:
        """A session lost its connection but may resume: it counts as away. With
        `info`, a session not seen yet is added as away (another worker's)."""
        record = self._members.get(member)
        if info is not None and (record is None or session not in record.sessions):
            before = None if record is None else self._entry(member)
            if record is None:
                record = self._members[member] = _Member(dict(info))
            record.sessions[session] = None
            return self._upsert(member, before)
        if record is None or record.sessions.get(session) is None:
            return PresenceDiff()
        before = self._entry(member)
        record.sessions[session] = None
        return self._upsert(member, before)

    def remove(self, member: str, session: str) -> PresenceDiff:
        """A session left the room (explicitly, or it ended or expired); a member with
        no session left is gone."""
        record = self._members.get(member)
        if record is None or session not in record.sessions:
            return PresenceDiff()
        before = self._entry(member)
        del record.sessions[session]
        if not record.sessions:
            del self._members[member]
            return PresenceDiff(leaves=(member,))
        return self._upsert(member, before)
