"""A small WebSocket client over AnyIO streams and wsproto (the ``client`` extra).

It runs on asyncio and trio alike. It is the transport of wsroom's Python client and
of the test suite, so it also exposes what fault tests need: a receive buffer size, an
abortive close (RST), and a close without a close frame.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import SocketAttribute, SocketStream

try:
    from wsproto import ConnectionType, WSConnection
    from wsproto.connection import ConnectionState
    from wsproto.events import (
        AcceptConnection,
        BytesMessage,
        CloseConnection,
        Event,
        Message,
        Ping,
        RejectConnection,
        RejectData,
        Request,
        TextMessage,
    )
    from wsproto.utilities import LocalProtocolError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "wsroom's client needs wsproto (the 'client' extra): pip install 'wsproto>=1.2'"
    ) from exc

__all__ = ["ConnectionClosed", "HandshakeRejected", "WebSocket", "connect"]


class ConnectionClosed(Exception):
    """The WebSocket is closed. `code` is 1006 when no close frame was received."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason}".strip())
        self.code = code
        self.reason = reason


class HandshakeRejected(ConnectionClosed):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(1006, f"HTTP {status}")
        self.status = status
        self.headers = dict(headers)
        """The response's headers (names in lower case)."""


_MISSING: Any = object()


@dataclass
class _Closed:
    code: int
    reason: str


class WebSocket:
    """A client WebSocket connection. Create it with `connect`."""

    def __init__(self, stream: SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._events: list[Event] = []
        self._parts: list[str | bytes] = []
        self._closed: _Closed | None = None
        self._send_lock = anyio.Lock()
        self.last_received = anyio.current_time()
        """When bytes from the server last arrived (`anyio.current_time`): a large
        message on a slow link keeps arriving long before `recv` can return it."""

    def extra(self, attribute: Any, default: Any = _MISSING) -> Any:
        """An attribute of the socket stream (AnyIO's typed attributes, such as
        ``SocketAttribute.raw_socket`` or ``SocketAttribute.local_port``)."""
        if default is _MISSING:
            return self._stream.extra(attribute)
        return self._stream.extra(attribute, default)

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection is closed, or None while it is open."""
        return None if self._closed is None else ConnectionClosed(
            self._closed.code, self._closed.reason
        )

    async def _write(self, data: bytes) -> None:
        if data:
            async with self._send_lock:
                await self._stream.send(data)

    async def _read_events(self) -> None:
        try:
            data = await self._stream.receive()
            self.last_received = anyio.current_time()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            data = None
        self._ws.receive_data(data)
        self._events.extend(self._ws.events())
        if data is None and not self._events and self._closed is None:
            self._closed = _Closed(1006, "connection lost")
            await self._stream.aclose()  # nothing more will come: the socket is done

    async def recv(self) -> str | bytes:
        """Return the next whole message.

        Raises:
            ConnectionClosed: when the server closed (its code) or the TCP connection
                was lost (1006).
        """
        while True:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, Message):
                    self._parts.append(event.data)
                    if event.message_finished:
                        parts, self._parts = self._parts, []
                        if isinstance(event, TextMessage):
                            return "".join(part for part in parts if isinstance(part, str))
                        return b"".join(part for part in parts if isinstance(part, bytes))
                elif isinstance(event, Ping):
                    await self._answer(event)
                elif isinstance(event, CloseConnection):
                    self._closed = _Closed(event.code, event.reason or "")
                    with contextlib.suppress(anyio.BrokenResourceError,
                                             anyio.ClosedResourceError, OSError,
                                             LocalProtocolError):
                        await self._write(self._ws.send(event.response()))
                    await self._stream.aclose()
            if self._closed is not None:
                raise ConnectionClosed(self._closed.code, self._closed.reason)
            await self._read_events()

    async def _answer(self, ping: Ping) -> None:
        """Answer a ping, if the connection is still open both ways.

        Once either side has sent its close frame (this side's `close` or `send_close`,
        or the peer's close read in the same batch), wsproto refuses to send a pong,
        and none is owed: the close handshake ends the connection. A write that fails
        means the connection is lost, which the next read reports.
        """
        if self._ws.state is not ConnectionState.OPEN:
            return
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError,
                                 OSError, LocalProtocolError):
            await self._write(self._ws.send(ping.response()))

    async def send(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed.code, self._closed.reason)
        await self._send(TextMessage(data=message) if isinstance(message, str)
                         else BytesMessage(data=message))

    async def send_fragments(self, fragments: Sequence[str]) -> None:
        """Send one text message split into several WebSocket frames.

        Raises:
            ConnectionClosed: as `send`.
        """
        if self._closed is not None:
            raise ConnectionClosed(self._closed.code, self._closed.reason)
        for index, fragment in enumerate(fragments):
            last = index == len(fragments) - 1
            await self._send(TextMessage(data=fragment, message_finished=last))

    async def _send(self, event: TextMessage | BytesMessage) -> None:
        try:
            data = self._ws.send(event)
        except LocalProtocolError as exc:
            # The peer's close frame was read (not yet returned by `recv`, which will
            # report its code): nothing can be sent any more.
            raise ConnectionClosed(1006, "the connection is closing") from exc
        try:
            await self._write(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = _Closed(1006, "connection lost")
            await self._stream.aclose()
            raise ConnectionClosed(1006, "connection lost") from exc

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame without reading; the task that reads sees the answer."""
        if self._closed is None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError,
                                     OSError, LocalProtocolError):
                await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame and wait (briefly) for the server's answer."""
        if self._closed is None:
            try:
                await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
                with anyio.move_on_after(5):
                    while self._closed is None:
                        try:
                            await self.recv()
                        except ConnectionClosed:
                            break
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
                    LocalProtocolError):
                pass
        self._closed = self._closed or _Closed(code, reason)
        await self._stream.aclose()

    async def drop(self) -> None:
        """Close the TCP connection without a WebSocket close frame (FIN)."""
        self._closed = _Closed(1006, "dropped")
        await self._stream.aclose()

    async def abort(self) -> None:
        """Reset the TCP connection (RST), like a process that was killed."""
        raw: socket.socket = self._stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._closed = _Closed(1006, "aborted")
        await self._stream.aclose()


