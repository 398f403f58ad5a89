"""Peer 3: Starlette with an asyncio.Queue and a writer task per client.

The usual fix for the naive loop: a publish puts the encoded text on every member's
bounded queue (put_nowait) and never waits. A member whose queue is full (it is not
reading) is closed and its queued messages are lost; it has no way to get them back.
The bound is wsroom's default message bound (4096), for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .common import encode, publish_loop, query

QUEUE_SIZE = 4096
MEMBERS: dict[WebSocket, asyncio.Queue[str]] = {}
WRITERS: dict[WebSocket, asyncio.Task[None]] = {}


async def writer(ws: WebSocket, queue: asyncio.Queue[str]) -> None:
    while True:
        await ws.send_text(await queue.get())


async def ws_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
    MEMBERS[ws] = queue
    task = WRITERS[ws] = asyncio.create_task(writer(ws, queue))
    try:
        while True:
            await ws.receive_text()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        MEMBERS.pop(ws, None)
        WRITERS.pop(ws, None)
        task.cancel()


async def drop(ws: WebSocket) -> None:
    """Close a slow member: what was queued for it is lost."""
    MEMBERS.pop(ws, None)
    task = WRITERS.pop(ws, None)
    if task is not None:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(1008, "slow consumer"), 10)


async def publish_one(data: dict[str, object]) -> None:
    text = encode(data)
    for ws, queue in list(MEMBERS.items()):
        try:
            queue.put_nowait(text)
        except asyncio.QueueFull:
            asyncio.create_task(drop(ws))  # noqa: RUF006 - fire and forget is the pattern
    await asyncio.sleep(0)


async def count(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(MEMBERS)}\n")


async def publish(request: Request) -> PlainTextResponse:
    n = await publish_loop(*query(request.url.query), publish_one)
    return PlainTextResponse(f"{n}\n")


app = Starlette(routes=[WebSocketRoute("/ws", ws_endpoint), Route("/count", count),
                        Route("/publish", publish)])
