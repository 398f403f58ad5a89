"""The client's WebSocket layer (``wsroom.client._websocket``) against a scripted server:
a wsproto server connection and an in-memory byte stream, so that each test sets the
protocol state exactly (who closed first, what arrives in the same read)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from wsroom.client._websocket import ConnectionClosed, WebSocket

pytestmark = pytest.mark.anyio


class FakeStream:
    """The part of a SocketStream the client uses: what it sends is kept, what it
    receives is queued by the test (None: the end of the stream)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.incoming: list[bytes | None] = []
        self.closed = False
        self.broken = False

    async def send(self, data: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        if self.closed:
            raise anyio.ClosedResourceError
        if self.broken:
            raise anyio.BrokenResourceError
        self.sent.append(data)

    async def receive(self) -> bytes:
        await anyio.lowlevel.checkpoint()
        if self.closed:
            raise anyio.ClosedResourceError
        if not self.incoming:
            raise AssertionError("the client read more than the test queued")
        data = self.incoming.pop(0)
        if data is None:
            raise anyio.EndOfStream
        return data

    async def aclose(self) -> None:
        self.closed = True

    def extra(self, attribute: Any, default: Any = None) -> Any:
        return default


class Pair:
    """An open client WebSocket and the server side of its wsproto conversation. The
    server writes raw frames (no state check), so it can send what a real server may
    send in a race: a ping after the client's close frame, or after its own."""

    def __init__(self) -> None:
        self.stream = FakeStream()
        client = WSConnection(ConnectionType.CLIENT)
        self.server = WSConnection(ConnectionType.SERVER)
        self.server.receive_data(client.send(Request(host="test", target="/ws")))
        (request,) = self.server.events()
        assert isinstance(request, Request)
        client.receive_data(self.server.send(AcceptConnection()))
        assert [type(event) for event in client.events()] == [AcceptConnection]
        self.client = client
        self.frames = FrameProtocol(client=False, extensions=[])
        self.ws = WebSocket(self.stream, client)  # type: ignore[arg-type]

    def _frame(self, event: Event) -> bytes:
        if isinstance(event, Ping):
            return self.frames.ping(bytes(event.payload))
        if isinstance(event, CloseConnection):
            return self.frames.close(event.code, event.reason)
        assert isinstance(event, TextMessage)
        return self.frames.send_data(event.data, event.message_finished)

    def queue(self, *events: Event) -> None:
        """The server sends `events`, which the client reads in one piece."""
        self.stream.incoming.append(b"".join(self._frame(event) for event in events))

    def server_events(self) -> list[Event]:
        """What the client wrote since the last call, as the server reads it."""
        sent, self.stream.sent[:] = list(self.stream.sent), []
        for data in sent:
            self.server.receive_data(data)
        return list(self.server.events())


async def test_a_ping_is_answered_while_open() -> None:
    pair = Pair()
    pair.queue(Ping(b"1"), TextMessage("hi"))
    assert await pair.ws.recv() == "hi"
    assert pair.server_events() == [Pong(b"1")]


async def test_a_ping_after_the_clients_close_frame_is_not_answered() -> None:
    """The attack's case: the client sent its close frame (LOCAL_CLOSING), and the
    server's ping arrives before its answering close. wsproto refuses a pong in that
    state; the client must skip it, not die with LocalProtocolError."""
    pair = Pair()
    await pair.ws.send_close(1000)
    assert pair.client.state is ConnectionState.LOCAL_CLOSING
    assert pair.server_events() == [CloseConnection(1000, "")]
    pair.queue(Ping(b"1"))
    pair.queue(Ping(b"2"), Ping(b"3"))
    pair.queue(CloseConnection(1000, ""))
    with pytest.raises(ConnectionClosed) as closed:
        await pair.ws.recv()
    assert closed.value.code == 1000
    assert pair.client.state is ConnectionState.CLOSED
    assert pair.server_events() == []  # no pong after the close frame


async def test_close_reads_through_pings_to_the_servers_answer() -> None:
    pair = Pair()
    pair.queue(Ping(b"1"), Ping(b"2"))
    pair.queue(TextMessage("late"), CloseConnection(1000, "bye"))
    await pair.ws.close(1000)
    assert pair.ws.closed is not None
    assert (pair.ws.closed.code, pair.ws.closed.reason) == (1000, "bye")
    assert pair.server_events() == [CloseConnection(1000, "")]
    assert pair.stream.closed


async def test_a_ping_in_the_same_read_as_the_servers_close() -> None:
    """REMOTE_CLOSING: the server's close was read with a ping before it."""
    pair = Pair()
    pair.queue(TextMessage("a"), CloseConnection(4501, "kicked"), Ping(b"x"))
    assert await pair.ws.recv() == "a"
    with pytest.raises(ConnectionClosed) as closed:
        await pair.ws.recv()
    assert closed.value.code == 4501


async def test_a_pong_that_cannot_be_written_is_a_lost_connection() -> None:
    pair = Pair()
    pair.stream.broken = True
    pair.queue(Ping(b"1"))
    pair.stream.incoming.append(None)
    with pytest.raises(ConnectionClosed) as closed:
        await pair.ws.recv()
    assert closed.value.code == 1006


async def test_sends_after_the_clients_close_frame_report_closing() -> None:
    pair = Pair()
    await pair.ws.send_close(1000)
    for send in (pair.ws.send("x"), pair.ws.send_fragments(["a", "b"])):
        with pytest.raises(ConnectionClosed) as closed:
            await send
        assert closed.value.code == 1006


async def test_fragments_on_a_lost_connection_report_it() -> None:
    pair = Pair()
    pair.stream.broken = True
    with pytest.raises(ConnectionClosed) as closed:
        await pair.ws.send_fragments(["a", "b"])
    assert (closed.value.code, closed.value.reason) == (1006, "connection lost")
    with pytest.raises(ConnectionClosed):
        await pair.ws.send_fragments(["c"])
