"""wsroom.client against real servers: a wsroom hub, and scripted fake servers for the
cases a correct server never produces (duplicates, gaps, silence)."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from hypothesis import given
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from support import current_backend, hub_app, serve, wait_for
from wsroom import Connection, Handshake, Hub, HubConfig, Identity, MessageContext
from wsroom.client import (
    Client,
    ClientClosed,
    Message,
    RequestError,
    Snapshot,
    backoff_delay,
)

pytestmark = pytest.mark.anyio

Script = Callable[[Callable[[Any], Awaitable[None]], int], Awaitable[None]]


def scripted_server(script: Script, disconnects: list[int] | None = None
                    ) -> tuple[Callable[..., Awaitable[None]], list[dict]]:
    """A raw ASGI WebSocket app: accepts, reads the hello, then runs `script(send,
    connection_number)`; records every hello it got (and disconnect codes)."""
    hellos: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        message = await receive()
        hellos.append(json.loads(message["text"]))

        async def send_frame(frame: Any) -> None:
            if isinstance(frame, dict) and frame["type"].startswith("websocket."):
                await send(frame)  # a raw ASGI message, e.g. websocket.close
                return
            text = frame if isinstance(frame, str) else json.dumps(frame)
            await send({"type": "websocket.send", "text": text})

        await script(send_frame, len(hellos))
        while (message := await receive())["type"] != "websocket.disconnect":
            pass  # read (and ignore) until the client leaves
        if disconnects is not None:
            disconnects.append(int(message.get("code", 1005)))

    return app, hellos


def welcome(interval: float = 30, timeout: float = 10, **streams: int) -> dict[str, Any]:
    return {"type": "welcome", "v": 1, "session": "s", "resume": None,
            "ping_interval": interval, "pong_timeout": timeout,
            "streams": {name: {"epoch": "e", "offset": offset, "recovered": False}
                        for name, offset in streams.items()}}


def msg(offset: int, stream: str = "room") -> dict[str, Any]:
    return {"type": "msg", "stream": stream, "epoch": "e", "offset": offset, "event": "n",
            "data": offset}


async def take(client: Client, count: int) -> list[Message]:
    got: list[Message] = []
    with anyio.fail_after(10):
        async for message in client.messages():
            got.append(message)
            if len(got) == count:
                break
    return got


@asynccontextmanager
async def wsproto_server(after_hello: Callable[[SocketStream, WSConnection], Awaitable[None]],
                         *, linger: float) -> AsyncIterator[str]:
    """A bare TCP server speaking WebSocket through wsproto, for what a correct server
    never sends in one piece (several frames in one write, a frame a few bytes at a
    time): per connection, it accepts the upgrade, reads the hello, runs
    `after_hello`, then reads until the client leaves (at most `linger` s)."""
    async def serve_once(stream: SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            hello = False
            while not hello:
                ws.receive_data(await stream.receive())
                for event in ws.events():
                    if isinstance(event, Request):
                        await stream.send(ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        hello = True
            await after_hello(stream, ws)
            with anyio.move_on_after(linger), contextlib.suppress(anyio.EndOfStream,
                                                                  anyio.BrokenResourceError):
                while True:
                    await stream.receive()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, \
            anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_once)
        yield f"ws://127.0.0.1:{listener.extra(SocketAttribute.local_port)}/ws"
        tg.cancel_scope.cancel()


async def test_requests_replies_and_room_messages_from_a_hub() -> None:
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    @hub.on("say")
    async def say(ctx: MessageContext, data: str) -> str:
        await ctx.publish("lobby", "said", data)
        return data.upper()

    async with serve(hub_app(hub)) as url, Client(url + "/ws") as client:
        assert await client.request("say", "hi") == "HI"
        with pytest.raises(RequestError) as error:
            await client.request("nope")
        assert error.value.code == "unknown_event"
        [message] = await take(client, 1)
        assert (message.stream, message.offset, message.data) == ("lobby", 1, "hi")
        assert client.positions["lobby"][1] == 1


async def test_duplicates_are_dropped_and_batches_unpacked() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome(room=0))
        await send(msg(1))
        await send("\n".join(json.dumps(m) for m in (msg(2), msg(2), msg(1), msg(3))))

    app, _ = scripted_server(script)
    async with serve(app) as url, Client(url) as client:
        assert [m.offset for m in await take(client, 3)] == [1, 2, 3]


async def test_a_gap_makes_the_client_reconnect_with_its_positions() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome(room=0 if number == 1 else 2))
        if number == 1:
            await send(msg(1))
            await send(msg(2))
            await send(msg(5))  # 3 and 4 are missing
        else:
            await send(msg(3))

    app, hellos = scripted_server(script)
    async with serve(app) as url, Client(url, min_backoff=0.01) as client:
        assert [m.offset for m in await take(client, 3)] == [1, 2, 3]
    assert len(hellos) == 2
    assert hellos[1]["streams"] == {"room": {"epoch": "e", "offset": 2}}


async def test_a_lossy_room_skips_offsets_without_a_reconnect() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        frame = welcome(room=0)
        frame["streams"]["room"]["lossy"] = True  # drop_oldest / coalesce
        await send(frame)
        for offset in (1, 4, 4, 2, 7):
            await send(msg(offset))

    app, hellos = scripted_server(script)
    async with serve(app) as url, Client(url, min_backoff=0.01) as client:
        assert [m.offset for m in await take(client, 3)] == [1, 4, 7]
    assert len(hellos) == 1


async def test_snapshots_presence_and_a_refused_token() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        if number == 2:  # the resume token is refused: the client comes back without
            await send({"type": "websocket.close", "code": 3500})
            return
        frame = welcome(room=5)
        frame["resume"] = f"token-{number}"
        await send(frame)
        await send({"type": "presence", "room": "room", "state": [
            {"id": "ann", "status": "online", "info": {}, "connections": [{}]}]})
        await send({"type": "snapshot", "stream": "room", "epoch": "e", "offset": 5,
                    "data": {"board": number}})
        await send(msg(6))
        await send({"type": "presence", "room": "room", "joins": [
            {"id": "bob", "status": "away", "info": {}, "connections": []}],
            "leaves": ["ann"]})
        if number == 1:
            await send({"type": "websocket.close", "code": 1012})

    app, hellos = scripted_server(script)
    async with serve(app) as url, Client(url, min_backoff=0.01) as client:
        got = await take(client, 4)
        assert client.recovered("room") is False
        assert client.recovered("nowhere") is None
        await wait_for(lambda: "bob" in client.presence.get("room", {}))
        assert set(client.presence["room"]) == {"bob"}
    assert [type(m).__name__ for m in got] == ["Snapshot", "Message", "Snapshot", "Message"]
    assert [m.data for m in got if isinstance(m, Snapshot)] == [{"board": 1}, {"board": 3}]
    assert [h.get("resume") for h in hellos] == [None, "token-1", None]


async def test_a_silent_server_is_left_after_ping_interval_plus_pong_timeout() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome(interval=0.2, timeout=0.2))  # then never a ping

    app, hellos = scripted_server(script)
    async with serve(app) as url, Client(url, min_backoff=0.01) as client:
        await wait_for(lambda: len(hellos) >= 3)
        assert client.connects >= 2


async def test_reconnect_codes_reconnect_and_terminal_codes_stop() -> None:
    hub = Hub(HubConfig(ping_interval=5, pong_timeout=5))

    @hub.on("bye")
    async def bye(ctx: MessageContext, data: int) -> None:
        ctx.connection.close(data)

    async with serve(hub_app(hub)) as url, Client(url + "/ws", min_backoff=0.01) as client:
        await client.wait_connected()
        first = client.session
        with pytest.raises(RequestError) as lost:
            await client.request("bye", 4000)  # reconnect range: no reply, a resume
        assert lost.value.code == "connection_lost"
        await wait_for(lambda: client.connected and client.connects == 2)
        assert client.session == first
        await client.send("bye", 4500)  # terminal
        await wait_for(lambda: client.closed is not None)
        with pytest.raises(ClientClosed) as closed:
            await client.wait_connected()
        assert closed.value.code == 4500
        assert client.connects == 2
        assert [m async for m in client.messages()] == []  # the stream ended


async def test_refused_credentials_are_terminal() -> None:
    attempts: list[Any] = []

    async def authenticate(handshake: Handshake) -> Identity | None:
        attempts.append(handshake.auth)
        return Identity(id="ann") if handshake.auth == "good" else None

    hub = Hub(authenticate=authenticate)
    async with serve(hub_app(hub)) as url:
        async with Client(url + "/ws", auth="bad", min_backoff=0.01) as client:
            with anyio.fail_after(5), pytest.raises(ClientClosed) as closed:
                await client.wait_connected()
            assert closed.value.code == 3500
        async with Client(url + "/ws", auth="good") as client:
            await client.wait_connected()
    assert attempts == ["bad", "good"]


async def test_an_unreachable_server_is_retried_with_backoff() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with Client(f"ws://127.0.0.1:{port}/ws", min_backoff=0.01, max_backoff=0.05) as client:
        with anyio.move_on_after(0.5):
            await client.wait_connected()
        assert not client.connected
        assert client.closed is None  # still trying
        assert 3 <= client.attempts <= 0.5 / 0.01 * 2 + 1  # retried, with backoff delays


@given(attempt=st.integers(0, 100), seed=st.integers(0, 2**32))
def test_backoff_is_full_jitter_between_zero_and_the_capped_ceiling(attempt: int,
                                                                    seed: int) -> None:
    delay = backoff_delay(attempt, base=0.5, cap=20.0, rng=random.Random(seed))
    assert 0.0 <= delay <= min(20.0, 0.5 * 2**attempt)


def test_backoff_spreads_a_reconnect_storm() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(10, rng=rng) for _ in range(1000)]
    assert max(delays) <= 20.0
    assert min(delays) < 1.0 < 19.0 < max(delays)  # spread over the whole range


async def test_leaving_the_context_closes_politely_with_1000() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome())

    codes: list[int] = []
    app, hellos = scripted_server(script, codes)
    async with serve(app) as url:
        async with Client(url) as client:
            await client.wait_connected()
        await wait_for(lambda: len(codes) == 1)
    assert len(hellos) == 1  # and it did not reconnect
    assert client.closed is not None
    assert client.closed.code == 1000  # the server answered our close frame
    if current_backend() == "asyncio":
        # uvicorn passes the client's code to the app (hypercorn always says 1006
        # unless the app closed first).
        assert codes == [1000]


async def test_bad_frames_from_the_server_make_the_client_reconnect() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome(room=0))
        bad = ["not json", "[1, 2]", '{"type": "ping"}', json.dumps(msg(1)) + "\n"]
        if number <= len(bad):
            await send(bad[number - 1])
        else:
            await send(msg(1))

    app, hellos = scripted_server(script)
    async with serve(app) as url, Client(url, min_backoff=0.01) as client:
        # the trailing newline of the 4th is fine: its message counts
        [message] = await take(client, 1)
        assert message.offset == 1
    assert len(hellos) == 4


async def test_a_request_made_while_disconnected_is_sent_on_the_next_connection() -> None:
    ran: list[str] = []
    hub = Hub(HubConfig(ping_interval=5, pong_timeout=5))

    @hub.on("bye")
    async def bye(ctx: MessageContext, data: Any) -> None:
        ctx.connection.close(4000)

    @hub.on("charge")
    async def charge(ctx: MessageContext, data: Any) -> str:
        ran.append("charge")
        return "charged"

    async with serve(hub_app(hub)) as url, Client(url + "/ws", min_backoff=0.3) as client:
        await client.wait_connected()
        await client.send("bye")
        await wait_for(lambda: not client.connected)
        assert await client.request("charge") == "charged"
    assert ran == ["charge"]


async def test_waiters_are_released_when_the_client_exits() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome: list[str] = []
    async with anyio.create_task_group() as tg:
        async with Client(f"ws://127.0.0.1:{port}/ws", min_backoff=0.01) as client:

            async def sender() -> None:
                try:
                    await client.send("x")
                except ClientClosed:
                    outcome.append("closed")

            tg.start_soon(sender)
            await anyio.sleep(0.1)
        with anyio.fail_after(2):
            await wait_for(lambda: outcome == ["closed"])


async def test_an_error_in_the_body_propagates_unwrapped() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome())

    async def use(url: str) -> None:
        async with Client(url) as client:
            await client.wait_connected()
            raise KeyError("mine")

    app, _ = scripted_server(script)
    async with serve(app) as url:
        with pytest.raises(KeyError):
            await use(url)


async def test_a_server_that_welcomes_then_sheds_gets_growing_backoff() -> None:
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome())
        raise RuntimeError("shed")  # the ASGI app fails: the server closes (1011)

    app, hellos = scripted_server(script)
    async with serve(app) as url, Client(url, min_backoff=0.05, max_backoff=5,
                                         rng=random.Random(1)) as client:
        await anyio.sleep(2)
        connects = client.connects
    # Without growth, a 0.05 s backoff would allow ~40 reconnects in 2 s.
    assert 2 <= connects <= 12
    assert len(hellos) == connects


async def test_a_ping_read_together_with_the_close_does_not_crash_the_client() -> None:
    """A stalled link delivers a ping and the server's close frame in one read: the
    pong cannot be sent any more, and the client must end with the close's code (found
    by the fault-injection suite, where it crashed the client's task)."""
    async def after_hello(stream: SocketStream, ws: WSConnection) -> None:
        await stream.send(ws.send(TextMessage(json.dumps(welcome(room=0))))
                          + ws.send(TextMessage(json.dumps({"type": "ping", "id": 1})))
                          + ws.send(CloseConnection(4501, "kicked")))

    async with wsproto_server(after_hello, linger=2) as url, \
            Client(url, min_backoff=0.01) as client:
        await wait_for(lambda: client.closed is not None)
        with pytest.raises(ClientClosed) as closed:
            await client.wait_connected()
        assert closed.value.code == 4501


