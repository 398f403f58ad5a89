"""Graceful shutdown under uvicorn, driven by a real SIGTERM to a server process."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from support import Player, spawn, wait_for
from wsroom import CloseCode

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

BAD_SIGNS = ("Traceback", "Task was destroyed", "was never awaited", "ResourceWarning",
             "Unclosed", "Exception in ASGI application")


async def test_sigterm_drains_in_batches_flushes_and_exits_cleanly() -> None:
    """SIGTERM while six clients have a backlog queued on the server: every client
    gets every message, then 1012, in batches; a newcomer during the drain gets 1013;
    the process exits without warnings."""
    count = 2000
    config = {"shutdown_timeout": 6, "shutdown_batch_size": 2, "ping_interval": 30}
    async with spawn("flood_app:app", config, send_buffer=65536) as server:
        url = server.url + "/ws"
        closes: list[tuple[float, int]] = []
        async with contextlib.AsyncExitStack() as stack:
            # Six members that do not read yet: the flood backs up into their queues.
            players = [await stack.enter_async_context(Player.connect(url,
                                                                      receive_buffer=8192))
                       for _ in range(6)]
            observer = await stack.enter_async_context(Player.connect(url))
            await players[0].send("flood", {"count": count, "size": 300, "rate": 1e6})
            await observer.collect(count)  # everything is published (and queued)
            server.terminate()

            async def read_to_the_end(player: Player) -> None:
                code = await player.until_closed(timeout=30)
                closes.append((anyio.current_time(), code))

            async with anyio.create_task_group() as tg:
                for player in players:
                    tg.start_soon(read_to_the_end, player)
                tg.start_soon(read_to_the_end, observer)
                await wait_for(lambda: "draining before the server shuts down" in server.log())
                async with Player.connect(url, hello=False) as late:
                    assert await late.until_closed() == CloseCode.TRY_AGAIN_LATER
        with anyio.fail_after(30):
            await server.process.wait()
        log = server.log()
    print([len(p.msgs) for p in players], closes)
    print(log)
    for player in players:
        assert [m["data"]["n"] for m in player.msgs] == list(range(count))
    assert [code for _, code in closes] == [CloseCode.SERVICE_RESTART] * 7
    # In batches of 2 spread over half of shutdown_timeout: not all at once.
    times = sorted(when for when, _ in closes)
    assert times[-1] - times[0] >= 1.0
    assert "draining before the server shuts down" in log
    assert "hub stopped" in log
    assert server.process.returncode in (0, -15)  # uvicorn re-raises SIGTERM at exit
    for sign in BAD_SIGNS:
        assert sign not in log, log
