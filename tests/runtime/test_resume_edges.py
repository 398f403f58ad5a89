"""Resume at the edges: regression tests for defects a review of the session/resume
change found (each section says what went wrong before the fix).

D1 a drop while a new session's inbox opens leaked the session; D2 an excluded sender
saw a false gap; D3 leave + rejoin looked like a gap; D4 a lossy room joined after the
welcome was not announced lossy; D5 a room joined during a handshake lost messages; D6
a room left during a handshake crashed the connection; D7 a client that went through
many rooms could never resume. The fixes: the session is set on the connection before
any await; ``stream`` frames (a room joined after the welcome, a message the client was
excluded from) and ``left`` frames move the client's position; the handshake plans
streams until no room is missing; a hello may name any number of streams.
"""

from __future__ import annotations

from typing import Any
from unittest.mock import ANY

import anyio
import pytest

from support import MemoryTransport, Peer, hub_app, running, serve, serve_transport, wait_for
from wsroom import (
    Connection,
    Hub,
    HubConfig,
    MessageContext,
    Policy,
    RoomConfig,
)
from wsroom._backplane import MemoryBackplane
from wsroom._core.cursor import Step, StreamCursor
from wsroom._core.history import HistoryLimits
from wsroom.client import Client, Message

pytestmark = pytest.mark.anyio

HELLO = {"type": "hello", "v": 1}
ROOM = "game"


def of_type(peer: Peer, kind: str) -> list[dict[str, Any]]:
    return [f for f in peer.frames if f["type"] == kind]


async def welcomed(peer: Peer) -> None:
    await wait_for(lambda: bool(of_type(peer, "welcome")) or peer.closed.is_set())


# ----------------------------------------------------------------------------------
# D1. A client that drops while its new session's @inbox is being opened leaves the
#     session registered forever, attached to a dead connection (never detached, never
#     expired): _open_session creates the session, then awaits backplane.open; a
#     cancellation there means Connection._session is never set, so _release ->
#     _connection_ended sees no session and forgets nothing.


