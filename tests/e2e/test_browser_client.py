"""The browser client (``wsroom.js``, served by `wsroom.static_files`) in a real browser:
Debian's Chromium driven by Playwright, against a wsroom hub on a real uvicorn server, and
against scripted servers for what a correct hub never sends (duplicates, gaps, silence,
refused tokens).

On a machine without Playwright or Chromium these tests skip, except on CI (``CI=true``)
where they fail with a message that says what is missing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from support import CHROMIUM, playwright_or_skip, serve, wait_for
from wsroom import (
    ClientError,
    Connection,
    Handshake,
    HistoryLimits,
    Hub,
    Identity,
    MessageContext,
    RoomConfig,
    should_reconnect,
    static_files,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


PAGE = """<!doctype html>
<meta charset="utf-8"><title>wsroom.js test page</title>
<script type="module">
import * as wsroom from "/wsroom/wsroom.js";

const plain = (v) => v instanceof Map
  ? Object.fromEntries([...v].map(([k, x]) => [k, plain(x)])) : v;
window.wsroom = wsroom;
window.plain = plain;
window.clients = {};
// start(name, url, options): a client whose callbacks record everything in clients[name].log
window.start = (name, url, options = {}) => {
  const log = {states: [], messages: [], snapshots: [], presence: [], errors: []};
  const client = new wsroom.WsroomClient(url, {
    minBackoff: 20, maxBackoff: 200, ...options,
    storage: options.storage === "session" ? window.sessionStorage : null,
    onState: (state, info) => log.states.push({state, ...info}),
    onMessage: (message) => log.messages.push(message),
    onSnapshot: (snapshot) => log.snapshots.push(snapshot),
    onPresence: (room, roster) => log.presence.push({room, roster: plain(roster)}),
    onError: (frame) => log.errors.push(frame),
  });
  window.clients[name] = {client, log};
  client.connect();
};
window.roster = (name) =>
  Object.keys(plain(clients[name].client.presence).lobby ?? {}).sort().join();
window.connects = (name) =>
  clients[name].log.states.filter((s) => s.state === "connected").length;
window.ready = true;
</script>
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio only


class Browser:
    """One page of the test page, and the server's WebSocket URL."""

    def __init__(self, page: Any, ws_url: str) -> None:
        self.page = page
        self.ws_url = ws_url
        self.page_errors: list[str] = []

    async def start(self, name: str = "a", **options: Any) -> None:
        await self.page.evaluate("([n, u, o]) => start(n, u, o)", [name, self.ws_url, options])

    async def js(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)

    async def until(self, expression: str, timeout: float = 10) -> None:
        try:
            await self.page.wait_for_function(expression, timeout=timeout * 1000)
        except Exception:  # say what the page saw
            logs = await self.js("JSON.stringify(Object.fromEntries(Object.entries("
                                 "window.clients ?? {}).map(([n, c]) => [n, c.log])))")
            pytest.fail(f"the page never saw {expression}; its clients' logs: {logs}")

    async def log(self, name: str = "a") -> dict[str, Any]:
        return dict(await self.js("n => clients[n].log", name))

    async def messages(self, name: str = "a", stream: str = "lobby") -> list[tuple[int, Any]]:
        log = await self.log(name)
        return [(m["offset"], m["data"]) for m in log["messages"] if m["stream"] == stream]

    async def reload(self) -> None:
        await self.page.reload()
        await self.until("window.ready === true")


@asynccontextmanager
async def browser(app: Any) -> AsyncIterator[Browser]:
    """Serve `app` (which must serve PAGE at ``/``) and open it in Chromium."""
    async_playwright = playwright_or_skip()
    async with serve(app) as base, async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                    args=["--no-sandbox"])
        try:
            page = await chromium.new_page()
            result = Browser(page, base + "/ws")
            page.on("pageerror", lambda error: result.page_errors.append(str(error)))
            await page.goto(base.replace("ws://", "http://") + "/")
            await result.until("window.ready === true")
            yield result
            assert result.page_errors == []
        finally:
            await chromium.close()


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


