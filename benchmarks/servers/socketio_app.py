"""Peer 4: python-socketio (ASGI) on uvicorn: ``sio.emit(event, data, room=...)``.

Clients connect with the WebSocket transport directly (no polling upgrade). Each
engine.io socket has an unbounded queue and a writer task.
"""

from __future__ import annotations

import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from .common import EVENT, ROOM, publish_loop, query

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")
MEMBERS: set[str] = set()


@sio.event
async def connect(sid: str, environ: dict[str, object]) -> None:
    await sio.enter_room(sid, ROOM)
    MEMBERS.add(sid)


@sio.event
async def disconnect(sid: str, *args: object) -> None:
    MEMBERS.discard(sid)


async def publish_one(data: dict[str, object]) -> None:
    await sio.emit(EVENT, data, room=ROOM)


async def count(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(MEMBERS)}\n")


async def publish(request: Request) -> PlainTextResponse:
    n = await publish_loop(*query(request.url.query), publish_one)
    return PlainTextResponse(f"{n}\n")


http = Starlette(routes=[Route("/count", count), Route("/publish", publish)])
app = socketio.ASGIApp(sio, other_asgi_app=http)
