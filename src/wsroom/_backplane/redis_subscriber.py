"""The subscriber connection of the `RedisBackplane`: one per worker.

It is subscribed to the worker's control channel and to the channel of every open
stream. It checks the connection with its own PINGs (a half-open socket answers none),
reconnects with a jittered backoff, and after each (re)connection has every open stream
caught up from the Redis history (`Streams.resync`). Opening a stream subscribes its
channel and waits for the confirmation on the connection of the moment before the
stream's position is read, so that nothing published after that position is missed;
if the connection changed meanwhile, the stream catches up.

The confirmations a connection owes are kept per channel in the order the commands
were sent (a subscribe for a stream, None for an unsubscribe): one that arrives without
being owed means the connection was silently replaced, and it is dropped.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from wsroom._backplane.redis_commands import Commands, describe
from wsroom._backplane.redis_state import PRESENCE_TAG
from wsroom._backplane.redis_streams import OpenStream, Streams
from wsroom._core.errors import BackplaneUnavailable
from wsroom._core.history import HistoryLimits

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["Subscriber"]

log = logging.getLogger("wsroom.redis")

_BATCH = 500  # channels per SUBSCRIBE command when resubscribing


class _Dead(Exception):
    """The subscriber connection can no longer be trusted."""


class Subscriber:
    """The subscriber connection, its supervision, and the opening and closing of
    streams (their subscriptions).

    Args:
        sub: the client of the subscriber connection (its own, not pooled).
        streams: the open streams (their messages are handed to it).
        commands: the Redis commands (to keep the open streams' meta alive).
        control: this worker's control channel.
        ping_interval, ping_timeout: see `RedisBackplane`.
        open_timeout: seconds to wait for a subscription's confirmation.
        errors: the exceptions that are Redis or socket errors.
        stats: the backplane's counters (``reconnects`` is counted here).
        on_control: receives a message of the control channel.
        on_presence: receives a roster change published on a stream's channel.
        on_resynced: called after every open stream was caught up on a connection.
    """

    def __init__(self, sub: Redis, streams: Streams, commands: Commands, *, control: str,
                 ping_interval: float, ping_timeout: float, open_timeout: float,
                 errors: tuple[type[Exception], ...], stats: dict[str, int],
                 on_control: Callable[[str], None], on_presence: Callable[[str], None],
                 on_resynced: Callable[[], None]) -> None:
        self._sub = sub
        self._streams = streams
        self._commands = commands
        self._control = control
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._errors = errors
        self.stats = stats
        self._on_control = on_control
        self._on_presence = on_presence
        self._on_resynced = on_resynced
        # The subscriber connection of the moment (generation `_gen`), and per channel
        # the confirmations it still owes, in the order the commands were sent.
        self._ps: PubSub | None = None
        self._gen = 0
        self._expect: dict[str, deque[OpenStream | None]] = {}
        self._confirmed: dict[OpenStream, int] = {}
        self._changed = anyio.Event()  # (made in the running loop: by start)
        self._first_try = anyio.Event()
        self.healthy = False
        """Whether the connection is up and every open stream was resynced on it."""
        self._scope: anyio.CancelScope | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """The subscriber task: runs until `stop`."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self._closed:
                scope.cancel()
            await self._supervise()

    def stop(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        self.healthy = False

    async def first_try(self) -> None:
        """Wait (at most the open timeout) for the first connection attempt's end."""
        with anyio.move_on_after(self._open_timeout):
            await self._first_try.wait()

    # -------------------------------------------------------------------- streams

    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        """Open `stream`: subscribe, then take its position; its ``(epoch, offset)``.

        Raises:
            BackplaneUnavailable: if the subscription was not confirmed in time, or
                another task's open of the stream failed.
            Exception: a Redis or socket error (the caller maps it).
        """
        st = self._streams.get(stream)
        if st is not None:
            if not st.ready:
                await st.opened.wait()
                if not st.ready:
                    raise BackplaneUnavailable(f"Redis: stream {stream!r} could not be "
                                               "opened")
            else:
                await anyio.lowlevel.checkpoint()
            return st.position()
        st = self._streams.add(stream, limits)
        try:
            gen = await self._subscribed(st)
            await self._streams.start(st)
            while gen != self._gen:
                # The subscriber reconnected meanwhile: catch up what it may have missed.
                gen = await self._subscribed(st)
                await self._streams.catch_up(st)
                await self._streams.drain(st)
        except BaseException:
            self._forget(st)
            raise
        finally:
            st.busy = False
            st.opened.set()
        return st.position()

    async def _subscribed(self, st: OpenStream) -> int:
        """Subscribe `st` on the current connection and wait for the confirmation."""
        with anyio.move_on_after(self._open_timeout):
            while True:
                changed = self._changed
                if not self._streams.is_open(st):
                    return self._gen  # closed meanwhile: its position is all that's asked
                if self._confirmed.get(st) == self._gen and self._ps is not None:
                    return self._gen
                await self._send_subscribe(st)
                await changed.wait()
        raise BackplaneUnavailable(f"Redis: subscribing to stream {st.name!r} timed out")

    async def _send_subscribe(self, st: OpenStream) -> None:
        ps = self._ps
        if ps is None or not self._streams.is_open(st):
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
            log.debug("redis backplane: subscribe failed: %s", describe(exc))

    async def close(self, stream: str) -> None:
        """Close `stream`: forget it and unsubscribe its channel."""
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
                log.debug("redis backplane: unsubscribe failed: %s", describe(exc))
        else:
            await anyio.lowlevel.checkpoint()

    def _forget(self, st: OpenStream) -> None:
        self._streams.forget(st)
        self._confirmed.pop(st, None)

    # ------------------------------------------------------------------ the reader

    async def _supervise(self) -> None:
        """Keep one subscriber connection up; never returns (cancelled by stop)."""
        backoff = 0.1
        while True:
            ps: PubSub | None = None
            try:
                ps = self._sub.pubsub()
                await self._read(ps)
            except Exception as exc:  # a connection error, a dead socket, or a bug
                if self.healthy:
                    log.warning("redis backplane: subscriber connection lost (%s); "
                                "reconnecting", describe(exc))
                else:
                    log.warning("redis backplane: cannot connect the subscriber (%s); "
                                "retrying", describe(exc))
                if not isinstance(exc, (_Dead, *self._errors)):
                    log.error("redis backplane: subscriber error", exc_info=exc)
                backoff = 0.1 if self.healthy else backoff
                self.stats["reconnects"] += self.healthy
            finally:
                self.healthy = False
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
        streams = list(self._streams)
        awaiting = {st.channel for st in streams}
        control_confirmed = False
        for st in streams:
            self._expect[st.channel] = deque([st])
        for start in range(0, len(streams), _BATCH):
            await ps.subscribe(*(st.channel for st in streams[start:start + _BATCH]))
        pings: deque[tuple[str, float]] = deque()
        token = 0
        touch_every = min(self._commands.meta_ttl / 4, 600)
        next_ping = anyio.current_time()
        next_touch = next_ping + touch_every
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
                await self._commands.touch(self._streams.names())
                next_touch = now + touch_every
            message = await ps.get_message(timeout=max(0.0, min(0.5, next_ping - now)))
            if message is None:
                if pings and anyio.current_time() - pings[0][1] > self._ping_timeout:
                    raise _Dead(f"no answer to PING for {self._ping_timeout:g}s")
                continue
            kind = message["type"]
            channel = message["channel"]
            if kind == "message":
                data = message["data"]
                st = self._streams.on_channel(channel)
                if st is not None:
                    if data.startswith(PRESENCE_TAG):
                        self._on_presence(data)
                    else:
                        await self._streams.on_message(st, data)
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
                if self._streams.is_open(st):
                    self._confirmed[st] = gen
                    self._wake()
                awaiting.discard(channel)
            elif kind == "unsubscribe":
                expect = self._expect.get(channel)
                if channel != self._control and expect and expect[0] is None:
                    expect.popleft()
            if not resynced and control_confirmed and not awaiting:
                await self._streams.resync()
                self._on_resynced()
                resynced = True
                self.healthy = True
                self._first_try.set()
                if gen > 1:
                    log.info("redis backplane: subscriber reconnected, %d stream(s) "
                             "resynced", len(streams))