async def _connect_with_receive_buffer(host: str, port: int, size: int) -> SocketStream:
    # SO_RCVBUF must be set before connect(): shrinking it afterwards, below a window
    # already advertised, makes the kernel drop segments and stall on retransmits.
    family, kind, proto, _, address = (await anyio.getaddrinfo(
        host, port, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS):
            raise OSError(error, os.strerror(error))
        await anyio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        return await SocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise


async def connect(
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    receive_buffer: int | None = None,
    open_timeout: float = 10.0,
) -> WebSocket:
    """Open a WebSocket to a ``ws://`` URL.

    Args:
        url: ``ws://host:port/path?query``.
        headers: extra request headers (``Origin``, ``Cookie``, ``Authorization``...).
        receive_buffer: SO_RCVBUF in bytes, to make a slow reader stall sooner.
        open_timeout: seconds for the TCP connect and the upgrade.

    Raises:
        HandshakeRejected: if the server answers the upgrade with an HTTP status.
        OSError: if the TCP connection fails.
    """
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported, got {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    with anyio.fail_after(open_timeout):
        if receive_buffer is None:
            stream = await anyio.connect_tcp(host, port)
        else:
            stream = await _connect_with_receive_buffer(host, port, receive_buffer)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            host_header = host if parts.port is None else f"{host}:{port}"
            extra = [(name.encode(), value.encode()) for name, value in headers]
            await stream.send(ws.send(Request(host=host_header, target=target,
                                              extra_headers=extra)))
            client = WebSocket(stream, ws)
            while True:
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        return client
                    if isinstance(event, RejectConnection):
                        raise HandshakeRejected(event.status_code, [
                            (bytes(name).decode("latin-1").lower(),
                             bytes(value).decode("latin-1"))
                            for name, value in event.headers])
                    if isinstance(event, RejectData):
                        continue
                    client._events.append(event)
                data = await stream.receive()
                ws.receive_data(data)
        except BaseException:
            await stream.aclose()
            raise
