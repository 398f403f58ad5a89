"""A wsroom worker on a `RedisBackplane`, for the multi-process tests
(tests/e2e/test_workers_e2e.py). Run several of these (uvicorn, one process each) with the
same prefix and the same ``resume_secrets``: together they are one cluster.

Environment: WSROOM_TEST_CONFIG (JSON of HubConfig fields; must include
``resume_secrets``), WSROOM_REDIS_URL, WSROOM_REDIS_PREFIX (the key prefix, unique per
test).

A client names itself in its hello (``"auth": {"name": ...}``): its member id is the
name, and its public info ``{"name": name}``. Every connection joins the room 'table'.
Routes:

- ``/ws``: the hub.
- ``GET /publish?n=<count>&tag=<text>``: publish `count` messages ``say {"tag", "i"}`` to
  'table' from this worker, one after the other; reply ``{"offsets": [...]}``.
- ``GET /send_to?member=<id>&text=<text>``: ``hub.send_to(member, "note", {"text"})``;
  reply ``{"sessions": <count>}``.
- ``GET /stats``: ``hub.stats()``, ``hub.ready``, the backplane's counters
  (``RedisBackplane.stats``), the roster of 'table' and the worker id.

Event ``say {"text"}``: publish ``said {"from", "text"}`` to 'table'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from wsroom import Connection, Handshake, Hub, HubConfig, Identity, MessageContext
from wsroom.redis import RedisBackplane

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

ROOM = "table"

backplane = RedisBackplane(os.environ.get("WSROOM_REDIS_URL", "redis://127.0.0.1:6379/0"),
                           prefix=os.environ["WSROOM_REDIS_PREFIX"])


async def by_name(handshake: Handshake) -> Identity | None:
    auth = handshake.auth
    name = auth.get("name") if isinstance(auth, dict) else None
    if not isinstance(name, str) or not name:
        return None
    return Identity(id=name, info={"name": name})


hub = Hub(HubConfig(**json.loads(os.environ.get("WSROOM_TEST_CONFIG", "{}"))),
          authenticate=by_name, backplane=backplane)


@hub.on_connect
async def join(conn: Connection) -> None:
    await conn.join(ROOM)  # a no-op on a resume: the session is in it already


@hub.on("say")
async def say(ctx: MessageContext, data: dict[str, Any]) -> int | None:
    return await ctx.publish(ROOM, "said", {"from": ctx.connection.identity.id,
                                            "text": data.get("text")})


async def publish(request: Request) -> JSONResponse:
    count = int(request.query_params.get("n", "1"))
    tag = request.query_params.get("tag", "")
    offsets = []
    for number in range(count):
        offsets.append(await hub.publish(ROOM, "say", {"tag": tag, "i": number}))
    return JSONResponse({"offsets": offsets})


async def send_to(request: Request) -> JSONResponse:
    sessions = await hub.send_to(request.query_params["member"], "note",
                                 {"text": request.query_params.get("text", "")})
    return JSONResponse({"sessions": sessions})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({
        "worker": backplane.worker,
        "ready": hub.ready,
        "backplane": dict(backplane.stats),
        "stats": dataclasses.asdict(hub.stats()),
        "presence": [entry.to_wire() for entry in hub.presence(ROOM)],
    })


app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint), Route("/publish", publish),
                        Route("/send_to", send_to), Route("/stats", stats)],
                lifespan=hub.lifespan)
