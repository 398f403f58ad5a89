"""The stream cursor cases (tests/cases/cursor.json), run against every reader of a stream:
`wsroom._core.cursor.StreamCursor` (the reference), the Python client's frame handling
(a message is delivered, dropped, or the client drops the connection and resumes with its
positions), and ``static/wsroom.js`` (tests/js/cursor.test.mjs, with Node's test runner)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.types import Receive, Scope, Send

from support import serve
from wsroom._core.cursor import Step, StreamCursor
from wsroom.client import Client, Message

ROOT = Path(__file__).resolve().parents[2]
CASES_FILE = ROOT / "tests" / "cases" / "cursor.json"
DOC = json.loads(CASES_FILE.read_text())
CASES: list[dict[str, Any]] = DOC["cases"]
VERDICTS = {step.value for step in Step}
END = "~end"  # a stream no case uses: its message says the client has read everything


def ids(case: dict[str, Any]) -> str:
    return str(case["name"]).replace(" ", "-")


def wire(frame: dict[str, Any], index: int) -> dict[str, Any]:
    """The frame as the server sends it: a welcome with the common fields, a msg with
    an event and its index as data (to tell which were delivered)."""
    frame = {key: value for key, value in frame.items() if key != "expect"}
    if frame["type"] == "welcome":
        return {"type": "welcome", **DOC["welcome"], **frame}
    if frame["type"] == "msg":
        return {**frame, "event": "m", "data": index}
    return frame


def expected(case: dict[str, Any]) -> tuple[list[int], bool]:
    """The indices of the frames to deliver, and whether the case ends in a resume."""
    frames = case["frames"]
    new = [i for i, frame in enumerate(frames) if frame.get("expect") == "new"]
    return new, frames[-1].get("expect") in ("hole", "epoch")


def positions(case: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {name: (str(epoch), int(offset))
            for name, (epoch, offset) in case["positions"].items()}


def test_the_cases_are_well_formed() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names))
    for case in CASES:
        frames = case["frames"]
        assert frames[0]["type"] == "welcome", case["name"]
        for index, frame in enumerate(frames):
            assert frame["type"] in ("welcome", "msg", "stream", "snapshot", "left")
            if frame["type"] == "msg":
                assert frame["expect"] in VERDICTS, case["name"]
                if frame["expect"] in ("hole", "epoch"):  # the client resumes
                    assert index == len(frames) - 1, case["name"]
            else:
                assert "expect" not in frame
    covered = {frame["expect"] for case in CASES for frame in case["frames"]
               if "expect" in frame}
    assert covered == VERDICTS


# ----------------------------------------------------------------- the reference


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_stream_cursor(case: dict[str, Any]) -> None:
    cursor = StreamCursor()
    for index, frame in enumerate(case["frames"]):
        kind = frame["type"]
        if kind == "welcome":
            cursor.welcome(frame["streams"])
        elif kind == "stream":
            cursor.set(frame["stream"], frame["epoch"], frame["offset"],
                       lossy=bool(frame.get("lossy")))
        elif kind == "snapshot":
            cursor.set(frame["stream"], frame["epoch"], frame["offset"])
        elif kind == "left":
            cursor.forget(frame["stream"])
        else:
            before = cursor.positions()
            step = cursor.advance(frame["stream"], frame["epoch"], frame["offset"])
            assert step.value == frame["expect"], (case["name"], index, frame)
            if step is not Step.NEW:
                assert cursor.positions() == before  # only a new message moves it
    assert cursor.positions() == positions(case)


# ------------------------------------------------------------- the Python client


def case_server(case: dict[str, Any]) -> tuple[Callable[..., Any], list[dict[str, Any]]]:
    """An ASGI app that sends the case's frames on the first connection, then a message
    of `END`; on a later one (after a resume), a welcome and the message of `END`.
    Records each hello."""
    hellos: list[dict[str, Any]] = []
    end = {"type": "msg", "stream": END, "epoch": "x", "offset": 1, "event": "end",
           "data": None}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()
        await send({"type": "websocket.accept"})
        hellos.append(json.loads((await receive())["text"]))
        if len(hellos) == 1:
            frames = [wire(frame, index) for index, frame in enumerate(case["frames"])]
        else:
            frames = [wire({"type": "welcome", "streams": {}}, 0)]
        for frame in [*frames, end]:
            await send({"type": "websocket.send", "text": json.dumps(frame)})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    return app, hellos


@asynccontextmanager
async def client_of(case: dict[str, Any]) -> AsyncIterator[tuple[Client,
                                                                 list[dict[str, Any]]]]:
    app, hellos = case_server(case)
    async with serve(app) as url, Client(url + "/ws", min_backoff=0.01,
                                         max_backoff=0.05) as client:
        yield client, hellos


@pytest.mark.anyio
@pytest.mark.parametrize("case", CASES, ids=ids)
async def test_python_client(case: dict[str, Any]) -> None:
    """New messages come out of `messages()`, others do not; a hole or an epoch change
    makes the client reconnect, presenting the positions it had."""
    new, resumes = expected(case)
    delivered: list[int] = []
    async with client_of(case) as (client, hellos):
        with anyio.fail_after(10):
            async for item in client.messages():
                if isinstance(item, Message):
                    if item.stream == END:
                        break
                    delivered.append(item.data)
        final = {name: position for name, position in client.positions.items()
                 if name != END}
    assert delivered == new, case["name"]
    if resumes:
        assert len(hellos) == 2, case["name"]
        asked = {name: (entry["epoch"], entry["offset"])
                 for name, entry in hellos[1].get("streams", {}).items()}
        assert asked == positions(case)
    else:
        assert len(hellos) == 1, case["name"]
        assert final == positions(case)


# ------------------------------------------------------------------- wsroom.js


def test_wsroom_js_passes_the_same_cases() -> None:
    """tests/js/*.test.mjs with Node's test runner. Without Node the test is skipped,
    except on CI (``CI=true``), where it fails."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is missing (CI=true): install Debian's nodejs package")
        pytest.skip("node is missing")
    files = sorted(str(path) for path in (ROOT / "tests" / "js").glob("*.test.mjs"))
    assert files
    done = subprocess.run([node, "--test", *files], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.search(r"^# pass (\d+)$", done.stdout, re.MULTILINE)
    assert passed is not None, done.stdout
    assert int(passed.group(1)) >= len(CASES), done.stdout  # every case ran
