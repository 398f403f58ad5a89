"""Budgets per member and per address in a running hub (issue 15), over in-memory
transports on asyncio and trio: what each budget ends or refuses, what the client sees
(close code, error frame, a new session), and the metric that counts it. The same
attacks against a real server are in tests/abuse/test_abuse_members.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from support import MemoryTransport, serve_transport, wait_for
from wsroom import Connection, Handshake, Hub, HubConfig, Identity, MessageContext

pytestmark = pytest.mark.anyio


async def by_auth(handshake: Handshake) -> Identity | None:
    return Identity(id=str(handshake.auth))


class Clients:
    """Connections to one running hub, each a MemoryTransport."""

    def __init__(self, hub: Hub, tg: anyio.abc.TaskGroup) -> None:
        self.hub = hub
        self.tg = tg
        self.transports: list[MemoryTransport] = []

    async def open(self, auth: str | None = None, address: str = "127.0.0.1",
                   **hello: Any) -> tuple[MemoryTransport, dict[str, Any]]:
        transport = MemoryTransport(client=(address, 40000 + len(self.transports)))
        self.transports.append(transport)
        self.tg.start_soon(serve_transport, self.hub, transport)
        frame: dict[str, Any] = {"type": "hello", "v": 1, **hello}
        if auth is not None:
            frame["auth"] = auth
        await transport.client_send(frame)
        welcome: list[dict[str, Any]] = []

        async def welcomed() -> None:
            while not welcome:
                welcome.extend(f for f in await transport.client_frames()
                               if f["type"] == "welcome")
                await anyio.sleep(0.001)

        with anyio.fail_after(5):
            await welcomed()
        return transport, welcome[0]

    async def lose(self, transport: MemoryTransport) -> None:
        """The client vanishes (1006): its session waits for a resume."""
        connections = self.hub.stats().connections
        await transport.client_disconnect(1006)
        await wait_for(lambda: self.hub.stats().connections == connections - 1)


@asynccontextmanager
async def clients(hub: Hub) -> AsyncIterator[Clients]:
    async with hub.run(), anyio.create_task_group() as tg:
        group = Clients(hub, tg)
        yield group
        tg.cancel_scope.cancel()
    for transport in group.transports:
        transport.close_streams()


async def test_a_members_new_session_ends_its_oldest_detached_then_its_oldest_live() -> None:
    hub = Hub(HubConfig(max_sessions_per_member=2, connect_rate_per_ip=None),
              authenticate=by_auth)
    async with clients(hub) as c:
        a, _ = await c.open("m")
        b, _ = await c.open("m")
        await c.lose(a)
        await c.open("m")  # a (detached) makes room
        assert hub.telemetry.metrics.sessions_ended["member_limit"] == 1
        assert b.close_code is None
        await c.open("m")  # none detached: b (the oldest live) is closed 3503
        await wait_for(lambda: b.close_code is not None)
        assert b.close_code == 3503
        assert hub.telemetry.metrics.sessions_ended["member_limit"] == 2
        other, _ = await c.open("someone else")
        stats = hub.stats()
        assert (stats.sessions, stats.detached_sessions) == (3, 0)
        assert other.close_code is None


async def test_an_address_keeps_at_most_its_quota_of_detached_sessions() -> None:
    hub = Hub(HubConfig(max_detached_per_ip=2, connect_rate_per_ip=None),
              authenticate=by_auth)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    async with clients(hub) as c:
        crowd = [(await c.open(f"bot{i}", "10.0.0.1"))[0] for i in range(3)]
        alone, _ = await c.open("victim", "10.0.0.2")
        await c.lose(alone)
        for transport in crowd:
            await c.lose(transport)
        stats = hub.stats()
        assert stats.detached_sessions == 3  # two of 10.0.0.1, and the victim's
        assert hub.telemetry.metrics.sessions_ended["address_quota"] == 1
        # The oldest of the crowd's address ended; the victim waits for its resume.
        assert {entry.member: entry.status.value for entry in hub.presence("lobby")} == {
            "bot1": "away", "bot2": "away", "victim": "away"}


async def test_a_member_has_one_message_rate_across_its_connections() -> None:
    hub = Hub(HubConfig(rate_limit=None, member_rate_limit=0.001, member_rate_burst=3,
                        connect_rate_per_ip=None), authenticate=by_auth)
    handled: list[Any] = []

    @hub.on("chat")
    async def chat(ctx: MessageContext, data: Any) -> None:
        handled.append(data)

    async with clients(hub) as c:
        first, _ = await c.open("m")
        second, _ = await c.open("m")
        stranger, _ = await c.open("x")
        for n in range(3):
            await first.client_send({"type": "msg", "event": "chat", "data": f"a{n}",
                                     "ref": f"a{n}"})
            await second.client_send({"type": "msg", "event": "chat", "data": f"b{n}",
                                      "ref": f"b{n}"})
        await stranger.client_send({"type": "msg", "event": "chat", "data": "x"})
        await wait_for(lambda: hub.telemetry.metrics.dropped["member_rate_limited"] == 3)
        await wait_for(lambda: len(handled) == 4)
        refused = [f for t in (first, second) for f in await t.client_frames()
                   if f["type"] == "error"]
        assert {f["code"] for f in refused} == {"rate_limited"}
        assert len(refused) == 3
        assert "x" in handled  # another member is not affected


async def test_member_refusals_count_toward_the_connections_patience() -> None:
    hub = Hub(HubConfig(rate_limit=1000.0, rate_burst=1000, rate_patience=5,
                        member_rate_limit=0.001, member_rate_burst=1,
                        connect_rate_per_ip=None), authenticate=by_auth)
    async with clients(hub) as c:
        spammer, _ = await c.open("m")
        for _ in range(10):
            await spammer.client_send({"type": "msg", "event": "nothing", "data": 1})
        await wait_for(lambda: spammer.close_code is not None)
        assert spammer.close_code == 3013


async def test_an_ended_anonymous_session_does_not_lend_its_member_id() -> None:
    hub = Hub(HubConfig(connect_rate_per_ip=None))
    members: list[str] = []

    @hub.on_connect
    async def seen(conn: Connection) -> None:
        assert conn.identity is not None
        members.append(conn.identity.id)

    async with clients(hub) as c:
        first, welcome = await c.open()
        await c.lose(first)
        # Detached: the token resumes the same session and member.
        again, resumed = await c.open(resume=welcome["resume"])
        assert resumed["session"] == welcome["session"]
        assert members[1] == members[0]
        assert await hub.disconnect(members[0], 4001) == 1
        await wait_for(lambda: again.close_code is not None)
        # Ended: the token's session is gone, and so is its identity.
        _, fresh = await c.open(resume=resumed["resume"])
        assert fresh["session"] != welcome["session"]
        assert members[2] != members[0]


async def test_expired_sessions_are_counted() -> None:
    """A session whose resume window passes is counted as ``expired`` (it was removed
    before it was ended, and the count used to be skipped)."""
    hub = Hub(HubConfig(resume_window=0.2, connect_rate_per_ip=None), authenticate=by_auth)
    async with clients(hub) as c:
        transport, _ = await c.open("m")
        await c.lose(transport)
        await wait_for(lambda: hub.stats().sessions == 0)
        assert hub.telemetry.metrics.sessions_ended["expired"] == 1


async def test_a_client_waiting_for_a_slow_handler_is_not_idle() -> None:
    """`idle_timeout` counts from the last message received *or handled*: four
    requests queued behind a handler of 0.4 s each take 1.6 s, longer than the idle
    timeout of 1 s, and every one of them is answered (a red team saw 3511 with 10 of
    12 requests unhandled)."""
    hub = Hub(HubConfig(idle_timeout=1.0, connect_rate_per_ip=None), authenticate=by_auth)

    @hub.on("slow")
    async def slow(ctx: MessageContext, data: Any) -> int:
        await anyio.sleep(0.4)
        return int(data)

    async with clients(hub) as c:
        transport, _ = await c.open("m")
        for n in range(4):
            await transport.client_send({"type": "msg", "event": "slow", "data": n,
                                         "ref": str(n)})
        replies: list[dict[str, Any]] = []

        async def answered() -> None:
            while len(replies) < 4:
                replies.extend(f for f in await transport.client_frames()
                               if f["type"] == "reply")
                await anyio.sleep(0.01)

        with anyio.fail_after(5):
            await answered()
        assert [f["data"] for f in replies] == [0, 1, 2, 3]
        assert transport.close_code is None
        # Then nothing more: idle, closed 3511 about a second after the last reply.
        await wait_for(lambda: transport.close_code is not None, timeout=5)
        assert transport.close_code == 3511