class SlowInboxBackplane(MemoryBackplane):
    """A backplane whose open() of an inbox takes a moment (a network round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = anyio.Event()

    async def open(self, stream: str, limits: HistoryLimits) -> tuple[str, int]:
        if stream.startswith("@inbox/"):
            self.entered.set()
            await anyio.sleep(0.05)
        return await super().open(stream, limits)


async def test_d1_drop_while_the_inbox_opens_leaks_the_session() -> None:
    backplane = SlowInboxBackplane()
    hub = Hub(HubConfig(resume_window=0.1), backplane=backplane)
    transport = MemoryTransport()
    try:
        async with hub.run(), anyio.create_task_group() as tg:
            tg.start_soon(serve_transport, hub, transport)
            await transport.client_send(HELLO)
            await backplane.entered.wait()
            await transport.client_disconnect(1006)  # lost: the session is resumable
            await wait_for(lambda: hub.stats().connections == 0)
            # Well past the resume window: nothing of this client may remain.
            await anyio.sleep(0.3)
            live_on_dead = [s for s in hub._membership.sessions.all() if s.connection is not None]
            tg.cancel_scope.cancel()
    finally:
        transport.close_streams()
    assert live_on_dead == [], "a session stays attached to a released connection"


async def test_d1b_hello_then_immediate_drop_with_the_default_backplane() -> None:
    """The same leak with the default in-memory backplane: hello and a drop in a row
    (a flaky mobile network); MemoryBackplane.open checkpoints, and the drop cancels
    the handshake there."""
    hub = Hub(HubConfig(resume_window=0.1))
    transports = [MemoryTransport() for _ in range(20)]
    try:
        async with hub.run(), anyio.create_task_group() as tg:
            for transport in transports:
                tg.start_soon(serve_transport, hub, transport)
                await transport.client_send(HELLO)
                await transport.client_disconnect(1006)
            await wait_for(lambda: hub.stats().connections == 0)
            await anyio.sleep(0.3)  # three resume windows
            sessions, streams = hub.stats().sessions, len(hub.backplane)  # type: ignore[arg-type]
            tg.cancel_scope.cancel()
    finally:
        for transport in transports:
            transport.close_streams()
    assert (sessions, streams) == (0, 0), (
        f"{sessions} sessions and {streams} inbox streams leaked by 20 dropped clients")


# ----------------------------------------------------------------------------------
# D2. publish(..., exclude=sender) / ctx.publish(exclude_self=True): the server moves
#     the sender's position past the message silently, but the Python client sees the
#     offset skip in a non-lossy room, takes it for a gap and reconnects; its resume
#     then replays the very message it was excluded from.


async def test_d2_exclude_self_makes_the_python_client_reconnect() -> None:
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join(ROOM)

    @hub.on("say")
    async def say(ctx: MessageContext, data: Any) -> None:
        await ctx.publish(ROOM, "said", data, exclude_self=True)

    async with serve(hub_app(hub)) as url, Client(url + "/ws") as client:
        await client.wait_connected()
        await client.request("say", 1)
        assert await hub.publish(ROOM, "tick", 2) == 2
        got: list[Message] = []
        with anyio.fail_after(10):
            async for item in client.messages():
                assert isinstance(item, Message)
                got.append(item)
                if item.event == "tick":
                    break
        connects = client.connects
    assert (connects, [m.event for m in got]) == (1, ["tick"]), (
        "the excluded message made the client reconnect, and the resume replayed it")


# ----------------------------------------------------------------------------------
# D3. Leaving a room and joining it again while it stays busy: the server continues
#     the stream from its current offset, the Python client still holds its old
#     position: a false gap, a reconnect, and a replay of what was published while the
#     member was *not* in the room.


async def test_d3_leave_and_rejoin_makes_the_python_client_reconnect() -> None:
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join(ROOM)

    @hub.on("leave")
    async def leave(ctx: MessageContext, data: Any) -> None:
        await ctx.connection.leave(ROOM)

    @hub.on("join")
    async def rejoin(ctx: MessageContext, data: Any) -> None:
        await ctx.connection.join(ROOM)

    async with serve(hub_app(hub)) as url, Client(url + "/ws") as other, \
            Client(url + "/ws") as client:
        await other.wait_connected()
        await client.wait_connected()
        assert await hub.publish(ROOM, "before", 1) == 1
        await client.request("leave")
        assert await hub.publish(ROOM, "while_away", 2) == 2  # `other` keeps the room
        await client.request("join")
        assert await hub.publish(ROOM, "back", 3) == 3
        got = []
        with anyio.fail_after(10):
            async for item in client.messages():
                got.append(item.event if isinstance(item, Message) else "snapshot")
                if got[-1] == "back":
                    break
        connects = client.connects
    assert (connects, got) == (1, ["before", "back"]), (
        "leave + join made the client reconnect, and the resume replayed a message "
        "published while it was not a member")


# ----------------------------------------------------------------------------------
# D4. "lossy" is only announced in the welcome: a drop_oldest/coalesce room joined
#     after the welcome is never marked, so the client takes its discards for gaps.


class GatedTransport(MemoryTransport):
    """A transport whose sends wait while `gate` is set to an unset Event."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: anyio.Event | None = None

    async def send(self, text: str) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await super().send(text)


async def test_d4_a_lossy_room_joined_after_the_welcome_is_never_marked_lossy() -> None:
    # Room for the reply, the stream and presence frames, and one tick.
    hub = Hub(HubConfig(max_queue_messages=4),
              room_config=lambda name: RoomConfig(policy=Policy.DROP_OLDEST)
              if name == "fast" else None)

    @hub.on("join")
    async def join(ctx: MessageContext, data: Any) -> None:
        await ctx.connection.join("fast")

    transport = GatedTransport()
    async with running(hub, transport=transport) as (peer, _):
        await welcomed(peer)
        await transport.client_send({"type": "msg", "event": "join", "ref": 1})
        await wait_for(lambda: "fast" in hub.rooms())
        transport.gate = anyio.Event()  # the client stops reading for a moment
        # Far more than the queue holds, whatever the writer took before the gate.
        for n in range(1, 21):
            await hub.publish("fast", "tick", n)
        transport.gate.set()
        await wait_for(lambda: any(m["offset"] == 20 for m in of_type(peer, "msg")))
    offsets = [m["offset"] for m in of_type(peer, "msg") if m["stream"] == "fast"]
    assert offsets != list(range(1, 21)), "precondition: drop_oldest discarded something"
    # What the clients (which judge positions with the one stream cursor) do with
    # these frames:
    cursor = StreamCursor()
    verdicts = []
    for frame in peer.frames:  # in order, as the client reads them
        if frame["type"] == "welcome":
            cursor.welcome(frame["streams"])
        elif frame["type"] == "stream":
            cursor.set(frame["stream"], frame["epoch"], frame["offset"],
                       lossy=bool(frame.get("lossy")))
        elif frame["type"] == "msg":
            step = cursor.advance(frame["stream"], frame["epoch"], frame["offset"])
            verdicts.append(step in (Step.NEW, Step.DUPLICATE))
    assert all(verdicts), (
        f"offsets {offsets} of a drop_oldest room look like a gap to the client: "
        "nothing told it the room is lossy")
    assert [f for f in peer.frames if f["type"] == "stream"] == [
        {"type": "stream", "stream": "fast", "epoch": ANY, "offset": 0, "lossy": True}]


