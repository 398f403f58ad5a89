"""The hub's side of shared state: sessions and presence across workers.

With a shared backplane (Redis), a client may resume on any worker and every worker
shows the whole roster of a room. Each worker applies its own changes at once (its
clients must never wait for the network to see their own presence) and announces
them in order through one task, the *outbox*: a session's record is saved when it
changes (welcome, confirm, rooms), detached when its client drops, ended when it ends;
roster changes are announced as `PresenceOp`s. The other workers apply them to their
mirrors (`Roster.remote`). Every `refresh_interval` the outbox also tells the
backplane that this worker is alive and still holds its live sessions; a worker that
stops doing so (SIGKILL) is declared dead by the others (`RedisBackplane`'s
``worker_timeout``, 3 s): its members turn *away*, and end when their resume window
passes unless they resume elsewhere.

The outbox keeps the order of changes and retries (with backoff) while the backplane
is unavailable, so a short Redis outage delays announcements but loses none. It is
bounded: beyond `max_pending` changes the oldest are dropped, with an error in the log
(rosters may then be stale until the sessions change again).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from wsroom._backplane.base import PresenceOp, SessionRecord, SharedState
from wsroom._core.errors import BackplaneUnavailable
from wsroom._core.identity import Identity
from wsroom._core.rooms import Rooms
from wsroom._core.sessions import SessionRegistry

if TYPE_CHECKING:
    from wsroom._runtime.ports import HubSession, PeerPort

__all__ = ["StateOutbox"]

log = logging.getLogger("wsroom.hub")

Job = Callable[[], Awaitable[None]]


class StateOutbox:
    """An ordered outbox of shared-state changes, flushed by `run`.

    Args:
        shared: the shared-state backplane.
        sessions: this worker's sessions (only the live ones are saved).
        rooms: the rooms registry (a session's record names its rooms).
        resume_window: how long a detached session waits for a resume.
        moved: called with a session id another worker holds now.
        refresh_interval: seconds between liveness refreshes.
        max_pending: changes kept while the backplane is unavailable.
    """

    def __init__(self, shared: SharedState, sessions: SessionRegistry[Identity, PeerPort],
                 rooms: Rooms[HubSession], resume_window: float,
                 moved: Callable[[str], None], *, refresh_interval: float = 1.0,
                 max_pending: int = 100_000) -> None:
        self._backplane = shared
        self._sessions = sessions
        self._rooms = rooms
        self._resume_window = resume_window
        self._moved = moved
        self._jobs: deque[tuple[str | None, Job]] = deque()
        self._dirty: set[str] = set()
        # Events are made in the task (a hub may be built outside any event loop).
        self._wakeup: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self.refresh_interval = refresh_interval
        self.max_pending = max_pending
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def ttl(self) -> float:
        """How long a live session's record outlives this worker's last refresh."""
        return self._resume_window + 3 * self.refresh_interval

    # ------------------------------------------------------------------ changes

    def _push(self, job: Job, dirty: str | None = None) -> None:
        if len(self._jobs) >= self.max_pending:
            dropped, _ = self._jobs.popleft()
            if dropped is not None:
                self._dirty.discard(dropped)
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("shared state: %d change(s) dropped while the backplane was "
                          "unavailable; rosters may be stale", self.dropped)
        self._jobs.append((dirty, job))
        if self._wakeup is not None:
            self._wakeup.set()

    def session_changed(self, session: HubSession) -> None:
        """Save the session's record (at the next flush, with its state then)."""
        if session.id in self._dirty:
            return
        self._dirty.add(session.id)
        self._push(lambda: self._save(session), dirty=session.id)

    async def _save(self, session: HubSession) -> None:
        self._dirty.discard(session.id)
        if self._sessions.get(session.id) is not session or session.connection is None:
            return  # ended, or detached since (the detach job follows)
        if not await self._backplane.save_session(self.record(session), self.ttl):
            # Another worker holds it now (this one missed the word): let it go.
            self._moved(session.id)

    def record(self, session: HubSession) -> SessionRecord:
        """The session as other workers need it."""
        return SessionRecord(
            session.id, session.member, session.generation, session.accepted,
            tuple(sorted(self._rooms.rooms_of(session))),
            dict(session.identity.info))

    def session_detached(self, session: HubSession) -> None:
        # A change after this (a resume here) must be saved after the detach.
        self._dirty.discard(session.id)
        window = self._resume_window
        self._push(lambda: self._backplane.detach_session(session.id, window))

    def session_ended(self, session_id: str) -> None:
        self._dirty.discard(session_id)
        self._push(lambda: self._backplane.end_session(session_id))

    def presence(self, op: PresenceOp) -> None:
        self._push(lambda: self._backplane.announce(op))

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        """Flush changes in order, and refresh liveness beside it (a change being
        retried must not delay the refresh: the others would declare us dead)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refresher, name="wsroom shared state refresh")
            await self._flush_jobs()

    async def _refresher(self) -> None:
        while True:
            try:
                await self._refresh()
            except Exception as exc:
                log.warning("shared state: refresh failed: %s", type(exc).__name__)
            await anyio.sleep(self.refresh_interval)

    async def _flush_jobs(self) -> None:
        """Run the jobs in order; retry one only while the backplane is unavailable
        (any other error is a bug or bad data: logged, and the job dropped)."""
        backoff = 0.05
        while True:
            if not self._jobs:
                self._wakeup = wakeup = anyio.Event()
                await wakeup.wait()
                continue
            _, job = self._jobs[0]
            try:
                await job()
            except BackplaneUnavailable as exc:
                log.warning("shared state: backplane unavailable (%s); retrying in %.2fs",
                            exc, backoff)
                await anyio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:
                log.exception("shared state: a change could not be announced; dropped")
            backoff = 0.05
            if self._jobs and self._jobs[0][1] is job:
                self._jobs.popleft()
            if not self._jobs and self._idle is not None:
                self._idle.set()

    async def _refresh(self) -> None:
        live = [s.id for s in self._sessions.all() if s.connection is not None]
        await self._backplane.refresh(live, self.ttl, self._resume_window)

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until every change so far was announced (False after `within` s)."""
        with anyio.move_on_after(within):
            while self._jobs:
                self._idle = anyio.Event()
                await self._idle.wait()
            return True
        return False

