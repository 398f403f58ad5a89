"""Hub API: publishing, policies, limits, handler outcomes, registration errors.

In-memory transport (no sockets), on asyncio and trio."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any
from unittest.mock import ANY

import anyio
import pytest
from fastapi import FastAPI, WebSocket
from pydantic import BaseModel

from support import (
    MemoryTransport,
    Peer,
    Player,
    hub_app,
    running,
    serve,
    serve_transport,
    wait_for,
)
from wsroom import (
    ClientError,
    CloseCode,
    Connection,
    Handshake,
    Hub,
    HubConfig,
    HubNotRunning,
    Identity,
    MessageContext,
    MessageTooLarge,
    Policy,
    Reject,
    RoomConfig,
)
from wsroom._backplane import Envelope, MemoryBackplane

pytestmark = pytest.mark.anyio


async def welcomed(peer: Peer) -> None:
    await wait_for(lambda: any(f["type"] == "welcome" for f in peer.frames))


async def closed(peer: Peer) -> None:
    await peer.wait_closed()


def of_type(peer: Peer, kind: str) -> list[dict[str, Any]]:
    return [f for f in peer.frames if f["type"] == kind]


async def test_publish_outside_run_raises() -> None:
    hub = Hub()
    with pytest.raises(HubNotRunning, match=r"lifespan=hub\.lifespan"):
        await hub.publish("room", "event", 1)


async def test_a_hub_runs_once() -> None:
    hub = Hub()
    async with hub.run():
        pass
    with pytest.raises(RuntimeError, match="runs only once"):
        async with hub.run():
            pass


async def test_publish_to_an_empty_room_returns_none_and_offsets_count_up() -> None:
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")

    async with running(hub) as (peer, _):
        await welcomed(peer)
        assert await hub.publish("nobody-here", "e", 1) is None
        assert [await hub.publish("room", "e", n) for n in range(3)] == [1, 2, 3]
        await wait_for(lambda: len(of_type(peer, "msg")) == 3)
        assert [f["offset"] for f in of_type(peer, "msg")] == [1, 2, 3]


async def test_a_message_larger_than_any_queue_is_refused_at_publish() -> None:
    hub = Hub(HubConfig(max_queue_bytes=100_000, max_message_bytes=1000))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")

    async with running(hub) as (peer, _):
        await welcomed(peer)
        with pytest.raises(MessageTooLarge, match="max_queue_bytes=100000"):
            await hub.publish("room", "e", "x" * 200_000)
        assert await hub.publish("room", "e", "fits") == 1  # the offset was not burnt


async def test_the_connection_cap_answers_1013() -> None:
    hub = Hub(HubConfig(max_connections=1))
    async with running(hub) as (first, tg):
        await welcomed(first)
        extra = MemoryTransport()
        peer = Peer(extra)
        tg.start_soon(serve_transport, hub, extra)
        await peer.pump()
        assert peer.close_code == CloseCode.TRY_AGAIN_LATER
        assert hub.stats().connections == 1
        extra.close_streams()


async def test_a_connection_before_the_hub_runs_is_closed_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub()
    transport = MemoryTransport()
    peer = Peer(transport)
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_transport, hub, transport)
        await peer.pump()
    transport.close_streams()
    assert peer.close_code == CloseCode.INTERNAL_ERROR
    assert "the hub is not running" in caplog.text


async def test_handler_outcomes_reply_error_and_reject() -> None:
    hub = Hub(HubConfig(error_budget=2))

    class Move(BaseModel):
        to: int

    @hub.on("move")
    async def move(ctx: MessageContext, data: Move) -> dict[str, int]:
        if data.to < 0:
            raise ClientError("not_allowed", "no negative squares")
        return {"at": data.to}

    @hub.on("leave")
    async def leave(ctx: MessageContext, data: Any) -> None:
        raise Reject(4501, "kicked")

    async with running(hub) as (peer, _):
        await welcomed(peer)
        send = peer.transport.client_send
        await send({"type": "msg", "event": "move", "data": {"to": 3}, "ref": 1})
        # ClientError does not count against the budget of 2: three in a row are fine.
        for ref in (2, 3, 4):
            await send({"type": "msg", "event": "move", "data": {"to": -1}, "ref": ref})
        await send({"type": "msg", "event": "leave"})
        await closed(peer)
    assert of_type(peer, "reply") == [{"type": "reply", "ref": 1, "data": {"at": 3}}]
    assert [(e["ref"], e["code"]) for e in of_type(peer, "error")] == [
        (2, "not_allowed"), (3, "not_allowed"), (4, "not_allowed")]
    assert peer.close_code == 4501


async def test_personal_messages_use_the_inbox_stream_and_close_flushes() -> None:
    hub = Hub()

    @hub.on_connect
    async def greet(conn: Connection) -> None:
        await conn.send("hello", 1)

    @hub.on("kick-me")
    async def kick(ctx: MessageContext, data: Any) -> None:
        await ctx.connection.send("bye", 2)
        ctx.connection.close(4500, "kicked")
        # Kept in the session's inbox until the session ends; never sent on a
        # closing connection.
        assert await ctx.connection.send("too late", 3) == 3

    async with running(hub) as (peer, _):
        await welcomed(peer)
        welcome = of_type(peer, "welcome")[0]
        assert welcome["streams"]["@inbox"] == {"epoch": ANY, "offset": 0,
                                                "recovered": False}
        await peer.transport.client_send({"type": "msg", "event": "kick-me"})
        await closed(peer)
    msgs = of_type(peer, "msg")
    assert [(m["stream"], m["offset"], m["event"]) for m in msgs] == [
        ("@inbox", 1, "hello"), ("@inbox", 2, "bye")]
    assert peer.close_code == 4500


async def test_close_rejects_codes_that_may_not_be_sent() -> None:
    hub = Hub()
    errors: list[Exception] = []

    @hub.on_connect
    async def bad_close(conn: Connection) -> None:
        for code, reason in ((1006, ""), (5000, ""), (4000, "x" * 124)):
            try:
                conn.close(code, reason)
            except ValueError as exc:
                errors.append(exc)

    async with running(hub) as (peer, _):
        await welcomed(peer)
    assert len(errors) == 3


def push(conn: Connection, frame: str, size: int, policy: Policy,
         key: Hashable | None = None) -> None:
    """Queue a frame on `conn` as a broadcast would (unnumbered: a test frame)."""
    conn._backing.sender.enqueue(Envelope("test", "e", 0, frame, size, key), policy)


async def test_drop_oldest_and_coalesce_discard_only_their_own_frames() -> None:
    hub = Hub(HubConfig(max_queue_messages=10),
              room_config=lambda name: RoomConfig(policy=Policy(name.split(":")[0])))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("drop_oldest:cursors")
        await conn.join("coalesce:scores")

    async with running(hub) as (peer, _):
        await welcomed(peer)
        # The welcome tells the client that these rooms may skip offsets on purpose.
        streams = of_type(peer, "welcome")[0]["streams"]
        assert streams["drop_oldest:cursors"]["lossy"] is True
        assert streams["coalesce:scores"]["lossy"] is True
        assert "lossy" not in streams["@inbox"]
        # Publish without letting the writer run (no await between the calls' fan-out
        # and the next push): exactly what a member that does not read experiences.
        conn = hub.members("drop_oldest:cursors")[0]
        for n in range(20):
            push(conn, f'{{"type":"t","c":{n}}}', 20, Policy.DROP_OLDEST)
        assert len(conn._backing.sender.queue) == 10
        assert hub.stats().discarded == 10
        await wait_for(lambda: any(f.get("c") == 19 for f in peer.frames))
        for n in range(30):
            push(conn, f'{{"type":"t","s":{n},"k":{n % 3}}}', 28, Policy.COALESCE,
                 ("coalesce:scores", n % 3))
        assert len(conn._backing.sender.queue) <= 10
        await wait_for(lambda: any(f.get("s") == 29 for f in peer.frames))
    cursors = [f["c"] for f in peer.frames if "c" in f]
    scores = [(f["k"], f["s"]) for f in peer.frames if "s" in f]
    assert cursors == list(range(10, 20))  # the oldest ten were dropped
    # At each compaction only the newest frame per key survives; the last three
    # frames (one per key) always arrive, in order.
    assert scores[-3:] == [(0, 27), (1, 28), (2, 29)]
    assert [s for _, s in scores] == sorted(s for _, s in scores)
    assert hub.stats().discarded == 10 + 30 - len(scores)
    assert "slow_consumer" not in hub.stats().closes


async def test_disconnect_policy_closes_a_full_queue_with_3008() -> None:
    hub = Hub(HubConfig(max_queue_messages=10))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")

    async with running(hub) as (peer, _):
        await welcomed(peer)
        conn = hub.members("room")[0]
        for n in range(11):  # synchronously: the writer gets no chance to drain
            push(conn, f'{{"type":"t","n":{n}}}', 20, Policy.DISCONNECT)
        await closed(peer)
    assert peer.close_code == CloseCode.SLOW_CONSUMER
    assert hub.stats().closes == {"slow_consumer": 1}


async def test_room_names_are_validated() -> None:
    hub = Hub()
    failures: list[str] = []

    @hub.on_connect
    async def join(conn: Connection) -> None:
        for name in ("", "@inbox", "x" * 201):
            try:
                await conn.join(name)
            except ValueError as exc:
                failures.append(str(exc))

    async with running(hub) as (peer, _):
        await welcomed(peer)
    assert len(failures) == 3


def test_handler_registration_errors() -> None:
    hub = Hub()

    @hub.on("a")
    async def a(ctx: MessageContext, data: int) -> None:
        return None

    with pytest.raises(ValueError, match="already has a handler"):
        hub.on("a")(a)
    with pytest.raises(TypeError, match="async function"):
        hub.on("b")(lambda ctx, data: None)  # type: ignore[arg-type,return-value]

    async def one_param(ctx: MessageContext) -> None:
        return None

    with pytest.raises(TypeError, match="two parameters"):
        hub.on("c")(one_param)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 128"):
        hub.on("")(a)


async def test_hook_failures_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()

    @hub.on_disconnect
    async def broken(conn: Connection) -> None:
        raise RuntimeError("hook bug")

    async with running(hub) as (peer, _):
        await welcomed(peer)
        await peer.transport.client_disconnect()
        await wait_for(lambda: hub.stats().connections == 0)
    assert "on_disconnect hook raised" in caplog.text
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.ERROR)


async def test_plain_asgi_endpoint_answers_http_with_426() -> None:
    import httpx

    hub = Hub()
    transport = httpx.ASGITransport(app=hub.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"


async def test_fastapi_route_and_lifespan() -> None:
    hub = Hub()

    @hub.on("echo")
    async def echo(ctx: MessageContext, data: Any) -> Any:
        return data

    app = FastAPI(lifespan=hub.lifespan)
    app.add_api_websocket_route("/ws", hub.endpoint)

    @app.websocket("/custom")  # (WebSocket must be importable from module globals)
    async def custom(websocket: WebSocket) -> None:
        await hub.endpoint(websocket)

    async with serve(app) as url:
        for path in ("/ws", "/custom"):
            async with Player.connect(url + path) as player:
                assert (await player.request("echo", {"a": 1}))["data"] == {"a": 1}


async def test_asgi_app_serves_websockets_too() -> None:
    from starlette.routing import Mount

    hub = Hub()
    app = hub_app(hub)
    app.router.routes.append(Mount("/raw", app=hub.asgi))
    async with serve(app) as url, Player.connect(url + "/raw/") as player:
        assert player.welcome is not None


async def test_asgi_app_alone_runs_its_own_lifespan() -> None:
    hub = Hub()
    async with serve(hub.asgi) as url, Player.connect(url + "/any/path") as player:
        assert player.welcome is not None
        assert hub.running
    assert not hub.running


async def test_a_binary_first_frame_is_a_bad_handshake() -> None:
    hub = Hub()
    async with running(hub, hello=False) as (peer, _):
        await peer.transport.client_send(b"\x00\x01")
        await closed(peer)
    assert peer.close_code == CloseCode.BAD_REQUEST


async def test_a_reply_that_cannot_be_encoded_is_an_error_not_a_crash() -> None:
    hub = Hub()

    @hub.on("weird")
    async def weird(ctx: MessageContext, data: Any) -> object:
        return object()

    @hub.on("fine")
    async def fine(ctx: MessageContext, data: Any) -> str:
        return "ok"

    async with running(hub) as (peer, _):
        await welcomed(peer)
        await peer.transport.client_send({"type": "msg", "event": "weird", "ref": 1})
        await peer.transport.client_send({"type": "msg", "event": "fine", "ref": 2})
        await wait_for(lambda: len(of_type(peer, "reply")) == 1)
    assert of_type(peer, "error") == [{"type": "error", "ref": 1, "code": "internal",
                                       "detail": "internal error"}]
    assert hub.stats().handler_errors == 1


async def test_reject_in_on_connect_closes_without_a_welcome() -> None:
    hub = Hub()

    @hub.on_connect
    async def refuse(conn: Connection) -> None:
        await conn.join("table")
        await hub.publish("table", "joined", 1)
        raise Reject(4503, "table full")

    async with running(hub) as (peer, _):
        await closed(peer)
    assert peer.frames == []  # no welcome, no room traffic
    assert peer.close_code == 4503
    assert hub.stats().rooms == 0


class GatedAcceptTransport(MemoryTransport):
    """accept() waits for `gate`, or raises if `fail` (the client left mid-upgrade)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.fail = fail

    async def accept(self) -> bool:
        await self.gate.wait()
        if self.fail:
            raise OSError("connection reset during the upgrade")
        return await super().accept()


