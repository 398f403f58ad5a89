"""Session resume against real servers (uvicorn on asyncio, hypercorn on trio): a
client whose socket is killed comes back with its token and its stream positions and
gets every missed message exactly once, in order — or ``recovered: false`` and a
snapshot; ghosts are replaced (3503), bad tokens refused (3500), presence says *away*
and never *leave* within the window, and the inbox is replayed like a room.

Clients: the wsproto client over real TCP (killed with RST or FIN, no close frame)
and `wsroom.client.Client`.

uvicorn's websockets-sansio protocol reports a connection lost without a close frame as
``websocket.disconnect`` code 1005: `Connection._resumable` treats it as resumable (the
session is detached for ``resume_window``), which the tests that kill a socket check.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from support import Player, current_backend, hub_app, serve, wait_for
from wsroom import (
    Connection,
    Handshake,
    HistoryLimits,
    Hub,
    HubConfig,
    Identity,
    RoomConfig,
)
from wsroom.client import Client, Message
from wsroom.client._websocket import WebSocket

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ROOM = "game"
INBOX = "@inbox"


# ------------------------------------------------------------------------ helpers


async def by_name(handshake: Handshake) -> Identity | None:
    """Authenticate by the hello's ``auth`` name (no name: refused)."""
    auth = handshake.auth
    if not isinstance(auth, dict) or not isinstance(auth.get("name"), str):
        return None
    return Identity(id=auth["name"], info={"name": auth["name"]})


def game_hub(config: HubConfig | None = None, **kwargs: Any) -> Hub:
    """A hub whose members all join ROOM on connect (new sessions; a resumed session
    still holds it)."""
    hub = Hub(config or HubConfig(), **kwargs)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        if not conn.resumed:
            await conn.join(ROOM)

    return hub


class Positions:
    """What a raw client knows of its streams: the welcome's positions, advanced by
    every ``snapshot`` and ``msg`` frame it has processed."""

    def __init__(self, welcome: dict[str, Any]) -> None:
        self.streams = {name: {"epoch": s["epoch"], "offset": s["offset"]}
                        for name, s in welcome["streams"].items()}

    def see(self, frame: dict[str, Any]) -> None:
        if frame["type"] in ("msg", "snapshot"):
            known = self.streams.get(frame["stream"])
            if known is None or frame["type"] == "snapshot" or frame["offset"] > known["offset"]:
                self.streams[frame["stream"]] = {"epoch": frame["epoch"],
                                                 "offset": frame["offset"]}

    def see_all(self, player: Player) -> None:
        for frame in player.seen:
            self.see(frame)

    def offset(self, stream: str) -> int:
        return int(self.streams[stream]["offset"])


async def resume(player: Player, token: str, streams: dict[str, Any] | None,
                 auth: Any = None) -> dict[str, Any]:
    """Send a resuming ``hello``; return the ``welcome``."""
    frame: dict[str, Any] = {"type": "hello", "v": 1, "resume": token}
    if streams is not None:
        frame["streams"] = streams
    if auth is not None:
        frame["auth"] = auth
    await player.ws.send(json.dumps(frame))
    player.welcome = await player.expect("welcome")
    return player.welcome


async def send_hello(ws: WebSocket, token: str | None, streams: dict[str, Any] | None = None,
                     auth: Any = None) -> None:
    frame: dict[str, Any] = {"type": "hello", "v": 1}
    if token is not None:
        frame["resume"] = token
    if streams is not None:
        frame["streams"] = streams
    if auth is not None:
        frame["auth"] = auth
    await ws.send(json.dumps(frame))


async def frames_until(player: Player, stop: Any, timeout: float = 10
                       ) -> list[dict[str, Any]]:
    """Read frames (answering pings) until ``stop(frame)`` holds; return them all."""
    got = []
    with anyio.fail_after(timeout):
        while True:
            frame = await player.frame()
            got.append(frame)
            if stop(frame):
                return got


def room_msgs(player: Player, stream: str = ROOM) -> list[dict[str, Any]]:
    return [m for m in player.msgs if m["stream"] == stream]


