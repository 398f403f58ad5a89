"""The abuse suite, Redis rows (issue 15): what workers leave in Redis is bounded in
time, and rosters have no ghosts.

Real uvicorn workers (tests/apps/worker_app.py, one process each) share one
`RedisBackplane` key prefix (unique per test); the tests look at Redis from outside
and assert bounds derived from the configuration, recording ``attack | bound |
measured`` in the table printed at the end of the run (tests/conftest.py).

- Sessions that end cleanly (a goodbye) leave nothing: after thousands of them, the
  keys under the prefix are those of the rooms alive and of the sessions still live,
  and every key has a TTL.
- Every worker killed (SIGKILL, no handover) and kept down longer than the session
  records live: the roster in Redis still names their members (nobody could end
  them), but the first worker that opens the room again drops them, and the roster key
  itself expires on its own if none does.

asyncio only (redis-py). Uses the Redis on 127.0.0.1:6379 ($WSROOM_REDIS_URL); without
it the tests are skipped, except on CI (CI=true), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from support import Player, ServerProcess, spawn
from support.netns import ABUSE
from support.redis import REDIS_URL
from wsroom import HistoryLimits

pytestmark = [pytest.mark.anyio, pytest.mark.e2e,
              pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ROOM = "table"
SECRET = "abuse-redis-secret-0123456789abcdef"
OPEN = {"connect_rate_per_ip": None, "max_connections_per_ip": None}
SESSIONS = int(os.environ.get("WSROOM_ABUSE_REDIS_SESSIONS", "2000"))
"""Sessions opened and ended cleanly in the first row (2,000 as in the issue)."""
META_TTL = 86400  # RedisBackplane's default meta_ttl (worker_app keeps it)
KEEP_MARGIN = 60.0  # a detached record outlives its window by this (redis_state)
REFRESH = 1.0  # the hub's refresh interval


def hold(window: float) -> float:
    """Seconds a shared-state key lives without a refresh (`RedisState.hold_ms`)."""
    return max(window + 3 * REFRESH, window + KEEP_MARGIN)


@asynccontextmanager
async def workers(prefix: str, count: int, config: dict[str, Any]
                  ) -> AsyncIterator[list[ServerProcess]]:
    environ = {"WSROOM_REDIS_URL": REDIS_URL, "WSROOM_REDIS_PREFIX": prefix}
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(
            spawn("worker_app:app", {"resume_secrets": [SECRET], **OPEN, **config},
                  environ=environ)) for _ in range(count)]


def http_url(server: ServerProcess) -> str:
    return server.url.replace("ws://", "http://")


async def stats(http: httpx.AsyncClient, server: ServerProcess) -> dict[str, Any]:
    response = await http.get(http_url(server) + "/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def keys(prefix: str) -> dict[str, int]:
    """Every key under `prefix`, with its TTL in ms (-1: none)."""
    import redis

    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        found = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        return {key: int(await client.pttl(key)) for key in found}
    finally:
        await client.aclose()


async def hkeys(key: str) -> list[str]:
    import redis

    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return sorted(await client.hkeys(key))
    finally:
        await client.aclose()


def kind(prefix: str, key: str) -> str:
    """A key's kind: ``room meta``, ``room history``, ``inbox meta``... or its name."""
    rest = key[len(prefix) + 1:]
    if rest.startswith("{"):
        stream, _, part = rest[1:].rpartition("}:")
        what = "meta" if part == "m" else "history"
        return f"inbox {what}" if stream.startswith("@inbox/") else f"room {what}"
    return rest.split(":", 1)[0]


def ttl_bound(kind_: str, window: float) -> float:
    """The longest TTL (s) a key of this kind may have, from the configuration."""
    if kind_ == "room meta":
        return META_TTL
    if kind_ == "room history":
        return HistoryLimits().max_age
    return hold(window)


async def open_and_end(url: str, name: str) -> None:
    """One session: hello, welcome, goodbye (close 1000: the session ends)."""
    async with Player.connect(url + "/ws", auth={"name": name}) as player:
        assert player.welcome is not None


# ------------------------------------------------------------------ the rows