class FailingSendTransport(MemoryTransport):
    """send() fails once `broken` is set: the socket died under the writer."""

    broken = False

    async def send(self, text: str) -> None:
        if self.broken:
            raise OSError("broken pipe")
        await super().send(text)


async def test_shutdown_while_a_connection_is_being_accepted() -> None:
    hub = Hub()
    transport = GatedAcceptTransport()
    peer = Peer(transport)
    async with anyio.create_task_group() as tg:
        async with hub.run():
            tg.start_soon(serve_transport, hub, transport)
            tg.start_soon(peer.pump)
            await wait_for(lambda: hub.stats().connections == 1)
            async with anyio.create_task_group() as inner:
                inner.start_soon(hub.shutdown)
                await anyio.sleep(0.05)
                transport.gate.set()
        await closed(peer)
    transport.close_streams()
    assert peer.close_code == CloseCode.SERVICE_RESTART
    assert hub.stats().closes == {"shutdown": 1}


async def test_a_client_that_leaves_during_the_upgrade_is_released_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub()
    transport = GatedAcceptTransport(fail=True)
    async with hub.run():
        transport.gate.set()
        await serve_transport(hub, transport)  # returns, does not raise
    transport.close_streams()
    assert hub.stats().closes == {"client_closed": 1}
    assert transport.close_code is None  # nothing sent on a socket never accepted
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_send_failure_evicts_exactly_once(caplog: pytest.LogCaptureFixture) -> None:
    """The audit's failure 2 at the runtime level: the writer's send raises (the socket
    died); the connection is evicted once, with a log line and a counted reason."""
    caplog.set_level(logging.INFO, logger="wsroom")
    hub = Hub()
    gone: list[str] = []

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")

    @hub.on_disconnect
    async def left(conn: Connection) -> None:
        gone.append(conn.id)

    transport = FailingSendTransport()
    async with running(hub, transport=transport) as (peer, _):
        await welcomed(peer)
        transport.broken = True
        await hub.publish("room", "e", 1)
        await hub.publish("room", "e", 2)
        await wait_for(lambda: hub.stats().connections == 0)
    assert hub.stats().closes == {"send_failed": 1}
    assert len(gone) == 1
    assert len([r for r in caplog.records if ": closed, reason=send_failed" in r.getMessage()]
               ) == 1
    assert (hub.stats().rooms, hub.stats().members) == (0, 0)


