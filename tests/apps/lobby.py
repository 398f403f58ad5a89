"""What the test apps share: a hub configured from WSROOM_TEST_CONFIG whose members all
join 'lobby', and a ``chat`` event that publishes to it (imported by the apps, which
uvicorn loads with ``--app-dir tests/apps``)."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from wsroom import Connection, Handshake, Hub, HubConfig, Identity, MessageContext

Authenticate = Callable[[Handshake], Awaitable[Identity | None]]


def config_from_env() -> dict[str, Any]:
    """The HubConfig fields the test passed (WSROOM_TEST_CONFIG, JSON)."""
    config: dict[str, Any] = json.loads(os.environ.get("WSROOM_TEST_CONFIG", "{}"))
    return config


def lobby_hub(config: HubConfig | None = None, *,
              authenticate: Authenticate | None = None) -> Hub:
    """A hub (`config`, else WSROOM_TEST_CONFIG's) where every member joins 'lobby', and
    ``chat <any>`` publishes it to 'lobby' as event ``chat`` and replies ``true``."""
    hub = Hub(config or HubConfig(**config_from_env()), authenticate=authenticate)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    @hub.on("chat")
    async def chat(ctx: MessageContext, data: Any) -> bool:
        await ctx.publish("lobby", "chat", data)
        return True

    return hub
