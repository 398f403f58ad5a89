"""Sessions and rooms: who is in which room, attached to which connection, and the fan-out.

Theory of operation
-------------------
Rooms are held by *sessions*, not connections (see ``_core/sessions.py``): a connection
that drops for a reason its client recovers from leaves its session detached for
``resume_window`` — rooms held, presence *away* — and a resume attaches the new
connection to it. A background task (`expire`) ends the sessions whose window passed:
they leave their rooms, which is the only time presence says *leave* for a member that
did not leave on purpose.

The registries (sessions, rooms, rosters) are changed only by synchronous code. The
backplane delivers numbered messages through `deliver`, which queues them for every
live member without awaiting: no membership change can interleave with a fan-out, and
no client can make a broadcast wait.

Ending a session has a synchronous part (`end`: it leaves its rooms, presence says
so) and an awaited one (`close_streams`: the streams nobody here needs any more are
closed on the backplane). Several sessions ended together are all ended before any
await, so that nobody sees the registries half-updated.

Three words, one meaning each: a session is *detached* when its connection drops
(it waits for a resume), *ended* when it is over (it leaves its rooms), and *dropped*
here when another worker holds it now or ended it (it is removed here without a word
to the others). A *kick* (`Hub.disconnect`) ends a session and closes its connection.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from wsroom._backplane.base import Backplane, Envelope, SharedState, StaleSession
from wsroom._core.admission import client_key, network_key
from wsroom._core.config import HubConfig, RoomConfig
from wsroom._core.identity import Identity
from wsroom._core.protocol import left_frame
from wsroom._core.queue import Policy
from wsroom._core.rooms import Rooms
from wsroom._core.sessions import SessionRegistry, inbox_key, inbox_owner
from wsroom._core.state import CloseReason
from wsroom._core.tokens import ResumeClaims, TokenSigner
from wsroom._runtime.outbox import StateOutbox
from wsroom._runtime.ports import HubSession, PeerPort
from wsroom._runtime.roster import Roster
from wsroom._runtime.stats import Telemetry

__all__ = ["Membership", "check_room_name"]

log = logging.getLogger("wsroom.hub")

Ended = list[tuple[HubSession, list[str]]]


def check_room_name(room: str) -> None:
    if not isinstance(room, str) or not 0 < len(room) <= 200 or room.startswith("@"):
        raise ValueError(
            f"invalid room name {room!r}: 1 to 200 characters, not starting with '@'"
        )


class Membership:
    """Sessions, rooms and rosters of one hub (see the module docstring).

    Args:
        config: the hub's configuration.
        settings: ``(room) -> RoomConfig``.
        backplane: where streams are opened, numbered and closed.
        shared: the same backplane when it shares sessions between workers.
        telemetry: the hub's counters.
        signer: issues resume tokens.
        clock: the wall clock (seconds since the epoch) for token expiry.
    """

    def __init__(self, config: HubConfig, settings: Callable[[str], RoomConfig],
                 backplane: Backplane, shared: SharedState | None, telemetry: Telemetry,
                 signer: TokenSigner, clock: Callable[[], float]) -> None:
        self._config = config
        self.settings = settings
        self._backplane = backplane
        self._shared = shared
        self._telemetry = telemetry
        self.signer = signer
        self.clock = clock
        self.sessions: SessionRegistry[Identity, PeerPort] = SessionRegistry(
            config.resume_window)
        self.rooms: Rooms[HubSession] = Rooms()
        self.outbox = (None if shared is None else StateOutbox(
            shared, self.sessions, self.rooms, config.resume_window,
            lambda session_id: self.drop(session_id, "moved")))
        self.roster = Roster(self.rooms, self.sessions, settings, shared, self.outbox)
        self.tg: TaskGroup | None = None  # the hub's, while it runs
        self._expiry_wakeup: anyio.Event | None = None

    # --------------------------------------------------------------- lookups

    def rooms_of(self, session: HubSession) -> frozenset[str]:
        return self.rooms.rooms_of(session)

    def is_current(self, session: HubSession) -> bool:
        """The session has not ended (nor been dropped) since it was looked up."""
        return self.sessions.get(session.id) is session

    def lossy(self, stream: str) -> bool:
        """Whether the room's policy may discard messages (the client is told)."""
        room = self.rooms.get(stream)
        return room is not None and room.config.policy is not Policy.DISCONNECT

    # ------------------------------------------------------------- sessions

    async def open_session(self, peer: PeerPort, identity: Identity,
                           claims: ResumeClaims | None, *, anonymous: bool = False
                           ) -> tuple[HubSession, bool] | None:
        """Attach `peer` to the session its token names, or to a new session.

        An anonymous member (`anonymous`: the hub has no `authenticate` hook) whose
        token names a session that no longer exists gets a new member id too; the
        session's `identity` is the one to use from now on.

        Returns ``(session, resumed)``, or None if the token is stale (a newer one was
        issued and confirmed since): the caller closes with 3500. The session is the
        peer's from before any await (`PeerPort.attach`), so that a client that vanishes now
        ends it on release.
        """
        counters = self._telemetry.counters
        session = None if claims is None else self.sessions.get(claims.session)
        if session is None and claims is not None and self._shared is not None:
            adopted = await self._adopt(peer, identity, claims)
            if adopted == "here":  # another connection took it over here meanwhile
                session = self.sessions.get(claims.session)
            elif adopted != "absent":
                return adopted
        if session is not None and claims is not None and session.member == identity.id:
            if not session.accepts(claims.generation):
                counters.resumes["rejected"] += 1
                return None
            session.identity = identity
            replaced = self.sessions.attach(session, peer)
            peer.attach(session)
            if replaced is not None:
                replaced.request_close(CloseReason.REPLACED)
            await anyio.lowlevel.checkpoint()
            return session, True
        if claims is not None:
            counters.resumes["new_session"] += 1
            if anonymous:
                # Its session is gone: the token must not bring back its identity.
                identity = Identity(id=secrets.token_urlsafe(12), info=identity.info)
        self._make_room_for(identity.id)
        session = self.sessions.create(identity.id, identity, peer)
        peer.attach(session)
        await self._backplane.open(inbox_key(session.id), self._config.inbox_history)
        return session, False

    def _make_room_for(self, member: str) -> None:
        """End the member's own oldest session while it holds
        ``max_sessions_per_member`` (before it gets a new one)."""
        cap = self._config.max_sessions_per_member
        ended: Ended = []
        while (victim := self.sessions.member_victim(member, cap)) is not None:
            log.info("session=%s member=%s: ended for the member's newer session "
                     "(max_sessions_per_member=%s)", victim.id, member, cap)
            if victim.connection is not None:
                victim.connection.request_close(CloseReason.SESSION_LIMIT)
            ended.append((victim, self.end(victim, "member_limit")))
        self._in_background(ended)

    async def _adopt(self, peer: PeerPort, identity: Identity, claims: ResumeClaims
                     ) -> tuple[HubSession, bool] | Literal["absent", "here"] | None:
        """Resume a session another worker held (shared backplane): its record gives
        the token state and rooms. None: refused (3500); "absent": no such session
        exists anywhere (a new one is created); "here": a concurrent resume made it
        local meanwhile (resume it as a local one)."""
        assert self._shared is not None
        assert self.outbox is not None
        try:
            record = await self._shared.claim_session(
                claims.session, identity.id, claims.generation, self.outbox.ttl)
        except StaleSession:
            self._telemetry.counters.resumes["rejected"] += 1
            return None
        if record is None or record.member != identity.id:
            return "absent"
        if self.sessions.get(record.id) is not None:
            return "here"
        # Claimed: from now on this worker holds it, even if the client has just left
        # (the release then detaches it, for a resume anywhere). It counts toward the
        # member's sessions here like a new one.
        self._make_room_for(identity.id)
        session = self.sessions.create(identity.id, identity, peer, session_id=record.id)
        peer.attach(session)
        session.restore(max(record.generation, claims.generation),
                        (*record.accepted, claims.generation))
        await self._backplane.open(inbox_key(session.id), self._config.inbox_history)
        for room in record.rooms:
            if session.connection is not peer or self.sessions.get(session.id) is not session:
                break
            await self._rejoin(session, room)
        log.info("conn=%s member=%s session=%s: taken over from another worker", peer.id,
                 identity.id, session.id)
        return session, True

    async def _rejoin(self, session: HubSession, room: str) -> None:
        """Re-enter `room` for an adopted session (before its welcome)."""
        config = self.settings(room)
        created = room not in self.rooms
        if not self.rooms.join(room, session, config=config):
            return
        await self._backplane.open(room, config.history)
        if created and config.presence:
            await self.roster.load(room)

    def issue_token(self, session: HubSession, presented: int | None) -> str:
        generation = session.rotate(presented)
        self.session_changed(session)
        expires = self.clock() + self._config.resume_token_ttl
        return self.signer.issue(ResumeClaims(session.id, session.member, generation,
                                              expires))

    def session_changed(self, session: HubSession) -> None:
        """Its record changed (shared backplane: saved for the other workers)."""
        if self.outbox is not None:
            self.outbox.session_changed(session)

    def confirm(self, session: HubSession) -> None:
        """A frame after the welcome: the client holds the newest resume token."""
        if session.confirm():
            self.session_changed(session)

    # ----------------------------------------------------------------- rooms

    async def join(self, peer: PeerPort, session: HubSession | None, room: str) -> None:
        check_room_name(room)
        if session is None or session.connection is not peer or peer.closing:
            await anyio.lowlevel.checkpoint()
            return
        config = self.settings(room)
        created = room not in self.rooms
        if not self.rooms.join(room, session, config=config):
            await anyio.lowlevel.checkpoint()
            return
        if created and config.presence:
            self.roster.create(room)
        self.session_changed(session)
        if peer.in_handshake:
            # During the handshake: the welcome will report the stream.
            await self._backplane.open(room, config.history)
            if created and config.presence:
                await self.roster.load(room)
            return
        # Welcomed already: buffer the room's deliveries until its position is known,
        # then announce the stream (a `stream` frame) and deliver what follows it.
        opening = peer.begin_stream(room)
        try:
            # A room that did not exist starts a stream (a new epoch in memory).
            epoch, offset = await self._backplane.open(room, config.history)
            if created and config.presence:
                await self.roster.load(room)
        except BaseException:
            peer.end_stream(opening)
            raise
        if session.connection is not peer or room not in self.rooms.rooms_of(session):
            peer.end_stream(opening)
            return  # replaced, or left again meanwhile
        if not peer.start_stream(opening, epoch, offset,
                                 config.policy is not Policy.DISCONNECT):
            return  # superseded by a later join of the room (or closing)
        frame = self.roster.attach(room, session, peer)
        if frame is not None:
            peer.push(frame)

    async def leave(self, peer: PeerPort, session: HubSession | None, room: str) -> None:
        if session is None or not self._leave(session, room):
            await anyio.lowlevel.checkpoint()
            return
        if peer.forget_stream(room):
            peer.push(left_frame(room))  # the client forgets its position
        await self.close_unused(room)

    def _leave(self, session: HubSession, room: str) -> bool:
        if not self.rooms.leave(room, session):
            return False
        if room not in self.rooms:
            self.roster.discard(room)
        else:
            self.roster.remove(room, session)
        self.roster.announce(room, "remove", session)
        if self.sessions.get(session.id) is session:
            self.session_changed(session)
        return True

    # ------------------------------------------------------------ the fan-out

    def deliver(self, envelope: Envelope) -> None:
        """The backplane delivers a numbered message: queue it for the live members
        of its stream. Synchronous: never waits for a client."""
        stream = envelope.stream
        owner = inbox_owner(stream)
        if owner is not None:
            session = self.sessions.get(owner)
            if session is not None and session.connection is not None:
                # Personal messages are never discarded by a policy.
                session.connection.deliver(envelope, Policy.DISCONNECT)
            return
        room = self.rooms.get(stream)
        if room is None:
            return
        policy = room.config.policy
        exclude = envelope.exclude
        started = time.perf_counter()
        if exclude is None:
            for session in room.members:
                peer = session.connection
                if peer is not None:
                    peer.deliver(envelope, policy, False)
        else:
            for session in room.members:
                peer = session.connection
                if peer is not None:
                    peer.deliver(envelope, policy, session.id == exclude)
        self._telemetry.metrics.broadcast_duration.observe(time.perf_counter() - started)

    def lost(self, stream: str) -> None:
        """The backplane could not deliver some messages of `stream`: its live clients
        must resume (3010) to recover them from history, or get a snapshot."""
        owner = inbox_owner(stream)
        if owner is not None:
            session = self.sessions.get(owner)
            sessions = [] if session is None else [session]
        else:
            room = self.rooms.get(stream)
            sessions = [] if room is None else list(room.members)
        log.warning("stream=%s: messages may have been lost in transit; %d client(s) told "
                    "to resume", stream, sum(s.connection is not None for s in sessions))
        for session in sessions:
            if session.connection is not None:
                session.connection.request_close(CloseReason.GAP)

    # ------------------------------------------------------------- endings

    async def connection_ended(self, peer: PeerPort, session: HubSession | None,
                               resumable: bool) -> None:
        """`peer` was released: detach its session for the window, or end it."""
        if (session is None or session.connection is not peer
                or self.sessions.get(session.id) is not session):
            return  # no session yet, a newer connection took it over, or it ended
        if resumable and session.welcomed:
            address = peer.client_address
            key = client_key(address)
            self.sessions.detach(session, anyio.current_time(),
                                 None if key == "unknown" else key, network_key(address))
            if self.outbox is not None:
                self.outbox.session_detached(session)
            for room in sorted(self.rooms.rooms_of(session)):
                self.roster.detach(room, session)
            if self._expiry_wakeup is not None:
                self._expiry_wakeup.set()
            await self._enforce_detached_cap(session)
        else:
            await self.close_streams(session, self.end(session, "closed"))

    async def _enforce_detached_cap(self, session: HubSession) -> None:
        """End detached sessions early while `session`'s address holds more than
        ``max_detached_per_ip`` of them, or more than ``max_detached_sessions`` wait
        for a resume: the oldest of the largest holder goes first."""
        config = self._config
        sessions = self.sessions
        ended: Ended = []
        while (victim := sessions.address_victim(
                session.address, config.max_detached_per_ip)) is not None:
            log.warning("session=%s member=%s: ended before its resume window, "
                        "max_detached_per_ip=%s reached", victim.id, victim.member,
                        config.max_detached_per_ip)
            ended.append((victim, self.end(victim, "address_quota")))
        while (victim := sessions.cap_victim(config.max_detached_sessions)) is not None:
            log.warning("session=%s member=%s: ended before its resume window, "
                        "max_detached_sessions=%s reached", victim.id, victim.member,
                        config.max_detached_sessions)
            ended.append((victim, self.end(victim, "evicted")))
        for victim, rooms in ended:
            await self.close_streams(victim, rooms)
        await anyio.lowlevel.checkpoint()

    def kick(self, session: HubSession, code: int, reason: str, ended: Ended) -> None:
        """End `session` (a kick): close its connection with `code`, forget it."""
        if session.connection is not None:
            session.connection.request_close(CloseReason.APP, code, reason)
        ended.append((session, self.end(session, "disconnected")))

    def kick_here(self, session_id: str, code: int, reason: str) -> None:
        """Another worker's `disconnect` names a session held here."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        ended: Ended = []
        self.kick(session, code, reason, ended)
        self._in_background(ended)

    def end(self, session: HubSession, why: str) -> list[str]:
        """The synchronous part of ending a session; return the rooms it left."""
        if self.sessions.remove(session):
            self._telemetry.metrics.sessions_ended[why] += 1
        rooms = sorted(self.rooms.rooms_of(session))
        if self._shared is not None and why == "shutdown":
            # Shared: the session lives on for a resume on another worker.
            for room in rooms:
                self.rooms.leave(room, session)
                if room not in self.rooms:
                    self.roster.discard(room)
            return rooms
        for room in rooms:
            self._leave(session, room)
        if self.outbox is not None:
            self.outbox.session_ended(session.id)
        return rooms

    def drop(self, session_id: str, why: str) -> None:
        """Another worker took the session over, or ended it: forget it here without
        announcing anything (its rosters are updated by whoever holds it now)."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        if session.connection is not None:
            # Moved: a newer connection elsewhere replaced this one (3503). Ended
            # elsewhere while connected here: resume (3010), which gives a new session.
            session.connection.request_close(
                CloseReason.REPLACED if why == "moved" else CloseReason.GAP)
        self.sessions.remove(session)
        self._telemetry.metrics.sessions_ended[why] += 1
        rooms = sorted(self.rooms.rooms_of(session))
        for room in rooms:
            self.rooms.leave(room, session)
            if room not in self.rooms:
                self.roster.discard(room)
        self._in_background([(session, rooms)])

    def _in_background(self, ended: Ended) -> None:
        if self.tg is not None:
            for session, rooms in ended:
                self.tg.start_soon(self.close_streams, session, rooms)

    async def close_streams(self, session: HubSession, rooms: list[str]) -> None:
        await self._backplane.close(inbox_key(session.id))
        for room in rooms:
            await self.close_unused(room)

    async def close_unused(self, room: str) -> None:
        """Close a room's stream if the room is gone. Checked at the moment of closing:
        someone may have joined (re-creating the room) while we awaited."""
        if room in self.rooms:
            await anyio.lowlevel.checkpoint()
        else:
            await self._backplane.close(room)

    async def end_all(self, why: str) -> None:
        """End every session here (the hub stops)."""
        ended = [(session, self.end(session, why)) for session in self.sessions.all()]
        for session, rooms in ended:
            await self.close_streams(session, rooms)

    async def expire(self) -> None:
        """Background task: end the detached sessions whose window has passed."""
        sessions = self.sessions
        while True:
            self._expiry_wakeup = wakeup = anyio.Event()
            deadline = sessions.next_expiry()
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
                await wakeup.wait()
            ended = []
            for session in sessions.expire(anyio.current_time()):  # removed already
                self._telemetry.metrics.sessions_ended["expired"] += 1
                ended.append((session, self.end(session, "expired")))
            for session, rooms in ended:
                log.info("session=%s member=%s: resume window expired", session.id,
                         session.member)
                try:
                    await self.close_streams(session, rooms)
                except Exception:
                    log.exception("closing the streams of an expired session failed")

    # -------------------------------------------- the other workers (shared)

    def reannounce(self) -> None:
        """Announce again every live session here and its presence (the others had
        declared this worker dead while it stalled, or it is new)."""
        for session in self.sessions.all():
            peer = session.connection
            if peer is None or not peer.welcomed:
                continue
            self.session_changed(session)
            for room in sorted(self.rooms.rooms_of(session)):
                self.roster.announce(room, "attach", session, peer.meta)

    async def resync(self) -> None:
        """The backplane reconnected: messages from other workers may have been lost.
        Drop the sessions that moved or ended meanwhile, save the live ones again,
        and reload the rosters of the rooms open here."""
        shared, outbox = self._shared, self.outbox
        assert shared is not None
        assert outbox is not None
        try:
            # First what this worker itself still has to say (saves, detaches), or its
            # own sessions would look ended.
            await outbox.flush(self._config.close_timeout)
            owners = await shared.session_owners(
                [session.id for session in self.sessions.all()])
            me = shared.worker
            for session_id, owner in owners.items():
                session = self.sessions.get(session_id)
                if session is None:
                    continue
                if owner is None and session.connection is None:
                    self.drop(session_id, "ended_elsewhere")
                elif owner not in (None, "", me):
                    self.drop(session_id, "moved")
                elif session.connection is not None:
                    self.session_changed(session)
            for room in self.roster.rooms():
                await self.roster.reload(room)
        except Exception as exc:
            log.warning("shared state: resync failed: %s", type(exc).__name__)
