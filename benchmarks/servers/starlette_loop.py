"""Peer 2: Starlette, a publish is a loop of ``await ws.send_text`` over the members.

The naive pattern: one client whose socket is full blocks the loop, so everyone waits.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .common import encode, publish_loop, query

MEMBERS: set[WebSocket] = set()


async def ws_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    MEMBERS.add(ws)
    try:
        while True:
            await ws.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        MEMBERS.discard(ws)


async def publish_one(data: dict[str, object]) -> None:
    text = encode(data)
    for ws in list(MEMBERS):
        try:
            await ws.send_text(text)
        except Exception:
            MEMBERS.discard(ws)
    await asyncio.sleep(0)


async def count(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(MEMBERS)}\n")


async def publish(request: Request) -> PlainTextResponse:
    n = await publish_loop(*query(request.url.query), publish_one)
    return PlainTextResponse(f"{n}\n")


app = Starlette(routes=[WebSocketRoute("/ws", ws_endpoint), Route("/count", count),
                        Route("/publish", publish)])
