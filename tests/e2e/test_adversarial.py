"""Adversarial inputs against a real server: uvicorn in its own process (support.spawn,
tests/apps/adversary_app.py), hostile clients that write WebSocket frames themselves
(wsproto for the handshake and for reading, raw frames for what no library sends), and a
well-behaved bystander in the same room.

Every case checks three things: the attacker gets the close code or error frame that
docs/topics/protocol.md documents; the server's memory stays bounded (the peak RSS of
its process, VmHWM, and the hub's queued bytes); and the bystander receives every
broadcast of the room, in order, while it happens.

Where a limit is enforced depends on the ASGI server: uvicorn (websockets and
websockets-sansio) caps a message at ``--ws-max-size`` (16 MiB by default) while it
reads and inflates it, and wsroom checks ``max_message_bytes`` (64 KiB) on what it is
handed. Both close with 1009; ``HubStats.closes`` tells which one did it
(``message_too_big``: wsroom; ``client_closed``: the server closed on its own and told the
hub with a disconnect).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.abc import SocketStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from support import Player, ServerProcess, spawn, wait_for
from wsroom import CloseCode
from wsroom.client._websocket import HandshakeRejected, connect

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

APP = "adversary_app:app"
SECRET = "SECRET-CREDENTIAL-5e8b1f"
MARKER = "PAYLOAD-MARKER-93c7aa"
LIMIT = 64 * 1024
"""wsroom's default max_message_bytes."""
MiB = 1024 * 1024

SERVERS = {
    # uvicorn's --ws implementation, and its --ws-max-size (None: uvicorn's 16 MiB)
    "sansio-default": ("websockets-sansio", None),
    "sansio-ws_max_size": ("websockets-sansio", LIMIT),
    "legacy-default": ("websockets", None),
    "legacy-ws_max_size": ("websockets", LIMIT),
}


@asynccontextmanager
async def server(name: str = "sansio-default", config: dict[str, Any] | None = None,
                 args: Sequence[str] = (), **kwargs: Any) -> AsyncIterator[ServerProcess]:
    ws, max_size = SERVERS[name]
    if max_size is not None:
        args = [*args, "--ws-max-size", str(max_size)]
    async with spawn(APP, config, ws=ws, args=args, **kwargs) as process:
        yield process


# --------------------------------------------------------------------- memory


def memory(process: ServerProcess) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of the server process, in bytes."""
    values = {}
    with open(f"/proc/{process.process.pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


@asynccontextmanager
async def peak_growth(process: ServerProcess, bound: int) -> AsyncIterator[None]:
    """Assert that the server's peak RSS while inside grows by less than `bound` bytes
    over its RSS on entry."""
    before = memory(process)["VmRSS"]
    yield
    grown = memory(process)["VmHWM"] - before
    assert grown < bound, f"server RSS peaked {grown / MiB:.1f} MiB above its start"


# ------------------------------------------------------------------- attacker


def raw_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False
              ) -> bytes:
    """A masked client frame, written by hand: any opcode, payload or RSV1 bit."""
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    if size:
        key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
        payload = (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big")
    return head + mask + payload


TEXT, BINARY, CONTINUATION = 0x1, 0x2, 0x0


def msg(event: str, data: Any = None, ref: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "msg", "event": event, "data": data}
    if ref is not None:
        frame["ref"] = ref
    return json.dumps(frame)


class Refused(Exception):
    """The server answered the upgrade with an HTTP status."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers


