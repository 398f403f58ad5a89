"""Sessions and presence shared through Redis (the `RedisBackplane`'s shared state).

Keys (``P`` is the backplane's prefix; standalone Redis only: the scripts compute key
names, which Redis Cluster does not allow). Every key has a TTL or is deleted when its
session ends; none outlives what it serves. ``ttl`` is a live record's TTL (the resume
window + 3 refreshes, refreshed every second by its worker), ``keep`` a detached
record's (its window + `KEEP_MARGIN_MS`), ``hold`` the larger of the two:

- ``P:sess:<sid>``, a hash: the session record (``m`` member, ``g`` generation, ``a``
  accepted generations, ``r`` rooms as JSON, ``i`` member info as JSON, ``w`` the worker
  holding it, ``''`` while detached, ``o`` the last worker that held it). It lives
  ``ttl`` after its worker's last refresh while live, ``keep`` after its detach (or
  its worker's death); deleted when the session ends. There is no token key: a resume
  token's generation is checked against this record, and a token whose session is gone
  just gets a new session.
- ``P:{@inbox/<sid>}:s`` and ``:m``, the session's inbox stream (see
  `wsroom._backplane.redis_commands`): ``hold`` from a save, a claim, a creation or a
  message, and while live from its worker's refreshes (each inbox within a quarter of
  ``hold - ttl``: they always outlive the record); ``keep`` from a detach; deleted
  when the session ends. (The history also expires ``max_age`` after its last
  message.)
- ``P:member:<id>``, a set: the member's sessions (for `Hub.send_to` on any worker).
  ``hold`` as the inboxes (never shortened by a save or a detach); a session is
  removed when it ends, and the empty set goes.
- ``P:wsess:<worker>``, a set: the sessions a worker holds live. ``hold`` after the
  worker's last refresh or save; deleted when a worker reaps it.
- ``P:workers``, a sorted set: workers by their last refresh (ms). ``hold`` after the
  last refresh of any worker; a dead worker's entry is removed by the one that reaps it.
- ``P:detached``, a sorted set: detached sessions by the time they end (ms). Its TTL
  is lengthened to ``keep`` at each detach (it outlives every due time in it); entries
  go when their session ends.
- ``P:pres:<room>``, a hash: the room's roster, session id -> ``<arrival>\\n<op JSON>``.
  ``hold`` after its last change, and after each refresh of a worker that has the room
  open; an entry goes when its session leaves the room or ends, or, if the session's
  record is gone (expired while no worker could end it), when a worker reads the roster
  (`roster`: on a room's first load, after a reconnection) or sweeps the rooms it has
  open (every `SWEEP_EVERY` refreshes, in turn). An empty roster is deleted.
- ``P:seq``, a counter: numbers arrivals. ``hold`` after the last arrival or refresh
  (so it outlives every roster).

Roster changes are published on the room's stream channel as ``#p\\n<op JSON>`` (the
stream reader hands them to `handle_presence`); control messages to one worker on its
own channel (``moved\\n<sid>``, ``ended\\n<sid>``).

A worker that has not refreshed for `dead_after` seconds is dead: the first worker to
notice (an atomic ``ZREM``) turns its live sessions into detached ones (their members
show *away*) that end after the resume window unless a client resumes them elsewhere.
Ending a session removes it from every roster it was in (one ``remove`` each), and so
does pruning a session whose record expired (every worker was down longer than the
records live): the ``HDEL`` in a script decides who announces it, so a member leaves
exactly once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic_core import to_json

from wsroom._backplane.base import PresenceOp, SessionRecord, StaleSession

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["PRESENCE_TAG", "RedisState", "parse_control", "parse_op"]

log = logging.getLogger("wsroom.redis")

PRESENCE_TAG = "#p\n"
"""Prefix of a roster change on a room's channel (stream messages start with a digit)."""

