"""Presence: each room's roster here, its frames to the members, and (with a shared
backplane) the mirror of the other workers' members and its resync.

A room with presence has a `RoomPresence` while it exists. Changes made here are
broadcast to the room's live members at once and, with a shared backplane, announced
to the other workers through the outbox; their announcements (`remote`) are applied to
the mirror, except for sessions live here (known first-hand). A roster loaded from the
backplane buffers the announcements that arrive meanwhile and applies them after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from wsroom._backplane.base import PresenceOp, SharedState
from wsroom._core.config import RoomConfig
from wsroom._core.identity import Identity
from wsroom._core.presence import PresenceEntry, RoomPresence
from wsroom._core.protocol import presence_diff_frame, presence_state_frame
from wsroom._core.queue import frame_size
from wsroom._core.rooms import Rooms
from wsroom._core.sessions import SessionRegistry
from wsroom._runtime.outbox import StateOutbox
from wsroom._runtime.ports import HubSession, PeerPort

__all__ = ["Roster"]

log = logging.getLogger("wsroom.hub")

Kind = Literal["attach", "detach", "remove"]


class Roster:
    """The rosters of the rooms here (see the module docstring)."""

    __slots__ = ("_loading", "_outbox", "_presence", "_rooms", "_sessions",
                 "_settings", "_shared")

    def __init__(self, rooms: Rooms[HubSession],
                 sessions: SessionRegistry[Identity, PeerPort],
                 settings: Callable[[str], RoomConfig],
                 shared: SharedState | None, outbox: StateOutbox | None) -> None:
        self._rooms = rooms
        self._sessions = sessions
        self._settings = settings
        self._shared = shared
        self._outbox = outbox
        self._presence: dict[str, RoomPresence] = {}
        self._loading: dict[str, list[PresenceOp]] = {}

    def __contains__(self, room: object) -> bool:
        return room in self._presence

    def rooms(self) -> list[str]:
        return list(self._presence)

    def state(self, room: str) -> tuple[PresenceEntry, ...]:
        roster = self._presence.get(room)
        return roster.state() if roster is not None else ()

    def state_frame(self, room: str) -> str | None:
        roster = self._presence.get(room)
        if roster is None:
            return None
        return presence_state_frame(room, [e.to_wire() for e in roster.state()])

    # ----------------------------------------------------------- local changes

    def create(self, room: str) -> None:
        """A room with presence was created here."""
        self._presence[room] = RoomPresence()

    def discard(self, room: str) -> None:
        """The room is gone here."""
        self._presence.pop(room, None)

    def attach(self, room: str, session: HubSession, peer: PeerPort) -> str | None:
        """`peer` is online in `room`: tell the others; return the roster frame for the
        peer itself (None: the room has no presence)."""
        roster = self._presence.get(room)
        if roster is None:
            return None
        diff = roster.attach(session.member, session.id, info=session.identity.info,
                             meta=peer.meta)
        self.broadcast(room, diff, skip=peer)
        self.announce(room, "attach", session, peer.meta)
        return presence_state_frame(room, [e.to_wire() for e in roster.state()])

    def attach_all(self, session: HubSession, peer: PeerPort, rooms: frozenset[str]
                   ) -> list[str]:
        """The session's connection is welcomed: it is online in its rooms."""
        frames = []
        for room in sorted(rooms):
            frame = self.attach(room, session, peer)
            if frame is not None:
                frames.append(frame)
        return frames

    def detach(self, room: str, session: HubSession) -> None:
        """The session is away (waiting for a resume)."""
        roster = self._presence.get(room)
        if roster is not None:
            self.broadcast(room, roster.detach(session.member, session.id))
        self.announce(room, "detach", session)

    def remove(self, room: str, session: HubSession) -> None:
        """The session left `room` (which still exists)."""
        roster = self._presence.get(room)
        if roster is not None:
            self.broadcast(room, roster.remove(session.member, session.id))

    def announce(self, room: str, kind: Kind, session: HubSession,
                 meta: Any = None) -> None:
        """Tell the other workers about a roster change made here."""
        if self._outbox is None or self._shared is None or not self._settings(room).presence:
            return
        self._outbox.presence(PresenceOp(
            room, kind, session.member, session.id,
            dict(session.identity.info) if kind == "attach" else {},
            dict(meta or {}) if kind == "attach" else {}, self._shared.worker))

    def broadcast(self, room: str, diff: Any, skip: PeerPort | None = None) -> None:
        if not diff:
            return
        target = self._rooms.get(room)
        if target is None:
            return
        frame = presence_diff_frame(room, [e.to_wire() for e in diff.joins],
                                    list(diff.leaves))
        size = frame_size(frame)
        for session in target.members:
            peer = session.connection
            if peer is not None and peer is not skip and peer.welcomed:
                peer.push(frame, size)

    # ---------------------------------------------------- the other workers'

    async def load(self, room: str) -> None:
        """A room opened here (shared backplane): build its roster mirror from the
        backplane, then apply what other workers announced meanwhile."""
        read = await self._read(room, tolerant=True)
        if read is None:
            return
        remote, buffered = read
        for op in (*remote, *buffered):
            self.apply(op)

    async def _read(self, room: str, *, tolerant: bool = False
                    ) -> tuple[list[PresenceOp], list[PresenceOp]] | None:
        """Read the backplane's roster of `room` while buffering the announcements
        that arrive meanwhile: ``(other workers' entries, buffered)``, or None if it
        is being read already (or nothing is shared). `tolerant`: a failed read counts
        as an empty roster (it fills in as members change)."""
        shared = self._shared
        if shared is None or room in self._loading:
            return None
        buffered: list[PresenceOp] = []
        self._loading[room] = buffered
        try:
            ops = await shared.roster(room)
        except Exception as exc:
            if not tolerant:
                raise
            log.warning("room=%s: roster not loaded (%s); it fills in as members "
                        "change", room, type(exc).__name__)
            ops = []
        finally:
            self._loading.pop(room, None)
        me = shared.worker  # this worker's own sessions are known here first-hand
        return [op for op in ops if op.worker != me], buffered

    def remote(self, op: PresenceOp) -> None:
        """Another worker changed a roster."""
        if self._shared is None or op.worker == self._shared.worker:
            return
        buffered = self._loading.get(op.room)
        if buffered is not None:
            buffered.append(op)
        else:
            self.apply(op)

    def apply(self, op: PresenceOp) -> None:
        roster = self._presence.get(op.room)
        if roster is None:
            return
        local = self._sessions.get(op.session)
        if local is not None and local.connection is not None and op.kind != "attach":
            return  # the session is live here: a late word from its previous worker
        if op.kind == "attach":
            diff = roster.attach(op.member, op.session, info=op.info, meta=op.meta)
        elif op.kind == "detach":
            diff = roster.detach(op.member, op.session, info=op.info)
        else:
            diff = roster.remove(op.member, op.session)
        self.broadcast(op.room, diff)

    async def reload(self, room: str) -> None:
        """Bring the mirror of `room` in line with the backplane's roster (other
        workers' sessions only; this worker's own are known first-hand). Changes
        announced while the roster is read are applied after it, as on a first load."""
        read = await self._read(room)
        roster = self._presence.get(room)
        if read is None or roster is None:
            return
        remote = [op for op in read[0] if not self._live_here(op.session)]
        buffered = read[1]
        known = {op.session for op in remote} | {op.session for op in buffered}
        for entry in roster.state():
            for session_id in roster.sessions_of(entry.member):
                if session_id not in known and self._sessions.get(session_id) is None:
                    self.broadcast(room, roster.remove(entry.member, session_id))
        for op in (*remote, *buffered):
            self.apply(op)

    def _live_here(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.connection is not None
