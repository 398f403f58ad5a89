"""Test support: real servers (uvicorn on asyncio, hypercorn on trio), a protocol-aware
test client over real sockets, and an in-memory transport for virtual-clock tests."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp

from wsroom import Hub
from wsroom._asgi.transport import Disconnected, Transport
from wsroom._runtime.peer import Peer as ServerPeer
from wsroom._runtime.serve import serve as serve_peer
from wsroom.client._websocket import ConnectionClosed, WebSocket, connect

GAME_DIR = Path(__file__).resolve().parents[2] / "examples" / "fastapi_game"


def load_game() -> ModuleType:
    """examples/fastapi_game/app.py, imported as a user runs it (``--app-dir``)."""
    sys.path.insert(0, str(GAME_DIR))
    try:
        import app as game
    finally:
        sys.path.remove(str(GAME_DIR))
    return game


def hub_app(hub: Hub, path: str = "/ws") -> Starlette:
    """The smallest app a user would write: one WebSocket route and the lifespan."""
    return Starlette(routes=[WebSocketRoute(path, hub.endpoint)], lifespan=hub.lifespan)


def current_backend() -> str:
    try:
        import asyncio

        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "asyncio"


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Run `app` on a real server on 127.0.0.1; yield its ``ws://`` base URL.

    asyncio runs uvicorn (websockets sans-I/O protocol), trio runs hypercorn.
    """
    if current_backend() == "asyncio":
        async with _serve_uvicorn(app) as url:
            yield url
    else:
        async with _serve_hypercorn(app) as url:
            yield url


@asynccontextmanager
async def _serve_uvicorn(app: ASGIApp) -> AsyncIterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # proxy_headers=False: uvicorn would otherwise take X-Forwarded-For from 127.0.0.1
    # itself; the tests check wsroom's own trusted-proxy handling.
    config = uvicorn.Config(app, lifespan="on", log_level="warning", ws="websockets-sansio",
                            timeout_graceful_shutdown=5, proxy_headers=False)
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield f"ws://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


@asynccontextmanager
async def _serve_hypercorn(app: ASGIApp) -> AsyncIterator[str]:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    config.graceful_timeout = 5
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        binds = await tg.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        )
        try:
            yield binds[0].replace("http://", "ws://")
        finally:
            stop.set()


@dataclass
class ServerProcess:
    """A uvicorn server in its own process (see `spawn`)."""

    url: str
    process: anyio.abc.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


