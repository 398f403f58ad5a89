"""A wsroom app for the adversarial tests (tests/e2e/test_adversarial.py), run by the uvicorn
CLI in its own process (support.spawn).

Configured through WSROOM_TEST_CONFIG (JSON of HubConfig fields) and
WSROOM_TEST_LOG_LEVEL (level of the root logger, default INFO). A `hello` whose `auth`
is ``"player:<name>"`` or ``"player:<name>:<password>"`` authenticates as member
``<name>`` (any password); any other `auth` is refused
(3500); no `auth` is an anonymous member. Every member joins 'lobby'. Events:

- ``chat <any>``: publish it to 'lobby' as event ``chat``; reply ``true``.
- ``ticks {count, rate}``: publish ``{"n": 0..count-1}`` to 'lobby' as event ``tick``
  at about `rate` messages/s (in the background); reply ``true`` at once.
- ``whisper {to, text}``: send ``text`` to member `to`'s ``@inbox``; reply the number of
  sessions it reached.
- ``whoami``: reply with the connection's client address (as admission control sees it).
- ``stats``: reply with the hub's stats.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from lobby import lobby_hub
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from wsroom import Handshake, Identity, MessageContext

logging.basicConfig(level=os.environ.get("WSROOM_TEST_LOG_LEVEL", "INFO"),
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def authenticate(handshake: Handshake) -> Identity | None:
    auth = handshake.auth
    if auth is None:
        return Identity(id="anon-" + os.urandom(6).hex())
    if isinstance(auth, str) and auth.startswith("player:"):
        return Identity(id=auth.split(":")[1])  # "player:<name>[:<password>]"
    return None


hub = lobby_hub(authenticate=authenticate)


class Ticks(BaseModel):
    count: int
    rate: float = 200.0


async def _tick(count: int, rate: float) -> None:
    for number in range(count):
        await hub.publish("lobby", "tick", {"n": number})
        await anyio.sleep(1 / rate)


@hub.on("ticks")
async def ticks(ctx: MessageContext, data: Ticks) -> bool:
    _background.start_soon(_tick, data.count, data.rate)
    return True


class Whisper(BaseModel):
    to: str
    text: str


@hub.on("whisper")
async def whisper(ctx: MessageContext, data: Whisper) -> int:
    return await hub.send_to(data.to, "whisper", {"text": data.text})


@hub.on("whoami")
async def whoami(ctx: MessageContext, data: object) -> str:
    return ctx.connection.client_address


@hub.on("stats")
async def stats(ctx: MessageContext, data: object) -> dict[str, object]:
    return dataclasses.asdict(hub.stats())


_background: anyio.abc.TaskGroup


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The hub's lifespan, plus a task group for the ``ticks`` publishers."""
    global _background
    async with hub.lifespan(app), anyio.create_task_group() as tg:
        _background = tg
        yield
        tg.cancel_scope.cancel()


app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint)], lifespan=lifespan)