# Helpers of every script. `extend` lengthens a key's TTL, never shortens it (a key
# without TTL, e.g. left by an older version, gets one); `inbox` gives a session's
# inbox stream (history and meta) the lifetime of its record; `prune` removes from a
# roster the sessions whose record is gone (expired while no worker could end them),
# each with one published ``remove``: the HDEL makes exactly one caller announce it.
# Spared: an entry written while its session had no record yet (``t``: when), for
# `grace` ms (`UNSAVED_GRACE_MS`): the hub always saves a record before it announces,
# but a caller of the `SharedState` API may announce first (the conformance suite
# does); and the entry of a session that the worker which wrote it still holds live,
# that worker being alive (it refreshed within `dead_after`): a worker that stalled
# longer than its records live keeps its sessions, and saves them again.
_HELPERS = """
local function extend(k, ms)
  local left = redis.call('PTTL', k)
  if left ~= -2 and left < tonumber(ms) then redis.call('PEXPIRE', k, ms) end
end
local function inbox(P, sid, ms)
  local base = P .. ':{@inbox/' .. sid .. '}:'
  redis.call('PEXPIRE', base .. 's', ms)
  redis.call('PEXPIRE', base .. 'm', ms)
end
local function held(P, sid, w, now, dead_after)
  if type(w) ~= 'string' or w == '' then return false end
  local seen = redis.call('ZSCORE', P .. ':workers', w)
  return seen ~= false and tonumber(seen) >= now - dead_after
    and redis.call('SISMEMBER', P .. ':wsess:' .. w, sid) == 1
end
local function prune(P, room, now, grace, dead_after)
  local pk = P .. ':pres:' .. room
  local gone = 0
  for _, sid in ipairs(redis.call('HKEYS', pk)) do
    if redis.call('EXISTS', P .. ':sess:' .. sid) == 0 then
      local old = redis.call('HGET', pk, sid) or ''
      local ok, entry = pcall(cjson.decode, string.match(old, '^%d+\\n(.*)$') or '{}')
      if not ok or type(entry) ~= 'table' then entry = {} end
      local young = type(entry.t) == 'number' and entry.t > now - grace
      if not young and not held(P, sid, entry.w, now, dead_after)
          and redis.call('HDEL', pk, sid) == 1 then
        gone = gone + 1
        local m = type(entry.m) == 'string' and entry.m or ''
        redis.call('PUBLISH', P .. ':c:' .. room, '#p\\n' .. cjson.encode(
          {room = room, k = 'remove', m = m, s = sid, w = ''}))
      end
    end
  end
  return gone
end
local function clock()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
"""

# Saving: not if another worker has taken the session over (`o` names the last holder;
# reaping a dead worker keeps it, so a worker declared dead while it stalled saves again).
_SAVE = _HELPERS + """
local P, sid, me = ARGV[1], ARGV[2], ARGV[3]
local ttl, hold = ARGV[9], ARGV[10]
local k = P .. ':sess:' .. sid
local o = redis.call('HGET', k, 'o')
if o and o ~= '' and o ~= me then return 0 end
redis.call('HSET', k, 'm', ARGV[4], 'g', ARGV[5], 'a', ARGV[6], 'r', ARGV[7],
           'i', ARGV[8], 'w', me, 'o', me)
redis.call('PEXPIRE', k, ttl)
inbox(P, sid, hold)
local wk = P .. ':wsess:' .. me
redis.call('SADD', wk, sid)
redis.call('PEXPIRE', wk, hold)
local mk = P .. ':member:' .. ARGV[4]
redis.call('SADD', mk, sid)
extend(mk, hold)
redis.call('ZREM', P .. ':detached', sid)
return 1
"""

