"""The audit's twelve failures (DESIGN.md §1), each reproduced against a real server
with real WebSocket clients, and wsroom's behaviour instead.

Servers: uvicorn on asyncio, hypercorn on trio (each test runs on both). Clients: the
wsproto client over real TCP sockets.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from support import Player, hub_app, serve, wait_for
from wsroom import (
    CloseCode,
    Connection,
    Handshake,
    Hub,
    HubConfig,
    Identity,
    MessageContext,
)
from wsroom.client._websocket import connect

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SECRET = "SECRET-TOKEN-7f3a9c"
PAYLOAD = "PAYLOAD-MARKER-41d2"


WINDOW = 0.3
"""The resume window of these tests: sessions of dropped clients end this soon, so
that 'registries return to zero' can be checked."""


def lobby_hub(config: HubConfig | None = None, **kwargs: Any) -> Hub:
    """A hub whose members all join 'lobby'."""
    hub = Hub(replace(config or HubConfig(), resume_window=WINDOW), **kwargs)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    return hub


def assert_released(hub: Hub) -> None:
    stats = hub.stats()
    assert (stats.connections, stats.sessions, stats.rooms, stats.members,
            stats.queued_bytes) == (0, 0, 0, 0, 0)


async def drained(hub: Hub) -> None:
    """Every connection is released and, after the resume window, every session."""
    await wait_for(lambda: hub.stats().connections == 0)
    assert hub.stats().queued_bytes == 0
    await wait_for(lambda: hub.stats().sessions == 0, timeout=WINDOW + 5)
    assert_released(hub)  # at once: sessions end with their rooms, never half-way


class SocketAudit:
    """ASGI middleware that watches every WebSocket the app drives: sends after the
    close frame or after the peer's disconnect, double closes, and sends that overlap
    (one begun while another on the same socket has not returned)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.violations: list[str] = []
        self.sends_per_socket: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        disconnected = closed = False
        sending = False
        sends = 0

        async def audited_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "websocket.disconnect":
                disconnected = True
            return message

        async def audited_send(message: Message) -> None:
            nonlocal closed, sending, sends
            if message["type"] in ("websocket.send", "websocket.close"):
                if closed:
                    self.violations.append(f"{message['type']} after close")
                if disconnected:
                    self.violations.append(f"{message['type']} after disconnect")
            if message["type"] == "websocket.close":
                closed = True
            if sending:
                self.violations.append(f"{message['type']} while another send is in progress")
            sending = True
            sends += 1
            try:
                await send(message)
            finally:
                sending = False

        try:
            await self.app(scope, audited_receive, audited_send)
        finally:
            self.sends_per_socket.append(sends)


@asynccontextmanager
async def publishing(hub: Hub, room: str = "lobby", rate: float = 200
                     ) -> AsyncIterator[list[int]]:
    """Publish to `room` at about `rate` messages/s while inside; yields the offsets."""
    offsets: list[int] = []

    async def run() -> None:
        number = 0
        while True:
            offset = await hub.publish(room, "tick", {"n": number})
            if offset is not None:
                offsets.append(offset)
            number += 1
            await anyio.sleep(1 / rate)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield offsets
        tg.cancel_scope.cancel()


def assert_contiguous(msgs: list[dict[str, Any]], stream: str = "lobby") -> None:
    offsets = [m["offset"] for m in msgs if m["stream"] == stream]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else True


def wsroom_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("wsroom")]


# 1 ------------------------------------------------------------------------------