# ----------------------------------------------------------------------------------
# D5. A room joined for a connection while its handshake awaits (snapshot hook,
#     backplane) -- e.g. by app code iterating hub.connections(), where the connection
#     is already `open` -- is not in the welcome, and what was published to it until
#     the welcome is dropped from the buffer: a silent gap.


def blocking_inbox_snapshot() -> tuple[Any, anyio.Event, anyio.Event]:
    in_hook, gate = anyio.Event(), anyio.Event()

    async def snapshot(conn: Connection, stream: str) -> Any:
        if stream == "@inbox":
            in_hook.set()
            await gate.wait()
        return None

    return snapshot, in_hook, gate


async def test_d5_a_room_joined_during_the_handshake_loses_its_first_messages() -> None:
    snapshot, in_hook, gate = blocking_inbox_snapshot()
    hub = Hub(snapshot=snapshot)
    async with running(hub) as (peer, _):
        await in_hook.wait()
        [conn] = hub.connections()
        assert conn.open
        await conn.join("extra")
        assert await hub.publish("extra", "first", 1) == 1
        gate.set()
        await welcomed(peer)
        assert await hub.publish("extra", "second", 2) == 2
        await wait_for(lambda: any(m["data"] == 2 for m in of_type(peer, "msg")))
    welcome = of_type(peer, "welcome")[0]
    got = [(m["stream"], m["offset"]) for m in of_type(peer, "msg")]
    assert "extra" in welcome["streams"] or ("extra", 1) in got, (
        f"message 1 of 'extra' vanished: welcome streams {sorted(welcome['streams'])}, "
        f"msgs {got}")


# ----------------------------------------------------------------------------------
# D6. A room left while a handshake awaits: the room's stream is closed, and
#     _plan_streams asks the backplane for its position: KeyError escapes the
#     connection's task group (and Connection._run), the client gets 1011.


async def test_d6_a_room_left_during_the_handshake_crashes_the_connection() -> None:
    snapshot, in_hook, gate = blocking_inbox_snapshot()
    hub = Hub(snapshot=snapshot)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("solo")

    transport = MemoryTransport()
    peer = Peer(transport)
    errors: list[BaseException] = []

    async def serve_one() -> None:
        try:
            await serve_transport(hub, transport)
        except Exception as exc:  # recorded for the assertion
            errors.append(exc)

    try:
        async with hub.run(), anyio.create_task_group() as tg:
            tg.start_soon(serve_one)
            tg.start_soon(peer.pump)
            await transport.client_send(HELLO)
            await in_hook.wait()
            [conn] = hub.connections()
            await conn.leave("solo")  # e.g. a game master kicks a player mid-handshake
            gate.set()
            await welcomed(peer)
            tg.cancel_scope.cancel()
    finally:
        transport.close_streams()
    assert errors == [], f"an exception escaped Connection._run: {errors!r}"
    assert of_type(peer, "welcome"), f"no welcome; closed with {peer.close_code}"


# ----------------------------------------------------------------------------------
# D7 (before the fix). The Python client never forgot a stream: every room it ever got
#     a message from stayed in `positions` and was sent in every resuming hello; the
#     server accepted at most 256 streams in a hello, so a long-lived client
#     that went through many short-lived rooms is closed 3501 (terminal) on its next
#     reconnect, and stops for good.


async def test_d7_a_client_that_saw_many_rooms_can_never_resume() -> None:
    hub = Hub()

    @hub.on("tour")
    async def tour(ctx: MessageContext, data: Any) -> None:
        for n in range(300):  # e.g. 300 short matches over a long session
            room = f"match-{n}"
            await ctx.connection.join(room)
            await hub.publish(room, "result", n)
            await ctx.connection.leave(room)

    @hub.on("bounce")
    async def bounce(ctx: MessageContext, data: Any) -> None:
        ctx.connection.close(4000)  # an app code that means "reconnect"

    async with serve(hub_app(hub)) as url, Client(url + "/ws") as client:
        await client.wait_connected()
        await client.request("tour")
        with anyio.fail_after(10):
            seen = 0
            async for _ in client.messages():
                seen += 1
                if seen == 300:
                    break
        await client.send("bounce")
        with anyio.fail_after(10):
            while client.connects < 2 and client.closed is None:
                await anyio.sleep(0.01)
        closed = client.closed
    assert closed is None, f"the client stopped for good on a reconnect: {closed!r}"