# The claim: the record must exist for this member; the generation presented must be
# one it accepts, or newer than it (the record may lag a welcome by milliseconds; only
# a server mints tokens). The previous holder (live or detached there), if another
# worker, is told.
_CLAIM = _HELPERS + """
local P, sid, member, gen, me, ttl, hold = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]),
  ARGV[5], ARGV[6], ARGV[7]
local k = P .. ':sess:' .. sid
local f = redis.call('HMGET', k, 'm', 'g', 'a', 'r', 'i', 'w', 'o')
if not f[1] or f[1] ~= member then return false end
local ok = gen > tonumber(f[2])
for g in string.gmatch(f[3], '%d+') do
  if tonumber(g) == gen then ok = true end
end
if not ok then return {'stale'} end
redis.call('HSET', k, 'w', me, 'o', me)
redis.call('PEXPIRE', k, ttl)
inbox(P, sid, hold)
extend(P .. ':member:' .. member, hold)
redis.call('ZREM', P .. ':detached', sid)
local wk = P .. ':wsess:' .. me
redis.call('SADD', wk, sid)
redis.call('PEXPIRE', wk, hold)
-- The worker that held it: live there, or detached there and still kept in memory.
local old = f[6]
if not old or old == '' then old = f[7] end
if old and old ~= '' and old ~= me then
  redis.call('SREM', P .. ':wsess:' .. old, sid)
  redis.call('PUBLISH', P .. ':w:' .. old, 'moved\\n' .. sid)
end
return {'ok', f[2], f[3], f[4], f[5]}
"""

_DETACH = _HELPERS + """
local P, sid, me, window, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local t = redis.call('TIME')
local due = t[1] * 1000 + math.floor(t[2] / 1000) + window
local k = P .. ':sess:' .. sid
local f = redis.call('HMGET', k, 'w', 'm')
if f[1] ~= me then return 0 end
redis.call('HSET', k, 'w', '')
redis.call('PEXPIRE', k, keep)
inbox(P, sid, keep)
extend(P .. ':member:' .. f[2], keep)
redis.call('SREM', P .. ':wsess:' .. me, sid)
redis.call('ZADD', P .. ':detached', due, sid)
extend(P .. ':detached', keep)
return 1
"""

# Shared by ending and reaping: remove a session from its rosters, delete its inbox
# stream, and forget it.
_END_BODY = _HELPERS + """
local function finish(P, sid, tell)
  local k = P .. ':sess:' .. sid
  local f = redis.call('HMGET', k, 'm', 'r', 'o', 'w')
  redis.call('ZREM', P .. ':detached', sid)
  redis.call('DEL', P .. ':{@inbox/' .. sid .. '}:s', P .. ':{@inbox/' .. sid .. '}:m')
  if not f[1] then return 0 end
  local ok, rooms = pcall(cjson.decode, f[2])
  if ok then
    for _, room in ipairs(rooms) do
      if redis.call('HDEL', P .. ':pres:' .. room, sid) == 1 then
        redis.call('PUBLISH', P .. ':c:' .. room, '#p\\n' .. cjson.encode(
          {room = room, k = 'remove', m = f[1], s = sid, w = ''}))
      end
    end
  end
  redis.call('DEL', k)
  redis.call('SREM', P .. ':member:' .. f[1], sid)
  if f[4] and f[4] ~= '' then redis.call('SREM', P .. ':wsess:' .. f[4], sid) end
  if tell and f[3] and f[3] ~= '' then
    redis.call('PUBLISH', P .. ':w:' .. f[3], 'ended\\n' .. sid)
  end
  return 1
end
"""

# Ending one's own session: not if another worker has claimed it meanwhile (a resume
# there raced this worker's expiry or goodbye).
_END = _END_BODY + """
local f = redis.call('HMGET', ARGV[1] .. ':sess:' .. ARGV[2], 'w', 'o')
local holder = f[1]
if holder == '' then holder = f[2] end
if holder and holder ~= '' and holder ~= ARGV[3] then return 0 end
return finish(ARGV[1], ARGV[2], false)
"""

# Hub.disconnect of sessions held elsewhere: a live one is ended by its worker (told
# here); a detached one is ended at once.
_DISCONNECT = _END_BODY + """
local P, code, reason, count = ARGV[1], ARGV[2], ARGV[3], 0
for i = 4, #ARGV do
  local sid = ARGV[i]
  local w = redis.call('HGET', P .. ':sess:' .. sid, 'w')
  if w then
    count = count + 1
    if w ~= '' then
      redis.call('PUBLISH', P .. ':w:' .. w,
                 'disconnect\\n' .. sid .. '\\n' .. code .. '\\n' .. reason)
    else
      finish(P, sid, true)
    end
  end
end
return count
"""

