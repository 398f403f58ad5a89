"""The hub's flusher: eager sends, hand-over of a send that must wait, and what an
idle connection costs in tasks."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
import pytest

from support import MemoryTransport, Player, hub_app, running, serve, server_peer, wait_for
from wsroom import CloseCode, Connection, Hub, HubConfig
from wsroom._core.protocol import parse_client_frame
from wsroom._core.state import CloseReason
from wsroom._runtime.flush import start_eagerly
from wsroom._runtime.serve import _to_dispatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the flusher is asyncio-only (trio's traps belong to a task)


async def test_a_send_that_does_not_wait_completes_in_the_caller() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    assert start_eagerly(send("a")) is None
    assert sent == ["a"]


async def test_a_send_that_waits_is_finished_by_whoever_awaits_it() -> None:
    writable = asyncio.Event()
    sent: list[str] = []

    async def send(text: str) -> str:
        await writable.wait()
        sent.append(text)
        return text

    pending = start_eagerly(send("b"))  # type: ignore[arg-type]
    assert pending is not None
    assert sent == []

    async def writer() -> None:
        await pending

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)  # another task resumes it
        await anyio.sleep(0.01)
        assert sent == []
        writable.set()
    assert sent == ["b"]


async def test_cancelling_the_awaiting_task_cancels_the_started_send() -> None:
    cleaned: list[str] = []

    async def send() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally")

    pending = start_eagerly(send())
    assert pending is not None
    with anyio.move_on_after(0.05):
        await pending
    assert cleaned == ["finally"]


async def test_an_idle_connection_costs_no_task_of_its_own() -> None:
    """With the flusher, the timers and a lazy dispatcher, a welcomed connection that
    only listens runs in its ASGI task alone (uvicorn's) and still gets everything,
    batched under load."""
    hub = Hub(HubConfig(connect_rate_per_ip=None))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    async with serve(hub_app(hub)) as url:
        baseline = len(asyncio.all_tasks())
        async with contextlib.AsyncExitStack() as stack:
            players = [await stack.enter_async_context(Player.connect(url + "/ws"))
                       for _ in range(20)]
            await wait_for(lambda: len(hub.members("lobby")) == 20)
            await anyio.sleep(0.1)  # writers started for the welcomes have ended
            names = [task.get_name() for task in asyncio.all_tasks()]
            per_connection = (len(names) - baseline) / 20
            assert not [n for n in names if n.startswith("wsroom ") and (
                "writer" in n or "dispatcher" in n or "reader" in n)], names
            # uvicorn's task for the connection (running our reader) and the test's
            # own client task per player.
            assert per_connection <= 2, names
            for n in range(200):
                await hub.publish("lobby", "m", {"n": n})
            for player in players:
                await player.collect(200)
                assert [m["data"]["n"] for m in player.msgs] == list(range(200))
            stats = hub.stats()
            assert stats.messages_out > stats.frames_out  # frames carried batches
            # A message sent by one of them starts its dispatcher.
            got: list[Any] = []

            @hub.on("ping_me")
            async def ping_me(ctx: Any, data: Any) -> None:
                got.append(data)

            await players[0].send("ping_me", {"x": 1})
            await wait_for(lambda: got == [{"x": 1}])


class _StuckTransport(MemoryTransport):
    """Once `stuck`, a send of a room message never completes (a client that stopped
    reading), and the first such send asks the connection to close without flushing:
    from inside the send, i.e. after the flusher started it and before any writer task
    has run."""

    def __init__(self) -> None:
        super().__init__()
        self.conn: Connection | None = None
        self.stuck = False

    async def send(self, text: str) -> None:
        if self.stuck and '"type":"msg"' in text:
            self.stuck = False
            assert self.conn is not None
            self.conn._backing.request_close(CloseReason.SLOW_CONSUMER)
            await anyio.sleep_forever()
        await super().send(text)


async def test_a_close_that_does_not_flush_abandons_a_send_the_flusher_handed_over() -> None:
    hub = Hub(HubConfig(close_timeout=1))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    transport = _StuckTransport()
    async with running(hub, transport=transport) as (peer, _):
        await wait_for(lambda: any(f["type"] == "welcome" for f in peer.frames))
        (transport.conn,) = hub.connections()
        transport.stuck = True
        await hub.publish("lobby", "m", {"n": 1})
        # The writer started for the close must not wait for the stuck send.
        assert await peer.wait_closed(timeout=5) == CloseCode.SLOW_CONSUMER
    assert hub.stats().closes == {"slow_consumer": 1}


async def test_the_reader_takes_a_stopped_dispatcher_as_the_end() -> None:
    """The dispatcher stops when the connection closes and closes its end of the inbox;
    a reader that was about to hand it a message (it checked the state just before)
    must take that as the end, not crash the connection's task group."""
    hub = Hub()
    async with hub.run(), anyio.create_task_group() as tg:
        transport = MemoryTransport()
        peer = server_peer(hub, transport)
        send, receive = anyio.create_memory_object_stream[Any](1)
        peer.inbox = send
        receive.close()  # what the dispatcher does when it stops
        frame = parse_client_frame('{"type":"msg","event":"work","data":1}')
        await _to_dispatcher(peer, frame, tg)  # type: ignore[arg-type]
        send.close()
        transport.close_streams()