@asynccontextmanager
async def spawn(app: str, config: dict[str, Any] | None = None,
                *, send_buffer: int | None = None, ws: str = "websockets-sansio",
                log_level: str = "info", args: Sequence[str] = (),
                environ: dict[str, str] | None = None) -> AsyncIterator[ServerProcess]:
    """Run ``uvicorn tests/apps/<app>`` in a child process on a socket bound here.

    Args:
        app: ``module:attribute`` inside tests/apps.
        config: HubConfig fields, passed as WSROOM_TEST_CONFIG.
        send_buffer: SO_SNDBUF of the listening socket (inherited by accepted sockets),
            to make a stalled reader back up into the server sooner.
        ws: uvicorn's ``--ws`` implementation.
        log_level: uvicorn's ``--log-level``.
        args: more uvicorn options (e.g. ``["--ws-max-size", "65536"]``).
        environ: more environment variables for the server.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    env = {**os.environ, "WSROOM_TEST_CONFIG": json.dumps(config or {}),
           "PYTHONWARNINGS": "default::ResourceWarning", **(environ or {})}
    fd, log_name = tempfile.mkstemp(prefix="wsroom-server-", suffix=".log")
    command = [sys.executable, "-m", "uvicorn", app, "--app-dir",
               str(Path(__file__).parents[1] / "apps"), "--fd", str(sock.fileno()),
               "--ws", ws, "--log-level", log_level,
               "--timeout-graceful-shutdown", "15", *args]
    with os.fdopen(fd, "wb") as log_file:
        process = await anyio.open_process(command, env=env, pass_fds=(sock.fileno(),),
                                           stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(f"ws://127.0.0.1:{port}", process, Path(log_name))
    try:
        with anyio.fail_after(20):
            while "Application startup complete" not in server.log():
                if process.returncode is not None:
                    raise RuntimeError(f"server exited early:\n{server.log()}")
                await anyio.sleep(0.05)
        yield server
    finally:
        sock.close()
        if process.returncode is None:
            process.kill()
        with anyio.move_on_after(10, shield=True):
            await process.wait()
        await process.aclose()
        os.unlink(log_name)


class Player:
    """A wsroom protocol client over a real WebSocket: hello, automatic pongs, batch
    unpacking. Frames are dicts; ``msgs`` collects every ``msg`` frame seen."""

    def __init__(self, ws: WebSocket, *, answer_pings: bool = True,
                 skip_presence: bool = True) -> None:
        self.ws = ws
        self.answer_pings = answer_pings
        self.skip_presence = skip_presence
        self.presence: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.msgs: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []
        self.frames_received = 0
        self.welcome: dict[str, Any] | None = None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, *, hello: bool = True, auth: Any = None, answer_pings: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[Player]:
        ws = await connect(url, **kwargs)
        player = cls(ws, answer_pings=answer_pings)
        try:
            if hello:
                await player.hello(auth)
            yield player
        finally:
            if ws.closed is None:
                with anyio.move_on_after(5, shield=True):
                    await ws.close()

    async def hello(self, auth: Any = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "hello", "v": 1}
        if auth is not None:
            frame["auth"] = auth
        await self.ws.send(json.dumps(frame))
        self.welcome = await self.expect("welcome")
        return self.welcome

    async def frame(self) -> dict[str, Any]:
        """The next frame other than ``ping`` (pings are answered if enabled) and,
        unless `skip_presence` is False, ``presence`` (kept in `presence`)."""
        while True:
            while self.pending:
                frame = self.pending.pop(0)
                if frame["type"] == "ping":
                    if self.answer_pings:
                        await self.ws.send(json.dumps({"type": "pong", "id": frame["id"]}))
                    continue
                if frame["type"] == "presence" and self.skip_presence:
                    self.presence.append(frame)
                    continue
                if frame["type"] == "msg":
                    self.msgs.append(frame)
                self.seen.append(frame)
                return frame
            raw = await self.ws.recv()
            self.frames_received += 1
            assert isinstance(raw, str), "the server sends text frames only"
            self.pending.extend(json.loads(line) for line in raw.split("\n"))

    async def expect(self, kind: str) -> dict[str, Any]:
        frame = await self.frame()
        assert frame["type"] == kind, f"expected {kind}, got {frame}"
        return frame

    async def send(self, event: str, data: Any = None, ref: Any = None) -> None:
        frame: dict[str, Any] = {"type": "msg", "event": event, "data": data}
        if ref is not None:
            frame["ref"] = ref
        await self.ws.send(json.dumps(frame))

    async def request(self, event: str, data: Any = None, ref: str = "r1") -> dict[str, Any]:
        await self.send(event, data, ref)
        while True:
            frame = await self.frame()
            if frame["type"] in ("reply", "error") and frame.get("ref") == ref:
                return frame

    async def until_closed(self, timeout: float = 10) -> int:
        """Read (answering pings) until the server closes; return the close code."""
        with anyio.fail_after(timeout):
            try:
                while True:
                    await self.frame()
            except ConnectionClosed as closed:
                return closed.code

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Keep reading (and answering pings) in the background while inside."""
        async with anyio.create_task_group() as tg:
            async def pump() -> None:
                with anyio.move_on_after(3600):
                    while True:
                        await self.frame()

            tg.start_soon(pump)
            yield
            tg.cancel_scope.cancel()

    async def collect(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        """Read until `count` msg frames have been seen in all."""
        with anyio.fail_after(timeout):
            while len(self.msgs) < count:
                await self.frame()
        return self.msgs


async def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until `predicate()` holds, checking after every scheduling round."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


class MemoryTransport:
    """An in-memory `Transport` for runtime tests under a virtual clock."""

    def __init__(self, headers: list[tuple[bytes, bytes]] | None = None,
                 client: tuple[str, int] | None = ("127.0.0.1", 50000),
                 can_deny: bool = True) -> None:
        self.request = HTTPConnection({
            "type": "websocket", "path": "/ws", "headers": headers or [],
            "client": client, "query_string": b"",
        })
        self.can_deny = can_deny
        self.denied: tuple[int, list[tuple[str, str]]] | None = None
        self._to_server_send, self._to_server = anyio.create_memory_object_stream[
            "str | bytes | Disconnected"
        ](1000)
        self._to_client, self.from_server = anyio.create_memory_object_stream[
            "str | Disconnected"
        ](100_000)
        self.accepted = False
        self.close_code: int | None = None
        self.sent: list[str] = []

    async def accept(self) -> bool:
        self.accepted = True
        return True

    async def refuse(self, code: int) -> None:
        self.close_code = code

    async def deny(self, status: int, headers: list[tuple[str, str]]) -> None:
        assert self.can_deny
        self.denied = (status, headers)

    async def receive(self) -> str | bytes | Disconnected:
        return await self._to_server.receive()

    async def send(self, text: str) -> None:
        assert self.close_code is None, "send after close"
        self.sent.append(text)
        await self._to_client.send(text)

    async def close(self, code: int, reason: str = "") -> None:
        assert self.close_code is None, "closed twice"
        self.close_code = code
        await self._to_client.send(Disconnected(code))

    # client side
    async def client_send(self, frame: dict[str, Any] | str | bytes) -> None:
        data = json.dumps(frame) if isinstance(frame, dict) else frame
        await self._to_server_send.send(data)

    async def client_disconnect(self, code: int = 1000) -> None:
        await self._to_server_send.send(Disconnected(code))

    async def client_frames(self) -> list[dict[str, Any]]:
        """Everything sent to the client so far (unpacked), without waiting."""
        frames = []
        while True:
            try:
                item = self.from_server.receive_nowait()
            except anyio.WouldBlock:
                return frames
            if isinstance(item, Disconnected):
                frames.append({"type": "close", "code": item.code})
            else:
                frames.extend(json.loads(line) for line in item.split("\n"))

    def close_streams(self) -> None:
        for stream in (self._to_server_send, self._to_server, self._to_client,
                       self.from_server):
            stream.close()


class Peer:
    """The client end of a MemoryTransport, driven by the test."""

    def __init__(self, transport: MemoryTransport, answer_pings: bool = True) -> None:
        self.transport = transport
        self.answer_pings = answer_pings
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.closed = anyio.Event()
        self.pings = 0

    async def wait_closed(self, timeout: float = 10) -> int:
        """Wait for the server's close; return its code."""
        with anyio.fail_after(timeout):
            await self.closed.wait()
        assert self.close_code is not None
        return self.close_code

    async def pump(self) -> None:
        """Read server frames until the close; answer pings if enabled."""
        async for item in self.transport.from_server:
            if isinstance(item, Disconnected):
                self.close_code = item.code
                self.closed_at = anyio.current_time()
                self.closed.set()
                return
            for line in item.split("\n"):
                frame = json.loads(line)
                if frame["type"] == "ping":
                    self.pings += 1
                    if self.answer_pings:
                        await self.transport.client_send({"type": "pong", "id": frame["id"]})
                else:
                    self.frames.append(frame)


def server_peer(hub: Hub, transport: Transport) -> ServerPeer:
    """The server side of a connection over `transport` (not started)."""
    return ServerPeer(hub._runtime, transport)


async def serve_transport(hub: Hub, transport: Transport) -> None:
    """Serve one connection over `transport` until it ends (as the ASGI endpoint)."""
    await serve_peer(server_peer(hub, transport))


@asynccontextmanager
async def running(hub: Hub, *, hello: bool = True, answer_pings: bool = True,
                  transport: MemoryTransport | None = None,
                  ) -> AsyncIterator[tuple[Peer, anyio.abc.TaskGroup]]:
    """Run `hub` with one connection over `transport` (a new MemoryTransport by
    default), its peer pumping frames; cancel everything on exit."""
    transport = transport or MemoryTransport()
    peer = Peer(transport, answer_pings)
    async with hub.run(), anyio.create_task_group() as tg:
        tg.start_soon(serve_transport, hub, transport)
        tg.start_soon(peer.pump)
        if hello:
            await transport.client_send({"type": "hello", "v": 1})
        yield peer, tg
        tg.cancel_scope.cancel()
    transport.close_streams()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
"""Debian's Chromium: the browser tests drive it (Playwright's downloads are unreachable)."""


def playwright_or_skip() -> Any:
    """Playwright's ``async_playwright``, or a skip when it or Chromium is missing; on CI
    (``CI=true``) a clear failure instead, never a silent skip."""
    missing = []
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
        async_playwright = None
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return async_playwright
