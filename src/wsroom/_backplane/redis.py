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
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

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
from wsroom._backplane.redis_state import PRESENCE_TAG, RedisState, parse_control, parse_op
from wsroom._core.errors import BackplaneUnavailable
from wsroom._core.history import HistoryLimits, Recovery
from wsroom._core.protocol import msg_frame_from
from wsroom._core.queue import frame_size
from wsroom._core.sessions import INBOX, inbox_owner

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

__all__ = ["RedisBackplane"]

log = logging.getLogger("wsroom.redis")

# KEYS: stream, meta. ARGV: payload, new epoch, max_messages, max_bytes, max_age_ms,
# meta_ttl_s, channel, exclude ('' none), key (JSON, '' none), frame size without the
# epoch and with offset 0 (the stored size is that of the frame the clients get).
_PUBLISH = """
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0, 'b', 0)
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
local size = tonumber(ARGV[10]) + string.len(epoch) + string.len(tostring(offset)) - 1
redis.call('XADD', KEYS[1], offset .. '-0', 'p', ARGV[1], 't', now, 'n', size,
           'x', ARGV[8], 'k', ARGV[9])
local bytes = redis.call('HINCRBY', KEYS[2], 'b', size)
local horizon = now - tonumber(ARGV[5])
local count = redis.call('XLEN', KEYS[1])
local max_messages, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
while count > 0 do
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  local f = head[2]
  if count <= max_messages and bytes <= max_bytes and tonumber(f[4]) >= horizon then
    break
  end
  redis.call('XDEL', KEYS[1], head[1])
  bytes = redis.call('HINCRBY', KEYS[2], 'b', -tonumber(f[6]))
  count = count - 1
end
redis.call('HSET', KEYS[2], 'a', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[7],
           offset .. '\\n' .. epoch .. '\\n' .. ARGV[8] .. '\\n' .. ARGV[9] .. '\\n' .. ARGV[1])
return {epoch, offset}
"""

# Ensure the stream exists (a new epoch if its meta is gone), refresh the meta's TTL,
# and return the entries after ARGV[4] if the epoch is still ARGV[3].
# KEYS: stream, meta. ARGV: new epoch, meta_ttl_s, expected epoch ('' none), offset.
_SYNC = """
local e = redis.call('HGET', KEYS[2], 'e')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', e, 's', 0, 'b', 0)
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
local s = tonumber(redis.call('HGET', KEYS[2], 's'))
local off = tonumber(ARGV[4])
local entries = {}
if e == ARGV[3] and off >= 0 and s > off then
  entries = redis.call('XRANGE', KEYS[1], off + 1, '+', 'COUNT', s - off)
end
return {e, s, entries}
"""

# Read-only: the meta, the entries after ARGV[1] and Redis's clock, all of one instant.
# KEYS: stream, meta.
_SINCE = """
local m = redis.call('HMGET', KEYS[2], 'e', 's', 'a')
if not m[1] then return {false, 0, {}, 0, false} end
local s = tonumber(m[2])
local off = tonumber(ARGV[1])
local entries = {}
if off >= 0 and s > off then
  entries = redis.call('XRANGE', KEYS[1], off + 1, '+', 'COUNT', s - off)
end
local t = redis.call('TIME')
return {m[1], s, entries, t[1] * 1000 + math.floor(t[2] / 1000), m[3] or false}
"""

_BATCH = 500  # channels per SUBSCRIBE command when resubscribing


def _import_redis() -> ModuleType:
    try:
        import redis.asyncio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "wsroom.redis.RedisBackplane needs redis-py (the 'redis' extra): "
            "pip install 'redis>=5.0.1'"
        ) from exc
    return redis


class _Dead(Exception):
    """The subscriber connection can no longer be trusted."""


# An entry of a stream or of the channel: offset, epoch, exclude, key, payload.
_Item = tuple[int, str, str, str, str]


class _Stream:
    """This process's view of one open stream."""

    __slots__ = ("busy", "channel", "epoch", "last", "limits", "name", "opened", "ready",
                 "stash", "wire")

    def __init__(self, name: str, channel: str, limits: HistoryLimits) -> None:
        self.name = name
        self.channel = channel
        self.wire = INBOX if inbox_owner(name) is not None else name
        self.limits = limits
        self.epoch = ""
        self.last = 0
        # ready: epoch and last are known; busy: some task is processing the stream
        # (opening or catching up): the reader stashes its messages meanwhile.
        self.ready = False
        self.busy = True
        self.stash: deque[_Item] = deque()
        self.opened = anyio.Event()  # created in a running event loop (by open)


