"""Regressions from a review of the example game and wsroom.js: a player id beyond a
database integer is a client error (not a crash with a logged traceback), and a page that
calls close() from its "reconnecting" callback stays closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from test_browser_client import app_for, browser, lobby_hub
from test_game_api import game_table
from test_game_ws import seats

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiosqlite and Playwright


# ------------------------------------------------------------------ the game

HUGE = 2**63  # valid for `int` in the models, but too large for a SQLite INTEGER


@pytest.mark.parametrize(("event", "data"), [
    ("kick", {"player_id": HUGE}),
    ("whisper", {"to": HUGE, "text": "psst"}),
    ("initiative", {"order": [HUGE], "current": 0}),
])
async def test_an_out_of_range_player_id_is_a_client_error_not_internal(
        tmp_path: Path, event: str, data: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with game_table(tmp_path) as table:
        gm, _ann = await seats(table, "Gina", "Ann")
        async with table.player(gm) as gina:
            answer = await gina.request(event, data)
    assert answer["type"] == "error"
    assert answer["code"] in {"not_found", "invalid_data"}, answer  # is "internal"
    assert "OverflowError" not in caplog.text  # a traceback per such message


# ------------------------------------------------------------------ wsroom.js


async def test_close_from_the_reconnecting_callback_stays_closed() -> None:
    """wsroom.js _ended: onState("reconnecting") runs before the retry timer is armed, so
    a close() from that callback is undone: the timer reconnects a closed client."""
    hub, connects = lobby_hub()
    async with browser(app_for(hub.endpoint, hub.lifespan)) as b:
        await b.js("""(url) => {
            window.seen = [];
            const client = new wsroom.WsroomClient(url, {minBackoff: 20, maxBackoff: 50,
              onState: (state) => {
                window.seen.push(state);
                if (state === "reconnecting") client.close(1000, "give up");
              }});
            window.c = client;
            client.connect();
        }""", b.ws_url)
        await b.until("window.c.state === 'connected'")
        await b.js("window.c.send('bye', 4000)")  # the server closes with a reconnect code
        await b.until("window.seen.includes('closed')")
        await anyio.sleep(0.5)  # backoff is at most 50 ms
        assert await b.js("window.seen") == ["connecting", "connected", "reconnecting",
                                             "closed"]
        assert await b.js("window.c.state") == "closed"
        assert len(connects) == 1