def assert_sequence(msgs: list[dict[str, Any]], first: int, last: int) -> None:
    """Offsets exactly ``first..last``, each once, in order; data ``{"n": offset}``."""
    offsets = [m["offset"] for m in msgs]
    assert offsets == list(range(first, last + 1)), (
        f"expected offsets {first}..{last}, got {len(offsets)} offsets "
        f"{offsets[:5]}...{offsets[-5:]}"
    )
    assert all(m["data"] == {"n": m["offset"]} for m in msgs)


async def publish_numbered(hub: Hub, first: int, last: int, *, pause_every: int = 0
                           ) -> None:
    """Publish ``{"n": k}`` for k in ``first..last`` to ROOM (it must get offset k)."""
    for number in range(first, last + 1):
        offset = await hub.publish(ROOM, "tick", {"n": number})
        assert offset == number
        if pause_every and number % pause_every == 0:
            await anyio.sleep(0.001)


def presence_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "presence" and f.get("room") == ROOM]


def status_changes(frames: list[dict[str, Any]], member: str) -> list[str]:
    """The presence story of `member` in `frames`: its statuses, and "leave"."""
    story = []
    for frame in presence_frames(frames):
        for entry in frame.get("joins", ()):
            if entry["id"] == member:
                story.append(entry["status"])
        if member in frame.get("leaves", ()):
            story.append("leave")
    return story


async def killed_after_welcome(hub: Hub, url: str) -> dict[str, Any]:
    """A client welcomed, then killed (RST, no close frame): its welcome, once the hub
    has detached its session."""
    async with Player.connect(url) as player:
        welcome = player.welcome
        assert welcome is not None
        await player.ws.abort()
    await wait_for(lambda: hub.stats().detached_sessions == 1)
    return welcome


@asynccontextmanager
async def raw(url: str, *, skip_presence: bool = True) -> AsyncIterator[Player]:
    """A Player without hello, closed on exit if still open."""
    async with Player.connect(url, hello=False) as player:
        player.skip_presence = skip_presence
        yield player


# 1 ----------------------------------------------------------------- exact replay


async def test_killed_socket_resumes_and_gets_every_missed_message_exactly_once() -> None:
    """The raw protocol: killed (RST) while 1,000 messages are published, resumed with
    the token and the positions: every missed message once, in order, then live ones."""
    hub = game_hub()
    total = 1000
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws") as first, anyio.create_task_group() as tg:
            welcome = first.welcome
            assert welcome is not None
            assert welcome["streams"][ROOM] == {"epoch": welcome["streams"][ROOM]["epoch"],
                                                "offset": 0, "recovered": False}
            tg.start_soon(lambda: publish_numbered(hub, 1, total, pause_every=50))
            await first.collect(100)
            await first.ws.abort()  # RST, no close frame, mid-stream
        positions = Positions(welcome)
        positions.see_all(first)
        seen = positions.offset(ROOM)
        assert 100 <= seen < total
        assert_sequence(room_msgs(first), 1, seen)
        await wait_for(lambda: hub.stats().detached_sessions == 1)
        assert hub.stats().sessions == 1

        async with raw(url + "/ws") as second:
            back = await resume(second, welcome["resume"], positions.streams)
            assert back["session"] == welcome["session"]
            assert back["resume"] not in (None, welcome["resume"])  # rotated
            assert back["streams"][ROOM] == {"epoch": welcome["streams"][ROOM]["epoch"],
                                             "offset": seen, "recovered": True}
            assert back["streams"][INBOX]["recovered"] is True
            # Published after the welcome: must come after the whole replay.
            await publish_numbered(hub, total + 1, total + 10)
            with anyio.fail_after(30):
                while not room_msgs(second) or room_msgs(second)[-1]["offset"] < total + 10:
                    await second.frame()
            assert_sequence(room_msgs(second), seen + 1, total + 10)
            assert [f["type"] for f in second.seen if f["type"] == "snapshot"] == []
            assert hub.stats().resumes.get("recovered") == 1
            assert (hub.stats().sessions, hub.stats().connections) == (1, 1)


