"""The example game (examples/fastapi_game), its HTTP API: a real uvicorn server, a real
SQLite file per test, httpx as the client.

The helpers here (`game_table`, `Table`) are shared with test_game_ws.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import GAME_DIR, Player, load_game, serve
from wsroom import Hub, HubConfig
from wsroom.client import Client

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CODE = re.compile(r"[ABCDEFGHJKMNPQRSTUVWXYZ23456789]{6}")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiosqlite runs on asyncio only


@dataclass
class Table:
    """A running game server and an HTTP client for it."""

    app: Any
    url: str  # ws://host:port
    http: httpx.AsyncClient

    @property
    def hub(self) -> Hub:
        hub: Hub = self.app.state.hub
        return hub

    async def create(self, name: str = "Gina") -> dict[str, Any]:
        """A new game; returns the GM's seat (code, player_id, credential, role)."""
        response = await self.http.post("/api/games", json={"name": name})
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def join(self, code: str, name: str) -> dict[str, Any]:
        response = await self.http.post(f"/api/games/{code}/players", json={"name": name})
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def me(self, seat: dict[str, Any]) -> httpx.Response:
        return await self.http.get("/api/me", headers=bearer(seat))

    def client(self, seat: dict[str, Any]) -> Client:
        return Client(self.url + "/ws", auth={"credential": seat["credential"]},
                      min_backoff=0.05, max_backoff=0.5)

    def player(self, seat: dict[str, Any] | None, **kwargs: Any) -> Any:
        """A raw protocol client (tests/support/ `Player`), hello sent."""
        auth = None if seat is None else {"credential": seat["credential"]}
        return Player.connect(self.url + "/ws", auth=auth, **kwargs)


