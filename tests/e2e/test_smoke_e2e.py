from __future__ import annotations

import pytest

from support import Player, hub_app, serve
from wsroom import Connection, Hub, HubConfig, MessageContext

pytestmark = pytest.mark.anyio


async def test_hello_join_publish_reply() -> None:
    hub = Hub(HubConfig(ping_interval=5, pong_timeout=5))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    @hub.on("chat")
    async def chat(ctx: MessageContext, data: dict[str, str]) -> dict[str, bool]:
        await ctx.publish("lobby", "chat", data)
        return {"ok": True}

    async with serve(hub_app(hub)) as url, Player.connect(url + "/ws") as a, \
            Player.connect(url + "/ws") as b:
        assert a.welcome is not None
        assert "lobby" in a.welcome["streams"]
        reply = await a.request("chat", {"text": "hi"})
        assert reply == {"type": "reply", "ref": "r1", "data": {"ok": True}}
        got = await b.collect(1)
        assert got[0]["event"] == "chat"
        assert got[0]["data"] == {"text": "hi"}
        assert got[0]["offset"] == 1