def app_for(endpoint: Any, lifespan: Any = None) -> Starlette:
    """The test page, the module, and a WebSocket endpoint at /ws."""
    return Starlette(routes=[
        Route("/", page),
        Mount("/wsroom", app=static_files()),
        WebSocketRoute("/ws", endpoint),
    ], lifespan=lifespan)


class Gate:
    """Holds `authenticate` (so a reconnecting client waits) while closed."""

    def __init__(self) -> None:
        self.opened = anyio.Event()
        self.opened.set()

    def close(self) -> None:
        self.opened = anyio.Event()


def lobby_hub(gate: Gate | None = None, **kwargs: Any) -> tuple[Hub, list[str]]:
    """A hub whose clients join "lobby"; `auth` is the member id. Events: ``say``
    (publish, reply upper-case), ``refuse`` (ClientError), ``num`` (an int), ``slow``, ``bye``
    (close with the given code). Returns the hub and the list of connects."""
    connects: list[str] = []

    async def authenticate(handshake: Handshake) -> Identity:
        if gate is not None:
            await gate.opened.wait()
        return Identity(id=str(handshake.auth or "anon"))

    hub = Hub(authenticate=authenticate, **kwargs)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        connects.append(conn.session)
        await conn.join("lobby")

    @hub.on("say")
    async def say(ctx: MessageContext, data: str) -> str:
        await ctx.publish("lobby", "said", data)
        return data.upper()

    @hub.on("refuse")
    async def refuse(ctx: MessageContext, data: Any) -> None:
        raise ClientError("not_now", "come back later")

    @hub.on("num")
    async def num(ctx: MessageContext, data: int) -> int:
        return data + 1

    @hub.on("slow")
    async def slow(ctx: MessageContext, data: Any) -> None:
        await anyio.sleep(0.5)

    @hub.on("bye")
    async def bye(ctx: MessageContext, data: int) -> None:
        ctx.connection.close(data)

    return hub, connects


async def publish(hub: Hub, *values: int) -> None:
    for value in values:
        await hub.publish("lobby", "n", value)


async def drop_and_publish_while_away(b: Browser, hub: Hub, gate: Gate, *values: int) -> None:
    """Close the page's connection with 4000 (reconnect) and publish `values` while its
    session is detached; then let the page back in."""
    gate.close()
    await b.js("clients.a.client.request('bye', 4000).catch((e) => { window.byeError = e.code })")
    await b.until("window.byeError === 'connection_lost'")
    await wait_for(lambda: hub.stats().detached_sessions == 1)
    await publish(hub, *values)
    await b.js("() => { window.queued = clients.a.client.request('num', 1) }")  # sent later
    gate.opened.set()
    await b.until("connects('a') === 2")
    assert await b.js("window.queued") == 2


async def test_the_helpers_agree_with_python() -> None:
    hub, _ = lobby_hub()
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        codes = await b.js("Array.from({length: 4000}, (_, i) => 1000 + i)"
                           ".filter(wsroom.shouldReconnect)")
        assert codes == [code for code in range(1000, 5000) if should_reconnect(code)]
        delays = await b.js("[0, 3, 10, 60].map((a) => Array.from({length: 300}, "
                            "() => wsroom.backoffDelay(a)))")
        for attempt, samples in zip([0, 3, 10, 60], delays, strict=True):
            assert all(0 <= d <= min(20000, 500 * 2**attempt) for d in samples)
        assert min(delays[2]) < 2000 < 18000 < max(delays[2])  # spread over the range


