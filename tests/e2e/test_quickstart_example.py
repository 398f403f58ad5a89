"""The quickstart example, as a user runs it: a real server and real clients."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from support import Player, serve
from wsroom import CloseCode

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

EXAMPLE = Path(__file__).parents[2] / "examples" / "quickstart" / "app.py"


def load_example() -> ModuleType:
    # A fresh module (and so a fresh hub) per test: a hub runs only once.
    spec = importlib.util.spec_from_file_location("quickstart_app", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop("quickstart_app", None)
    spec.loader.exec_module(module)
    return module


async def test_two_users_chat() -> None:
    example = load_example()
    async with serve(example.app) as url, \
            Player.connect(url + "/ws", auth={"name": "ann"}) as ann, \
            Player.connect(url + "/ws", auth={"name": "bob"}) as bob:
        assert (await ann.request("chat", {"text": "hello bob"}))["data"] == {"ok": True}
        got = await bob.collect(1)
        assert got[0]["data"] == {"from": "ann", "text": "hello bob"}
        invalid = await bob.request("chat", {"text": ""})
        assert invalid["code"] == "invalid_data"


async def test_a_nameless_hello_is_refused() -> None:
    example = load_example()
    async with serve(example.app) as url, Player.connect(url + "/ws", hello=False) as anon:
        await anon.ws.send('{"type":"hello","v":1,"auth":{"name":""}}')
        assert await anon.until_closed() == CloseCode.INVALID_TOKEN