class RedisBackplane(Backplane, SharedState):
    """Streams, sessions and presence shared by every worker through Redis (see the
    module docstring; the shared state: `wsroom._backplane.redis_state`).

    Args:
        url: the Redis server (``redis://``, ``rediss://`` or ``unix://``).
        prefix: prefix of every key and channel (several apps can share a Redis).
        meta_ttl: seconds a stream's epoch and last offset are kept after its last
            publish (refreshed while some worker has the stream open); its history
            lasts ``max_age`` (`HistoryLimits`).
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
        self._publish_script: AsyncScript | None = None
        self._sync_script: AsyncScript | None = None
        self._since_script: AsyncScript | None = None
        self._streams: dict[str, _Stream] = {}
        self._by_channel: dict[str, _Stream] = {}
        # The subscriber connection of the moment (generation `_gen`), and per channel
        # the confirmations it still owes, in the order the commands were sent.
        self._ps: PubSub | None = None
        self._gen = 0
        self._expect: dict[str, deque[_Stream | None]] = {}
        self._confirmed: dict[_Stream, int] = {}
        self._changed: anyio.Event  # (events are made in the running loop: by start)
        self._first_try: anyio.Event
        self._healthy = False
        self._reader_scope: anyio.CancelScope | None = None
        self._closed = False
        self.stats = {"reconnects": 0, "caught_up": 0, "lost": 0, "publish_errors": 0}
        """Counters: subscriber reconnects, gaps caught up from history, streams
        reported lost, publishes that failed."""

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return self._healthy

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
        self._client = module.asyncio.Redis(connection_pool=pool)
        # The subscriber: its own connection, checked by our PINGs. RESP2: under RESP3
        # (redis-py 8's default) a PING's answer on a subscribed connection is not
        # reported as a pong, and the connection would be taken for dead every time.
        self._sub = module.asyncio.Redis.from_url(
            self._url, socket_timeout=self._ping_timeout,
            socket_connect_timeout=self._ping_timeout, retry=retry, decode_responses=True,
            health_check_interval=0, protocol=2)
        client = self._client
        assert client is not None
        self._publish_script = client.register_script(_PUBLISH)
        self._sync_script = client.register_script(_SYNC)
        self._since_script = client.register_script(_SINCE)
        self._state = RedisState(client, self._prefix, self.worker,
                                 lambda: int(time.time() * 1000))
        self._state.dead_after_ms = max(1, int(self._worker_timeout * 1000))
        self._changed = anyio.Event()
        self._first_try = anyio.Event()
        task_group.start_soon(self._run_reader, name="wsroom redis subscriber")
        with anyio.move_on_after(self._open_timeout):
            await self._first_try.wait()

    async def aclose(self) -> None:
        """Stop the subscriber task and close the connections."""
        self._closed = True
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        self._healthy = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for client in (self._sub, self._client):
                if client is not None:
                    await client.aclose(close_connection_pool=True)

    # ---------------------------------------------------------------- keys, helpers

    def _keys(self, stream: str) -> list[str]:
        return [f"{self._prefix}:{{{stream}}}:s", f"{self._prefix}:{{{stream}}}:m"]

    def _channel(self, stream: str) -> str:
        return f"{self._prefix}:c:{stream}"

    def _started(self) -> None:
        if self._client is None:
            raise RuntimeError("the RedisBackplane is not started (the hub starts it)")

    def _unavailable(self, what: str, exc: Exception) -> BackplaneUnavailable:
        log.warning("redis backplane: %s failed: %s", what, _describe(exc))
        return BackplaneUnavailable(f"Redis: {what} failed: {_describe(exc)}")

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

    async def _run_sync(self, stream: str, expected: str, offset: int
                        ) -> tuple[str, int, list[Any]]:
        assert self._sync_script is not None
        result = await self._sync_script(
            keys=self._keys(stream),
            args=[secrets.token_urlsafe(6), self._meta_ttl, expected, offset])
        return str(result[0]), int(result[1]), list(result[2])

    def _emit(self, st: _Stream, epoch: str, offset: int, exclude: str, key: str,
              payload: str) -> None:
        frame = msg_frame_from(st.wire, epoch, offset, payload)
        self._deliver(Envelope(st.name, epoch, offset, frame, frame_size(frame),
                               None if not key else (st.name, json.loads(key)),
                               exclude or None))
        st.last = offset

    def _declare_lost(self, st: _Stream, epoch: str, offset: int, why: str) -> None:
        log.warning("redis backplane: stream=%s %s: its clients must resume", st.name, why)
        self.stats["lost"] += 1
        st.epoch, st.last = epoch, offset
        self._lost(st.name)

    # --------------------------------------------------------------- the interface

    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        self._started()
        st = self._streams.get(stream)
        if st is not None:
            if not st.ready:
                await st.opened.wait()
                if not st.ready:
                    raise BackplaneUnavailable(f"Redis: stream {stream!r} could not be "
                                               "opened")
            else:
                await anyio.lowlevel.checkpoint()
            return st.epoch, st.last
        st = _Stream(stream, self._channel(stream), limits)
        self._streams[stream] = st
        self._by_channel[st.channel] = st
        try:
            gen = await self._subscribed(st)
            st.epoch, st.last, _ = await self._run_sync(stream, "", -1)
            st.ready = True
            await self._drain(st)
            while gen != self._gen:
                # The subscriber reconnected meanwhile: catch up what it may have missed.
                gen = await self._subscribed(st)
                await self._catch_up(st)
                await self._drain(st)
        except BaseException as exc:
            self._forget(st)
            if isinstance(exc, self._errors):
                raise self._unavailable(f"open of stream {stream!r}", exc) from exc
            raise
        finally:
            st.busy = False
            st.opened.set()
        return st.epoch, st.last

    async def _subscribed(self, st: _Stream) -> int:
        """Subscribe `st` on the current connection and wait for the confirmation."""
        with anyio.move_on_after(self._open_timeout):
            while True:
                changed = self._changed
                if self._streams.get(st.name) is not st:
                    return self._gen  # closed meanwhile: its position is all that's asked
                if self._confirmed.get(st) == self._gen and self._ps is not None:
                    return self._gen
                await self._send_subscribe(st)
                await changed.wait()
        raise BackplaneUnavailable(f"Redis: subscribing to stream {st.name!r} timed out")

    async def _send_subscribe(self, st: _Stream) -> None:
        ps = self._ps
        if ps is None or self._streams.get(st.name) is not st:
            return
        expect = self._expect.setdefault(st.channel, deque())
        if st in expect or self._confirmed.get(st) == self._gen:
            return
        conn = ps.connection
        if conn is None or not conn.is_connected:
            return
        expect.append(st)
        try:
            await ps.subscribe(st.channel)
        except Exception as exc:  # the reader notices and reconnects
            log.debug("redis backplane: subscribe failed: %s", _describe(exc))

    async def close(self, stream: str) -> None:
        st = self._streams.get(stream)
        if st is None:
            await anyio.lowlevel.checkpoint()
            return
        self._forget(st)
        ps = self._ps
        conn = None if ps is None else ps.connection
        if ps is not None and conn is not None and conn.is_connected:
            self._expect.setdefault(st.channel, deque()).append(None)
            try:
                await ps.unsubscribe(st.channel)
            except Exception as exc:  # the reader notices and reconnects
                log.debug("redis backplane: unsubscribe failed: %s", _describe(exc))
        else:
            await anyio.lowlevel.checkpoint()

    def _forget(self, st: _Stream) -> None:
        if self._streams.get(st.name) is st:
            del self._streams[st.name]
            del self._by_channel[st.channel]
        self._confirmed.pop(st, None)

    async def publish(self, stream: str, wire_name: str, payload: str, *,
                      key: Hashable | None = None, exclude: str | None = None,
                      limits: HistoryLimits | None = None) -> Envelope:
        self._started()
        assert self._publish_script is not None
        st = self._streams.get(stream)
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
        max_age_ms = max(1, math.ceil(limits.max_age * 1000))
        base = frame_size(msg_frame_from(wire, "", 0, payload))
        try:
            result = await self._publish_script(
                keys=self._keys(stream),
                args=[payload, secrets.token_urlsafe(6), limits.max_messages,
                      limits.max_bytes, max_age_ms, self._meta_ttl, self._channel(stream),
                      exclude or "", key_json, base])
        except self._errors as exc:
            self.stats["publish_errors"] += 1
            raise self._unavailable(f"publish to stream {stream!r}", exc) from exc
        epoch, offset = str(result[0]), int(result[1])
        frame = msg_frame_from(wire, epoch, offset, payload)
        envelope = Envelope(stream, epoch, offset, frame, frame_size(frame), key, exclude)
        st = self._streams.get(stream)
        if (st is not None and st.ready and not st.busy and st.epoch == epoch
                and offset == st.last + 1):
            # The next one here: deliver now (its echo from the channel is a duplicate).
            self._deliver(envelope)
            st.last = offset
        return envelope

    async def position(self, stream: str) -> tuple[str, int]:
        self._started()
        st = self._streams.get(stream)
        if st is not None and st.ready:
            await anyio.lowlevel.checkpoint()
            return st.epoch, st.last
        with self._guard(f"position of stream {stream!r}"):
            epoch, offset, _ = await self._run_sync(stream, "", -1)
        return epoch, offset

    async def since(self, stream: str, epoch: str, offset: int) -> Recovery:
        self._started()
        assert self._since_script is not None
        with self._guard(f"history of stream {stream!r}"):
            result = await self._since_script(keys=self._keys(stream), args=[offset])
        current, top, entries, now, max_age = result
        if current is None:
            return Recovery(False, (), "", 0)
        top = int(top)
        failed = Recovery(False, (), current, top)
        if epoch != current or offset > top or offset < 0:
            return failed
        if offset == top:
            return Recovery(True, (), current, top)
        items = _items(entries, offset + 1, current)
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
        state.window_ms = max(1, int(window * 1000))
        with self._guard("liveness refresh"):
            fresh = await state.refresh(sessions, ttl)
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

    # ------------------------------------------------------------ stream processing

    async def _drain(self, st: _Stream) -> None:
        """Process what the reader stashed while `st` was busy (the caller holds it)."""
        while st.stash:
            await self._process(st, st.stash.popleft())

    async def _process(self, st: _Stream, item: _Item) -> None:
        """Deliver a message of the channel, after catching up a hole before it."""
        if self._apply(st, item):
            return
        await self._catch_up(st)
        if not self._apply(st, item):
            self._declare_lost(st, item[1], item[0], f"offset {item[0]} after {st.last}")

    def _apply(self, st: _Stream, item: _Item) -> bool:
        offset, epoch, exclude, key, payload = item
        if epoch != st.epoch:
            self._declare_lost(st, epoch, offset, "was renumbered (new epoch)")
            return True
        if offset <= st.last:
            return True  # a duplicate (delivered by publish, or by a catch-up)
        if offset != st.last + 1:
            return False
        self._emit(st, epoch, offset, exclude, key, payload)
        return True

    async def _catch_up(self, st: _Stream) -> None:
        """Deliver what `st` missed from the Redis history, or report it lost."""
        epoch, top, entries = await self._run_sync(st.name, st.epoch, st.last)
        if epoch != st.epoch:
            self._declare_lost(st, epoch, top, "was renumbered (new epoch)")
            return
        if top <= st.last:
            return
        items = _items(entries, st.last + 1, epoch)
        if items is None or len(items) != top - st.last:
            self._declare_lost(st, epoch, top,
                               f"missed offsets after {st.last} that its history no "
                               "longer holds")
            return
        log.info("redis backplane: stream=%s caught up %d message(s) from history",
                 st.name, len(items))
        self.stats["caught_up"] += 1
        for offset, _, exclude, key, payload in items:
            self._emit(st, epoch, offset, exclude, key, payload)

    # ------------------------------------------------------------------- the reader

    async def _run_reader(self) -> None:
        with anyio.CancelScope() as scope:
            self._reader_scope = scope
            if self._closed:
                scope.cancel()
            await self._supervise()

    async def _supervise(self) -> None:
        """Keep one subscriber connection up; never returns (cancelled by aclose)."""
        backoff = 0.1
        while True:
            ps: PubSub | None = None
            try:
                assert self._sub is not None
                ps = self._sub.pubsub()
                await self._read(ps)
            except Exception as exc:  # a connection error, a dead socket, or a bug
                if self._healthy:
                    log.warning("redis backplane: subscriber connection lost (%s); "
                                "reconnecting", _describe(exc))
                else:
                    log.warning("redis backplane: cannot connect the subscriber (%s); "
                                "retrying", _describe(exc))
                if not isinstance(exc, (_Dead, *self._errors)):
                    log.error("redis backplane: subscriber error", exc_info=exc)
                backoff = 0.1 if self._healthy else backoff
                self.stats["reconnects"] += self._healthy
            finally:
                self._healthy = False
                self._ps = None
                self._wake()
                if ps is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        # Typed from redis-py 8.2 on: the ignore holds for both.
                        await ps.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            self._first_try.set()
            await anyio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _read(self, ps: PubSub) -> None:
        """Subscribe everything, resync every open stream, then read until the
        connection fails (raises)."""
        await ps.subscribe(self._control)  # connects
        gen = self._gen = self._gen + 1
        self._ps = ps
        self._expect = {}
        streams = list(self._streams.values())
        awaiting = {st.channel for st in streams}
        control_confirmed = False
        for st in streams:
            self._expect[st.channel] = deque([st])
        for start in range(0, len(streams), _BATCH):
            await ps.subscribe(*(st.channel for st in streams[start:start + _BATCH]))
        pings: deque[tuple[str, float]] = deque()
        token = 0
        next_ping = anyio.current_time()
        next_touch = next_ping + min(self._meta_ttl / 4, 600)
        resynced = False
        while True:
            conn = ps.connection
            if conn is None or not conn.is_connected:
                raise _Dead("the connection closed")
            now = anyio.current_time()
            if now >= next_ping:
                token += 1
                pings.append((f"wsroom:{token}", now))
                await ps.ping(f"wsroom:{token}")
                next_ping = now + self._ping_interval
            if resynced and now >= next_touch:
                await self._touch()
                next_touch = now + min(self._meta_ttl / 4, 600)
            message = await ps.get_message(timeout=max(0.0, min(0.5, next_ping - now)))
            if message is None:
                if pings and anyio.current_time() - pings[0][1] > self._ping_timeout:
                    raise _Dead(f"no answer to PING for {self._ping_timeout:g}s")
                continue
            kind = message["type"]
            channel = message["channel"]
            if kind == "message":
                data = message["data"]
                st = self._by_channel.get(channel)
                if st is not None:
                    if data.startswith(PRESENCE_TAG):
                        self._on_presence(data)
                    else:
                        await self._on_message(st, data)
                elif channel == self._control:
                    self._on_control(data)
            elif kind == "pong":
                data = message["data"]
                while pings:
                    if pings.popleft()[0] == data:
                        break
            elif kind == "subscribe":
                if channel == self._control:
                    if control_confirmed:
                        raise _Dead("an unexpected resubscription (a silent reconnect)")
                    control_confirmed = True
                    continue
                expect = self._expect.get(channel)
                if not expect:
                    raise _Dead("an unexpected resubscription (a silent reconnect)")
                st = expect.popleft()
                if st is None:
                    raise _Dead("confirmations out of order")
                if self._streams.get(st.name) is st:
                    self._confirmed[st] = gen
                    self._wake()
                awaiting.discard(channel)
            elif kind == "unsubscribe":
                expect = self._expect.get(channel)
                if channel != self._control and expect and expect[0] is None:
                    expect.popleft()
            if not resynced and control_confirmed and not awaiting:
                await self._resync()
                resynced = True
                self._healthy = True
                self._first_try.set()
                if gen > 1:
                    log.info("redis backplane: subscriber reconnected, %d stream(s) "
                             "resynced", len(streams))

    async def _on_message(self, st: _Stream, data: str) -> None:
        offset, epoch, exclude, key, payload = data.split("\n", 4)
        item = (int(offset), epoch, exclude, key, payload)
        if not st.ready or st.busy:
            st.stash.append(item)
            return
        st.busy = True
        try:
            await self._process(st, item)
        finally:
            st.busy = False

    async def _resync(self) -> None:
        """After a (re)connection: catch every open stream up from history."""
        for st in list(self._streams.values()):
            if not st.ready or st.busy or self._streams.get(st.name) is not st:
                continue  # an open in progress does its own
            st.busy = True
            try:
                await self._catch_up(st)
                await self._drain(st)
            finally:
                st.busy = False
        if self._events is not None:
            self._events.resynced()

    async def _touch(self) -> None:
        """Keep the meta of the open streams (their epoch) alive."""
        assert self._client is not None
        streams = list(self._streams)
        if not streams:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.expire(self._keys(stream)[1], self._meta_ttl)
            await pipe.execute()


def _items(entries: Sequence[Any], first: int, epoch: str) -> list[_Item] | None:
    """The stream entries as items, if they are consecutive from `first`."""
    items = []
    for index, (entry_id, fields) in enumerate(entries):
        offset = first + index
        if entry_id != f"{offset}-0":
            return None
        f = dict(zip(fields[::2], fields[1::2], strict=True))
        items.append((offset, epoch, f.get("x", ""), f.get("k", ""), f["p"]))
    return items


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