async def test_shutdown_called_from_a_handler_completes() -> None:
    hub = Hub(HubConfig(shutdown_batch_size=1, shutdown_timeout=2))

    @hub.on("stop-server")
    async def stop(ctx: MessageContext, data: Any) -> None:
        await ctx.hub.shutdown()

    transports = [MemoryTransport() for _ in range(3)]
    peers = [Peer(t) for t in transports]
    async with anyio.create_task_group() as outer:
        async with hub.run():
            for transport, peer in zip(transports, peers, strict=True):
                outer.start_soon(serve_transport, hub, transport)
                outer.start_soon(peer.pump)
                await transport.client_send({"type": "hello", "v": 1})
                await welcomed(peer)
            await transports[0].client_send({"type": "msg", "event": "stop-server"})
            for peer in peers:
                await closed(peer)
        assert hub.stats().connections == 0
    for transport in transports:
        transport.close_streams()
    assert [p.close_code for p in peers] == [CloseCode.SERVICE_RESTART] * 3


async def test_a_validator_bug_is_an_internal_error_not_a_crash() -> None:
    from pydantic import field_validator

    hub = Hub()

    class Move(BaseModel):
        square: str

        @field_validator("square")
        @classmethod
        def known(cls, value: str) -> str:
            return {"a1": "a1"}[value]  # KeyError: pydantic does not wrap it

    @hub.on("move")
    async def move(ctx: MessageContext, data: Move) -> str:
        return data.square

    async with running(hub) as (peer, _):
        await welcomed(peer)
        await peer.transport.client_send(
            {"type": "msg", "event": "move", "data": {"square": "z9"}, "ref": 1})
        await peer.transport.client_send(
            {"type": "msg", "event": "move", "data": {"square": "a1"}, "ref": 2})
        await wait_for(lambda: len(of_type(peer, "reply")) == 1)
    assert [e["code"] for e in of_type(peer, "error")] == ["internal"]
    assert of_type(peer, "reply")[0]["data"] == "a1"


