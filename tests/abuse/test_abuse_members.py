"""The abuse suite, budgets per member and per machine (issue 15): each test replays a
row of the attack table against a real uvicorn server (tests/apps/budget_app.py) and
asserts a bound derived from the configuration, recording ``attack | bound | measured``
in the table printed at the end of the run (tests/conftest.py).

Clients come from many addresses through ``X-Forwarded-For`` from a trusted proxy
(127.0.0.1): admission control and the per-address quotas see them as distinct
machines, as they would behind a real reverse proxy.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from support import Player, ServerProcess, spawn
from support.netns import ABUSE
from wsroom import HubConfig
from wsroom._backplane.memory import SWEEP_INTERVAL
from wsroom.client._websocket import ConnectionClosed

pytestmark = [pytest.mark.anyio, pytest.mark.e2e,
              pytest.mark.parametrize("anyio_backend", ["asyncio"])]

APP = "budget_app:app"
MiB = 1024 * 1024
DEFAULTS = HubConfig()
# Connections in these tests come fast and from few addresses: the per-address
# connection rate is not what they measure.
OPEN = {"connect_rate_per_ip": 10_000.0, "connect_burst_per_ip": 10_000,
        "max_connections_per_ip": 10_000, "trusted_proxies": ["127.0.0.1"]}


@asynccontextmanager
async def server(config: dict[str, Any], *, anonymous: bool = False
                 ) -> AsyncIterator[ServerProcess]:
    environ = {"WSROOM_TEST_ANONYMOUS": "1"} if anonymous else {}
    async with spawn(APP, {**OPEN, **config}, environ=environ) as process:
        yield process


def address(n: int) -> list[tuple[str, str]]:
    """Client `n`'s address: 198.51.100.x for n < 1000 (one IPv4 /24), and beyond,
    an IPv6 /64 of its own inside one /48 (an attacker's cheap supply of addresses)."""
    if n >= 1000:
        return [("X-Forwarded-For", f"2001:db8:7:{n:x}::1")]
    return [("X-Forwarded-For", f"198.51.100.{n % 250 + 1}")]


@asynccontextmanager
async def player(url: str, auth: str | None, n: int = 0, **hello: Any
                 ) -> AsyncIterator[Player]:
    async with Player.connect(url + "/ws", hello=False, headers=address(n)) as p:
        if hello:
            await resume(p, auth, **hello)
        else:
            await p.hello(auth)
        yield p


async def resume(p: Player, auth: str | None, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "hello", "v": 1, **fields}
    if auth is not None:
        frame["auth"] = auth
    await p.ws.send(json.dumps(frame))
    p.welcome = await p.expect("welcome")
    return p.welcome


async def stats(url: str) -> dict[str, Any]:
    async with player(url, "player:observer", 249) as observer:
        result: dict[str, Any] = (await observer.request("stats"))["data"]
    return result


async def sessions_and_drop(url: str, auth: str | None, count: int, *,
                            addresses: int = 1, concurrency: int = 10) -> None:
    """`count` clients say hello and vanish (a TCP drop: their sessions wait for a
    resume), `concurrency` at a time, from `addresses` addresses."""
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            # A live session of the same member may be ended for this one (3503).
            with contextlib.suppress(ConnectionClosed):
                async with player(url, auth, n % addresses) as p:
                    await p.ws.drop()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


# --------------------------------------------------------------- the rows


async def test_one_credential_many_sessions_and_whispers_to_all_of_them() -> None:
    """Row 1: one credential opens 1,000 sessions and drops them; its GM whispers 500
    characters 52 times a second. Before: RSS +878 MiB in 40 s (every whisper kept in
    1,000 inboxes). Now the member holds at most `max_sessions_per_member` sessions, and
    their inboxes share one copy of each whisper."""
    cap = DEFAULTS.max_sessions_per_member
    assert cap is not None
    async with server({}) as process:
        url = process.url
        await sessions_and_drop(url, "player:mallory", 1000, addresses=30)
        before = await stats(url)
        assert before["sessions"] - 1 <= cap  # and the observer asking
        async with player(url, "player:gm", 200) as gm:
            started = time.monotonic()
            reached = set()
            for i in range(520):  # 52 a second for 10 s
                reply = await gm.request("whisper", {"to": "mallory", "text": "w" * 500},
                                         ref=f"w{i}")
                reached.add(reply["data"])
                await anyio.sleep(max(0.0, started + (i + 1) / 52 - time.monotonic()))
        after = await stats(url)
    grown = after["rss"] - before["rss"]
    inbox = DEFAULTS.inbox_history.max_bytes
    bound = cap * inbox + 16 * MiB
    ABUSE.record("one credential, 1,000 sessions dropped; 520 whispers of 500 chars",
                 f"sessions <= {cap}; RSS growth < {cap} x {inbox // MiB} MiB inbox "
                 "+ 16 MiB",
                 f"{after['sessions'] - 1} sessions; each whisper reached {max(reached)}; "
                 f"RSS +{grown / MiB:.1f} MiB; histories {after['history_bytes'] / MiB:.1f}"
                 " MiB (counted per inbox)")
    assert max(reached) <= cap
    assert grown < bound
    assert after["history_bytes"] <= (cap + 1) * inbox + DEFAULTS.default_room.history.max_bytes


@pytest.mark.parametrize("credentials", ["one", "many", "many-networks"])
async def test_a_flood_of_detached_sessions_cannot_evict_a_victims_session(
        credentials: str) -> None:
    """Row 2: a victim drops, then 30 addresses open and drop 1,000 sessions (one
    credential, or a new credential each), past `max_detached_sessions`; or 1,000
    credentials with an address each (IPv6 /64s of one /48: "many-networks"). Before:
    the global "evict the oldest" took the victim's session (a new session, no replay).
    Now the cap evicts from the largest holder (member or address, then network): the
    victim resumes and recovers everything."""
    cap = 200
    async with server({"max_detached_sessions": cap}) as process:
        url = process.url
        async with player(url, "player:victim", 240) as victim:
            welcome = victim.welcome
            assert welcome is not None
            await victim.ws.drop()  # a phone leaving Wi-Fi: the session waits
        async with player(url, "player:gm", 200) as gm:
            for i in range(5):
                await gm.request("chat", f"while away {i}", ref=f"c{i}")
        if credentials == "one":
            await sessions_and_drop(url, "player:mallory", 1000, addresses=30)
        elif credentials == "many":
            await sessions_and_drop_many(url, 1000, addresses=30)
        else:
            await sessions_and_drop_many(url, 1000, addresses=None)
        mid = await stats(url)
        positions = {name: {"epoch": s["epoch"], "offset": s["offset"]}
                     for name, s in welcome["streams"].items()}
        async with player(url, "player:victim", 240, resume=welcome["resume"],
                          streams=positions) as back:
            again = back.welcome
            assert again is not None
            chats = [m for m in await back.collect(5) if m["event"] == "chat"]
    where = {"one": "30 addresses, one credential", "many": "30 addresses, a credential "
             "each", "many-networks": "1,000 IPv6 /64s of one /48, a credential each"}
    ABUSE.record(f"victim drops; 1,000 sessions from {where[credentials]}",
                 f"detached <= max_detached_sessions={cap}; victim resumes, recovered",
                 f"detached {mid['detached_sessions']}; victim same session: "
                 f"{again['session'] == welcome['session']}, recovered: "
                 f"{all(s['recovered'] for s in again['streams'].values())}, "
                 f"{len(chats)}/5 missed chats replayed")
    assert mid["detached_sessions"] <= cap + 1
    assert again["session"] == welcome["session"]
    assert all(s["recovered"] for s in again["streams"].values())
    assert [m["data"] for m in chats] == [f"while away {i}" for i in range(5)]


async def sessions_and_drop_many(url: str, count: int, *, addresses: int | None) -> None:
    """`count` credentials say hello once each and vanish, from `addresses` addresses
    (None: an address each, see `address`)."""
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            where = 1000 + n if addresses is None else n % addresses
            async with player(url, f"player:bot{n}", where) as p:
                await p.ws.drop()

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(worker)


async def lobby_offset(url: str) -> int:
    async with player(url, "player:observer", 249) as observer:
        assert observer.welcome is not None
        return int(observer.welcome["streams"]["lobby"]["offset"])


async def test_one_credential_over_twenty_connections_shares_one_rate() -> None:
    """Row 3: one credential over 20 connections sends chats as fast as it can. Before:
    347 stored chats/s (the limit was per connection). Now `member_rate_limit` holds
    across the member's connections."""
    rate, burst = DEFAULTS.member_rate_limit, DEFAULTS.member_rate_burst
    assert rate is not None
    duration = 3.0
    # Twenty live connections of one member (not ended by max_sessions_per_member).
    async with server({"max_sessions_per_member": 32}) as process:
        url = process.url
        closes = []

        async def flood(n: int) -> None:
            async with player(url, "player:mallory", n) as p:
                async def read() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        while True:
                            await p.frame()

                async def spam() -> None:
                    try:
                        while True:
                            await p.send("chat", "spam")
                            await anyio.sleep(0.001)
                    except ConnectionClosed as closed:  # out of patience: 3013
                        closes.append(closed.code)

                with anyio.move_on_after(duration):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(read)
                        await spam()
                        tg.cancel_scope.cancel()

        # A witness in the lobby throughout (the room and its offsets live on).
        async with player(url, "player:witness", 248) as witness, witness.reading():
            start = await lobby_offset(url)
            began = time.monotonic()
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(flood, n)
            elapsed = time.monotonic() - began
            await anyio.sleep(0.5)
            stored = await lobby_offset(url) - start
    bound = burst + rate * (elapsed + 1.0)
    ABUSE.record("one credential, 20 connections, chat flood for 3 s",
                 f"stored <= member burst {burst} + {rate:g}/s x elapsed",
                 f"{stored} stored in {elapsed:.1f} s ({stored / elapsed:.0f}/s); "
                 f"closes {sorted(set(closes))}")
    assert stored <= bound


async def test_an_idle_room_forgets_its_history_after_max_age() -> None:
    """Row 7: 10,000 messages in a room, then the room stays idle. Before: 7 MB held for
    an hour (`max_age` applied only on append or resume). Now a timer applies it: the
    history is gone within ``max_age + SWEEP_INTERVAL``."""
    max_age = 3.0
    async with server({"room_history": {"max_age": max_age}}) as process:
        url = process.url
        async with player(url, "player:filler", 1) as filler:
            assert (await filler.request("fill", {"room": "idle", "count": 10_000,
                                                  "size": 700}, ref="f"))["data"]
            full = (await filler.request("stats", ref="s"))["data"]["history_bytes"]
            waited = time.monotonic()
            bound = max_age + SWEEP_INTERVAL
            left = full

            async def drained() -> bool:
                nonlocal left
                left = (await filler.request("stats", ref="t"))["data"]["history_bytes"]
                return bool(left < 64 * 1024)  # the lobby's few frames, at most

            while not await drained() and time.monotonic() - waited < bound + 5:
                await anyio.sleep(0.5)
            took = time.monotonic() - waited
    ABUSE.record("10,000 messages in a room, then idle",
                 f"history gone within max_age {max_age:g} s + sweep {SWEEP_INTERVAL:g} s",
                 f"{full / MiB:.1f} MiB -> {left} bytes in {took:.1f} s")
    assert full > 7_000_000
    assert left < 64 * 1024
    assert took <= bound + 1.0


async def test_an_ended_anonymous_sessions_token_does_not_bring_back_its_identity() -> None:
    """Row 8: an anonymous hub; `Hub.disconnect(member)`, then the old resume token.
    Before: a new session with the same member id for the token's 24 h. Now: a new
    session with a new member id."""
    async with server({}, anonymous=True) as process:
        url = process.url
        async with player(url, None, 1) as first:
            me = (await first.request("whoami"))["data"]["member"]
            welcome = first.welcome
            assert welcome is not None
            await first.ws.drop()
        async with player(url, None, 2) as admin:
            ended = (await admin.request("kick", {"member": me}))["data"]
        async with player(url, None, 1, resume=welcome["resume"]) as back:
            again = back.welcome
            assert again is not None
            now = (await back.request("whoami"))["data"]["member"]
    ABUSE.record("anonymous hub: kick a member, then resume with its old token",
                 "a new session and a new member id",
                 f"sessions ended {ended}; new session: {again['session'] != welcome['session']};"
                 f" same member id: {now == me}")
    assert ended == 1
    assert again["session"] != welcome["session"]
    assert now != me


async def test_the_hubs_history_budget_is_paid_by_the_largest_room() -> None:
    """A memory budget per hub: rooms that together hold more than
    `max_history_bytes` forget their oldest messages, the largest room first; a client
    that resumes behind them is told (`recovered: false`), the others recover."""
    budget = 4 * MiB
    async with server({"max_history_bytes": budget}) as process:
        url = process.url
        positions: dict[str, dict[str, Any]] = {}
        resume_tokens = {}
        for n, name in enumerate(("small", "big")):
            async with player(url, f"player:{name}", n) as p:
                await p.request("fill", {"room": name, "count": 100, "size": 1000})
                assert p.welcome is not None
                resume_tokens[name] = p.welcome["resume"]
                # Its position in the room: the first `stream` frame (offset 0), so a
                # resume asks for all of the room's messages.
                first = next(f for f in p.seen if f["type"] == "stream")
                positions[name] = {name: {"epoch": first["epoch"], "offset": first["offset"]}}
                await p.ws.drop()
        async with player(url, "player:filler", 4) as filler:
            # The big room grows past the budget (5,000 x 1 kB = 5 MB).
            await filler.request("fill", {"room": "big", "count": 5000, "size": 1000})
            used = (await filler.request("stats", ref="s"))["data"]["history_bytes"]
            outcome = {}
            for name in ("small", "big"):
                async with player(url, f"player:{name}", 5, resume=resume_tokens[name],
                                  streams=positions[name]) as back:
                    assert back.welcome is not None
                    outcome[name] = back.welcome["streams"][name]["recovered"]
    ABUSE.record("rooms filled past max_history_bytes",
                 f"histories <= {budget // MiB} MiB; the largest room pays; its resumes "
                 "say recovered: false",
                 f"{used / MiB:.2f} MiB held; resume recovered: {outcome}")
    assert used <= budget
    assert outcome == {"small": True, "big": False}