# A roster change. The entry of a session without a record (not saved yet) carries
# the time it was written (``t``, spliced into the stored JSON; readers ignore it):
# `prune` spares it for the grace period.
_ANNOUNCE = _HELPERS + """
local P, room, sid, kind, op, hold = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local pk = P .. ':pres:' .. room
local me = cjson.decode(op).w
local o = redis.call('HGET', P .. ':sess:' .. sid, 'o')
if o and o ~= '' and o ~= me then return 0 end  -- the session moved on
local old = redis.call('HGET', pk, sid)
if old and kind ~= 'attach' then
  -- A word from a worker that no longer holds the session (it moved) is stale.
  local ok, entry = pcall(cjson.decode, string.match(old, '^%d+\\n(.*)$') or '{}')
  if ok and entry.w and entry.w ~= '' and entry.w ~= me then return 0 end
end
if kind == 'remove' then
  if redis.call('HDEL', pk, sid) == 0 then return 0 end
else
  local n = old and string.match(old, '^(%d+)')
  if not n then
    n = redis.call('INCR', P .. ':seq')
    redis.call('PEXPIRE', P .. ':seq', hold)
  end
  local stored = op
  if not o then stored = string.sub(op, 1, -2) .. ',"t":' .. clock() .. '}' end
  redis.call('HSET', pk, sid, n .. '\\n' .. stored)
  redis.call('PEXPIRE', pk, hold)
end
redis.call('PUBLISH', P .. ':c:' .. room, '#p\\n' .. op)
return 1
"""

# A room's roster, without the sessions whose record is gone (pruned, see `prune`).
_ROSTER = _HELPERS + """
prune(ARGV[1], ARGV[2], clock(), tonumber(ARGV[3]), tonumber(ARGV[4]))
return redis.call('HGETALL', ARGV[1] .. ':pres:' .. ARGV[2])
"""

