"""A backplane on Redis: many worker processes share streams, history and fan-out.

```python
from wsroom import Hub
from wsroom.redis import RedisBackplane

hub = Hub(backplane=RedisBackplane("redis://127.0.0.1:6379/0"))
```

Every stream (a room, or a session's ``@inbox/<id>``) lives in Redis under two keys:

- ``<prefix>:{<stream>}:s``, a Redis stream whose entry IDs are the offsets
  (``<offset>-0``): the stream's history, trimmed by count, bytes and age exactly like
  the in-memory history (`HistoryLimits`);
- ``<prefix>:{<stream>}:m``, a hash with the stream's epoch (``e``), last offset
  (``s``), retained bytes (``b``) and history age limit (``a``, ms).

A room's history expires ``max_age`` after its last message, its meta ``meta_ttl``
after its last publish while no worker has the room open. A session's inbox lives as
the session's record, and is deleted when the session ends (see
`wsroom._backplane.redis_state`, which lists every key and its lifetime).

A message is numbered, stored, trimmed and published (on the channel
``<prefix>:c:<stream>``) by one Lua script, so that an offset is given to exactly one
message and every worker receives a stream's messages in offset order. Each worker
holds one subscriber connection: it checks that connection with its own PINGs,
reconnects with a jittered backoff, and then catches every open stream up from the
Redis history (or, when the history no longer covers what it missed, reports the
stream as lost: its clients resume). A Redis that lost its data (restarted without
persistence, keys expired) gives the streams new epochs; the clients' positions are
then not recoverable and they take snapshots. No offset is ever given twice within an
epoch, and no message is skipped silently.

redis-py's asyncio client is used: this backplane runs on asyncio only.

The parts: `redis_commands` (key names and the scripts), `redis_streams` (the open
streams, their positions and their delivery with catch-up), `redis_subscriber` (the
subscriber connection, its supervision, and the subscriptions of the streams),
`redis_state` (the shared sessions and presence). `RedisBackplane` puts them together.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from wsroom._backplane.base import (
    Backplane,
    Envelope,
    PresenceOp,
    SessionRecord,
    SharedState,
    StateEvents,
)
from wsroom._backplane.redis_commands import Commands, describe, parse_items
from wsroom._backplane.redis_state import PRESENCE_TAG, RedisState, parse_control, parse_op
from wsroom._backplane.redis_streams import Streams
from wsroom._backplane.redis_subscriber import Subscriber
from wsroom._core.errors import BackplaneUnavailable
from wsroom._core.history import HistoryLimits, Recovery
from wsroom._core.protocol import msg_frame_from
from wsroom._core.queue import frame_size
from wsroom._core.sessions import INBOX, inbox_owner

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisBackplane"]

log = logging.getLogger("wsroom.redis")


def _import_redis() -> ModuleType:
    try:
        import redis.asyncio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "wsroom.redis.RedisBackplane needs redis-py (the 'redis' extra): "
            "pip install 'redis>=5.0.1'"
        ) from exc
    return redis


class RedisBackplane(Backplane, SharedState):
    """Streams, sessions and presence shared by every worker through Redis (see the
    module docstring; the shared state: `wsroom._backplane.redis_state`).

    Args:
        url: the Redis server (``redis://``, ``rediss://`` or ``unix://``).
        prefix: prefix of every key and channel (several apps can share a Redis).
        meta_ttl: seconds a room's epoch and last offset are kept after its last
            publish (refreshed while some worker has the room open); its history
            lasts ``max_age`` (`HistoryLimits`). A session's inbox lives as long as
            the session's record (the resume window after its client left), not this.
        ping_interval: seconds between the PINGs that check the subscriber
            connection.
        ping_timeout: seconds without an answer after which the subscriber
            connection is taken for dead (a half-open socket) and replaced.
        max_connections: connections of the command pool (publishes and reads wait
            for a free one).
        worker_timeout: seconds without a liveness refresh (the hub refreshes every
            second) after which the other workers declare this one dead: its members
            turn *away*, and their sessions end after the resume window unless their
            clients resume on another worker.

    Raises:
        ImportError: if redis-py is not installed (the ``redis`` extra).
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "wsroom",
                 meta_ttl: float = 86400, ping_interval: float = 1.0,
                 ping_timeout: float = 3.0, max_connections: int = 32,
                 worker_timeout: float = 3.0) -> None:
        self._redis_module = _import_redis()
        if (meta_ttl <= 0 or ping_interval <= 0 or ping_timeout <= 0 or max_connections < 1
                or worker_timeout <= 0):
            raise ValueError("meta_ttl, ping_interval, ping_timeout, max_connections and "
                             "worker_timeout must be positive")
        self._worker_timeout = worker_timeout
        self._url = url
        self._prefix = prefix
        self._meta_ttl = max(1, math.ceil(meta_ttl))
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_connections = max_connections
        self._open_timeout = max(5.0, 2 * ping_timeout)
        self.worker = secrets.token_urlsafe(9)
        self._control = f"{prefix}:w:{self.worker}"
        self._events: StateEvents | None = None
        self._state: RedisState | None = None
        self._client: Redis | None = None
        self._sub: Redis | None = None
        # Made by start: the commands, the open streams, the subscriber connection.
        self._commands: Commands | None = None
        self._streams: Streams | None = None
        self._subscriber: Subscriber | None = None
        self._closed = False
        self.stats = {"reconnects": 0, "caught_up": 0, "lost": 0, "publish_errors": 0}
        """Counters: subscriber reconnects, gaps caught up from history, streams
        reported lost, publishes that failed."""

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return self._subscriber is not None and self._subscriber.healthy

    async def start(self, task_group: TaskGroup) -> None:
        """Connect and start the subscriber task in `task_group`; wait for the first
        connection attempt (a Redis that is down makes `healthy` False, not an error).

        Raises:
            RuntimeError: if the running async library is not asyncio, or if the
                backplane was started before.
        """
        try:
            import asyncio

            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "RedisBackplane runs on asyncio only (redis-py is asyncio-only); "
                "run the app on asyncio, or use MemoryBackplane"
            ) from None
        if self._client is not None:
            raise RuntimeError("this RedisBackplane was started already")
        module = self._redis_module
        retry = module.asyncio.retry.Retry(module.backoff.NoBackoff(), 0)
        # Commands: never retried (a publish retried after a lost reply would be
        # numbered twice); a bounded wait for a free pooled connection.
        pool = module.asyncio.BlockingConnectionPool.from_url(
            self._url, max_connections=self._max_connections, timeout=2,
            socket_timeout=2, socket_connect_timeout=1, retry=retry,
            decode_responses=True, health_check_interval=0, protocol=2)
        self._client = client = module.asyncio.Redis(connection_pool=pool)
        # The subscriber: its own connection, checked by our PINGs. RESP2: under RESP3
        # (redis-py 8's default) a PING's answer on a subscribed connection is not
        # reported as a pong, and the connection would be taken for dead every time.
        self._sub = sub = module.asyncio.Redis.from_url(
            self._url, socket_timeout=self._ping_timeout,
            socket_connect_timeout=self._ping_timeout, retry=retry, decode_responses=True,
            health_check_interval=0, protocol=2)
        self._commands = commands = Commands(client, self._prefix, self._meta_ttl)
        self._state = RedisState(client, self._prefix, self.worker,
                                 lambda: int(time.time() * 1000))
        self._state.dead_after_ms = max(1, int(self._worker_timeout * 1000))
        self._streams = streams = Streams(
            commands, lambda envelope: self._deliver(envelope),
            lambda stream: self._lost(stream), self.stats)
        self._subscriber = subscriber = Subscriber(
            sub, streams, commands, control=self._control,
            ping_interval=self._ping_interval, ping_timeout=self._ping_timeout,
            open_timeout=self._open_timeout, errors=self._errors, stats=self.stats,
            on_control=self._on_control, on_presence=self._on_presence,
            on_resynced=self._on_resynced)
        if self._closed:
            subscriber.stop()
        task_group.start_soon(subscriber.run, name="wsroom redis subscriber")
        await subscriber.first_try()

    async def aclose(self) -> None:
        """Stop the subscriber task and close the connections."""
        self._closed = True
        if self._subscriber is not None:
            self._subscriber.stop()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for client in (self._sub, self._client):
                if client is not None:
                    await client.aclose(close_connection_pool=True)

    # ---------------------------------------------------------------- helpers

    def _parts(self) -> tuple[Commands, Streams, Subscriber]:
        """The started parts (raises RuntimeError before `start`)."""
        self._started()
        assert self._commands is not None
        assert self._streams is not None
        assert self._subscriber is not None
        return self._commands, self._streams, self._subscriber

    def _started(self) -> None:
        if self._client is None:
            raise RuntimeError("the RedisBackplane is not started (the hub starts it)")

    def _unavailable(self, what: str, exc: Exception) -> BackplaneUnavailable:
        log.warning("redis backplane: %s failed: %s", what, describe(exc))
        return BackplaneUnavailable(f"Redis: {what} failed: {describe(exc)}")

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """A Redis or socket error inside becomes `BackplaneUnavailable` (logged, with
        `what` failed); anything else passes through."""
        try:
            yield
        except self._errors as exc:
            raise self._unavailable(what, exc) from exc

    @property
    def _errors(self) -> tuple[type[Exception], ...]:
        return (self._redis_module.RedisError, OSError)

    # --------------------------------------------------------------- the interface

    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        _, _, subscriber = self._parts()
        try:
            return await subscriber.open(stream, limits)
        except self._errors as exc:
            raise self._unavailable(f"open of stream {stream!r}", exc) from exc

    async def close(self, stream: str) -> None:
        if self._subscriber is None:
            await anyio.lowlevel.checkpoint()
            return
        await self._subscriber.close(stream)

    async def publish(self, stream: str, wire_name: str, payload: str, *,
                      key: Hashable | None = None, exclude: str | None = None,
                      limits: HistoryLimits | None = None) -> Envelope:
        commands, streams, _ = self._parts()
        st = streams.get(stream)
        wire = INBOX if inbox_owner(stream) is not None else stream
        if wire_name != wire:
            raise ValueError(f"the wire name of stream {stream!r} is {wire!r}")
        if key is None:
            key_json = ""
        elif (isinstance(key, tuple) and len(key) == 2 and key[0] == stream
              and isinstance(key[1], str)):
            key_json = json.dumps(key[1])
        else:
            raise TypeError("RedisBackplane carries coalescing keys of the form "
                            "(stream, str)")
        if limits is None:
            limits = st.limits if st is not None else HistoryLimits()
        base = frame_size(msg_frame_from(wire, "", 0, payload))
        try:
            epoch, offset = await commands.publish(stream, payload, limits, exclude or "",
                                                   key_json, base)
        except self._errors as exc:
            self.stats["publish_errors"] += 1
            raise self._unavailable(f"publish to stream {stream!r}", exc) from exc
        frame = msg_frame_from(wire, epoch, offset, payload)
        envelope = Envelope(stream, epoch, offset, frame, frame_size(frame), key, exclude)
        streams.published(envelope)
        return envelope

    async def position(self, stream: str) -> tuple[str, int]:
        commands, streams, _ = self._parts()
        st = streams.get(stream)
        if st is not None and st.ready:
            await anyio.lowlevel.checkpoint()
            return st.position()
        with self._guard(f"position of stream {stream!r}"):
            epoch, offset, _ = await commands.sync(stream, "", -1)
        return epoch, offset

    async def since(self, stream: str, epoch: str, offset: int) -> Recovery:
        commands, _, _ = self._parts()
        with self._guard(f"history of stream {stream!r}"):
            result = await commands.since(stream, offset)
        current, top, entries, now, max_age = result
        if current is None:
            return Recovery(False, (), "", 0)
        top = int(top)
        failed = Recovery(False, (), current, top)
        if epoch != current or offset > top or offset < 0:
            return failed
        if offset == top:
            return Recovery(True, (), current, top)
        items = parse_items(entries, offset + 1, current)
        if items is None or len(items) != top - offset:
            return failed
        if max_age is not None and int(entries[0][1][3]) < int(now) - int(max_age):
            return failed  # the oldest needed message aged out
        wire = INBOX if inbox_owner(stream) is not None else stream
        return Recovery(True, tuple(msg_frame_from(wire, current, item[0], item[4])
                                    for item in items), current, top)

    # ------------------------------------------------- shared sessions and presence

    def bind_state(self, events: StateEvents) -> None:
        self._events = events

    def _shared_state(self) -> RedisState:
        self._started()
        assert self._state is not None
        return self._state

    # Each operation: the started `RedisState` does it; `_guard` maps Redis errors.

    async def save_session(self, record: SessionRecord, ttl: float) -> bool:
        with self._guard("saving a session"):
            return await self._shared_state().save_session(record, ttl)

    async def claim_session(self, session: str, member: str, generation: int,
                            ttl: float) -> SessionRecord | None:
        with self._guard("claiming a session"):
            return await self._shared_state().claim_session(session, member, generation,
                                                            ttl)

    async def detach_session(self, session: str, window: float) -> None:
        with self._guard("detaching a session"):
            await self._shared_state().detach_session(session, window)

    async def end_session(self, session: str) -> None:
        with self._guard("ending a session"):
            await self._shared_state().end_session(session)

    async def announce(self, op: PresenceOp) -> None:
        with self._guard("announcing a roster change"):
            await self._shared_state().announce(op)

    async def roster(self, room: str) -> list[PresenceOp]:
        with self._guard(f"roster of room {room!r}"):
            return await self._shared_state().roster(room)

    async def refresh(self, sessions: list[str], ttl: float, window: float) -> None:
        state = self._shared_state()
        commands, streams, _ = self._parts()
        state.window_ms = max(1, int(window * 1000))
        rooms = [name for name in streams.names() if inbox_owner(name) is None]
        with self._guard("liveness refresh"):
            fresh = await state.refresh(sessions, ttl, rooms)
        commands.inbox_ttl_ms = state.hold_ms
        if fresh and self._events is not None:
            self._events.reannounce()

    async def session_owners(self, sessions: list[str]) -> dict[str, str | None]:
        with self._guard("session owners"):
            return await self._shared_state().session_owners(sessions)

    async def disconnect_sessions(self, sessions: list[str], code: int, reason: str
                                  ) -> int:
        with self._guard("disconnecting sessions"):
            return await self._shared_state().disconnect_sessions(sessions, code, reason)

    async def member_sessions(self, member: str) -> list[str]:
        with self._guard(f"sessions of member {member!r}"):
            return await self._shared_state().member_sessions(member)

    def _on_control(self, data: str) -> None:
        parsed = parse_control(data)
        if parsed is None or self._events is None:
            return
        verb, session, code, reason = parsed
        if verb == "moved":
            self._events.session_moved(session)
        elif verb == "ended":
            self._events.session_ended(session)
        else:
            self._events.disconnect(session, code, reason)

    def _on_presence(self, data: str) -> None:
        op = parse_op(data[len(PRESENCE_TAG):])
        if op is not None and self._events is not None:
            self._events.presence(op)

    def _on_resynced(self) -> None:
        if self._events is not None:
            self._events.resynced()