async def test_the_welcome_is_a_message_of_its_own_ahead_of_a_batched_replay() -> None:
    """A resume with 300 missed messages: the welcome arrives alone, the replay after it
    in batches. Batched with the replay (64 KiB), the welcome would reach a client on a
    lossy link only with the whole batch (the fault suite saw a client wait 30 s for
    it and give up)."""
    hub = game_hub()
    async with serve(hub_app(hub)) as url:
        welcome = await killed_after_welcome(hub, url + "/ws")
        await publish_numbered(hub, 1, 300)
        async with raw(url + "/ws") as second:
            await send_hello(second.ws, welcome["resume"], Positions(welcome).streams)
            with anyio.fail_after(10):
                messages = [await second.ws.recv()]
                while '"offset":300' not in messages[-1]:
                    messages.append(await second.ws.recv())
    lines = [[json.loads(line) for line in str(m).split("\n")] for m in messages]
    assert [frame["type"] for frame in lines[0]] == ["welcome"]
    assert lines[0][0]["streams"][ROOM]["recovered"] is True
    replayed = [frame for message in lines[1:] for frame in message
                if frame["type"] == "msg" and frame["stream"] == ROOM]
    assert_sequence(replayed, 1, 300)
    assert max(len(message) for message in lines[1:]) > 1  # the replay is batched


async def test_python_client_resumes_by_itself_and_recovers_exactly_once() -> None:
    """`wsroom.client.Client`: its socket is killed while 1,000 messages are published
    (its reconnect is held in `authenticate` until they all are); it resumes on its
    own, `recovered` is true, and `messages()` is one gap-free, duplicate-free
    sequence, the messages published after the resume at its end."""
    gate = anyio.Event()
    gate.set()
    gates = [gate]

    async def authenticate(handshake: Handshake) -> Identity:
        await gates[0].wait()
        return Identity(id="p1")

    hub = game_hub(authenticate=authenticate)
    total = 1000
    got: list[Message] = []
    async with serve(hub_app(hub)) as url, Client(url + "/ws", buffer=16,
                                                  min_backoff=0.05) as client:
        with anyio.fail_after(10):
            await client.wait_connected()
        session = client.session
        messages = client.messages()

        async def take_until(offset: int) -> None:
            with anyio.fail_after(30):
                while not got or got[-1].offset < offset:
                    message = await messages.__anext__()
                    assert isinstance(message, Message), message  # no snapshot hook
                    if message.stream == ROOM:
                        got.append(message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: publish_numbered(hub, 1, 300, pause_every=50))
            await take_until(100)
            gates[0] = anyio.Event()  # hold the reconnect's authentication
            ws = client._ws
            assert ws is not None
            await ws.abort()
        await publish_numbered(hub, 301, total)
        await wait_for(lambda: hub.stats().detached_sessions == 1)
        gates[0].set()
        await take_until(total)
        assert client.connects == 2
        assert client.session == session
        assert client.welcome is not None
        assert client.welcome["streams"][ROOM]["recovered"] is True
        assert client.recovered(ROOM) is True
        assert client.welcome["streams"][ROOM]["offset"] < total  # the rest was replayed
        await publish_numbered(hub, total + 1, total + 10)
        await take_until(total + 10)
        assert [m.offset for m in got] == list(range(1, total + 11))
        assert all(m.data == {"n": m.offset} for m in got)
        assert hub.stats().resumes.get("recovered") == 1


# 2 ---------------------------------------------------------- snapshot, not replay


