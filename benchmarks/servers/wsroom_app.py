"""Peer 5: wsroom, a Hub with one room; ``hub.publish`` on request.

The hub's defaults (bounded queues, policy ``disconnect`` with 3008, batching, history for
resume, heartbeats every 30 s) except: the per-address admission limits are off (every
client comes from 127.0.0.1), and the room has no presence (no peer has it; with it, every
join would send a roster change to every member), and the room's history keeps 50,000
messages (32 MiB) instead of 10,000 (8 MiB): the stalled client of the slow-consumer
scenario misses more than 10,000, and must be replayed all of them.

`build` makes the same app on another backplane (``benchmarks/servers/wsroom_redis.py``).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute

from wsroom import Backplane, Connection, HistoryLimits, Hub, HubConfig, RoomConfig

from .common import EVENT, ROOM, publish_loop, query


def build(backplane: Backplane | None = None, *,
          resume_secrets: Sequence[str] | None = None,
          on_publish: Callable[[Callable[[], Awaitable[int]]], Awaitable[int]] | None = None,
          routes: Sequence[BaseRoute] = ()) -> tuple[Hub, Starlette]:
    """The hub and its app. `on_publish` wraps each ``/publish`` loop (to time it);
    `routes` are added to the app's."""
    hub = Hub(
        HubConfig(max_connections_per_ip=None, connect_rate_per_ip=None,
                  resume_secrets=resume_secrets,
                  default_room=RoomConfig(presence=False, history=HistoryLimits(
                      max_messages=50_000, max_bytes=32 * 2**20))),
        backplane=backplane,
    )

    @hub.on_connect
    async def joined(conn: Connection) -> None:
        await conn.join(ROOM)

    async def publish_one(data: dict[str, object]) -> None:
        await hub.publish(ROOM, EVENT, data)  # yields once itself

    async def count(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{hub.stats().members}\n")

    async def closes(request: Request) -> PlainTextResponse:
        """Connections ended so far, by close reason (wsroom only: the slow-consumer
        check)."""
        return PlainTextResponse(json.dumps(hub.stats().closes))

    async def collections(request: Request) -> PlainTextResponse:
        """The garbage collector's collections so far, per generation (the 10k-idle
        scenario: was a window's CPU a full collection?)."""
        return PlainTextResponse(json.dumps([g["collections"] for g in gc.get_stats()]))

    async def publish(request: Request) -> PlainTextResponse:
        async def loop() -> int:
            return await publish_loop(*query(request.url.query), publish_one)

        n = await (loop() if on_publish is None else on_publish(loop))
        return PlainTextResponse(f"{n}\n")

    app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint), Route("/count", count),
                            Route("/closes", closes), Route("/publish", publish),
                            Route("/gc", collections),
                            *routes], lifespan=hub.lifespan)
    return hub, app


hub, app = build()