async def test_a_large_message_arriving_slowly_is_not_silence() -> None:
    """Silence is no bytes at all: a 4 KB message dribbled over ~1.6 s (a slow or lossy
    link) to a client whose silence limit is 0.4 s is received on the same connection.
    Afterwards the server says nothing, and the client leaves it after 0.4 s."""
    hellos: list[float] = []
    dribbled: list[float] = []

    async def after_hello(stream: SocketStream, ws: WSConnection) -> None:
        hellos.append(anyio.current_time())
        await stream.send(ws.send(TextMessage(json.dumps(
            welcome(interval=0.2, timeout=0.2, room=0)))))
        if not dribbled:
            data = ws.send(TextMessage(json.dumps({**msg(1), "data": "x" * 4000})))
            for start in range(0, len(data), 256):
                if start:
                    await anyio.sleep(0.1)
                await stream.send(data[start:start + 256])
            dribbled.append(anyio.current_time())  # the last bytes

    async with wsproto_server(after_hello, linger=5) as url, \
            Client(url, min_backoff=0.01) as client:
        [got] = await take(client, 1)
        assert got.data == "x" * 4000
        assert len(hellos) == 1  # the same connection throughout
        await wait_for(lambda: len(hellos) == 2)  # then silence: left, and back
        assert hellos[1] - dribbled[0] >= 0.4