async def test_welcome_messages_in_order_and_requests() -> None:
    hub, _ = lobby_hub()
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        # Sent in the same task as connect(): queued before the welcome, sent after it.
        assert await b.js("""(url) => {
            start('a', url);
            clients.a.client.send('say', 'early');
            return clients.a.client.state;
        }""", b.ws_url) == "connecting"
        await b.until("clients.a.client.state === 'connected'")
        replies = await b.js("""async () => {
            const c = clients.a.client;
            const outcome = async (p) => p.then((d) => ['ok', d], (e) => ['error', e.code]);
            const late = outcome(c.request('slow', null, {timeout: 50}));
            return [await outcome(c.request('say', 'x')), await outcome(c.request('say', 'y')),
                    await outcome(c.request('num', 41)),
                    await outcome(c.request('num', 'nope')), await outcome(c.request('refuse')),
                    await outcome(c.request('missing')), await late];
        }""")
        assert replies == [["ok", "X"], ["ok", "Y"], ["ok", 42], ["error", "invalid_data"],
                           ["error", "not_now"], ["error", "unknown_event"],
                           ["error", "timeout"]]
        await publish(hub, 4, 5)
        await b.until("clients.a.log.messages.filter((m) => m.stream === 'lobby').length === 5")
        assert await b.messages() == [(1, "early"), (2, "x"), (3, "y"), (4, 4), (5, 5)]
        log = await b.log()
        assert [s["state"] for s in log["states"]] == ["connecting", "connected"]
        connected = log["states"][1]
        assert connected["resumed"] is False
        assert connected["recovered"] == {"@inbox": False, "lobby": False}
        assert connected["session"] == await b.js("clients.a.client.session")
        positions = await b.js("plain(clients.a.client.positions)")
        assert positions["lobby"]["offset"] == 5


async def test_a_reconnect_code_resumes_and_delivers_what_was_missed_once() -> None:
    gate = Gate()
    hub, connects = lobby_hub(gate)
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        await b.start()
        await b.until("clients.a.client.state === 'connected'")
        await publish(hub, 1, 2)
        await b.until("clients.a.log.messages.length === 2")
        await drop_and_publish_while_away(b, hub, gate, 3, 4, 5)
        await publish(hub, 6)
        await b.until("clients.a.log.messages.length >= 6")
        await anyio.sleep(0.2)  # a duplicate would show up now
        assert await b.messages() == [(n, n) for n in range(1, 7)]
        log = await b.log()
        states = [s["state"] for s in log["states"]]
        assert states == ["connecting", "connected", "reconnecting", "connected"]
        assert log["states"][2]["code"] == 4000
        resumed = log["states"][3]
        assert resumed["resumed"] is True
        assert resumed["recovered"] == {"@inbox": True, "lobby": True}
        assert resumed["session"] == log["states"][1]["session"] == connects[0]
        assert await b.js("clients.a.client.resumed") is True
        assert len(connects) == 2


async def test_a_terminal_code_closes_for_good() -> None:
    hub, connects = lobby_hub()
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        await b.start()
        await b.until("clients.a.client.state === 'connected'")
        await b.js("clients.a.client.send('bye', 4501)")
        await b.until("clients.a.client.state === 'closed'")
        await anyio.sleep(0.5)  # no reconnect (the backoff is 20-200 ms)
        log = await b.log()
        assert [s["state"] for s in log["states"]] == ["connecting", "connected", "closed"]
        assert log["states"][-1]["code"] == 4501
        assert len(connects) == 1
        refused = await b.js("clients.a.client.request('say', 'x').catch((e) => e.code)")
        assert refused == "closed"
        await wait_for(lambda: hub.stats().sessions == 0)  # terminal: the session ended


async def test_a_stream_that_is_not_recovered_gets_a_snapshot() -> None:
    gate = Gate()
    published: list[int] = []

    async def snapshot(conn: Connection, stream: str) -> Any:
        return {"stream": stream, "count": len(published)}

    hub, _ = lobby_hub(gate, snapshot=snapshot, room_config=lambda name: RoomConfig(
        history=HistoryLimits(max_messages=2)))
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        await b.start()
        await b.until("clients.a.log.snapshots.length === 2")  # a new session: both streams
        first = await b.log()
        assert {s["stream"]: s["data"]["count"] for s in first["snapshots"]} == {
            "@inbox": 0, "lobby": 0}
        published.extend(range(1, 6))  # 5 messages while away; history keeps only 2
        await drop_and_publish_while_away(b, hub, gate, *published)
        await b.until("clients.a.log.snapshots.length === 3")
        await publish(hub, 6)
        await b.until("clients.a.log.messages.length === 1")
        log = await b.log()
        resumed = log["states"][-1]
        assert (resumed["state"], resumed["resumed"]) == ("connected", True)
        assert resumed["recovered"] == {"@inbox": True, "lobby": False}
        snap = log["snapshots"][-1]
        assert (snap["stream"], snap["offset"], snap["data"]["count"]) == ("lobby", 5, 5)
        assert await b.messages() == [(6, 6)]  # 1-5 are in the snapshot, not replayed
        positions = await b.js("plain(clients.a.client.positions)")
        assert positions["lobby"]["offset"] == 6