@dataclass
class Attacker:
    """A hostile client: wsproto does the handshake and reads; what it sends can be any
    bytes. A background reader collects every frame (batches unpacked) and the close
    code, and answers the server's close like any client library would. Send errors
    after the server closed are swallowed: an attacker does not care."""

    stream: SocketStream
    ws: WSConnection
    extensions: list[Any]
    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    closed: anyio.Event = field(default_factory=anyio.Event)
    broken: bool = False
    answer_close: bool = True
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def send_raw(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            async with self.lock:
                await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.broken = True

    async def send(self, text: str) -> None:
        """One text message, through wsproto (compressed if negotiated)."""
        try:
            data = self.ws.send(TextMessage(data=text))
        except Exception:  # wsproto refuses once the close handshake started
            self.broken = True
            return
        await self.send_raw(data)

    async def hello(self, **fields: Any) -> dict[str, Any]:
        await self.send(json.dumps({"type": "hello", "v": 1, **fields}))
        return await self.wait_frame(lambda f: f["type"] == "welcome")

    async def request(self, event: str, data: Any = None, ref: str = "r") -> dict[str, Any]:
        """Send a `msg` with `ref`; return its reply (or error) frame."""
        await self.send(msg(event, data, ref))
        return await self.wait_frame(
            lambda f: f["type"] in ("reply", "error") and f.get("ref") == ref)

    async def wait_frame(self, predicate: Callable[[dict[str, Any]], bool],
                         timeout: float = 10) -> dict[str, Any]:
        """The first frame received that satisfies `predicate` (waiting for it)."""
        def found() -> list[dict[str, Any]]:
            return [f for f in self.frames if predicate(f)]

        await wait_for(lambda: self.closed.is_set() or bool(found()), timeout)
        assert found(), f"closed with {self.close_code} before the expected frame"
        return found()[0]

    async def drop(self) -> None:
        """Close the TCP connection without a close frame."""
        self.broken = True
        await self.stream.aclose()

    async def wait_closed(self, timeout: float = 15) -> int:
        with anyio.fail_after(timeout):
            await self.closed.wait()
        assert self.close_code is not None
        return self.close_code

    def errors(self, code: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "error"
                and (code is None or f["code"] == code)]

    async def _read(self) -> None:
        parts: list[str] = []
        while self.close_code is None:
            try:
                data: bytes | None = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError):
                data = None
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        text, parts = "".join(parts), []
                        self.frames.extend(json.loads(line) for line in text.split("\n"))
                elif isinstance(event, Message):
                    raise AssertionError("the server sent a binary frame")
                elif isinstance(event, Ping):
                    await self.send_raw(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    if self.answer_close:
                        try:
                            answer = self.ws.send(event.response())
                        except Exception:
                            answer = b""
                        await self.send_raw(answer)
            if data is None and self.close_code is None:
                self.close_code = 1006
        self.closed.set()
        if self.answer_close:
            self.broken = True
            await self.stream.aclose()


@asynccontextmanager
async def attacker(url: str, *, headers: Sequence[tuple[str, str]] = (),
                   deflate: bool = False) -> AsyncIterator[Attacker]:
    """Open a WebSocket to ``url/ws`` as an attacker; raise `Refused` on an HTTP answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await anyio.connect_tcp(parts.hostname, parts.port)
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(
            host=f"{parts.hostname}:{parts.port}", target="/ws",
            extra_headers=[(k.encode(), v.encode()) for k, v in headers],
            extensions=[PerMessageDeflate()] if deflate else [])))
        accepted: AcceptConnection | None = None
        with anyio.fail_after(10):
            while accepted is None:
                ws.receive_data(await stream.receive())
                for event in ws.events():
                    if isinstance(event, RejectConnection):
                        raise Refused(event.status_code, {
                            k.decode().lower(): v.decode() for k, v in event.headers})
                    if isinstance(event, AcceptConnection):
                        accepted = event
        client = Attacker(stream, ws, list(accepted.extensions))
        async with anyio.create_task_group() as tg:
            tg.start_soon(client._read)
            yield client
            if not client.broken:  # still open: say goodbye, as a client would
                with contextlib.suppress(Exception):
                    await client.send_raw(ws.send(CloseConnection(code=1000)))
            with anyio.move_on_after(5):
                await client.closed.wait()
            tg.cancel_scope.cancel()


# ------------------------------------------------------------------ bystander


def lobby_msgs(player: Player) -> list[dict[str, Any]]:
    return [m for m in player.msgs if m["stream"] == "lobby"]


def ticks(player: Player) -> list[int]:
    return [m["data"]["n"] for m in lobby_msgs(player) if m["event"] == "tick"]


@asynccontextmanager
async def bystander(url: str, count: int = 200, rate: float = 100
                    ) -> AsyncIterator[Player]:
    """A well-behaved member of 'lobby' that asks the server to publish `count` ticks at
    about `rate`/s and reads (answering pings) while the attack runs inside; on exit
    it checks that it got every tick, in order, and every message of the room without a
    hole."""
    async with Player.connect(url + "/ws", auth="player:witness") as player:
        assert player.welcome is not None
        start = player.welcome["streams"]["lobby"]["offset"]
        assert (await player.request("ticks", {"count": count, "rate": rate}))["data"] is True
        async with player.reading():
            yield player
            await wait_for(lambda: len(ticks(player)) >= count, timeout=60)
        offsets = [m["offset"] for m in lobby_msgs(player)]
        assert offsets == list(range(start + 1, start + 1 + len(offsets)))
        assert ticks(player) == list(range(count))


async def server_stats(url: str) -> dict[str, Any]:
    async with Player.connect(url + "/ws", auth="player:observer") as observer:
        stats: dict[str, Any] = (await observer.request("stats"))["data"]
    return stats


# ---------------------------------------------------------------- 1. size (1009)


@asyncio_only
@pytest.mark.parametrize("variant", list(SERVERS))
async def test_oversized_and_fragmented_messages_close_1009(variant: str) -> None:
    """One frame over the limit, a frame header that announces 1 GiB, and a message of
    many small continuation frames that adds up to more than the limit: each attacker
    gets 1009. Without --ws-max-size uvicorn assembles messages up to 16 MiB and wsroom
    closes (closes['message_too_big']); with --ws-max-size 65536 uvicorn closes by itself
    while reading (the hub sees a disconnect with 1009), before the message is
    complete."""
    server_limited = SERVERS[variant][1] is not None
    async with server(variant) as process, bystander(process.url):
        async with peak_growth(process, 40 * MiB):
            async with attacker(process.url) as one:
                await one.hello()
                await one.send(msg("chat", "z" * MiB))
                assert await one.wait_closed() == CloseCode.MESSAGE_TOO_BIG

            async with attacker(process.url) as announcer:
                await announcer.hello()
                # header of a 1 GiB text frame, then only 1 KiB of it
                header = bytes([0x81, 0x80 | 127]) + (1 << 30).to_bytes(8, "big")
                await announcer.send_raw(header + os.urandom(4) + b"x" * 1024)
                assert await announcer.wait_closed() == CloseCode.MESSAGE_TOO_BIG

            async with attacker(process.url) as fragments:
                await fragments.hello()
                piece = b"z" * 100
                first = raw_frame(TEXT, b'{"type":"msg","event":"chat","data":"', fin=False)
                middle = b"".join(raw_frame(CONTINUATION, piece, fin=False)
                                  for _ in range(LIMIT // len(piece) + 10))
                await fragments.send_raw(first + middle)
                if not server_limited:
                    # the server waits for the end of the message; wsroom checks it then
                    await fragments.send_raw(raw_frame(CONTINUATION, b'"}'))
                assert await fragments.wait_closed() == CloseCode.MESSAGE_TOO_BIG
        stats = await server_stats(process.url)
    closes = stats["closes"]
    if server_limited:
        # uvicorn caught all three: wsroom never got the messages, only a disconnect
        # (with --ws websockets, only after its 10 s close timeout: the unread rest of
        # the 1 MiB frame stands in front of the client's FIN)
        assert closes.get("message_too_big", 0) == 0
    else:
        # wsroom closed the 1 MiB frame and the fragmented message; uvicorn refused the
        # 1 GiB header (over its 16 MiB) by itself
        assert closes["message_too_big"] == 2
    assert stats["queued_bytes"] < LIMIT


# ----------------------------------------------------- 2. compression bomb (1009)


BOMB_PREFIX = b'{"type":"msg","event":"chat","data":"'


@cache
def deflate_bomb(size: int, window_bits: int) -> bytes:
    """A permessage-deflate payload that inflates to a JSON `msg` of about `size` bytes
    of "0", compressed chunk by chunk (never held inflated here)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -window_bits)
    chunk = b"0" * MiB
    parts = [compressor.compress(BOMB_PREFIX)]
    parts.extend(compressor.compress(chunk) for _ in range(size // MiB))
    parts.append(compressor.compress(b'"}'))
    data = b"".join(parts) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


@asyncio_only
@pytest.mark.parametrize("variant", list(SERVERS))
async def test_compression_bombs_close_1009_with_bounded_memory(variant: str) -> None:
    """permessage-deflate is negotiated (uvicorn enables it by default). A frame of
    ~10 KB that inflates to 10 MiB, and one of ~130 KB that inflates to 128 MiB: each
    attacker gets 1009 and the server's memory stays bounded. uvicorn never inflates
    past its --ws-max-size (websockets bounds the decompressor): by default that is
    16 MiB per message, which it inflates and hands to wsroom (10 MiB bomb: wsroom's
    1009 after the whole message is in memory); with --ws-max-size 65536 it stops at
    64 KiB."""
    server_limited = SERVERS[variant][1] is not None
    async with server(variant) as process, bystander(process.url):
        for size, bound in [(10 * MiB, 48 * MiB), (128 * MiB, 80 * MiB)]:
            if server_limited:
                bound = 8 * MiB
            async with attacker(process.url, deflate=True) as bomber:
                assert [type(e) for e in bomber.extensions] == [PerMessageDeflate]
                extension = bomber.extensions[0]
                bits = min(12, extension.client_max_window_bits or 15)
                await bomber.hello()
                payload = deflate_bomb(size, bits)
                assert len(payload) < size // 500
                async with peak_growth(process, bound):
                    await bomber.send_raw(raw_frame(TEXT, payload, rsv1=True))
                    assert await bomber.wait_closed() == CloseCode.MESSAGE_TOO_BIG
        stats = await server_stats(process.url)
    # wsroom saw (and refused) only the 10 MiB bomb, and only without --ws-max-size
    assert stats["closes"].get("message_too_big", 0) == (0 if server_limited else 1)


# ------------------------------------------------- 3. invalid UTF-8, binary frames


@asyncio_only
@pytest.mark.parametrize("variant", ["sansio-default", "legacy-default"])
async def test_invalid_utf8_closes_1007_and_binary_frames_are_bad_frames(
    variant: str,
) -> None:
    """Invalid UTF-8 in a text frame, in one frame or split across continuation frames
    (or a UTF-8-encoded surrogate), is closed by the ASGI server with 1007 before wsroom
    sees it. A binary frame after the hello is answered with an error frame
    ``bad_frame`` (no ref) and the connection keeps serving; as the first frame it
    closes 3501."""
    async with server(variant) as process, bystander(process.url):
        for payload in [b'{"type":"msg","event":"chat","data":"\xff\xfe"}',
                        b'{"type":"msg","event":"chat","data":"\xed\xa0\x80"}']:
            async with attacker(process.url) as bad:
                await bad.hello()
                await bad.send_raw(raw_frame(TEXT, payload))
                assert await bad.wait_closed() == 1007
        async with attacker(process.url) as split:
            await split.hello()
            await split.send_raw(raw_frame(TEXT, b'{"type":"msg","data":"\xc3', fin=False)
                                 + raw_frame(CONTINUATION, b'("}'))
            assert await split.wait_closed() == 1007

        async with attacker(process.url) as binary:
            await binary.hello()
            for _ in range(3):
                await binary.send_raw(raw_frame(BINARY, msg("chat", MARKER).encode()))
            reply = await binary.request("chat", "fine", ref="r1")
            assert reply == {"type": "reply", "ref": "r1", "data": True}
            assert binary.errors() == [{"type": "error", "code": "bad_frame",
                                        "detail": "binary frames are not accepted"}] * 3
            assert not binary.closed.is_set()
            await binary.send_raw(raw_frame(0x8, (1000).to_bytes(2, "big")))
            assert await binary.wait_closed() == 1000

        async with attacker(process.url) as binary_first:
            await binary_first.send_raw(raw_frame(BINARY, b'{"type":"hello","v":1}'))
            assert await binary_first.wait_closed() == CloseCode.BAD_REQUEST
            assert binary_first.frames == []


# ------------------------------------------------------------ 4. flood (3013)


@asyncio_only
async def test_message_flood_is_rate_limited_then_closed_3013() -> None:
    """An attacker sends ~10,000 messages/s (batches of 100 frames every 10 ms). First
    it ignores the server's close and keeps going for 20,000 messages (about two
    seconds); then it reconnects after each close, nine times. Each connection gets
    (at most) its burst handled, ``rate_limited`` error frames for the messages dropped
    (with their refs), then 3013; nothing it sends after that is handled. The
    bystander gets every broadcast in order (including the attacker's handled chats)
    and the server's memory and queues stay bounded."""
    burst, rate, patience = 100, 50, 20  # HubConfig's defaults
    replied: dict[int, set[str]] = {}
    async with server() as process, bystander(process.url, count=300) as witness:
        async with peak_growth(process, 40 * MiB):
            for round_ in range(10):
                deaf = round_ == 0
                async with attacker(process.url) as flood:
                    flood.answer_close = not deaf
                    await flood.hello()
                    started = anyio.current_time()
                    sent = 0
                    while sent < (20_000 if deaf else 30_000) and not flood.broken:
                        refs = [f"{round_}.{sent + i}" for i in range(100)]
                        await flood.send_raw(b"".join(
                            raw_frame(TEXT, msg("chat", ref, ref).encode()) for ref in refs))
                        sent += 100
                        await anyio.sleep(0.01)
                    assert await flood.wait_closed() == CloseCode.RATE_LIMITED
                    elapsed = anyio.current_time() - started
                    refused = flood.errors("rate_limited")
                    assert len(refused) >= patience - 1
                    assert flood.errors() == refused
                    assert {e["detail"] for e in refused} == {"too many messages: slow down"}
                    replies = {f["ref"] for f in flood.frames if f["type"] == "reply"}
                    assert replies
                    assert not replies & {e["ref"] for e in refused}
                    assert len(replies) <= burst + rate * (elapsed + 1)
                    assert len(replies) + len(refused) < sent
                    replied[round_] = replies
                    if deaf:
                        await flood.drop()
        stats = await server_stats(process.url)
    for round_, replies in replied.items():
        handled = {m["data"] for m in lobby_msgs(witness)
                   if m["event"] == "chat" and m["data"].startswith(f"{round_}.")}
        # every reply is for a handled message; a handler still running when the close
        # was requested completes (it published) but its reply is not sent; messages
        # waiting in the connection's inbox then are dropped unhandled
        assert replies <= handled
        assert len(handled - replies) <= 1
    assert stats["closes"]["rate_limited"] == 10
    assert stats["queued_bytes"] < LIMIT


# ------------------------------------------------------- 5. bad JSON flood (3509)


@asyncio_only
async def test_malformed_json_flood_ends_at_the_error_budget() -> None:
    """1,000 frames that are not JSON, sent at once: exactly `error_budget` (10)
    ``bad_json`` error frames, without a ref and without the input, then 3509; a mixed
    flood (bad JSON, frames outside the contract, second hellos) and a flood of unknown
    events too. Nothing after the 10th bad frame is answered."""
    budget = 10
    async with server() as process, bystander(process.url):
        async with peak_growth(process, 40 * MiB):
            async with attacker(process.url) as garbage:
                await garbage.hello()
                await garbage.send_raw(b"".join(
                    raw_frame(TEXT, b'{"type":"msg","data":"%s' % MARKER.encode())
                    for _ in range(1000)))
                assert await garbage.wait_closed() == CloseCode.ERROR_BUDGET
                assert garbage.errors() == [{"type": "error", "code": "bad_json",
                                             "detail": "frame is not valid JSON"}] * budget
            async with attacker(process.url) as mixed:
                await mixed.hello()
                frames = [b"[1, 2", b'{"type":"nope"}', b'{"type":"hello","v":1}',
                          b'{"type":"msg","data":"%s"}' % MARKER.encode(), b"null"]
                await mixed.send_raw(b"".join(raw_frame(TEXT, frames[i % len(frames)])
                                              for i in range(1000)))
                assert await mixed.wait_closed() == CloseCode.ERROR_BUDGET
                codes = [e["code"] for e in mixed.errors()]
                assert codes == ["bad_json", "bad_frame", "bad_frame", "bad_frame",
                                 "bad_frame"] * 2
                assert all(MARKER not in json.dumps(e) for e in mixed.errors())
            async with attacker(process.url) as unknown:
                await unknown.hello()
                await unknown.send_raw(b"".join(
                    raw_frame(TEXT, msg("no-such-event", MARKER, ref=str(i)).encode())
                    for i in range(1000)))
                assert await unknown.wait_closed() == CloseCode.ERROR_BUDGET
                assert [(e["code"], e["ref"]) for e in unknown.errors()] == [
                    ("unknown_event", str(i)) for i in range(budget)]
        stats = await server_stats(process.url)
    assert stats["closes"]["error_budget"] == 3


# ------------------------------------------------------ 6. no hello (3502 / 3501)


async def test_missing_or_bad_hello_closes_3502_or_3501() -> None:
    """A client that sends nothing, only protocol pings, or half a frame, is closed
    with 3502 after handshake_timeout; a first frame that is not a valid hello (a msg,
    garbage, a pong, another version, no version, a resume token over 1024 characters)
    gets 3501 (a binary first frame: see the UTF-8 test). None of them is sent anything
    else."""
    async with server(config={"handshake_timeout": 0.5}) as process, \
            bystander(process.url, count=50, rate=50):
        async with attacker(process.url) as silent:
            assert await silent.wait_closed() == CloseCode.HANDSHAKE_TIMEOUT
        async with attacker(process.url) as pinger:
            for _ in range(5):
                await pinger.send_raw(raw_frame(0x9, b"alive"))
                await anyio.sleep(0.2)
            assert await pinger.wait_closed() == CloseCode.HANDSHAKE_TIMEOUT
        async with attacker(process.url) as slowloris:
            hello = raw_frame(TEXT, b'{"type":"hello","v":1}')
            await slowloris.send_raw(hello[:4])  # never finished
            assert await slowloris.wait_closed() == CloseCode.HANDSHAKE_TIMEOUT
        for first in [msg("chat", "hi").encode(), b"{not json", b'{"type":"pong","id":1}',
                      b'{"type":"hello","v":2}', b'{"type":"hello"}',
                      json.dumps({"type": "hello", "v": 1, "resume": "v1." + "A" * 2000})
                      .encode()]:
            async with attacker(process.url) as bad:
                await bad.send_raw(raw_frame(TEXT, first))
                assert await bad.wait_closed() == CloseCode.BAD_REQUEST, first
                assert bad.frames == []
        stats = await server_stats(process.url)
    assert stats["closes"]["handshake_timeout"] == 3
    assert stats["closes"]["bad_handshake"] == 6


# ------------------------------------------------------------ 7. Origin (403)


async def test_foreign_origins_are_refused_with_403() -> None:
    """allowed_origins=["https://game.example"]: upgrades from other origins —
    look-alikes, another scheme or port, ``null`` — get HTTP 403 before any WebSocket
    exists; the right origin (any case, explicit default port) and a request without
    Origin are accepted."""
    async with server(config={"allowed_origins": ["https://game.example"]}) as process, \
            bystander(process.url, count=50, rate=50):
        for origin in ["https://evil.example", "https://game.example.evil.net",
                       "https://evil-game.example", "http://game.example",
                       "https://game.example:8443", "null", "https://user@game.example",
                       "https://game.example/path", ""]:
            with pytest.raises(HandshakeRejected) as refused:
                await connect(process.url + "/ws", headers=[("Origin", origin)])
            assert refused.value.status == 403, origin
        for origin in ["https://game.example", "HTTPS://Game.Example:443", None]:
            headers = [] if origin is None else [("Origin", origin)]
            async with Player.connect(process.url + "/ws", headers=headers) as player:
                assert player.welcome is not None, origin


# --------------------------------------------- 8 and 9. tokens, and the logs


def frame_trace(line: str) -> bool:
    """websockets' own log of a frame (uvicorn at debug): ``DEBUG:    < TEXT '...'``."""
    return re.match(r"DEBUG:\s+[<>] [A-Z]+ ", line) is not None


@pytest.mark.parametrize("log_level", ["info", "debug"])
async def test_tokens_of_others_are_refused_and_never_logged(log_level: str) -> None:
    """Alice gets a resume token and inbox messages, then drops. Bob (another identity)
    presenting her token, a tampered token (signature or claims), and her token
    without credentials are closed with 3500 and are sent nothing at all; then Alice
    resumes with it and gets her inbox. The server logs everything at DEBUG (wsroom and
    uvicorn at `log_level`): no resume token, credential or payload appears in any line
    (at uvicorn's debug level, websockets itself logs frames truncated to 75
    characters; those lines are left out of the check and reported)."""
    alice_auth, bob_auth = f"player:alice:{SECRET}", f"player:bob:{SECRET}"
    async with server(config={"resume_window": 60}, log_level=log_level,
                      environ={"WSROOM_TEST_LOG_LEVEL": "DEBUG"}) as process:
        async with bystander(process.url, count=50, rate=50):
            async with attacker(process.url) as alice:
                welcome = await alice.hello(auth=alice_auth)
                token, inbox = welcome["resume"], welcome["streams"]["@inbox"]
                whisper = {"to": "alice", "text": MARKER}
                assert (await alice.request("whisper", whisper, ref="w"))["data"] == 1
                await wait_for(lambda: any(f.get("stream") == "@inbox" for f in alice.frames))
                assert (await alice.request("chat", MARKER, ref="c"))["data"] is True
                await alice.drop()  # lost: her session waits for a resume
            async with Player.connect(process.url + "/ws", auth="player:carol") as carol:
                whisper = {"to": "alice", "text": MARKER + "-2"}
                assert (await carol.request("whisper", whisper))["data"] == 1

            signature_at = token.rindex(".") + 5
            tampered_signature = (token[:signature_at]
                                  + ("A" if token[signature_at] != "A" else "B")
                                  + token[signature_at + 1:])
            claims_at = token.index(".") + 5
            tampered_claims = (token[:claims_at]
                               + ("A" if token[claims_at] != "A" else "B")
                               + token[claims_at + 1:])
            streams = {"@inbox": {"epoch": inbox["epoch"], "offset": 0}}
            for fields in [{"auth": bob_auth, "resume": token, "streams": streams},
                           {"auth": alice_auth, "resume": tampered_signature},
                           {"auth": alice_auth, "resume": tampered_claims},
                           {"resume": token, "streams": streams}]:
                async with attacker(process.url) as thief:
                    await thief.send(json.dumps({"type": "hello", "v": 1, **fields}))
                    assert await thief.wait_closed() == CloseCode.INVALID_TOKEN
                    assert thief.frames == []  # no welcome, no inbox, nothing

            async with attacker(process.url) as back:
                welcome = await back.hello(auth=alice_auth, resume=token, streams={
                    "@inbox": {"epoch": inbox["epoch"], "offset": 1}})
                assert welcome["streams"]["@inbox"]["recovered"] is True
                await wait_for(lambda: any(f.get("stream") == "@inbox" for f in back.frames))
                whispers = [f for f in back.frames if f.get("stream") == "@inbox"]
                assert [w["data"]["text"] for w in whispers] == [MARKER + "-2"]
                new_token = welcome["resume"]
                await back.send_raw(raw_frame(0x8, (1000).to_bytes(2, "big")))
                await back.wait_closed()
        stats = await server_stats(process.url)
        log = process.log()
    assert stats["resumes"]["rejected"] == 4
    assert "wsroom.connection DEBUG" in log  # wsroom's DEBUG lines are in
    assert "resume token refused" in log
    lines = [line for line in log.splitlines() if not frame_trace(line)]
    for secret in [token, new_token, tampered_signature, tampered_claims, SECRET, MARKER,
                   token.split(".")[1][:16], token.split(".")[2][-16:]]:
        assert not [line for line in lines if secret in line], secret


# ------------------------------------------------------ 10. forged proxy headers


NO_PROXY_HEADERS = ["--no-proxy-headers"]
"""uvicorn trusts X-Forwarded-For from 127.0.0.1 by default (--proxy-headers with
--forwarded-allow-ips 127.0.0.1) and rewrites the client's address itself: these tests
connect from 127.0.0.1, so that is turned off to test wsroom's own handling."""


async def refused(url: str, headers: Sequence[tuple[str, str]]) -> Refused:
    with pytest.raises(Refused) as refusal:
        async with attacker(url, headers=headers):
            pass
    return refusal.value


async def test_forged_proxy_headers_do_not_escape_admission_control() -> None:
    """Without trusted_proxies, X-Forwarded-For and Forwarded are ignored: connections
    that each claim another address are all counted against the TCP peer, and the one
    over max_connections_per_ip gets HTTP 429 (Retry-After: 1). Behind a trusted proxy
    (here the test itself is the proxy at 127.0.0.1 and appends the client's address),
    what the client wrote to the left of that — other addresses, a trusted proxy's
    address, a second header, garbage — does not change its address; an IPv6 client
    rotating addresses within its /64 is one client; the connection rate is per client
    too (429 with a Retry-After). The bystander, another client of the proxy, is never
    refused and gets every broadcast."""
    limits = {"max_connections_per_ip": 3, "connect_rate_per_ip": None}
    async with server(config=limits, args=NO_PROXY_HEADERS) as process, \
            attacker(process.url) as first:
        await first.hello()
        assert (await first.request("whoami"))["data"] == "127.0.0.1"
        async with attacker(process.url, headers=[("X-Forwarded-For", "198.51.100.1")]
                            ) as second, \
                attacker(process.url, headers=[("Forwarded", "for=198.51.100.2")]
                         ) as third:
            for conn in (second, third):
                await conn.hello()
                assert (await conn.request("whoami"))["data"] == "127.0.0.1"
            for forged in [[("X-Forwarded-For", "198.51.100.3")],
                           [("Forwarded", 'for="[2001:db8::1]"')],
                           [("X-Forwarded-For", "198.51.100.4, 198.51.100.5")]]:
                refusal = await refused(process.url, forged)
                assert (refusal.status, refusal.headers["retry-after"]) == (429, "1")

    client = "203.0.113.7"
    proxy = {"trusted_proxies": ["127.0.0.1"], "max_connections_per_ip": 2,
             "connect_rate_per_ip": 1, "connect_burst_per_ip": 4}
    async with server(config=proxy, args=NO_PROXY_HEADERS) as process:
        async with bystander(process.url, count=50, rate=50):
            # (the bystander comes from 127.0.0.1 without a header: the proxy itself)
            async with attacker(process.url, headers=[
                    ("X-Forwarded-For", f"198.51.100.1, {client}")]) as one, \
                    attacker(process.url, headers=[
                        ("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", client)]
                    ) as two:
                for conn in (one, two):
                    await conn.hello()
                    assert (await conn.request("whoami"))["data"] == client
                for forged in [f"198.51.100.9, {client}", f"127.0.0.1, {client}",
                               f"not-an-ip, {client}", f"{client}, 127.0.0.1"]:
                    refusal = await refused(process.url, [("X-Forwarded-For", forged)])
                    assert refusal.status == 429, forged
            # a client rotating IPv6 addresses within its /64 is one client: its
            # burst of new connections is 4, each closed before the next
            admitted = 0
            statuses = []
            for host in range(1, 7):
                try:
                    async with attacker(process.url, headers=[
                            ("X-Forwarded-For", f"2001:db8:0:1::{host}")]) as six:
                        await six.hello()
                        admitted += 1
                        await six.send_raw(raw_frame(0x8, (1000).to_bytes(2, "big")))
                        await six.wait_closed()
                except Refused as refusal:
                    statuses.append((refusal.status, int(refusal.headers["retry-after"])))
            assert admitted == 4  # connect_burst_per_ip
            assert statuses == [(429, statuses[0][1])] * 2
            assert statuses[0][1] >= 1
        stats = await server_stats(process.url)
    assert stats["closes"]["ip_limit"] == 4
    assert stats["closes"]["ip_rate"] == 2
