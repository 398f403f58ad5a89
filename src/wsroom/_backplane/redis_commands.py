"""The Redis commands of the `RedisBackplane`: its key names and its three Lua scripts
(publish, sync, since), on the pooled command connection; and the parsing of a stream's
entries.

Every stream lives under ``<prefix>:{<stream>}:s`` (its history, entry IDs are the
offsets) and ``<prefix>:{<stream>}:m`` (epoch, last offset, retained bytes, age limit);
its messages are published on ``<prefix>:c:<stream>`` (see `wsroom._backplane.redis`).
The history expires ``max_age`` after its last message. A room's meta lives
``meta_ttl`` after its last publish or open (and while a worker has it open: `touch`);
an inbox's meta at most `Commands.inbox_ttl_ms` from here, and then as its session's
record (`wsroom._backplane.redis_state`). A TTL is only ever lengthened here.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wsroom._core.history import HistoryLimits
from wsroom._core.sessions import inbox_owner

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Commands", "Item", "describe", "parse_items"]

# KEYS: stream, meta. ARGV: payload, new epoch, max_messages, max_bytes, max_age_ms,
# meta TTL (ms: lengthened to it, never shortened), channel, exclude ('' none), key
# (JSON, '' none), frame size without the epoch and with offset 0 (the stored size is
# that of the frame the clients get).
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
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[6]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
redis.call('PUBLISH', ARGV[7],
           offset .. '\\n' .. epoch .. '\\n' .. ARGV[8] .. '\\n' .. ARGV[9] .. '\\n' .. ARGV[1])
return {epoch, offset}
"""

# Ensure the stream exists (a new epoch if its meta is gone), refresh the meta's TTL
# (never shortened), and return the entries after ARGV[4] if the epoch is still ARGV[3].
# KEYS: stream, meta. ARGV: new epoch, meta TTL (ms), expected epoch ('' none), offset.
_SYNC = """
local e = redis.call('HGET', KEYS[2], 'e')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', e, 's', 0, 'b', 0)
end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
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


Item = tuple[int, str, str, str, str]
"""An entry of a stream or of the channel: offset, epoch, exclude, key, payload."""


class Commands:
    """Key names and scripted commands of the streams (on the command connection)."""

    __slots__ = ("_client", "_prefix", "_publish", "_since", "_sync", "inbox_ttl_ms",
                 "meta_ttl")

    def __init__(self, client: Redis, prefix: str, meta_ttl: int) -> None:
        self._client = client
        self._prefix = prefix
        self.meta_ttl = meta_ttl
        """Seconds a room's meta is kept (refreshed while the room is open)."""
        self.inbox_ttl_ms = 180_000
        """Milliseconds an inbox's meta is kept when it is created or published to: the
        longest a session record lives unrefreshed (`RedisState.hold_ms`, set at each
        refresh). The session's own scripts give its inbox its record's lifetime, and
        delete it when it ends."""
        self._publish = client.register_script(_PUBLISH)
        self._sync = client.register_script(_SYNC)
        self._since = client.register_script(_SINCE)

    def keys(self, stream: str) -> list[str]:
        """The stream's history and meta keys."""
        return [f"{self._prefix}:{{{stream}}}:s", f"{self._prefix}:{{{stream}}}:m"]

    def meta_ttl_ms(self, stream: str) -> int:
        """The TTL a publish or an open gives the stream's meta (at least)."""
        if inbox_owner(stream) is not None:
            return self.inbox_ttl_ms
        return self.meta_ttl * 1000

    def channel(self, stream: str) -> str:
        """The channel the stream's messages are published on."""
        return f"{self._prefix}:c:{stream}"

    async def publish(self, stream: str, payload: str, limits: HistoryLimits,
                      exclude: str, key_json: str, base: int) -> tuple[str, int]:
        """Number, store, trim and publish a message; its ``(epoch, offset)``."""
        max_age_ms = max(1, math.ceil(limits.max_age * 1000))
        result = await self._publish(
            keys=self.keys(stream),
            args=[payload, secrets.token_urlsafe(6), limits.max_messages,
                  limits.max_bytes, max_age_ms, self.meta_ttl_ms(stream),
                  self.channel(stream),
                  exclude, key_json, base])
        return str(result[0]), int(result[1])

    async def sync(self, stream: str, expected: str, offset: int
                   ) -> tuple[str, int, list[Any]]:
        """Ensure the stream exists and refresh its meta: its epoch, its last offset,
        and the entries after `offset` if its epoch is still `expected`."""
        result = await self._sync(
            keys=self.keys(stream),
            args=[secrets.token_urlsafe(6), self.meta_ttl_ms(stream), expected, offset])
        return str(result[0]), int(result[1]), list(result[2])

    async def since(self, stream: str, offset: int) -> Any:
        """Read-only: ``[epoch or None, last offset, entries after offset, Redis's
        time (ms), age limit (ms) or None]``."""
        return await self._since(keys=self.keys(stream), args=[offset])

    async def touch(self, streams: list[str]) -> None:
        """Keep the meta (the epoch) of the rooms among `streams` alive (an inbox lives
        as its session's record: the shared-state scripts keep it)."""
        rooms = [stream for stream in streams if inbox_owner(stream) is None]
        if not rooms:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for stream in rooms:
                pipe.expire(self.keys(stream)[1], self.meta_ttl)
            await pipe.execute()


def parse_items(entries: Sequence[Any], first: int, epoch: str) -> list[Item] | None:
    """The stream entries as items, if they are consecutive from `first`."""
    items = []
    for index, (entry_id, fields) in enumerate(entries):
        offset = first + index
        if entry_id != f"{offset}-0":
            return None
        f = dict(zip(fields[::2], fields[1::2], strict=True))
        items.append((offset, epoch, f.get("x", ""), f.get("k", ""), f["p"]))
    return items


def describe(exc: BaseException) -> str:
    """An exception as ``Type: text`` for the logs."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