async def test_presence_rosters_follow_joins_and_leaves() -> None:
    hub, _ = lobby_hub()
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        await b.start("ann", auth="ann")
        await b.until("roster('ann') === 'ann'")
        await b.start("bob", auth="bob")
        await b.until("roster('ann') === 'ann,bob' && roster('bob') === 'ann,bob'")
        entry = await b.js("plain(clients.ann.client.presence).lobby.bob")
        assert (entry["id"], entry["status"]) == ("bob", "online")
        await b.js("clients.bob.client.close()")  # 1000: bob's session ends, he leaves
        await b.until("roster('ann') === 'ann'")
        calls = (await b.log("ann"))["presence"]
        assert [sorted(call["roster"]) for call in calls][-1] == ["ann"]
        assert all(call["room"] == "lobby" for call in calls)
        assert (await b.log("bob"))["states"][-1]["code"] == 1000


@pytest.mark.parametrize("restore", [False, True])
async def test_a_reload_resumes_from_session_storage_and_close_clears_it(restore: bool) -> None:
    async def snapshot(conn: Connection, stream: str) -> Any:
        return {"stream": stream}

    hub, connects = lobby_hub(snapshot=snapshot)
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        await b.start(storage="session", restorePositions=restore)
        await b.until("clients.a.client.state === 'connected'")
        await publish(hub, 1, 2)
        await b.until("clients.a.log.messages.length === 2")
        session = await b.js("clients.a.client.session")
        await b.reload()  # the socket closes with 1001: the session waits for a resume
        await publish(hub, 3)
        await b.start(storage="session", restorePositions=restore)
        await b.until("clients.a.client.state === 'connected'")
        await publish(hub, 4)
        await b.until(f"clients.a.log.messages.length >= {2 if restore else 1}")
        await anyio.sleep(0.2)
        log = await b.log()
        assert await b.js("[clients.a.client.session, clients.a.client.resumed]") == [
            session, True]
        if restore:  # the page kept its state: only what it missed, no snapshot
            assert await b.messages() == [(3, 3), (4, 4)]
            assert log["states"][-1]["recovered"] == {"@inbox": True, "lobby": True}
            assert log["snapshots"] == []
        else:  # the page's memory is gone: the same session, and a snapshot of each stream
            assert await b.messages() == [(4, 4)]
            assert log["states"][-1]["recovered"] == {"@inbox": False, "lobby": False}
            assert sorted((s["stream"], s["offset"]) for s in log["snapshots"]) == [
                ("@inbox", 0), ("lobby", 3)]
        assert json.loads(await b.js("sessionStorage.getItem('wsroom')"))["session"] == session
        await b.js("clients.a.client.close()")
        assert await b.js("sessionStorage.getItem('wsroom')") is None
        await wait_for(lambda: hub.stats().sessions == 0)
        assert connects == [session, session]


# ------------------------------------------------------------------- scripted servers

SendFrame = Callable[[Any], Awaitable[None]]


class Scripted:
    """A raw WebSocket endpoint: accepts, reads the hello, runs ``script(send, number)``;
    records the hellos, what the client sent afterwards, and its close codes."""

    def __init__(self, script: Callable[[SendFrame, int], Awaitable[None]]) -> None:
        self.script = script
        self.hellos: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.codes: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        self.hellos.append(json.loads((await receive())["text"]))

        async def send_frame(frame: Any) -> None:
            if isinstance(frame, dict) and frame["type"].startswith("websocket."):
                await send(frame)
            else:
                text = frame if isinstance(frame, str) else json.dumps(frame)
                await send({"type": "websocket.send", "text": text})

        await self.script(send_frame, len(self.hellos))
        while (message := await receive())["type"] != "websocket.disconnect":
            self.received.append(json.loads(message["text"]))
        self.codes.append(int(message.get("code", 1005)))