async def test_failure_01_membership_changes_race_with_broadcast(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Audit: shared dicts mutated during broadcast ('dictionary changed size during
    iteration'). wsroom: 200 clients join and leave at random (close, FIN, RST) while
    the room broadcasts; no error, every client sees a gap-free sequence, nothing is
    sent to a closed socket, and the registries return to zero."""
    # The 200 visitors all come from 127.0.0.1: no per-address connection rate here.
    hub = lobby_hub(HubConfig(ping_interval=5, pong_timeout=5, connect_rate_per_ip=None))
    audit = SocketAudit(hub_app(hub))
    rng = random.Random(1)
    limiter = anyio.CapacityLimiter(50)
    sequences: list[list[dict[str, Any]]] = []

    async def visitor(url: str, seed: int) -> None:
        local = random.Random(seed)
        async with limiter:
            await anyio.sleep(local.random() * 0.2)
            ws = await connect(url)
            player = Player(ws)
            await player.hello()
            with anyio.move_on_after(local.random() * 0.3):
                while True:
                    await player.frame()
            sequences.append(list(player.msgs))
            how = local.choice(["close", "drop", "abort"])
            if how == "close":
                await ws.close()
            elif how == "drop":
                await ws.drop()
            else:
                await ws.abort()

    async with serve(audit) as url, publishing(hub, rate=500) as offsets:
        async with anyio.create_task_group() as tg:
            for index in range(200):
                tg.start_soon(visitor, url + "/ws", rng.randrange(1 << 30), name=f"v{index}")
        await drained(hub)
        assert offsets, "the room broadcast while clients came and went"
    assert len(sequences) == 200
    for msgs in sequences:
        assert_contiguous(msgs)
    assert sum(hub.stats().closes.values()) == 200
    assert audit.violations == []
    assert [r for r in wsroom_records(caplog) if r.levelno >= logging.ERROR] == []


# 2 ------------------------------------------------------------------------------


async def test_failure_02_failed_send_evicts_the_dead_socket_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Audit: a failed send left the dead socket registered. wsroom: a client whose
    socket is reset mid-broadcast is evicted exactly once (one close counted, one
    on_disconnect, one 'closed' log line) and the others keep receiving everything.
    (Here the reader usually notices first; the writer's send-error path is covered
    deterministically by test_hub.py::test_a_send_failure_evicts_exactly_once.)"""
    caplog.set_level(logging.INFO, logger="wsroom")
    hub = lobby_hub(HubConfig(ping_interval=5, pong_timeout=5))
    released: list[str] = []

    @hub.on_disconnect
    async def gone(conn: Connection) -> None:
        assert conn.session is not None
        released.append(conn.session)

    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as witness:
        victim_ws = await connect(url + "/ws")
        victim = Player(victim_ws)
        welcome = await victim.hello()
        async with publishing(hub, rate=1000) as offsets:
            await victim.collect(20)
            await victim_ws.abort()
            await wait_for(lambda: len(hub.connections()) == 1)
            target = offsets[-1] + 50
            await wait_for(lambda: offsets[-1] >= target)
        await witness.collect(offsets[-1] - witness.msgs[0]["offset"] + 1 if witness.msgs
                              else len(offsets))
        assert_contiguous(witness.msgs)
    await drained(hub)
    session = welcome["session"]
    assert released.count(session) == 1
    closed_lines = [r for r in wsroom_records(caplog)
                    if f"session={session}" in r.getMessage() and ": closed," in r.getMessage()]
    assert len(closed_lines) == 1
    assert sum(hub.stats().closes.values()) == 2


# 3 ------------------------------------------------------------------------------


async def test_failure_03_no_heartbeat_ghosts_are_evicted() -> None:
    """Audit: no heartbeat, half-open 'ghosts' stay forever. wsroom: a client that
    never answers pings is closed with 3012 within ping_interval + pong_timeout + 1 s,
    while the room is busy; a ghost that neither reads nor writes is released too."""
    interval, timeout = 0.5, 0.5
    hub = lobby_hub(HubConfig(ping_interval=interval, pong_timeout=timeout))
    async with serve(hub_app(hub)) as url, publishing(hub, rate=100):
        async with Player.connect(url + "/ws", answer_pings=False) as mute:
            start = anyio.current_time()
            code = await mute.until_closed()
            assert code == CloseCode.NO_PONG
            assert anyio.current_time() - start <= interval + timeout + 1
            assert len(mute.msgs) > 0, "it was receiving the room's traffic meanwhile"

        ghost_ws = await connect(url + "/ws", receive_buffer=4096)
        ghost = Player(ghost_ws)
        await ghost.hello()
        start = anyio.current_time()
        await wait_for(lambda: hub.stats().connections == 0, timeout=interval + timeout + 1)
        assert anyio.current_time() - start <= interval + timeout + 1
        await ghost_ws.drop()
    assert hub.stats().closes.get("no_pong") == 2


# 4 ------------------------------------------------------------------------------


async def test_failure_04_every_path_from_upgrade_releases_the_socket() -> None:
    """Audit: an exception between auth and registration leaked the socket. wsroom:
    authenticate raising, refusing, a bad first frame, on_connect raising after joins,
    and a client that vanishes mid-authentication all end with a close code (or a
    clean release) and leave nothing behind — registries and file descriptors."""
    slow_auth = anyio.Event()

    async def authenticate(handshake: Handshake) -> Identity | None:
        token = handshake.auth
        if token == "crash":
            raise RuntimeError("database unreachable")
        if token == "slow":
            slow_auth.set()
            await anyio.sleep(3600)
        if token in ("player", "joins-then-crash"):
            return Identity(id=token)
        return None

    hub = Hub(HubConfig(ping_interval=5, pong_timeout=5, resume_window=WINDOW),
              authenticate=authenticate)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("table")
        if conn.identity and conn.identity.id == "joins-then-crash":
            raise RuntimeError("bug after join")

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws", auth="player"):
            pass  # warm up: the server's lazily created resources exist now
        await drained(hub)
        baseline = open_fds()
        for token, expected in [("crash", CloseCode.INTERNAL_ERROR),
                                ("stranger", CloseCode.INVALID_TOKEN),
                                ("joins-then-crash", CloseCode.INTERNAL_ERROR)]:
            async with Player.connect(url + "/ws", hello=False) as player:
                await player.ws.send('{"type":"hello","v":1,"auth":"%s"}' % token)
                assert await player.until_closed() == expected, token
            await drained(hub)
        async with Player.connect(url + "/ws", hello=False) as player:
            await player.ws.send('{"type":"msg","event":"chat","data":1}')
            assert await player.until_closed() == CloseCode.BAD_REQUEST
        async with Player.connect(url + "/ws", hello=False) as player:
            await player.ws.send('{"type":"hello","v":1,"auth":"slow"}')
            with anyio.fail_after(5):
                await slow_auth.wait()
            await player.ws.abort()
        await drained(hub)
        await wait_for(lambda: open_fds() <= baseline)
    closes = hub.stats().closes
    assert closes["internal_error"] == 2
    assert closes["auth_failed"] == 1
    assert closes["bad_handshake"] == 1


# 5 ------------------------------------------------------------------------------


async def test_failure_05_bad_message_loop_ends_at_the_error_budget() -> None:
    """Audit: the receive loop kept looping on errors. wsroom: each bad message gets
    an error frame; a good one resets the count; N consecutive bad ones close 3509."""
    budget = 5
    hub = lobby_hub(HubConfig(error_budget=budget, ping_interval=5, pong_timeout=5))

    @hub.on("ok")
    async def ok(ctx: MessageContext, data: Any) -> str:
        return "fine"

    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as player:
        for _ in range(budget - 1):
            await player.ws.send("{not json")
            assert (await player.expect("error"))["code"] == "bad_json"
        assert (await player.request("ok"))["data"] == "fine"  # resets the count
        for _ in range(budget - 1):
            await player.ws.send("{not json")
        await player.ws.send('{"type":"nope"}')
        before = len(player.seen)
        assert await player.until_closed() == CloseCode.ERROR_BUDGET
        assert [f["type"] for f in player.seen[before:]] == ["error"] * budget
    await drained(hub)
    assert hub.stats().closes == {"error_budget": 1}


# 6 ------------------------------------------------------------------------------


async def test_failure_06_one_database_session_per_message(tmp_path: Path) -> None:
    """Audit: one DB session for a whole connection, no explicit commits. wsroom: the
    message scope opens a session (here a real SQLite connection) per message, commits
    on success and rolls back when the handler raises; the next message gets a fresh
    session."""
    db_path = tmp_path / "game.db"
    with closing(sqlite3.connect(db_path)) as db:
        db.execute("create table rolls (player text, value int)")
    opened: list[int] = []

    @asynccontextmanager
    async def db_session(ctx: MessageContext) -> AsyncIterator[sqlite3.Connection]:
        session = sqlite3.connect(db_path)
        opened.append(id(session))
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    hub = lobby_hub(HubConfig(ping_interval=5, pong_timeout=5), message_scope=db_session)

    class Roll(BaseModel):
        value: int = Field(ge=1, le=6)
        fail: bool = False

    @hub.on("roll", model=Roll)  # a class local to this function: name it explicitly
    async def roll(ctx: MessageContext, data: Roll) -> int:
        session: sqlite3.Connection = ctx.scope
        session.execute("insert into rolls values (?, ?)", ("p1", data.value))
        if data.fail:
            raise RuntimeError("failure after a write")
        return data.value

    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as player:
        for value in (1, 2, 3):
            assert (await player.request("roll", {"value": value}))["data"] == value
        failed = await player.request("roll", {"value": 6, "fail": True})
        assert failed["code"] == "internal"
        assert (await player.request("roll", {"value": 4}))["data"] == 4
        invalid = await player.request("roll", {"value": 7})
        assert invalid["code"] == "invalid_data"
    with closing(sqlite3.connect(db_path)) as db:
        values = [row[0] for row in db.execute("select value from rolls order by rowid")]
    assert values == [1, 2, 3, 4]  # the failed message's write was rolled back
    assert len(opened) == 5  # one session per handled message (not for invalid data)


# 7 ------------------------------------------------------------------------------


async def test_failure_07_errors_are_logged_with_ids_never_tokens_or_payloads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Audit: broadcast errors swallowed silently. wsroom: evictions and handler
    errors are logged with connection and member ids and the close code; the auth
    token and message payloads never appear in any log line."""
    caplog.set_level(logging.DEBUG, logger="wsroom")

    async def authenticate(handshake: Handshake) -> Identity | None:
        return Identity(id="player-7") if handshake.auth == SECRET else None

    hub = lobby_hub(HubConfig(ping_interval=5, pong_timeout=5, max_message_bytes=2048),
                    authenticate=authenticate)

    @hub.on("crash")
    async def crash(ctx: MessageContext, data: Any) -> None:
        raise RuntimeError("handler bug")

    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws", auth=SECRET) as player:
            session = player.welcome["session"]  # type: ignore[index]
            await hub.publish("lobby", "chat", {"text": PAYLOAD})
            await player.request("crash", {"text": PAYLOAD})
            await player.send("no-such-event", {"text": PAYLOAD})
            await player.ws.send('{"type":"msg","event":"crash","data":"%s' % PAYLOAD)
            await player.ws.send("x" * 4096 + PAYLOAD)  # oversized: closes 1009
            assert await player.until_closed() == CloseCode.MESSAGE_TOO_BIG
        async with Player.connect(url + "/ws", hello=False) as intruder:
            await intruder.ws.send('{"type":"hello","v":1,"auth":"%s-forged"}' % SECRET)
            assert await intruder.until_closed() == CloseCode.INVALID_TOKEN
        await drained(hub)
    text = "\n".join(
        record.getMessage() + (logging.Formatter().formatException(record.exc_info)
                               if record.exc_info else "")
        for record in caplog.records
    )
    assert SECRET not in text
    assert PAYLOAD not in text
    lines = [r.getMessage() for r in wsroom_records(caplog)]
    assert any(f"member=player-7 session={session}" in line and "handler for event 'crash'"
               in line for line in lines)
    assert any(f"member=player-7 session={session}: closed, reason=message_too_big "
               "code=1009" in line for line in lines)


# 8 ------------------------------------------------------------------------------


async def test_failure_08_nothing_is_sent_to_a_closing_or_closed_socket() -> None:
    """Audit: sends to CLOSING/CLOSED sockets. wsroom: sends on a socket never overlap
    (the hub's flusher writes only while the connection's writer is idle, and hands it
    any send that has to wait); after a close frame or the peer's disconnect nothing
    more is sent — checked by an ASGI middleware on every socket while clients leave in
    every way."""
    hub = lobby_hub(HubConfig(ping_interval=0.5, pong_timeout=0.5, max_queue_bytes=65536,
                              max_message_bytes=4096))
    audit = SocketAudit(hub_app(hub))
    async with serve(audit) as url, publishing(hub, rate=500):
        async def leave(how: str) -> None:
            async with Player.connect(url + "/ws", answer_pings=how != "mute") as player:
                await player.collect(5)
                if how == "close":
                    await player.ws.close()
                elif how == "drop":
                    await player.ws.drop()
                elif how == "abort":
                    await player.ws.abort()
                elif how == "oversize":
                    await player.ws.send("y" * 5000)
                    await player.until_closed()
                elif how == "mute":
                    await player.until_closed()

        async with anyio.create_task_group() as tg:
            for how in ["close", "drop", "abort", "oversize", "mute"] * 4:
                tg.start_soon(leave, how)
        await drained(hub)
    assert audit.violations == []
    assert len(audit.sends_per_socket) == 20
    assert all(n >= 2 for n in audit.sends_per_socket)  # the accept, the welcome, ...


# 9 ------------------------------------------------------------------------------


async def test_failure_09_no_receive_waits_forever() -> None:
    """Audit: receive_text() waited forever. wsroom: no hello within the handshake
    timeout closes 3502; an optional idle timeout closes 3511; (the heartbeat covers
    silent peers, see failure 3)."""
    hub = lobby_hub(HubConfig(handshake_timeout=0.5, idle_timeout=1.0,
                              ping_interval=0.3, pong_timeout=0.5))
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws", hello=False) as silent:
            assert await silent.until_closed(timeout=5) == CloseCode.HANDSHAKE_TIMEOUT
        async with Player.connect(url + "/ws") as idle:
            # it answers pings (alive) but sends no application message
            assert await idle.until_closed(timeout=5) == CloseCode.IDLE_TIMEOUT
        await drained(hub)
    assert hub.stats().closes == {"handshake_timeout": 1, "idle_timeout": 1}


# 10 -----------------------------------------------------------------------------


async def test_failure_10_message_size_limit_closes_1009() -> None:
    """Audit: no message size limit (DoS). wsroom: a frame above max_message_bytes —
    in one piece or fragmented — closes 1009 before any parsing; the handler never
    runs; another member is unaffected."""
    hub = lobby_hub(HubConfig(max_message_bytes=1024, ping_interval=5, pong_timeout=5))
    calls: list[int] = []

    @hub.on("chat")
    async def chat(ctx: MessageContext, data: str) -> None:
        calls.append(len(data))
        await ctx.publish("lobby", "chat", data)

    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as bystander:
        async with Player.connect(url + "/ws") as attacker:
            big = '{"type":"msg","event":"chat","data":"%s"}' % ("z" * 2000)
            await attacker.ws.send(big)
            assert await attacker.until_closed() == CloseCode.MESSAGE_TOO_BIG
        async with Player.connect(url + "/ws") as attacker:
            await attacker.ws.send_fragments([big[:600], big[600:1200], big[1200:]])
            assert await attacker.until_closed() == CloseCode.MESSAGE_TOO_BIG
        async with Player.connect(url + "/ws") as attacker:
            await attacker.ws.send('{"type":"msg","event":"chat","data":"%s"}' % ("é" * 600))
            assert await attacker.until_closed() == CloseCode.MESSAGE_TOO_BIG
        await bystander.send("chat", "still here")
        got = await bystander.collect(1)
        assert got[-1]["data"] == "still here"
    assert calls == [len("still here")]
    assert hub.stats().closes["message_too_big"] == 3


# 11 -----------------------------------------------------------------------------


async def test_failure_11_a_reconnecting_player_can_reuse_its_credentials() -> None:
    """Audit: a reconnecting player could not reuse its token while the dead
    connection held it. wsroom: the same credentials connect again at once while the
    ghost is still registered; the ghost is evicted by the heartbeat; the player keeps
    its identity and rooms. (Resume tokens with exact replay build on this: issue 3.)"""

    async def authenticate(handshake: Handshake) -> Identity | None:
        return Identity(id="player-1") if handshake.auth == "player-1-credential" else None

    hub = lobby_hub(HubConfig(ping_interval=0.5, pong_timeout=0.5),
                    authenticate=authenticate)
    async with serve(hub_app(hub)) as url:
        ghost_ws = await connect(url + "/ws", receive_buffer=4096)
        ghost = Player(ghost_ws, answer_pings=False)
        await ghost.hello(auth="player-1-credential")
        async with Player.connect(url + "/ws", auth="player-1-credential") as back:
            assert back.welcome is not None
            assert "lobby" in back.welcome["streams"]
            members = [c.identity.id for c in hub.members("lobby") if c.identity]
            assert members == ["player-1", "player-1"]  # the ghost is still there
            async with back.reading():
                await wait_for(lambda: len(hub.connections()) == 1, timeout=3)
            await hub.publish("lobby", "chat", "welcome back")
            assert (await back.collect(1))[-1]["data"] == "welcome back"
        await ghost_ws.drop()
        await drained(hub)
    assert hub.stats().closes["no_pong"] == 1


# 12 -----------------------------------------------------------------------------


async def test_failure_12_handler_exceptions_are_caught_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Audit: handler exceptions escaped. wsroom: the client gets an `error` frame
    (no internals), the log gets a traceback with ids, the connection keeps serving,
    and only consecutive crashes exhaust the error budget (3509)."""
    hub = lobby_hub(HubConfig(error_budget=3, ping_interval=5, pong_timeout=5))

    @hub.on("crash")
    async def crash(ctx: MessageContext, data: Any) -> None:
        raise KeyError("internal-detail-xyz")

    @hub.on("echo")
    async def echo(ctx: MessageContext, data: Any) -> Any:
        return data

    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as player:
        for round_ in range(3):
            error = await player.request("crash", ref=f"c{round_}")
            assert error == {"type": "error", "ref": f"c{round_}", "code": "internal",
                             "detail": "internal error"}
            assert (await player.request("echo", round_, ref=f"e{round_}"))["data"] == round_
        for round_ in range(3):
            await player.send("crash", ref=f"x{round_}")
        assert await player.until_closed() == CloseCode.ERROR_BUDGET
    records = [r for r in wsroom_records(caplog) if r.levelno == logging.ERROR and r.exc_info]
    assert len(records) == 6
    assert all("handler for event 'crash' raised" in r.getMessage() for r in records)
    assert hub.stats().handler_errors == 6