async def test_oversized_personal_messages_raise_and_oversized_replies_keep_their_ref(
) -> None:
    hub = Hub(HubConfig(max_queue_bytes=70_000))
    outcomes: list[str] = []

    @hub.on("big-send")
    async def big_send(ctx: MessageContext, data: Any) -> None:
        await ctx.connection.send("small", 1)
        try:
            await ctx.connection.send("big", "x" * 80_000)
        except MessageTooLarge:
            outcomes.append("raised")
        await ctx.connection.send("small", 2)

    @hub.on("big-reply")
    async def big_reply(ctx: MessageContext, data: Any) -> str:
        return "y" * 80_000

    async with running(hub) as (peer, _):
        await welcomed(peer)
        await peer.transport.client_send({"type": "msg", "event": "big-send"})
        await peer.transport.client_send({"type": "msg", "event": "big-reply", "ref": "r"})
        await wait_for(lambda: len(of_type(peer, "error")) == 1)
    assert outcomes == ["raised"]
    assert [m["offset"] for m in of_type(peer, "msg")] == [1, 2]  # no gap
    assert of_type(peer, "error")[0] == {"type": "error", "ref": "r", "code": "internal",
                                        "detail": "reply too large"}


async def test_a_handler_sending_many_personal_messages_does_not_overflow() -> None:
    hub = Hub(HubConfig(max_queue_messages=50))

    @hub.on("burst")
    async def burst(ctx: MessageContext, data: Any) -> None:
        for n in range(500):
            await ctx.connection.send("n", n)

    async with running(hub) as (peer, _):
        await welcomed(peer)
        await peer.transport.client_send({"type": "msg", "event": "burst"})
        await wait_for(lambda: len(of_type(peer, "msg")) == 500)
    assert peer.close_code is None