def welcome(room: int | None = 0, *, recovered: bool = False, resume: str | None = None,
            interval: float = 30, timeout: float = 10) -> dict[str, Any]:
    streams = {} if room is None else {
        "room": {"epoch": "e", "offset": room, "recovered": recovered}}
    return {"type": "welcome", "v": 1, "session": "s", "resume": resume,
            "ping_interval": interval, "pong_timeout": timeout, "streams": streams}


def msg(offset: int, epoch: str = "e") -> dict[str, Any]:
    return {"type": "msg", "stream": "room", "epoch": epoch, "offset": offset, "event": "n",
            "data": offset}


def close(code: int) -> dict[str, Any]:
    return {"type": "websocket.close", "code": code}


async def test_duplicates_are_dropped_batches_unpacked_and_pings_answered() -> None:
    async def script(send: SendFrame, number: int) -> None:
        if number == 1:
            await send(welcome(resume="t1"))
            await send(msg(1))
            await send("\n".join(json.dumps(m) for m in (msg(2), msg(2), msg(1), msg(3))))
            await send(close(4000))
        else:  # the replay overlaps what the client has
            await send(welcome(3, recovered=True, resume="t2"))
            await send("\n".join(json.dumps(m) for m in (msg(2), msg(3), msg(4))) + "\n")
            await send({"type": "ping", "id": 7})
            await send({"type": "error", "code": "bad_json", "detail": "not JSON"})

    server = Scripted(script)
    async with browser(app_for(server)) as b:
        await b.start()
        await b.until("clients.a.log.errors.length === 1")
        assert await b.messages(stream="room") == [(n, n) for n in (1, 2, 3, 4)]
        assert (await b.log())["errors"][0]["code"] == "bad_json"
        await wait_for(lambda: {"type": "pong", "id": 7} in server.received)
    assert server.hellos[0] == {"type": "hello", "v": 1}
    assert server.hellos[1] == {"type": "hello", "v": 1, "resume": "t1",
                                "streams": {"room": {"epoch": "e", "offset": 3}}}


async def test_gaps_epoch_changes_bad_frames_and_silence_make_it_reconnect() -> None:
    async def script(send: SendFrame, number: int) -> None:
        if number == 4:  # then never a frame: the client leaves after 0.4 s
            await send(welcome(1, recovered=True, interval=0.2, timeout=0.2))
            return
        await send(welcome(0 if number == 1 else 1, recovered=number > 1))
        bad = {1: [msg(1), msg(3)], 2: [msg(2, epoch="other")], 3: ["[1, 2]"],
               5: [msg(2)]}[number]
        for frame in bad:
            await send(frame)

    server = Scripted(script)
    async with browser(app_for(server)) as b:
        await b.start()
        await b.until("clients.a.log.messages.length === 2 && connects('a') === 5")
        assert await b.messages(stream="room") == [(1, 1), (2, 2)]
        await wait_for(lambda: len(server.codes) == 4)
        assert await b.js("clients.a.client.state") == "connected"
        assert server.codes == [3010, 3010, 3010, 3012]  # all say "reconnect" to the server
    assert [h.get("streams") for h in server.hellos[1:]] == [
        {"room": {"epoch": "e", "offset": 1}}] * 4
    assert all(should_reconnect(code) for code in server.codes[:4])


async def test_a_refused_token_starts_a_new_session_once() -> None:
    async def script(send: SendFrame, number: int) -> None:
        if number in (1, 3):
            await send(welcome(resume=f"t{number}"))
            await send(close(1012))
        else:
            await send(close(3500))

    server = Scripted(script)
    async with browser(app_for(server)) as b:
        await b.start()
        await b.until("clients.a.client.state === 'closed'")
        log = await b.log()
        assert log["states"][-1]["code"] == 3500
    assert [h.get("resume") for h in server.hellos] == [None, "t1", None, "t3", None]
    assert [h.get("streams") for h in server.hellos] == [None, {"room": {
        "epoch": "e", "offset": 0}}, None, {"room": {"epoch": "e", "offset": 0}}, None]