async def test_resume_beyond_the_history_gets_recovered_false_and_a_snapshot() -> None:
    """History of 10 messages: a client that missed more is told ``recovered:
    false`` and gets the app's snapshot at the current offset; live messages continue
    right after it."""
    published = {"count": 0}

    async def snapshot(conn: Connection, stream: str) -> Any:
        return {"stream": stream, "count": published["count"] if stream == ROOM else None}

    hub = game_hub(room_config=lambda room: RoomConfig(history=HistoryLimits(max_messages=10)),
                   snapshot=snapshot)
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws") as first:
            welcome = first.welcome
            assert welcome is not None
            # A new session: a snapshot for every stream, the room's at offset 0.
            snaps = await frames_until(
                first, lambda f: sum(g["type"] == "snapshot" for g in first.seen) == 2)
            assert {f["stream"]: f["data"] for f in snaps if f["type"] == "snapshot"} == {
                INBOX: {"stream": INBOX, "count": None}, ROOM: {"stream": ROOM, "count": 0}}
            for number in range(1, 6):
                published["count"] = number
                await hub.publish(ROOM, "tick", {"n": number})
            await first.collect(5)
            positions = Positions(welcome)
            positions.see_all(first)
            assert positions.offset(ROOM) == 5
            await first.ws.abort()
        await wait_for(lambda: hub.stats().detached_sessions == 1)
        for number in range(6, 51):  # 45 missed, the history keeps 10
            published["count"] = number
            await hub.publish(ROOM, "tick", {"n": number})

        async with raw(url + "/ws") as second:
            back = await resume(second, welcome["resume"], positions.streams)
            assert back["session"] == welcome["session"]
            epoch = welcome["streams"][ROOM]["epoch"]
            assert back["streams"][ROOM] == {"epoch": epoch, "offset": 50, "recovered": False}
            assert back["streams"][INBOX]["recovered"] is True
            snap = await second.expect("snapshot")
            assert snap == {"type": "snapshot", "stream": ROOM, "epoch": epoch, "offset": 50,
                            "data": {"stream": ROOM, "count": 50}}
            for number in range(51, 54):
                await hub.publish(ROOM, "tick", {"n": number})
            with anyio.fail_after(10):
                while len(room_msgs(second)) < 3:
                    await second.frame()
            assert_sequence(room_msgs(second), 51, 53)
            assert [f for f in second.seen if f["type"] == "snapshot"] == [snap]
            assert hub.stats().resumes.get("not_recovered") == 1


# 3 --------------------------------------------------------------------- takeover


async def test_a_resume_while_the_ghost_is_attached_replaces_it_with_3503() -> None:
    """The first connection is still open (it just stops reading); a second one with
    its token takes the session over: the ghost is closed with 3503, exactly one
    session and one connection remain, the new one has the same session id and gets
    what the ghost never read."""
    hub = game_hub()
    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as ghost:
        welcome = ghost.welcome
        assert welcome is not None
        await publish_numbered(hub, 1, 20)  # queued for the ghost, never read by it
        async with raw(url + "/ws") as second:
            back = await resume(second, welcome["resume"],
                                Positions(welcome).streams)
            assert back["session"] == welcome["session"]
            assert back["streams"][ROOM]["recovered"] is True
            assert await ghost.until_closed() == 3503
            await wait_for(lambda: hub.stats().connections == 1)
            stats = hub.stats()
            assert (stats.sessions, stats.detached_sessions, stats.connections) == (1, 0, 1)
            await publish_numbered(hub, 21, 25)
            with anyio.fail_after(10):
                while len(room_msgs(second)) < 25:
                    await second.frame()
            assert_sequence(room_msgs(second), 1, 25)
            [roster] = hub.presence(ROOM)
            assert roster.status == "online"
            assert len(roster.connections) == 1


# 4 ------------------------------------------------------------------- bad tokens


async def test_an_expired_token_is_refused_with_3500() -> None:
    hub = game_hub(HubConfig(resume_token_ttl=0.3))
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws") as first:
            assert first.welcome is not None
            token = first.welcome["resume"]
            await first.ws.drop()
            await anyio.sleep(0.4)  # past the token's ttl (the window is 120 s)
            async with raw(url + "/ws") as second:
                await send_hello(second.ws, token, Positions(first.welcome).streams)
                assert await second.until_closed() == 3500
        assert hub.stats().resumes.get("rejected") == 1


async def test_expiry_is_checked_on_the_hubs_wall_clock() -> None:
    wall = [time.time()]
    hub = game_hub(clock=lambda: wall[0])
    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as first:
        assert first.welcome is not None
        token = first.welcome["resume"]
        wall[0] += hub.config.resume_token_ttl + 1
        async with raw(url + "/ws") as second:
            await send_hello(second.ws, token)
            assert await second.until_closed() == 3500
        # The live connection was not touched by the refused attempt.
        await hub.publish(ROOM, "tick", {"n": 1})
        assert (await first.expect("msg"))["offset"] == 1


