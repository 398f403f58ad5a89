"""The ``hello`` handshake: verify the resume token, authenticate, attach the session,
and compose what the client gets first.

Theory of operation
-------------------
The handshake attaches the connection to a session (a new one, or the one its resume
token names) and then composes the welcome, race-free against messages published
meanwhile: from the moment of attaching, deliveries are *buffered* (`Peer.pending`).
For each stream it reads what the client missed from the backplane's history (or, when
that is impossible, takes the stream's position and the app's snapshot) — the *plan*;
then, synchronously, `go_live` merges the buffer behind the replay by offset
(`merge_buffered`: duplicates dropped, a hole refused), queues ``welcome``, the replay
and the buffer, and goes live.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

import anyio

from wsroom._asgi.transport import Handshake
from wsroom._core.cursor import Start, Step, merge_buffered
from wsroom._core.heartbeat import Heartbeat
from wsroom._core.protocol import Hello, StreamPosition, snapshot_frame, welcome_frame
from wsroom._core.sessions import INBOX, inbox_key
from wsroom._core.state import CloseReason
from wsroom._core.tokens import ResumeClaims, TokenError
from wsroom._runtime.peer import Peer
from wsroom._runtime.ports import HubSession

__all__ = ["StreamPlan", "handshake"]

log = logging.getLogger("wsroom.connection")


@dataclass(slots=True)
class StreamPlan:
    """What a client gets first on one stream, decided during its handshake."""

    wire: str
    key: str
    start: Start
    """The epoch, the position reported in the welcome (the client's own when
    recovered), and the last offset the replay covers (None: not recovered)."""
    recovered: bool
    frames: tuple[str, ...] = ()
    """Replayed frames (recovered), or the snapshot frame once encoded."""
    snapshot: tuple[Any] | None = None
    """The app's snapshot data (not recovered, with a snapshot hook)."""
    lossy: bool = False
    """The room's policy may discard messages (drop_oldest, coalesce): the client
    must not take a missing offset for a fault."""

    def entry(self) -> dict[str, Any]:
        """The stream's entry in the welcome frame."""
        entry: dict[str, Any] = {"epoch": self.start.epoch, "offset": self.start.offset,
                                 "recovered": self.recovered}
        if self.lossy:
            entry["lossy"] = True
        return entry


async def handshake(peer: Peer, hello: Hello) -> None:
    """Run the hello of `peer` (in a task beside its reader)."""
    runtime = peer.runtime
    membership = runtime.membership
    counters = runtime.telemetry.counters
    claims: ResumeClaims | None = None
    if hello.resume is not None:
        try:
            claims = membership.signer.verify(hello.resume, membership.clock())
        except TokenError as exc:  # the token itself is never logged
            log.info("%s: resume token refused: %s", peer.tag(), exc.problem)
            counters.resumes["rejected"] += 1
            peer.request_close(CloseReason.RESUME_REJECTED)
            return
    request = Handshake(peer.transport.request, hello.auth)
    anonymous = claims.member if claims is not None else secrets.token_urlsafe(12)
    ok, identity = await peer.guarded(
        "authenticate", runtime.authenticate(request, anonymous_id=anonymous))
    if not ok or peer.sm.closing:
        return
    if identity is None:
        peer.request_close(CloseReason.AUTH_FAILED)
        return
    if claims is not None and identity.id != claims.member:
        log.info("%s: resume token of another member refused", peer.tag())
        counters.resumes["rejected"] += 1
        peer.request_close(CloseReason.RESUME_REJECTED)
        return
    peer.identity = peer.connection.identity = identity
    # From the moment the session is attached, deliveries are buffered.
    peer.pending = []
    ok, opened = await peer.guarded(
        "opening the session",
        membership.open_session(peer, identity, claims, anonymous=runtime.anonymous))
    if not ok:
        return
    if opened is None:
        log.info("%s: stale resume token refused", peer.tag())
        peer.request_close(CloseReason.RESUME_REJECTED)
        return
    session, peer.resumed = opened
    peer.session = session
    peer.identity = peer.connection.identity = session.identity
    if peer.sm.closing:
        return
    peer.sm.welcome()
    config = runtime.config
    peer.heartbeat = Heartbeat(
        ping_interval=config.ping_interval, pong_timeout=config.pong_timeout,
        idle_timeout=config.idle_timeout, now=anyio.current_time())
    ok, _ = await peer.guarded("on_connect hook", runtime.on_connect(peer.connection))
    if not ok or peer.sm.closing:
        return  # closed before the welcome: nothing queued is ever sent
    plans = await _plan_streams(peer, session, hello)
    if plans is None or peer.sm.closing:
        return
    go_live(peer, session, plans, None if claims is None else claims.generation)