async def test_authenticate_reads_a_cookie_or_a_header_never_the_query_string() -> None:
    seen: list[tuple[str | None, str | None, str]] = []

    async def authenticate(handshake: Handshake) -> Identity | None:
        request = handshake.request
        seen.append((request.cookies.get("session"), request.headers.get("authorization"),
                     str(request.url.query)))
        if request.cookies.get("session") == "cookie-123":
            return Identity(id="by-cookie")
        if request.headers.get("authorization") == "Bearer header-456":
            return Identity(id="by-header")
        return None

    hub = Hub(authenticate=authenticate)

    @hub.on("whoami")
    async def whoami(ctx: MessageContext, data: Any) -> str | None:
        return ctx.connection.identity.id if ctx.connection.identity else None

    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws", headers=[("Cookie", "session=cookie-123")]
                                  ) as player:
            assert (await player.request("whoami"))["data"] == "by-cookie"
        async with Player.connect(url + "/ws",
                                  headers=[("Authorization", "Bearer header-456")]) as player:
            assert (await player.request("whoami"))["data"] == "by-header"
    assert [query for _, _, query in seen] == ["", ""]


async def test_an_excluded_sender_skips_the_message_without_a_gap() -> None:
    """`publish(..., exclude=conn)`: the sender does not get its own message, and the
    hole this leaves in its view of the stream is not mistaken for a lost message
    (no 3010); the next message reaches it normally."""
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")

    @hub.on("say")
    async def say(ctx: MessageContext, data: int) -> None:
        await ctx.publish("room", "said", data, exclude_self=True)

    async with running(hub) as (peer, _):
        await welcomed(peer)
        await peer.transport.client_send({"type": "msg", "event": "say", "data": 1})
        await wait_for(lambda: hub.stats().messages_in >= 2)
        await hub.publish("room", "said", 2)
        await wait_for(lambda: len(of_type(peer, "msg")) == 1)
        assert peer.close_code is None
    assert [(m["offset"], m["data"]) for m in of_type(peer, "msg")] == [(2, 2)]
    assert "gap" not in hub.stats().closes