async def test_a_tampered_token_is_refused_and_the_session_is_untouched() -> None:
    hub = game_hub()
    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as first:
        assert first.welcome is not None
        token = first.welcome["resume"]
        head, signature = token.rsplit(".", 1)
        index = len(signature) // 2
        flipped = "B" if signature[index] == "A" else "A"
        tampered = f"{head}.{signature[:index]}{flipped}{signature[index + 1:]}"
        assert tampered != token
        async with raw(url + "/ws") as second:
            await send_hello(second.ws, tampered, Positions(first.welcome).streams)
            assert await second.until_closed() == 3500
        await hub.publish(ROOM, "tick", {"n": 1})
        assert (await first.expect("msg"))["offset"] == 1
        stats = hub.stats()
        assert (stats.sessions, stats.connections) == (1, 1)
        assert stats.resumes.get("rejected") == 1


async def test_a_token_presented_by_another_member_is_refused() -> None:
    hub = game_hub(authenticate=by_name)
    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws", auth={"name": "ann"}) as ann:
        assert ann.welcome is not None
        token = ann.welcome["resume"]
        await ann.ws.abort()
        await wait_for(lambda: hub.stats().detached_sessions == 1)
        async with raw(url + "/ws") as bob:
            await send_hello(bob.ws, token, Positions(ann.welcome).streams,
                             auth={"name": "bob"})
            assert await bob.until_closed() == 3500
        # Ann's session still waits for Ann.
        assert (hub.stats().sessions, hub.stats().detached_sessions) == (1, 1)
        async with raw(url + "/ws") as again:
            back = await resume(again, token, Positions(ann.welcome).streams,
                                auth={"name": "ann"})
            assert back["session"] == ann.welcome["session"]


async def test_a_valid_token_after_the_window_gets_a_new_session() -> None:
    hub = game_hub(HubConfig(resume_window=0.3))
    async with serve(hub_app(hub)) as url:
        welcome = await killed_after_welcome(hub, url + "/ws")
        await wait_for(lambda: hub.stats().sessions == 0)  # the window passed
        async with raw(url + "/ws") as second:
            back = await resume(second, welcome["resume"], Positions(welcome).streams)
            assert back["session"] != welcome["session"]
            assert {name: s["recovered"] for name, s in back["streams"].items()} == {
                INBOX: False, ROOM: False}
            assert back["streams"][ROOM]["epoch"] != welcome["streams"][ROOM]["epoch"]
            assert hub.stats().resumes.get("new_session") == 1
            assert hub.stats().sessions == 1


# 5 --------------------------------------------------------------------- presence


async def test_presence_says_away_then_online_and_never_leave_within_the_window() -> None:
    hub = game_hub(authenticate=by_name)
    async with (serve(hub_app(hub)) as url,
                Player.connect(url + "/ws", auth={"name": "w"}) as watcher):
        watcher.skip_presence = False
        async with Player.connect(url + "/ws", auth={"name": "x"}) as x:
            welcome = x.welcome
            assert welcome is not None
            seen = await frames_until(watcher, lambda f: status_changes([f], "x") != [])
            assert status_changes(seen, "x") == ["online"]
            await x.ws.abort()
        seen += await frames_until(watcher, lambda f: status_changes([f], "x") != [])
        assert status_changes(seen, "x") == ["online", "away"]
        [entry] = [e for e in hub.presence(ROOM) if e.member == "x"]
        assert (entry.status, entry.connections) == ("away", ())

        async with raw(url + "/ws", skip_presence=False) as again:
            positions = Positions(welcome)
            positions.see_all(x)
            back = await resume(again, welcome["resume"], positions.streams,
                                auth={"name": "x"})
            assert back["session"] == welcome["session"]
            state = await again.expect("presence")
            assert {e["id"]: e["status"] for e in state["state"]} == {
                "w": "online", "x": "online"}
            seen += await frames_until(watcher,
                                       lambda f: status_changes([f], "x") != [])
            # A sentinel message: everything about x before it has been seen.
            await hub.publish(ROOM, "sentinel")
            seen += await frames_until(watcher, lambda f: f["type"] == "msg")
            assert status_changes(seen, "x") == ["online", "away", "online"]
            assert hub.stats().resumes.get("recovered") == 1