# 2,000 sessions make the collector run mid-test, and it finds a test client's socket
# left unclosed (by this test or an earlier one: seen only in full runs, never alone;
# a client-side leak under investigation, not the server's). What this test measures
# is Redis keys.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_thousands_of_sessions_that_end_cleanly_leave_no_keys(prefix: str) -> None:
    """2,000 sessions open and end cleanly on two workers while one member stays in
    the room: the keys under the prefix come back to those of the room alive (its
    meta, history and roster), of the one live session (record, member set, inbox
    meta, its worker's set) and the two counters (workers, arrivals). Every key has a
    TTL, at most the room meta's ``meta_ttl``, the history's ``max_age``, or the
    shared state's hold (window + 60 s)."""
    window = 30.0
    rooms, live = 1, 1
    bound = 3 * rooms + 4 * live + 2
    async with (workers(prefix, 2, {"resume_window": window}) as (a, b),
                httpx.AsyncClient(timeout=10) as http,
                Player.connect(a.url + "/ws", auth={"name": "host"}) as host):
        assert host.welcome is not None
        (await http.get(http_url(b) + "/publish?n=1&tag=x")).raise_for_status()
        started = time.monotonic()
        batch = 20
        for first in range(0, SESSIONS, batch):
            async with anyio.create_task_group() as tg:
                for n in range(first, min(first + batch, SESSIONS)):
                    tg.start_soon(open_and_end, (a, b)[n % 2].url, f"m{n}")
        opened = time.monotonic() - started
        found: dict[str, int] = {}
        with anyio.fail_after(30):
            while True:
                found = await keys(prefix)
                if len(found) <= bound:
                    break
                await anyio.sleep(0.2)
        settled = time.monotonic() - started - opened
        counts = [(await stats(http, server))["stats"]["sessions"] for server in (a, b)]
        assert counts == [1, 0]
        no_ttl = sorted(kind(prefix, key) for key, ttl in found.items() if ttl < 0)
        assert no_ttl == [], f"keys without a TTL: {no_ttl}"
        for key, ttl in found.items():
            assert ttl <= ttl_bound(kind(prefix, key), window) * 1000, (key, ttl)
        kinds = sorted(kind(prefix, key) for key in found)
        longest = max((ttl, kind(prefix, key)) for key, ttl in found.items()
                      if kind(prefix, key) != "room meta")
    ABUSE.record(
        f"{SESSIONS:,} sessions end cleanly (goodbye) on 2 Redis workers, 1 member stays",
        f"keys <= 3 x rooms + 4 x live sessions + 2 = {bound}; every key has a TTL "
        f"(room meta <= meta_ttl {META_TTL} s, else <= window + 60 s = {hold(window):g} s)",
        f"{len(found)} keys ({', '.join(kinds)}), none without TTL, longest besides the "
        f"room meta {longest[0] / 1000:.0f} s ({longest[1]}); {opened:.1f} s to run them, "
        f"keys settled {settled:.1f} s after (main: 2,006 keys, inbox metas for 24 h)")


async def test_every_worker_killed_past_the_session_ttl_leaves_no_ghost_online(
        prefix: str) -> None:
    """Five members online on two workers; both workers are SIGKILLed and stay down
    past the session TTL (window + 3 refreshes): the session records expire, the roster
    in Redis still names the five (nobody could end them), with a TTL of at most the
    hold (window + 60 s). A new worker starts, a client joins the room: it sees only
    itself online, and the roster key holds only its entry."""
    window = 1.0
    config = {"resume_window": window}
    session_ttl = window + 3 * REFRESH
    names = [f"m{n}" for n in range(5)]
    async with httpx.AsyncClient(timeout=10) as http:
        async with workers(prefix, 2, config) as (a, b):
            players = AsyncExitStack()
            for n, name in enumerate(names):
                await players.enter_async_context(
                    Player.connect((a, b)[n % 2].url + "/ws", auth={"name": name}))
            with anyio.fail_after(10):
                while len(await hkeys(f"{prefix}:pres:{ROOM}")) < 5 or any(
                        entry["status"] != "online"
                        for entry in (await stats(http, a))["presence"]):
                    await anyio.sleep(0.05)
            a.process.kill()
            b.process.kill()
            killed = time.monotonic()
            await a.process.wait()
            await b.process.wait()
            with contextlib.suppress(Exception):
                await players.aclose()  # their sockets died with the workers
        with anyio.fail_after(session_ttl + 10):
            while any(":sess:" in key for key in await keys(prefix)):
                await anyio.sleep(0.1)
        records_gone = time.monotonic() - killed
        ghosts = await hkeys(f"{prefix}:pres:{ROOM}")
        pres_ttl = (await keys(prefix))[f"{prefix}:pres:{ROOM}"]
        assert len(ghosts) == 5  # what main showed online for ever
        assert 0 <= pres_ttl <= hold(window) * 1000

        async with (workers(prefix, 1, config) as (c,),
                    Player.connect(c.url + "/ws", auth={"name": "carl"}) as carl):
            assert carl.welcome is not None
            with anyio.fail_after(10):
                while True:
                    presence = (await stats(http, c))["presence"]
                    if [entry["id"] for entry in presence] == ["carl"]:
                        break
                    await anyio.sleep(0.05)
            entries = await hkeys(f"{prefix}:pres:{ROOM}")
            assert entries == [carl.welcome["session"]]
            found = await keys(prefix)
            assert all(ttl >= 0 for ttl in found.values()), found
            with contextlib.suppress(Exception):
                await carl.ws.close()
    ABUSE.record(
        "5 members online, every worker SIGKILLed, down past the session TTL, then a "
        "new worker",
        f"records gone <= session TTL (window + 3 s = {session_ttl:g} s) + slack; the "
        f"new worker's first roster load drops the ghosts; pres:<room> TTL <= window + "
        f"60 s = {hold(window):g} s if no worker loads it",
        f"records gone {records_gone:.1f} s after the kill; pres:{ROOM} then held 5 "
        f"ghosts, TTL {pres_ttl / 1000:.1f} s; new worker: roster [carl], pres:{ROOM} = "
        f"1 entry (main: 5 ghosts online for ever, no TTL)")
