"""The example game as a load-test scenario: every simulated player gets a seat at one table.

``wsroom loadtest ws://127.0.0.1:8000/ws --scenario examples/fastapi_game/loadtest_scenario.py``
(``--game`` is the shortcut, from a clone of wsroom): before the run, `scenario` creates a
game through the game's HTTP API (``POST /api/games``, on the URL's host and port: the
first client is its game master), then one seat per other client
(``POST /api/games/{code}/players``), and hands each client its seat's credential as its
``auth``. The game broadcasts every ``chat`` message to the table, which is what the load
test sends by default. The game's code is added to the report (``"game"``).

A template for other apps: a scenario is any callable that gets the load test's
`wsroom.loadtest.Options` and returns those of the run (here with ``auths``, one per
client, and ``labels``), sync or async, raising `wsroom.loadtest.SetupError` when the
setup fails.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import anyio

from wsroom.loadtest import Options, SetupError

MAX_SEATS = 10_000


def _post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SetupError(f"POST {url}: HTTP {exc.code} (is it the example game?)") from None
    except urllib.error.URLError as exc:
        raise SetupError(f"POST {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise SetupError(f"POST {url}: {type(exc).__name__}: {exc}") from None


async def seats(options: Options) -> tuple[str, list[Any]]:
    """Create a game and a seat per client; return its code and the clients' auths."""
    if options.clients > MAX_SEATS:
        raise SetupError(f"the example game's scenario creates one seat per client over "
                         f"HTTP: at most {MAX_SEATS} clients")
    base = f"http://{urlsplit(options.url).netloc}/api"
    gm = await anyio.to_thread.run_sync(_post_json, f"{base}/games", {"name": "lt-gm"})
    code = str(gm["code"])
    auths: list[Any] = [None] * options.clients
    auths[0] = {"credential": gm["credential"]}
    limiter = anyio.CapacityLimiter(4)  # SQLite: few writers at once
    failures: list[SetupError] = []

    async def join(number: int) -> None:
        try:
            seat = await anyio.to_thread.run_sync(
                _post_json, f"{base}/games/{code}/players", {"name": f"lt-{number}"},
                limiter=limiter)
            auths[number] = {"credential": seat["credential"]}
        except SetupError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for number in range(1, options.clients):
            tg.start_soon(join, number)
    if failures:
        raise failures[0]
    return code, auths


async def scenario(options: Options) -> Options:
    """The load test's options with a seat per client (the scenario's entry point)."""
    code, auths = await seats(options)
    return dataclasses.replace(options, auths=auths, labels={**options.labels, "game": code})