async def test_a_snapshot_never_swallows_what_on_connect_sent() -> None:
    """A new session gets a snapshot of each stream, labelled with the position it
    starts from, and then every message sent while its handshake ran."""
    snapshots: list[str] = []

    async def snapshot(conn: Connection, stream: str) -> Any:
        snapshots.append(stream)
        return {"of": stream}

    hub = Hub(snapshot=snapshot)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")
        await conn.send("greeting", 1)
        await hub.publish("room", "early", 2)

    async with running(hub) as (peer, _):
        await wait_for(lambda: len(of_type(peer, "msg")) == 2)
    welcome = of_type(peer, "welcome")[0]
    assert {name: (s["offset"], s["recovered"]) for name, s in welcome["streams"].items()
            } == {"@inbox": (0, False), "room": (0, False)}
    assert sorted(snapshots) == ["@inbox", "room"]
    kinds = [(f["type"], f["stream"], f["offset"]) for f in peer.frames
             if f["type"] in ("snapshot", "msg")]
    assert kinds == [("snapshot", "@inbox", 0), ("snapshot", "room", 0),
                     ("msg", "@inbox", 1), ("msg", "room", 1)]
    assert of_type(peer, "snapshot")[1]["data"] == {"of": "room"}


async def test_disconnect_ends_every_session_of_a_member() -> None:
    """`hub.disconnect(member, code)`: the live connection gets what was queued, then
    the code; a detached session of the same member ends too (no waiting for its
    window), and the roster drops the member at once."""

    async def authenticate(handshake: Handshake) -> Identity:
        return Identity(id=str(handshake.auth))

    hub = Hub(authenticate=authenticate)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("table")

    async with hub.run(), anyio.create_task_group() as tg:
        peers = []
        for member in ("sam", "sam", "gm"):
            transport = MemoryTransport()
            peer = Peer(transport)
            tg.start_soon(serve_transport, hub, transport)
            tg.start_soon(peer.pump)
            await transport.client_send({"type": "hello", "v": 1, "auth": member})
            await welcomed(peer)
            peers.append(peer)
        # One of sam's two sessions drops (1006): detached, waiting for a resume.
        await peers[0].transport.client_disconnect(1006)
        await wait_for(lambda: hub.stats().detached_sessions == 1)
        await hub.publish("table", "news", "before the kick")
        assert await hub.disconnect("sam", 4501, "kicked") == 2
        assert await peers[1].wait_closed() == 4501
        assert [e.member for e in hub.presence("table")] == ["gm"]
        assert hub.stats().sessions == 1
        assert await hub.disconnect("nobody") == 0
        with pytest.raises(ValueError, match="may be sent"):
            await hub.disconnect("gm", 1005)
        tg.cancel_scope.cancel()
    for peer in peers:
        peer.transport.close_streams()
    assert [m["data"] for m in of_type(peers[1], "msg")] == ["before the kick"]
    leaves = [f for f in of_type(peers[2], "presence") if "sam" in f.get("leaves", [])]
    assert len(leaves) == 1