async def test_presence_says_leave_exactly_once_when_the_window_passes() -> None:
    hub = game_hub(HubConfig(resume_window=0.5), authenticate=by_name)
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws", auth={"name": "w"}) as watcher:
            watcher.skip_presence = False
            async with Player.connect(url + "/ws", auth={"name": "x"}) as x:
                seen = await frames_until(watcher, lambda f: status_changes([f], "x") != [])
                await x.ws.drop()  # FIN, no close frame
            seen += await frames_until(watcher, lambda f: status_changes([f], "x") != [])
            assert status_changes(seen, "x") == ["online", "away"]
            assert [e.member for e in hub.presence(ROOM)] == ["w", "x"]
            assert hub.stats().detached_sessions == 1

            seen += await frames_until(watcher, lambda f: status_changes([f], "x") != [])
            assert status_changes(seen, "x") == ["online", "away", "leave"]
            assert [f["leaves"] for f in presence_frames(seen) if f.get("leaves")] == [["x"]]
            assert [e.member for e in hub.presence(ROOM)] == ["w"]
            await hub.publish(ROOM, "sentinel")
            seen += await frames_until(watcher, lambda f: f["type"] == "msg")
            assert status_changes(seen, "x") == ["online", "away", "leave"]
            stats = hub.stats()
            assert (stats.sessions, stats.detached_sessions, stats.rooms) == (1, 0, 1)
        # The watcher said goodbye (1000): its session ends at once. Hypercorn reports
        # a client's close frame to the app as 1006 whatever its code, so there the
        # watcher's session is kept for its window like a drop's.
        await wait_for(lambda: hub.stats().connections == 0)
        if current_backend() == "asyncio":
            assert hub.stats().sessions == 0
        await wait_for(lambda: hub.stats().sessions == 0)
        stats = hub.stats()
        assert (stats.sessions, stats.detached_sessions, stats.rooms, stats.members) == (
            0, 0, 0, 0)
        assert hub.presence(ROOM) == ()


async def test_an_unresumed_session_alone_is_forgotten_after_the_window() -> None:
    hub = game_hub(HubConfig(resume_window=0.5))
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws") as player:
            await player.ws.abort()
        await wait_for(lambda: hub.stats().detached_sessions == 1)
        stats = hub.stats()
        assert (stats.connections, stats.sessions, stats.rooms) == (0, 1, 1)
        assert [e.status for e in hub.presence(ROOM)] == ["away"]
        await wait_for(lambda: hub.stats().sessions == 0)
        stats = hub.stats()
        assert (stats.sessions, stats.detached_sessions, stats.rooms, stats.members) == (
            0, 0, 0, 0)
        assert hub.presence(ROOM) == ()
        # The streams (inbox, room) are closed right after (the close awaits).
        await wait_for(lambda: len(hub.backplane) == 0)  # type: ignore[arg-type]


# 6 ------------------------------------------------------------------------ inbox


async def test_inbox_messages_sent_while_disconnected_are_replayed_once() -> None:
    hub = game_hub(authenticate=by_name)
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws", auth={"name": "x"}) as first:
            welcome = first.welcome
            assert welcome is not None
            assert welcome["streams"][INBOX]["offset"] == 0
            assert await hub.send_to("x", "note", {"n": 1}) == 1
            [note] = await first.collect(1)
            assert (note["stream"], note["offset"], note["data"]) == (INBOX, 1, {"n": 1})
            positions = Positions(welcome)
            positions.see_all(first)
            await first.ws.drop()  # FIN, no close frame
        await wait_for(lambda: hub.stats().detached_sessions == 1)
        for number in (2, 3, 4):
            assert await hub.send_to("x", "note", {"n": number}) == 1

        async with raw(url + "/ws") as second:
            back = await resume(second, welcome["resume"], positions.streams,
                                auth={"name": "x"})
            assert back["session"] == welcome["session"]
            assert back["streams"][INBOX] == {"epoch": welcome["streams"][INBOX]["epoch"],
                                              "offset": 1, "recovered": True}
            assert await hub.send_to("x", "note", {"n": 5}) == 1
            with anyio.fail_after(10):
                while len(room_msgs(second, INBOX)) < 4:
                    await second.frame()
            assert_sequence(room_msgs(second, INBOX), 2, 5)
            # Nothing more on the inbox: a room message comes next.
            await hub.publish(ROOM, "sentinel")
            with anyio.fail_after(10):
                while not room_msgs(second):
                    await second.frame()
            assert len(room_msgs(second, INBOX)) == 4
