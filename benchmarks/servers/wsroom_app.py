"""Peer 5: wsroom, a Hub with one room; ``hub.publish`` on request.

The hub's defaults (bounded queues, policy ``disconnect`` with 3008, batching, history for
resume, heartbeats every 30 s) except: the per-address admission limits are off (every
client comes from 127.0.0.1), and the room has no presence (no peer has it; with it, every
join would send a roster change to every member), and the room's history keeps 50,000
messages (32 MiB) instead of 10,000 (8 MiB): the stalled client of the slow-consumer
scenario misses more than 10,000, and must be replayed all of them.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute

from wsroom import Connection, HistoryLimits, Hub, HubConfig, RoomConfig

from .common import EVENT, ROOM, publish_loop, query

hub = Hub(
    HubConfig(max_connections_per_ip=None, connect_rate_per_ip=None,
              default_room=RoomConfig(presence=False, history=HistoryLimits(
                  max_messages=50_000, max_bytes=32 * 2**20))),
)


@hub.on_connect
async def joined(conn: Connection) -> None:
    await conn.join(ROOM)


async def publish_one(data: dict[str, object]) -> None:
    await hub.publish(ROOM, EVENT, data)  # yields once itself


async def count(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{hub.stats().members}\n")


async def closes(request: Request) -> PlainTextResponse:
    """Connections ended so far, by close reason (wsroom only: the slow-consumer check)."""
    return PlainTextResponse(json.dumps(hub.stats().closes))


async def publish(request: Request) -> PlainTextResponse:
    n = await publish_loop(*query(request.url.query), publish_one)
    return PlainTextResponse(f"{n}\n")


app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint), Route("/count", count),
                        Route("/closes", closes),
                        Route("/publish", publish)], lifespan=hub.lifespan)