async def test_a_429_is_retried_no_sooner_than_its_retry_after() -> None:
    """Refused by a per-address rate limit (HTTP 429, Retry-After: 1), the client waits
    at least that long instead of its short backoff."""
    hub = Hub(HubConfig(connect_rate_per_ip=0.5, connect_burst_per_ip=1))
    async with serve(hub_app(hub)) as url:
        async with Client(url + "/ws", min_backoff=0.01, max_backoff=0.02) as first:
            await first.wait_connected()
        async with Client(url + "/ws", min_backoff=0.01, max_backoff=0.02) as second:
            await anyio.sleep(0.5)  # its backoff alone would have retried ~20 times
            assert second.attempts == 1
            with anyio.fail_after(10):
                await second.wait_connected()  # once the bucket has a token again


async def test_tools_observe_frames_and_connection_ends_and_can_drop() -> None:
    """The public hooks for tools: `on_frame` sees every frame before the client acts on
    it, `on_disconnect` every connection's end (before the socket is let go: `extra`
    still answers), `drop()` cuts the connection and the client resumes."""
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    frames: list[tuple[str, int]] = []
    ends: list[tuple[int, str, Any]] = []
    async with serve(hub_app(hub)) as url:
        client = Client(url + "/ws", min_backoff=0.01, max_backoff=0.05)
        client.on_frame = lambda frame: frames.append((frame["type"], client.connects))
        client.on_disconnect = lambda code, reason: ends.append(
            (code, reason, client.extra(SocketAttribute.local_port, None)))
        assert client.extra(SocketAttribute.local_port, "none") == "none"
        with pytest.raises(anyio.TypedAttributeLookupError):
            client.extra(SocketAttribute.local_port)
        async with client:
            await client.wait_connected()
            port = client.extra(SocketAttribute.local_port)
            assert isinstance(port, int)
            assert ("welcome", 0) in frames  # seen before the client counted it
            await client.drop()
            await wait_for(lambda: client.connects == 2)
            assert client.recovered("lobby") is True
        assert ends[0][0] == 1006
        assert ends[0][2] is None  # drop() closed the socket
        assert ends[-1][0] == 1000  # the client's own goodbye
        assert ("welcome", 1) in frames


