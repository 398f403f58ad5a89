"""The example game on two workers sharing Redis (and one database): players on either
worker play at one table; a GM's kick on one worker closes the player on the other."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from test_game_api import Table
from test_game_ws import event_is, msg_where, next_message, room, seats

from support import load_game, serve, wait_for
from support.redis import REDIS_URL, delete_prefix, redis_or_skip
from wsroom import HubConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiosqlite and redis-py run on asyncio only


@asynccontextmanager
async def two_tables(tmp_path: Path) -> AsyncIterator[tuple[Table, Table]]:
    """Two workers of the game: one SQLite file, one Redis prefix."""
    redis_or_skip()
    from wsroom.redis import RedisBackplane

    game = load_game()
    prefix = f"wsroom-game-test-{secrets.token_hex(4)}"
    database = f"sqlite+aiosqlite:///{tmp_path / 'game.db'}"
    config = HubConfig(resume_secrets=["g" * 32], connect_rate_per_ip=None)
    try:
        async with AsyncExitStack() as stack:
            tables = []
            for _ in range(2):
                app = game.create_app(database, hub_config=config,
                                      backplane=RedisBackplane(REDIS_URL, prefix=prefix))
                url = await stack.enter_async_context(serve(app))
                http = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=url.replace("ws://", "http://")))
                tables.append(Table(app, url, http))
            yield tables[0], tables[1]
    finally:
        delete_prefix(prefix)


async def test_players_on_two_workers_share_the_table_and_a_kick_crosses_workers(
        tmp_path: Path) -> None:
    async with two_tables(tmp_path) as (one, two):
        gm, ann = await seats(one, "Gina", "Ann")
        async with one.client(gm) as gina, two.player(ann) as player:
            await gina.wait_connected()
            said = await player.request("chat", {"text": "hello from worker two"})
            assert said["type"] == "reply"
            assert (await next_message(gina, "chat")).data == said["data"]
            # The roster on each worker shows both.
            for table in (one, two):
                await wait_for(lambda t=table: {e.member for e in t.hub.presence(room(gm))}
                               == {str(gm["player_id"]), str(ann["player_id"])})
            assert (await one.http.get("/ready")).status_code == 200

            kicked = await gina.request("kick", {"player_id": ann["player_id"]})
            assert (await msg_where(player, event_is("kicked")))["data"] == kicked
            assert await player.until_closed() == 4501
            await wait_for(lambda: str(ann["player_id"]) not in
                           {e.member for e in one.hub.presence(room(gm))})
            with anyio.fail_after(5):
                await gina.wait_connected()  # the GM stays connected