# Liveness and reaping, run by every worker on each refresh. Returns {fresh, pruned,
# missing}: fresh is 1 if this worker was not registered (new, or declared dead while
# it stalled): it must re-announce; pruned, how many of the rooms to prune were
# checked; missing, the live sessions given whose record does not exist.
# ARGV: P, me, dead_after, window, ttl, hold, the three lists' lengths, the prune
# grace (ms), the prune budget (roster entries; at least one room is checked), how
# many of the sessions come first for a long refresh, then the three lists: this
# worker's live sessions (their records live `ttl` more; for the first ones, their
# member sets and inboxes `hold` more: see `RedisState.refresh`), the rooms open here
# (their rosters live `hold` more) and the rooms to prune now, in turn.
_REFRESH = _END_BODY + """
local P, me, dead_after, window, ttl, hold = ARGV[1], ARGV[2], tonumber(ARGV[3]),
  tonumber(ARGV[4]), ARGV[5], ARGV[6]
local ns, nr, np = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local nl = tonumber(ARGV[12])
local t = redis.call('TIME')  -- one clock for every worker
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local fresh = redis.call('ZADD', P .. ':workers', now, me)
redis.call('PEXPIRE', P .. ':workers', hold)
redis.call('PEXPIRE', P .. ':wsess:' .. me, hold)
redis.call('PEXPIRE', P .. ':seq', hold)
local first, missing = 13, {}
for i = first, first + ns - 1 do
  local sid = ARGV[i]
  local k = P .. ':sess:' .. sid
  if redis.call('PEXPIRE', k, ttl) == 0 then
    missing[#missing + 1] = sid
  elseif i < first + nl then
    inbox(P, sid, hold)
    local m = redis.call('HGET', k, 'm')
    if m then redis.call('PEXPIRE', P .. ':member:' .. m, hold) end
  end
end
first = first + ns
for i = first, first + nr - 1 do
  redis.call('PEXPIRE', P .. ':pres:' .. ARGV[i], hold)
end
first = first + nr
local keep = window + 60000
for _, w in ipairs(redis.call('ZRANGEBYSCORE', P .. ':workers', '-inf', now - dead_after)) do
  if redis.call('ZREM', P .. ':workers', w) == 1 then
    local held = P .. ':wsess:' .. w
    for _, sid in ipairs(redis.call('SMEMBERS', held)) do
      local k = P .. ':sess:' .. sid
      local f = redis.call('HMGET', k, 'w', 'r', 'm', 'i')
      if f[1] == w then
        redis.call('HSET', k, 'w', '')
        redis.call('PEXPIRE', k, keep)
        inbox(P, sid, keep)
        extend(P .. ':member:' .. f[3], keep)
        redis.call('ZADD', P .. ':detached', now + window, sid)
        extend(P .. ':detached', keep)
        local ok, rooms = pcall(cjson.decode, f[2])
        if ok then
          for _, room in ipairs(rooms) do
            local pk = P .. ':pres:' .. room
            local old = redis.call('HGET', pk, sid)
            if old then
              local n = string.match(old, '^(%d+)')
              local op = cjson.encode({room = room, k = 'detach', m = f[3], s = sid,
                                       i = cjson.decode(f[4] or '{}'), w = ''})
              redis.call('HSET', pk, sid, n .. '\\n' .. op)
              extend(pk, keep)
              redis.call('PUBLISH', P .. ':c:' .. room, '#p\\n' .. op)
            end
          end
        end
      end
    end
    redis.call('DEL', held)
  end
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', P .. ':detached', '-inf', now,
                                'LIMIT', 0, 1000)) do
  finish(P, sid, true)
end
-- Last, once the dead workers are reaped: the sweep of some rosters.
local budget, pruned = tonumber(ARGV[11]), 0
for i = first, first + np - 1 do
  if pruned > 0 and budget <= 0 then break end
  budget = budget - redis.call('HLEN', P .. ':pres:' .. ARGV[i])
  prune(P, ARGV[i], now, tonumber(ARGV[10]), dead_after)
  pruned = pruned + 1
end
return {fresh, pruned, missing}
"""

KEEP_MARGIN_MS = 60_000
"""How long a detached session's record outlives its resume window (so that the worker
that ends it, or reaps it, still finds it)."""

UNSAVED_GRACE_MS = 30_000
"""How long a roster entry written before its session's record is spared by `prune`
(the hub saves first; a direct caller of the API may not)."""

PRUNE_BATCH = 16
"""At most this many rooms open here have their roster checked against the session
records by one sweep..."""

PRUNE_BUDGET = 2_000
"""...and no more rooms once this many roster entries were checked (at least one room
is, however large)."""

SWEEP_EVERY = 5
"""A refresh out of this many sweeps (the first one does)."""


def _json(value: object) -> str:
    """JSON as on the wire (pydantic's encoder: datetimes, UUIDs, enums... like frames)."""
    return to_json(value).decode()


def _op_json(op: PresenceOp) -> str:
    return _json({"room": op.room, "k": op.kind, "m": op.member, "s": op.session,
                  "i": dict(op.info), "c": dict(op.meta), "w": op.worker})


def parse_op(data: str) -> PresenceOp | None:
    """A roster change from its JSON (None if malformed)."""
    try:
        raw = json.loads(data)
        kind = raw["k"]
        if kind not in ("attach", "detach", "remove"):
            return None
        info = raw.get("i") or {}
        meta = raw.get("c") or {}
        return PresenceOp(str(raw["room"]), kind, str(raw["m"]), str(raw["s"]),
                          info if isinstance(info, dict) else {},
                          meta if isinstance(meta, dict) else {}, str(raw.get("w", "")))
    except (ValueError, KeyError, TypeError):
        return None


