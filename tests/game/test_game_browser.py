"""The example game in a real browser: Debian's Chromium, driven by Playwright, against
a real uvicorn server.

A GM page and two player pages. Players chat and roll. One player's network goes dark
(a TCP proxy between its browser and the server stops forwarding: no FIN, no RST, as
when a phone loses its signal) while the GM posts 50 messages and whispers to it; the
server evicts the silent connection, the GM's roster shows the player away; the network
comes back, the page resumes its session and shows every missed message once, in order,
and the whisper; the roster shows the player online again, never gone. The GM kicks the
other player: its page says so and does not reconnect. Screenshots of the GM's and the
player's pages are saved under ``test-artifacts/browser/``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from support import CHROMIUM, playwright_or_skip, serve
from wsroom import HubConfig

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API and aiosqlite need asyncio


class Blackhole:
    """A TCP proxy that can go dark: while cut, it forwards nothing in either direction
    and closes nothing (the peers see silence, as on a dead network). Restoring it
    resets the connections that went dark and forwards new ones again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._dark = False
        self._restored = anyio.Event()
        self._streams: set[anyio.abc.SocketStream] = set()

    def cut(self) -> None:
        self._dark = True
        self._restored = anyio.Event()

    async def restore(self) -> None:
        self._dark = False
        for stream in list(self._streams):
            await stream.aclose()  # these went dark: the browser sees them fail now
        self._restored.set()

    async def _pipe(self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream,
                    born_dark: bool) -> None:
        try:
            async for chunk in source:
                if self._dark or born_dark:
                    await anyio.sleep_forever()  # swallow: nothing more gets through
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError,
                anyio.EndOfStream, OSError):
            pass
        finally:
            await sink.aclose()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        born_dark = self._dark
        self._streams.add(client)
        try:
            async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as server:
                self._streams.add(server)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pipe, client, server, born_dark)
                    tg.start_soon(self._pipe, server, client, born_dark)
        except OSError:
            pass
        finally:
            self._streams.discard(client)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Blackhole]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            yield self
            tg.cancel_scope.cancel()


def game_app(tmp_path: Path) -> Any:
    sys.path.insert(0, str(ROOT / "examples" / "fastapi_game"))
    try:
        import app as game
    finally:
        sys.path.pop(0)
    # Short heartbeats so that the server notices the dark network within seconds.
    return game.create_app(f"sqlite+aiosqlite:///{tmp_path / 'game.db'}",
                           hub_config=HubConfig(ping_interval=1, pong_timeout=1))


async def wait_state(page: Any, *states: str, timeout: float = 20) -> None:
    selector = ", ".join(f'#state[data-state="{s}"]' for s in states)
    await page.wait_for_selector(selector, timeout=timeout * 1000)


async def log_lines(page: Any) -> list[str]:
    return list(await page.locator("#log li").all_inner_texts())


