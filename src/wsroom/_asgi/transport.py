"""The socket edge: an ASGI WebSocket as the few operations a connection needs.

A `Transport` is what `Connection` drives. `AsgiTransport` implements it over the ASGI
``receive``/``send`` callables of any ASGI server (uvicorn, hypercorn, ...), so the
runtime does not depend on Starlette's ``WebSocket`` state checks on its hot path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import HTTPConnection

__all__ = ["AsgiTransport", "Disconnected", "Handshake", "Transport"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The peer closed the connection (or it was lost: code 1006)."""

    code: int


class Transport(Protocol):
    """The operations `Connection` performs on a WebSocket."""

    @property
    def request(self) -> HTTPConnection:
        """The upgrade request: headers, cookies, client address, path."""
        ...

    async def accept(self) -> bool:
        """Complete the WebSocket handshake; False if the peer left before it."""
        ...

    async def refuse(self, code: int) -> None:
        """Refuse the upgrade (the ASGI server answers HTTP 403)."""
        ...

    @property
    def can_deny(self) -> bool:
        """Whether `deny` can answer the upgrade with an HTTP status of our choice."""
        ...

    async def deny(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Refuse the upgrade with an HTTP response (only where `can_deny`)."""
        ...

    async def receive(self) -> str | bytes | Disconnected:
        """Wait for the next message."""
        ...

    async def send(self, text: str) -> None:
        """Send one text frame."""
        ...

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame."""
        ...


class AsgiTransport:
    """`Transport` over an ASGI WebSocket scope."""

    __slots__ = ("_receive", "_send", "request")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            raise ValueError(f"expected a websocket scope, got {scope['type']!r}")
        self.request = HTTPConnection(scope)
        self._receive = receive
        self._send = send

    async def accept(self) -> bool:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return False
        await self._send({"type": "websocket.accept"})
        return True

    async def refuse(self, code: int) -> None:
        message = await self._receive()
        if message["type"] == "websocket.connect":
            # A close before the accept: servers answer the upgrade with HTTP 403.
            await self._send({"type": "websocket.close", "code": code, "reason": ""})

    @property
    def can_deny(self) -> bool:
        # The ASGI "WebSocket Denial Response" extension (uvicorn, hypercorn, daphne).
        extensions = self.request.scope.get("extensions") or {}
        return "websocket.http.response" in extensions

    async def deny(self, status: int, headers: list[tuple[str, str]]) -> None:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return  # the client left already
        body = f"{status}\n".encode()
        raw = [(b"content-type", b"text/plain; charset=utf-8"),
               (b"content-length", str(len(body)).encode())]
        raw += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        await self._send({"type": "websocket.http.response.start", "status": status,
                          "headers": raw})
        await self._send({"type": "websocket.http.response.body", "body": body})

    async def receive(self) -> str | bytes | Disconnected:
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        if kind == "websocket.disconnect":
            return Disconnected(int(message.get("code", 1005)))
        raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def send(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str = "") -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


@dataclass(frozen=True, slots=True)
class Handshake:
    """What `authenticate` gets: the upgrade request and the `hello` frame's `auth`.

    Attributes:
        request: the HTTP upgrade request (headers, cookies, client, url).
        auth: the `auth` value of the client's `hello` frame (None if absent).
    """

    request: HTTPConnection
    auth: Any
