"""Connection runtime under trio's virtual clock: heartbeats, timeouts and slow handlers
take hours of virtual time and milliseconds of real time. No sleeps, no sockets."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from support import MemoryTransport, Peer, running, serve_transport
from wsroom import (
    CloseCode,
    Connection,
    Handshake,
    Hub,
    HubConfig,
    Identity,
    MessageContext,
    Policy,
    RoomConfig,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


async def test_silent_peer_is_evicted_within_interval_plus_timeout() -> None:
    config = HubConfig(ping_interval=30, pong_timeout=10)
    hub = Hub(config)
    async with running(hub, answer_pings=False) as (peer, _):
        start = anyio.current_time()
        await peer.wait_closed(1000)
    assert peer.close_code == CloseCode.NO_PONG
    assert peer.closed_at is not None
    elapsed = peer.closed_at - start
    assert 40 <= elapsed <= 41
    assert hub.stats().closes == {"no_pong": 1}
    assert hub.stats().connections == 0


async def test_live_peer_survives_an_hour_of_heartbeats() -> None:
    hub = Hub(HubConfig(ping_interval=30, pong_timeout=10))
    async with running(hub) as (peer, _tg):
        await anyio.sleep(3600)
        assert peer.close_code is None
        assert peer.pings >= 119
        assert len(hub.connections()) == 1


async def test_handshake_timeout_closes_with_3502() -> None:
    hub = Hub(HubConfig(handshake_timeout=10))
    async with running(hub, hello=False) as (peer, _):
        start = anyio.current_time()
        await peer.wait_closed(100)
    assert peer.close_code == CloseCode.HANDSHAKE_TIMEOUT
    assert peer.closed_at is not None
    assert peer.closed_at - start == pytest.approx(10, abs=0.01)
    assert hub.stats().connections == 0


async def test_idle_timeout_closes_with_3511_but_messages_reset_it() -> None:
    hub = Hub(HubConfig(ping_interval=30, pong_timeout=10, idle_timeout=300))

    @hub.on("poke")
    async def poke(ctx: MessageContext, data: Any) -> None:
        return None

    async with running(hub) as (peer, _):
        start = anyio.current_time()
        for _ in range(5):  # active for 5 x 200 s: never idle
            await anyio.sleep(200)
            await peer.transport.client_send({"type": "msg", "event": "poke"})
        assert peer.close_code is None
        await peer.wait_closed(1000)
        assert peer.close_code == CloseCode.IDLE_TIMEOUT
        assert peer.closed_at is not None
        assert peer.closed_at - start == pytest.approx(1300, abs=1)


async def test_slow_handler_does_not_cause_a_heartbeat_eviction() -> None:
    """A handler that takes 10 minutes, and a client that keeps sending while it runs
    (so the inbox fills and the reader waits): the connection stays up, every message
    is handled in order, and no pong deadline fires."""
    config = HubConfig(ping_interval=30, pong_timeout=10, inbox_size=4)
    hub = Hub(config)
    handled: list[int] = []

    @hub.on("slow")
    async def slow(ctx: MessageContext, data: int) -> int:
        await anyio.sleep(600)
        handled.append(data)
        return data

    async with running(hub) as (peer, _tg):
        for number in range(10):
            await peer.transport.client_send(
                {"type": "msg", "event": "slow", "data": number, "ref": number})
        with anyio.fail_after(10 * 600 + 100):
            while len(handled) < 10:
                await anyio.sleep(5)
        await anyio.sleep(1)
        assert peer.close_code is None
        assert handled == list(range(10))
        replies = [f["data"] for f in peer.frames if f["type"] == "reply"]
        assert replies == list(range(10))
        assert hub.stats().closes == {}


async def test_peer_close_releases_everything_once() -> None:
    hub = Hub()
    closed: list[str] = []

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("a")
        await conn.join("b")

    @hub.on_disconnect
    async def left(conn: Connection) -> None:
        closed.append(conn.id)

    async with running(hub) as (peer, _):
        with anyio.fail_after(5):
            while not peer.frames:
                await anyio.sleep(0.01)
        assert sorted(hub.rooms()) == ["a", "b"]
        await peer.transport.client_disconnect(1000)
        with anyio.fail_after(5):
            while hub.stats().connections:
                await anyio.sleep(0.01)
    stats = hub.stats()
    assert (stats.connections, stats.rooms, stats.members) == (0, 0, 0)
    assert stats.closes == {"client_closed": 1}
    assert len(closed) == 1


async def test_welcome_comes_first_and_reports_join_positions() -> None:
    """Messages published while on_connect runs are queued behind the welcome, whose
    stream offsets say where the client's view starts."""
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")
        await hub.publish("room", "early", 1)
        await anyio.sleep(5)
        await hub.publish("room", "early", 2)

    async with running(hub) as (peer, _tg):
        with anyio.fail_after(20):
            while len(frames := [f for f in peer.frames if f["type"] != "presence"]) < 3:
                await anyio.sleep(0.1)
        welcome, first, second = frames[:3]
        assert welcome["type"] == "welcome"
        assert welcome["streams"]["room"]["offset"] == 0
        assert [first["offset"], second["offset"]] == [1, 2]