async def test_the_readiness_endpoint_follows_the_hub_and_its_backplane() -> None:
    from starlette.requests import Request

    hub = Hub()
    request = Request({"type": "http", "method": "GET", "path": "/ready", "headers": []})
    assert (await hub.readiness(request)).status_code == 503  # not running yet
    async with hub.run():
        assert (await hub.readiness(request)).status_code == 200
    assert (await hub.readiness(request)).status_code == 503


class _GatedOpen(MemoryBackplane):
    """Opening the room ``slow`` takes its position, then waits for the next gate in
    `gates` before returning it."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[anyio.Event] = []

    async def open(self, stream: str, limits: Any = None) -> tuple[str, int]:
        position = await super().open(stream, limits)
        if stream == "slow" and self.gates:
            await self.gates.pop(0).wait()
        return position


async def test_a_join_superseded_by_a_later_join_of_the_room_does_not_move_the_position(
) -> None:
    """join, leave and join again while the first opening still waits: the later join
    decides the position; the first, finishing last, must neither announce an older
    position (the client would take the next message for a hole) nor leave its
    buffered bytes counted against the connection (a spurious 3008 later)."""
    backplane = _GatedOpen()
    hub = Hub(HubConfig(max_queue_messages=50), backplane=backplane)
    async with running(hub) as (peer, tg):
        await welcomed(peer)
        (conn,) = hub.connections()
        first, second = anyio.Event(), anyio.Event()
        backplane.gates[:] = [first, second]
        tg.start_soon(conn.join, "slow")
        await wait_for(lambda: not backplane.gates[1:])  # the first opening waits
        await conn.leave("slow")
        tg.start_soon(conn.join, "slow")
        await wait_for(lambda: not backplane.gates)  # the second one waits too
        for n in range(3):
            await hub.publish("slow", "m", n)
        second.set()
        await wait_for(lambda: of_type(peer, "stream"))
        first.set()
        for n in range(3, 6):
            await hub.publish("slow", "m", n)
        await wait_for(lambda: [m["data"] for m in of_type(peer, "msg")][-1:] == [5])
        assert len(of_type(peer, "stream")) == 1
        offsets = [m["offset"] for m in of_type(peer, "msg")]
        assert offsets == sorted(set(offsets))
        assert conn.open
        assert conn._backing.pending_bytes == 0  # type: ignore[attr-defined]