async def test_on_disconnect_sees_the_socket_the_client_gives_up_on() -> None:
    """A gap (or a silent server): the socket is still open when `on_disconnect` runs."""
    async def script(send: Callable[[Any], Awaitable[None]], number: int) -> None:
        await send(welcome(room=0))
        if number == 1:
            await send(msg(1))
            await send(msg(3))  # 2 is missing

    ends: list[tuple[int, str, Any]] = []
    app, _ = scripted_server(script)
    async with serve(app) as url:
        client = Client(url, min_backoff=0.01)
        client.on_disconnect = lambda code, reason: ends.append(
            (code, reason, client.extra(SocketAttribute.raw_socket, None)))
        async with client:
            await wait_for(lambda: client.connects == 2)
    code, reason, sock = ends[0]
    assert (code, reason) == (1006, "dropped")
    assert sock is not None
    assert sock.fileno() == -1  # closed since, by the client


async def test_pings_during_the_close_never_kill_the_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn pings every 50 ms (``--ws-ping-interval 0.05``) while clients close: a
    ping read after the client's close frame went out cannot be answered (wsproto
    refuses a pong then), and used to kill the client's task with LocalProtocolError
    (1 load test in 3). Each client here keeps its event loop busy across a ping
    interval before it leaves, so that a ping is waiting, unread, when its close frame
    goes out: the race, every time. Every exit must be clean."""
    import time

    from support import spawn
    from wsroom.client import _websocket

    answered = _websocket.WebSocket._answer
    while_closing = 0

    async def counting(self: _websocket.WebSocket, ping: Any) -> None:
        nonlocal while_closing
        if self._ws.state is not _websocket.ConnectionState.OPEN:
            while_closing += 1
        await answered(self, ping)

    monkeypatch.setattr(_websocket.WebSocket, "_answer", counting)
    closes = 20
    async with spawn("wire_app:app", {"ping_interval": 5.0},
                     args=["--ws-ping-interval", "0.05", "--ws-ping-timeout", "5"]
                     ) as server:
        for _ in range(closes):
            async with Client(server.url + "/ws") as client:
                await client.wait_connected()
                time.sleep(0.12)  # busy: pings arrive and wait in the socket buffer
            assert client.closed is not None
            assert client.closed.code == 1000, client.closed
        # Many at once too: the server's answers to their closes compete with its pings.
        async def one() -> None:
            async with Client(server.url + "/ws") as client:
                await client.wait_connected()
                await anyio.sleep(random.uniform(0, 0.1))

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(one)
        assert "Traceback" not in server.log()
    assert while_closing >= 1  # the race did happen