async def test_shutdown_flushes_then_closes_with_1012() -> None:
    hub = Hub(HubConfig(shutdown_timeout=10))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")

    transport = MemoryTransport()
    peer = Peer(transport)
    async with anyio.create_task_group() as tg:
        async with hub.run():
            tg.start_soon(serve_transport, hub, transport)
            tg.start_soon(peer.pump)
            await transport.client_send({"type": "hello", "v": 1})
            with anyio.fail_after(5):
                while not peer.frames:
                    await anyio.sleep(0.01)
            for number in range(100):
                await hub.publish("room", "n", number)
        # hub.run() exited: the drain happened inside
        assert peer.close_code == CloseCode.SERVICE_RESTART
        assert [f["data"] for f in peer.frames if f["type"] == "msg"] == list(range(100))
        assert hub.stats().connections == 0
    transport.close_streams()


class StallingTransport(MemoryTransport):
    """After `stall` is set, send() and close() block forever: a peer whose TCP window
    is full (it stopped reading, or vanished without FIN/RST with data in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.stall = anyio.Event()

    async def send(self, text: str) -> None:
        if self.stall.is_set():
            await anyio.sleep_forever()
        await super().send(text)

    async def close(self, code: int, reason: str = "") -> None:
        if self.stall.is_set():
            await anyio.sleep_forever()
        await super().close(code, reason)


class SlowLinkTransport(MemoryTransport):
    """A live client on a slow link: each frame takes len/bandwidth seconds to send."""

    bandwidth = 50_000  # bytes/s

    async def send(self, text: str) -> None:
        await anyio.sleep(len(text) / self.bandwidth)
        await super().send(text)


async def test_a_flushing_close_to_a_stalled_peer_ends_within_close_timeout() -> None:
    """Closes that flush (app close, Reject, error budget, idle, shutdown) stop
    waiting for a peer that reads nothing after close_timeout: no ghost survives."""
    hub = Hub(HubConfig(ping_interval=30, pong_timeout=10, close_timeout=10))
    conns: list[Connection] = []

    @hub.on_connect
    async def join(conn: Connection) -> None:
        conns.append(conn)
        await conn.join("room")

    transport = StallingTransport()
    async with running(hub, transport=transport) as (peer, _):
        while not peer.frames:
            await anyio.sleep(0.01)
        transport.stall.set()
        await hub.publish("room", "e", 1)  # the writer is now stuck in send()
        await anyio.sleep(1)
        closed_at = anyio.current_time()
        conns[0].close(4000, "game over")
        with anyio.fail_after(60):
            while hub.connections():
                await anyio.sleep(0.5)
        assert anyio.current_time() - closed_at <= 10.5
    assert hub.stats().closes == {"app": 1}


@pytest.mark.parametrize("where", ["authenticate", "on_connect"])
async def test_slow_app_hooks_answer_1013_not_the_terminal_3502(where: str) -> None:
    """The hello arrived at once; the app's hooks are slow (a slow database): the
    client is told to try again later (1013), not 'no hello' (3502, terminal)."""

    async def authenticate(handshake: Handshake) -> Identity | None:
        if where == "authenticate":
            await anyio.sleep(30)
        return Identity(id="p1")

    hub = Hub(HubConfig(handshake_timeout=10, hook_timeout=20), authenticate=authenticate)

    @hub.on_connect
    async def slow(conn: Connection) -> None:
        if where == "on_connect":
            await anyio.sleep(30)

    async with running(hub) as (peer, _):
        start = anyio.current_time()
        await peer.wait_closed(100)
        assert peer.closed_at is not None
        assert peer.closed_at - start == pytest.approx(20, abs=0.6)
    assert peer.close_code == CloseCode.TRY_AGAIN_LATER
    assert peer.frames == []


async def test_a_live_slow_listener_in_a_drop_oldest_room_is_not_evicted() -> None:
    """A listener on a 50 kB/s link, in a drop_oldest room fed at 60 kB/s, answering
    every ping: pings jump the backlog, so it is never mistaken for a ghost."""
    hub = Hub(HubConfig(ping_interval=30, pong_timeout=10,
                        default_room=RoomConfig(policy=Policy.DROP_OLDEST)))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("cursors")

    async with running(hub, transport=SlowLinkTransport()) as (peer, _):
        pad = "c" * 1000
        with anyio.move_on_after(300):
            while peer.close_code is None:
                for _ in range(6):
                    await hub.publish("cursors", "move", pad)
                await anyio.sleep(0.1)
    assert peer.close_code is None, "a live client was evicted as a ghost"
    assert peer.pings >= 9
    assert hub.stats().discarded > 0  # it did fall behind: drop_oldest did its job