async def _plan_streams(peer: Peer, session: HubSession, hello: Hello
                        ) -> list[StreamPlan] | None:
    """Decide, per stream of the session, replay or snapshot (awaits the backplane and
    the app's snapshot hook; deliveries are buffered meanwhile).

    Rooms may be joined or left by other tasks while this awaits: it plans until no
    stream is missing, and the check that ends the loop runs after the last await, so
    `go_live` (called at once) sees exactly these streams.
    """
    membership = peer.runtime.membership
    asked = hello.streams if peer.resumed else {}
    planned: dict[str, StreamPlan] = {}
    while True:
        rooms = membership.rooms_of(session)
        streams = [(INBOX, inbox_key(session.id))]
        streams += [(room, room) for room in sorted(rooms)]
        todo = [(wire, key) for wire, key in streams if key not in planned]
        if not todo:
            return [planned[key] for _, key in streams]
        for wire, key in todo:
            try:
                plan = await _plan_stream(peer, wire, key, asked.get(wire))
            except KeyError:  # the room was left, and its stream closed, meanwhile
                plan = None
            if peer.sm.closing:
                return None
            if plan is not None:
                planned[key] = plan


async def _plan_stream(peer: Peer, wire: str, key: str, position: StreamPosition | None
                       ) -> StreamPlan | None:
    """Plan one stream; None if the app's snapshot hook failed (closing)."""
    runtime = peer.runtime
    backplane = runtime.backplane
    plan = None
    if position is not None:
        found = await backplane.since(key, position.epoch, position.offset)
        if found.recovered:
            plan = StreamPlan(wire, key, Start(found.epoch, position.offset, found.offset),
                              True, found.frames)
    if plan is None:
        epoch, offset = await backplane.position(key)
        plan = StreamPlan(wire, key, Start(epoch, offset, None), False)
        if runtime.snapshot is not None:
            # Taken now, it reflects at least everything up to `offset`, and so up to
            # the position it is labelled with (`go_live`), which is `offset` or
            # earlier.
            ok, data = await peer.guarded("snapshot hook",
                                          runtime.snapshot(peer.connection, wire))
            if not ok:
                return None
            plan.snapshot = (data,)
    plan.lossy = runtime.membership.lossy(key)
    return plan


def go_live(peer: Peer, session: HubSession, plans: list[StreamPlan],
            presented: int | None) -> None:
    """Merge the buffered deliveries behind the replay, queue the welcome, the replay
    and the buffer, and go live. Synchronous: nothing interleaves."""
    runtime = peer.runtime
    config = runtime.config
    step, live = merge_buffered({plan.key: plan.start for plan in plans},
                                peer.pending or (), peer.cursor)
    if step is Step.EPOCH:
        # Renumbered while the client was being attached: no exact merge.
        log.warning("%s: stream epoch changed during the handshake", peer.tag())
        peer.request_close(CloseReason.GAP)
        return
    if step is Step.HOLE:
        log.warning("%s: hole in a stream during the handshake", peer.tag())
        peer.request_close(CloseReason.GAP)
        return
    peer.pending = None
    peer.pending_bytes = 0
    try:
        token = runtime.membership.issue_token(session, presented)
    except ValueError:
        log.exception("%s: no resume token can be issued", peer.tag())
        peer.request_close(CloseReason.INTERNAL_ERROR)
        return
    if peer.resumed:
        result = "recovered" if all(p.recovered for p in plans) else "not_recovered"
        runtime.telemetry.counters.resumes[result] += 1
    # The welcome is a frame of its own, ahead of everything: batched with a long
    # replay, it would reach a client on a slow or lossy link only with the whole
    # 64 KiB, and until then the client does not know the heartbeat it is owed.
    peer.sender.push_control(welcome_frame(
        session=session.id, resume=token, ping_interval=config.ping_interval,
        pong_timeout=config.pong_timeout, streams={p.wire: p.entry() for p in plans},
    ))
    replay: deque[str] = deque()
    for plan in plans:
        if plan.snapshot is not None:
            plan.frames = (snapshot_frame(plan.wire, plan.start.epoch, plan.start.offset,
                                          plan.snapshot[0]),)
        replay.extend(plan.frames)
    replay.extend(runtime.membership.roster.attach_all(
        session, peer, runtime.membership.rooms_of(session)))
    peer.sender.start_replay(replay)
    peer.deliver_merged(live)
    replayed = sum(len(p.frames) for p in plans if p.recovered)
    log.info("%s: welcomed, resumed=%s rooms=%d replayed=%d", peer.tag(), peer.resumed,
             len(plans) - 1, replayed)
    peer.went_live()
