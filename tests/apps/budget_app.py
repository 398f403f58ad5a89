"""A wsroom app for the abuse suite's budgets per member and per machine
(tests/abuse/test_abuse_members.py), run by the uvicorn CLI in its own process
(support.spawn).

Configured through WSROOM_TEST_CONFIG (JSON of HubConfig fields, plus
``"room_history"``: the HistoryLimits fields of every room) and WSROOM_TEST_ANONYMOUS
(``1``: no `authenticate` hook, every member anonymous). Otherwise a `hello` whose
`auth` is ``"player:<name>"`` is member ``<name>``. Every member joins 'lobby'. Events:

- ``chat <any>``: publish it to 'lobby'; reply ``true``.
- ``whisper {to, text}``: `Hub.send_to`; reply the number of sessions it reached.
- ``fill {room, count, size}``: join `room` and publish `count` messages of about `size`
  bytes to it (not delivered to the sender); reply ``true``.
- ``kick {member}``: `Hub.disconnect(member, 4001)`; reply the sessions ended.
- ``whoami``: reply ``{member, address}``.
- ``stats``: reply `Hub.stats()` plus ``history_bytes`` (the memory backplane's budget
  in use) and ``rss`` (the server's resident memory, bytes).
"""

from __future__ import annotations

import dataclasses
import os

from lobby import config_from_env, lobby_hub
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from wsroom import (
    Handshake,
    HistoryLimits,
    HubConfig,
    Identity,
    MemoryBackplane,
    MessageContext,
    RoomConfig,
)

settings = config_from_env()
room_history = settings.pop("room_history", None)
if room_history is not None:
    settings["default_room"] = RoomConfig(history=HistoryLimits(**room_history))


async def authenticate(handshake: Handshake) -> Identity | None:
    auth = handshake.auth
    if isinstance(auth, str) and auth.startswith("player:"):
        return Identity(id=auth.split(":")[1])
    return None


hub = lobby_hub(HubConfig(**settings), authenticate=None
                if os.environ.get("WSROOM_TEST_ANONYMOUS") else authenticate)


class Whisper(BaseModel):
    to: str
    text: str


@hub.on("whisper")
async def whisper(ctx: MessageContext, data: Whisper) -> int:
    return await hub.send_to(data.to, "whisper", {"text": data.text})


class Fill(BaseModel):
    room: str
    count: int
    size: int


@hub.on("fill")
async def fill(ctx: MessageContext, data: Fill) -> bool:
    await ctx.connection.join(data.room)
    for number in range(data.count):
        await hub.publish(data.room, "filler", {"n": number, "pad": "x" * data.size},
                          exclude=ctx.connection)
    return True


class Kick(BaseModel):
    member: str


@hub.on("kick")
async def kick(ctx: MessageContext, data: Kick) -> int:
    return await hub.disconnect(data.member, 4001, "kicked")


@hub.on("whoami")
async def whoami(ctx: MessageContext, data: object) -> dict[str, str]:
    conn = ctx.connection
    assert conn.identity is not None
    return {"member": conn.identity.id, "address": conn.client_address}


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@hub.on("stats")
async def stats(ctx: MessageContext, data: object) -> dict[str, object]:
    backplane = hub.backplane
    assert isinstance(backplane, MemoryBackplane)
    return {**dataclasses.asdict(hub.stats()), "history_bytes": backplane.history_bytes,
            "rss": _rss()}


app = Starlette(routes=[WebSocketRoute("/ws", hub.endpoint)], lifespan=hub.lifespan)