async def test_a_gm_and_two_players_in_chromium(tmp_path: Path) -> None:
    async_playwright = playwright_or_skip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with serve(game_app(tmp_path)) as ws_url, async_playwright() as playwright:
        http = ws_url.replace("ws://", "http://")
        port = int(http.rsplit(":", 1)[1])
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        async with Blackhole(port).running() as network:
            pages = []
            for _ in range(3):  # one browser context each: separate storage, like devices
                pages.append(await (await browser.new_context()).new_page())
            gm, frodo, sam = pages
            # The GM creates a game; the players join with its code (Frodo through the
            # network that will go dark).
            await gm.goto(http + "/")
            await gm.fill("#create input[name=name]", "Gandalf")
            await gm.click("#create button")
            await wait_state(gm, "connected")
            code = (await gm.inner_text("#code")).strip()
            assert len(code) == 6
            for page, name, base in ((frodo, "Frodo", f"http://127.0.0.1:{network.port}"),
                                     (sam, "Sam", http)):
                await page.goto(base + "/")
                await page.fill("#join input[name=code]", code)
                await page.fill("#join input[name=name]", name)
                await page.click("#join button")
                await wait_state(page, "connected")
            frodo_id = str(await frodo.evaluate("window.game.me.player_id"))
            sam_id = str(await sam.evaluate("window.game.me.player_id"))
            await gm.wait_for_selector(
                f'#roster li[data-member="{frodo_id}"][data-status="online"]')

            # Players chat and roll; everyone sees it.
            await frodo.fill("#chat input", "Hello from Frodo")
            await frodo.click("#chat button")
            await sam.fill("#roll input", "2d6+3")
            await sam.click("#roll button")
            for page in (gm, frodo, sam):
                await page.wait_for_selector("#log li.roll")
                lines = await log_lines(page)
                assert "Frodo: Hello from Frodo" in lines
                assert any(line.startswith("Sam rolled 2d6+3") for line in lines)
            # The GM sets the scene; a reload keeps the player and shows the history.
            await gm.fill("#scene-form textarea", "The Shire, at dawn")
            await gm.click("#scene-form button")
            await frodo.wait_for_selector("#scene:text('The Shire, at dawn')")
            await sam.reload()
            await wait_state(sam, "connected", "resumed")
            await sam.wait_for_selector("#log li.roll")
            assert "Frodo: Hello from Frodo" in await log_lines(sam)
            assert await sam.inner_text("#scene") == "The Shire, at dawn"
            await sam.fill("#roll input", "2d6+")  # bad notation: a clear error, no crash
            await sam.click("#roll button")
            await sam.wait_for_selector("#error:not(:empty)")
            assert "Sam: " not in "".join(await log_lines(sam))

            # Frodo's network goes dark: the server evicts the silent connection and the
            # GM sees Frodo away (not gone) while posting 50 messages and a whisper.
            network.cut()
            await gm.wait_for_selector(
                f'#roster li[data-member="{frodo_id}"][data-status="away"]', timeout=20_000)
            await gm.evaluate("""async () => {
                for (let i = 1; i <= 50; i++)
                    await window.game.client.request("chat", {text: `GM line ${i}`});
            }""")
            await gm.evaluate(
                f'window.game.client.request("whisper", {{to: {frodo_id}, '
                f'text: "The ring is in your pocket"}})')
            await gm.wait_for_function(
                "[...document.querySelectorAll('#log li')].some(li => "
                "li.textContent === 'Gandalf: GM line 50')")
            await wait_state(frodo, "reconnecting", "connecting", timeout=20)

            # The network comes back: Frodo's page resumes and shows everything once.
            await network.restore()
            await wait_state(frodo, "resumed", timeout=30)
            await frodo.wait_for_function(
                "[...document.querySelectorAll('#log li')].some(li => "
                "li.textContent === 'Gandalf: GM line 50')", timeout=20_000)
            gm_lines = [line for line in await log_lines(frodo) if line.startswith("Gandalf: ")]
            assert gm_lines == [f"Gandalf: GM line {i}" for i in range(1, 51)]
            await frodo.wait_for_selector("#whispers li")
            assert await frodo.locator("#whispers li").all_inner_texts() == [
                "Gandalf: The ring is in your pocket"]
            await gm.wait_for_selector(
                f'#roster li[data-member="{frodo_id}"][data-status="online"]')
            history = [h["status"] for h in await gm.evaluate("window.game.rosterHistory")
                       if h["id"] == frodo_id]
            assert "away" in history
            assert history[history.index("away"):].count("online") >= 1
            assert "gone" not in history
            await gm.screenshot(path=str(ARTIFACTS / "gm.png"), full_page=True)
            await frodo.screenshot(path=str(ARTIFACTS / "player-frodo.png"), full_page=True)

            # The GM kicks Sam: Sam's page says so and stays closed.
            await gm.click(f'#roster button[data-kick="{sam_id}"]')
            await sam.wait_for_selector("#removed", state="visible")
            await wait_state(sam, "closed")
            await anyio.sleep(3)  # a reconnect would have happened by now
            assert await sam.get_attribute("#state", "data-state") == "closed"
            await sam.screenshot(path=str(ARTIFACTS / "player-sam-kicked.png"), full_page=True)
            await gm.wait_for_selector(f'#roster li[data-member="{sam_id}"]', state="detached")
        await browser.close()
