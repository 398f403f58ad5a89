"""A wsroom app for tests that run the server in its own process (uvicorn CLI).

Configured through the environment variable WSROOM_TEST_CONFIG (JSON of HubConfig
fields). Every member joins 'lobby'. Events:

- ``flood {count, size, rate}``: publish `count` messages of about `size` bytes to
  'lobby' at about `rate` messages/s; reply with the largest outbound queue (bytes)
  seen on any connection after any publish, and the hub's stats.
- ``stats``: reply with the hub's stats.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import anyio
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from wsroom import Connection, Hub, HubConfig, MessageContext

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
hub = Hub(HubConfig(**json.loads(os.environ.get("WSROOM_TEST_CONFIG", "{}"))))


@hub.on_connect
async def join(conn: Connection) -> None:
    await conn.join("lobby")


class Flood(BaseModel):
    count: int
    size: int = 200
    rate: float = 2000.0


@hub.on("flood")
async def flood(ctx: MessageContext, data: Flood) -> dict[str, object]:
    pad = "x" * data.size
    largest: dict[str, int] = {}
    burst = max(1, int(data.rate / 100))  # publish in bursts, 100 bursts per second
    for number in range(data.count):
        await hub.publish("lobby", "n", {"n": number, "pad": pad})
        for conn in hub.connections():
            key = conn.session or conn.id
            largest[key] = max(largest.get(key, 0), conn.queued_bytes)
        if number % burst == burst - 1:
            await anyio.sleep(0.01)
    return {"largest_queue": largest, "stats": dataclasses.asdict(hub.stats())}


@hub.on("stats")
async def stats(ctx: MessageContext, data: object) -> dict[str, object]:
    return dataclasses.asdict(hub.stats())


app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint)], lifespan=hub.lifespan)
