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

import logging
import os

from lobby import lobby_hub
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from wsroom import Handshake, Identity, MessageContext
from wsroom.metrics import metrics_app

logging.basicConfig(level=os.environ.get("WSROOM_TEST_LOG_LEVEL", "WARNING"),
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def authenticate(handshake: Handshake) -> Identity | None:
    return Identity(id="anon-" + os.urandom(6).hex())


hub = lobby_hub(authenticate=authenticate)


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