def bearer(seat: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {seat['credential']}"}


@asynccontextmanager
async def game_table(tmp_path: Path, hub_config: HubConfig | None = None
                     ) -> AsyncIterator[Table]:
    """The game on a real server, with a fresh SQLite database (created by the lifespan)."""
    app = load_game().create_app(f"sqlite+aiosqlite:///{tmp_path / 'game.db'}",
                                 hub_config=hub_config)
    async with serve(app) as url, httpx.AsyncClient(
            base_url=url.replace("ws://", "http://")) as http:
        yield Table(app, url, http)


# ------------------------------------------------------------------ create, join, me


async def test_a_gm_creates_a_game_and_players_join_it(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm = await table.create("  Gina ")
        assert gm["role"] == "gm"
        assert CODE.fullmatch(gm["code"]), gm["code"]
        assert len(gm["credential"]) >= 32
        assert (await table.me(gm)).json() == {
            "code": gm["code"], "player_id": gm["player_id"], "name": "Gina", "role": "gm"}

        ann = await table.join(gm["code"].lower(), "Ann")  # codes are case-insensitive
        assert ann["role"] == "player"
        assert ann["code"] == gm["code"]
        assert ann["player_id"] != gm["player_id"]
        assert ann["credential"] != gm["credential"]
        assert (await table.me(ann)).json() == {
            "code": gm["code"], "player_id": ann["player_id"], "name": "Ann", "role": "player"}

        other = await table.create("Gina")  # names are per game
        assert other["code"] != gm["code"]


async def test_joining_an_unknown_game_is_404(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        await table.create()
        response = await table.http.post("/api/games/ZZZZZZ/players", json={"name": "Ann"})
        assert response.status_code == 404
        assert response.json()["detail"] == "no game with this code"


@pytest.mark.parametrize("body", [
    {"name": ""},
    {"name": "   "},
    {"name": "x" * 33},
    {"name": "Ann\x00"},
    {"name": "Ann\nBob"},
    {"name": "\x1b[31mred"},
    {"name": 42},
    {"name": None},
    {},
    [],
])
async def test_an_invalid_name_is_422(tmp_path: Path, body: Any) -> None:
    async with game_table(tmp_path) as table:
        gm = await table.create()
        joined = await table.http.post(f"/api/games/{gm['code']}/players", json=body)
        assert joined.status_code == 422, joined.text
        created = await table.http.post("/api/games", json=body)
        assert created.status_code == 422, created.text


async def test_names_of_32_characters_and_unicode_are_fine(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm = await table.create("Ärger 🎲")
        long = "y" * 32
        seat = await table.join(gm["code"], f"  {long}  ")
        assert (await table.me(seat)).json()["name"] == long


async def test_a_name_taken_in_the_game_is_409(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm = await table.create("Gina")
        await table.join(gm["code"], "Ann")
        for name in ("Ann", "ann", " ANN ", "gina"):  # case-insensitive, the GM's too
            response = await table.http.post(f"/api/games/{gm['code']}/players",
                                             json={"name": name})
            assert response.status_code == 409, name
            assert response.json()["detail"] == "this name is taken in this game"


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer not-a-credential"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
])
async def test_me_without_a_valid_credential_is_401(tmp_path: Path,
                                                    headers: dict[str, str]) -> None:
    async with game_table(tmp_path) as table:
        await table.create()
        response = await table.http.get("/api/me", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


# A kicked player's /api/me (403) is tested with the kick, in test_game_ws.py.


# ------------------------------------------------------------------ history


async def test_history_is_the_rooms_snapshot(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm = await table.create("Gina")
        ann = await table.join(gm["code"], "Ann")
        async with table.client(ann) as client:
            said = await client.request("chat", {"text": "hello"})
            rolled = await client.request("roll", {"expr": "d20"})
        response = await table.http.get(f"/api/games/{gm['code']}/history", headers=bearer(gm))
        assert response.status_code == 200
        assert response.json() == {
            "game": {"code": gm["code"], "scene": "",
                     "initiative": {"order": [], "current": 0}},
            "players": [
                {"player_id": gm["player_id"], "name": "Gina", "role": "gm", "kicked": False},
                {"player_id": ann["player_id"], "name": "Ann", "role": "player",
                 "kicked": False},
            ],
            "chat": [said],
            "rolls": [rolled],
        }


async def test_history_needs_a_seat_at_that_table(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        gm = await table.create()
        stranger = await table.create("Sam")
        path = f"/api/games/{gm['code']}/history"
        assert (await table.http.get(path)).status_code == 401
        assert (await table.http.get(path, headers=bearer(stranger))).status_code == 403
        missing = await table.http.get("/api/games/ZZZZZZ/history", headers=bearer(gm))
        assert missing.status_code == 404


# ------------------------------------------------------------------ the page


async def test_the_page_and_the_browser_client_are_served(tmp_path: Path) -> None:
    async with game_table(tmp_path) as table:
        page = await table.http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.text == (GAME_DIR / "static" / "index.html").read_text()
        script = await table.http.get("/static/game.js")
        assert script.status_code == 200
        client = await table.http.get("/wsroom/wsroom.js")
        assert client.status_code == 200
        assert "javascript" in client.headers["content-type"]


# ------------------------------------------------------------------ configuration


def test_the_database_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    game = load_game()
    monkeypatch.setenv("GAME_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'env.db'}")
    assert game.create_app().state.db.engine.url.database == str(tmp_path / "env.db")
    monkeypatch.delenv("GAME_DATABASE_URL")
    assert game.create_app().state.db.engine.url.database == "./game.db"


def test_production_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    game = load_game()
    monkeypatch.setenv("GAME_RESUME_SECRETS", "a" * 32 + ", " + "b" * 32)
    monkeypatch.setenv("GAME_ALLOWED_ORIGINS", "https://game.example.com")
    monkeypatch.setenv("GAME_TRUSTED_PROXIES", "10.0.0.0/8")
    config = game.config_from_env()
    assert config.resume_secrets == ("a" * 32, "b" * 32)
    assert config.allowed_origins == ("https://game.example.com",)
    assert config.trusted_proxies == ("10.0.0.0/8",)
    for name in ("GAME_RESUME_SECRETS", "GAME_ALLOWED_ORIGINS", "GAME_TRUSTED_PROXIES"):
        monkeypatch.delenv(name)
    config = game.config_from_env()
    assert (config.resume_secrets, config.allowed_origins, config.trusted_proxies) == (
        None, None, None)


# ------------------------------------------------------------------ metrics


async def test_the_game_serves_prometheus_metrics(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with game_table(tmp_path) as table:
        gm = await table.create("Gina")
        async with table.player(gm) as player:
            await player.request("chat", {"text": "hello"})
            response = await table.http.get("/metrics")
        assert response.status_code == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(response.text)
                   for s in family.samples}
        assert samples[("wsroom_connections", (("state", "open"),))] == 1
        assert samples[("wsroom_admitted_connections_total", ())] == 1
        assert samples[("wsroom_messages_received_total", ())] >= 2  # hello, chat
        assert samples[("wsroom_received_bytes_total", ())] > 0
        assert samples[("wsroom_sent_bytes_total", ())] > 0
        assert samples[("wsroom_backplane_up", ())] == 1
