"""A wsroom app for the wire abuse tests (tests/abuse/test_abuse_wire.py), run by the
uvicorn CLI in its own process (support.spawn).

Configured through WSROOM_TEST_CONFIG (JSON of HubConfig fields). Anyone may connect
(anonymous members); every member joins 'lobby'. Routes: ``/ws`` (the hub) and
``/metrics`` (`wsroom.metrics.metrics_app`). Events:

- ``chat <any>``: publish it to 'lobby' as event ``chat``; reply ``true``.
- ``order Order``: validate the payload (a model with a nested dict, a validator that
  quotes its input in its ValueError, and ``extra="forbid"``); reply ``"ok"``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from wsroom import Connection, Handshake, Hub, HubConfig, Identity, MessageContext
from wsroom.metrics import metrics_app

logging.basicConfig(level=os.environ.get("WSROOM_TEST_LOG_LEVEL", "WARNING"),
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def authenticate(handshake: Handshake) -> Identity | None:
    return Identity(id="anon-" + os.urandom(6).hex())


hub = Hub(HubConfig(**json.loads(os.environ.get("WSROOM_TEST_CONFIG", "{}"))),
          authenticate=authenticate)


@hub.on_connect
async def join(conn: Connection) -> None:
    await conn.join("lobby")


@hub.on("chat")
async def chat(ctx: MessageContext, data: Any) -> bool:
    await ctx.publish("lobby", "chat", data)
    return True


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item: str = Field(max_length=20)
    quantity: int = Field(gt=0)
    notes: dict[str, int] = {}

    @field_validator("item")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ("apple", "pear"):
            raise ValueError(f"unknown item {value!r}")  # quotes the client's input
        return value


@hub.on("order")
async def order(ctx: MessageContext, data: Order) -> str:
    return "ok"


app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint),
                        Route("/metrics", metrics_app(hub))],
                lifespan=hub.lifespan)