class RedisState:
    """The shared-state operations of `RedisBackplane` (see the module docstring).

    Args:
        client: the backplane's command client (``decode_responses=True``).
        prefix: the key prefix.
        worker: this worker's id (its control channel is ``P:w:<worker>``).
        now_ms: the wall clock in milliseconds (all workers' clocks are compared).
    """

    def __init__(self, client: Redis, prefix: str, worker: str,
                 now_ms: Callable[[], int]) -> None:
        self._client = client
        self._prefix = prefix
        self.worker = worker
        self._now_ms = now_ms
        self._save = client.register_script(_SAVE)
        self._claim = client.register_script(_CLAIM)
        self._detach = client.register_script(_DETACH)
        self._end = client.register_script(_END)
        self._announce = client.register_script(_ANNOUNCE)
        self._refresh = client.register_script(_REFRESH)
        self._disconnect = client.register_script(_DISCONNECT)
        self._roster = client.register_script(_ROSTER)
        self.window_ms = 120_000
        """The resume window (set by the hub's config through the backplane)."""
        self.ttl_ms = self.window_ms + 3_000
        """A live session's record TTL (the last one the hub gave)."""
        self.dead_after_ms = 3_000
        self._saved: set[str] = set()  # live sessions whose record this worker wrote
        self._sweep = 0  # where the next sweep starts among the rooms open here
        self._refreshes = 0
        self._last_at: int | None = None  # when the last refresh was (now_ms)
        self._cycle = 0  # where the next slice of long-refreshed sessions starts

    @property
    def hold_ms(self) -> int:
        """The longest a key of the shared state lives without a refresh: a live
        record's TTL, or a detached one's (its window and `KEEP_MARGIN_MS`). Rosters,
        the worker sets and the arrival counter live this long after the last refresh
        or change; every session record in them is gone by then."""
        return max(self.ttl_ms, self.window_ms + KEEP_MARGIN_MS)

    def _ttl(self, ttl: float) -> int:
        self.ttl_ms = max(1, int(ttl * 1000))
        return self.ttl_ms

    async def save_session(self, record: SessionRecord, ttl: float) -> bool:
        ttl_ms = self._ttl(ttl)
        saved = bool(await self._save(args=[
            self._prefix, record.id, self.worker, record.member, record.generation,
            ",".join(map(str, record.accepted)), json.dumps(list(record.rooms)),
            _json(record.info), ttl_ms, self.hold_ms]))
        if saved:
            self._saved.add(record.id)
        return saved

    async def claim_session(self, session: str, member: str, generation: int, ttl: float
                            ) -> SessionRecord | None:
        ttl_ms = self._ttl(ttl)
        result = await self._claim(args=[self._prefix, session, member, generation,
                                         self.worker, ttl_ms, self.hold_ms])
        if not result:
            return None
        if result[0] == "stale":
            raise StaleSession(session)
        self._saved.add(session)
        _, g, accepted, rooms, info = result
        try:
            room_list = tuple(str(room) for room in json.loads(rooms or "[]"))
            info_map = json.loads(info or "{}")
        except ValueError:
            room_list, info_map = (), {}
        return SessionRecord(session, member, int(g),
                             tuple(int(a) for a in str(accepted).split(",") if a),
                             room_list, info_map if isinstance(info_map, dict) else {})

    async def detach_session(self, session: str, window: float) -> None:
        self._saved.discard(session)
        await self._detach(args=[self._prefix, session, self.worker, int(window * 1000),
                                 int(window * 1000) + KEEP_MARGIN_MS])

    async def end_session(self, session: str) -> None:
        self._saved.discard(session)
        await self._end(args=[self._prefix, session, self.worker])

    async def announce(self, op: PresenceOp) -> None:
        await self._announce(args=[self._prefix, op.room, op.session, op.kind,
                                   _op_json(op), self.hold_ms])

    async def roster(self, room: str) -> list[PresenceOp]:
        """The room's roster, after removing the sessions whose record is gone."""
        flat = await self._roster(args=[self._prefix, room, UNSAVED_GRACE_MS,
                                        self.dead_after_ms])
        ordered: list[tuple[int, PresenceOp]] = []
        for value in flat[1::2]:
            number, _, data = str(value).partition("\n")
            op = parse_op(data)
            if op is not None and number.isdigit():
                ordered.append((int(number), op))
        ordered.sort(key=lambda pair: pair[0])
        return [op for _, op in ordered]

    async def session_owners(self, sessions: list[str]) -> dict[str, str | None]:
        async with self._client.pipeline(transaction=False) as pipe:
            for sid in sessions:
                pipe.hget(f"{self._prefix}:sess:{sid}", "w")
            owners = await pipe.execute() if sessions else []
        return {sid: None if owner is None else str(owner)
                for sid, owner in zip(sessions, owners, strict=True)}

    async def disconnect_sessions(self, sessions: list[str], code: int, reason: str
                                  ) -> int:
        if not sessions:
            return 0
        return int(await self._disconnect(args=[self._prefix, code, reason, *sessions]))

    async def member_sessions(self, member: str) -> list[str]:
        found = await self._client.smembers(f"{self._prefix}:member:{member}")
        return sorted(str(sid) for sid in found)

    async def refresh(self, sessions: list[str], ttl: float, rooms: list[str]) -> bool:
        """Liveness, TTLs and reaping; True if this worker must announce what it holds
        again: it was not registered, or records it wrote for live sessions are gone.
        `rooms`: the rooms open here, whose rosters live on; every `SWEEP_EVERY`
        refreshes, some of them (in turn: `PRUNE_BATCH`, `PRUNE_BUDGET`) are checked
        against the session records."""
        ttl_ms = self._ttl(ttl)
        prune: list[str] = []
        start = 0
        if rooms and self._refreshes % SWEEP_EVERY == 0:
            start = self._sweep % len(rooms)
            prune = (rooms[start:] + rooms[:start])[:PRUNE_BATCH]
        self._refreshes += 1
        # The inboxes and member sets of live sessions get `hold` (more than their
        # records' `ttl`), each within a quarter of the difference: a slice of the
        # sessions per refresh, in turn, so that no refresh does them all (fewer
        # commands, no spike), and they never live shorter than the records.
        hold_ms, now = self.hold_ms, self._now_ms()
        interval = max(1, now - self._last_at) if self._last_at is not None else 1000
        self._last_at = now
        rounds = max(1, ((hold_ms - ttl_ms) // 4) // interval)
        chunk = -(-len(sessions) // rounds)  # ceil
        at = self._cycle % len(sessions) if sessions else 0
        ordered = sessions[at:] + sessions[:at]
        self._cycle = at + chunk
        fresh, pruned, missing = await self._refresh(args=[
            self._prefix, self.worker, self.dead_after_ms, self.window_ms, ttl_ms,
            hold_ms, len(sessions), len(rooms), len(prune), UNSAVED_GRACE_MS,
            PRUNE_BUDGET, chunk, *ordered, *rooms, *prune])
        if prune:
            self._sweep = start + int(pruned)
        # A record this worker wrote for a session it still holds live is gone: it
        # expired while the worker stalled, or Redis lost its data. Announcing
        # everything again saves it again (and its roster entries).
        live = set(sessions)
        lost = sum(1 for sid in missing if sid in self._saved)
        self._saved &= live
        if lost:
            log.warning("redis backplane: the records of %d live session(s) were lost; "
                        "saving and announcing them again", lost)
        return bool(fresh) or lost > 0


def parse_control(data: str) -> tuple[str, str, int, str] | None:
    """``(verb, session id, code, reason)`` of a control message (code and reason:
    ``disconnect`` only); None if malformed."""
    verb, _, rest = data.partition("\n")
    if verb in ("moved", "ended") and rest:
        return verb, rest, 0, ""
    if verb == "disconnect":
        session, _, rest = rest.partition("\n")
        code, _, reason = rest.partition("\n")
        if session and code.isdigit():
            return verb, session, int(code), reason
    return None

