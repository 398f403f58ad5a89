"""The abuse suite, what a client puts on the wire (issue 15): values a client chooses
never become metric labels, pings during a close never kill the Python client, and
`error` details never echo the client's input. Each test runs a real uvicorn server
(tests/apps/wire_app.py), asserts a bound and records ``attack | bound | measured`` in
the table printed at the end of the run (tests/conftest.py).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import Player, ServerProcess, spawn, wait_for
from support.netns import ABUSE
from wsroom._core.codes import CloseCode
from wsroom._core.metrics import CLOSE_CODE_LABELS
from wsroom.client import Client, _websocket
from wsroom.client._websocket import connect

pytestmark = [pytest.mark.anyio, pytest.mark.e2e,
              pytest.mark.parametrize("anyio_backend", ["asyncio"])]

APP = "wire_app:app"
MARK = "<script>alert(1)</script>"
SHORT = "<b>alert</b>"  # short enough for the field: the validator sees it


async def disconnect_series(server: ServerProcess) -> dict[tuple[str, str], float]:
    """``wsroom_disconnects_total`` from the server's /metrics, by (code, reason)."""
    url = server.url.replace("ws://", "http://") + "/metrics"
    async with httpx.AsyncClient() as http:
        text = (await http.get(url)).text
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "wsroom_disconnects_total":
                series[(sample.labels["code"], sample.labels["reason"])] = sample.value
    return series


async def test_made_up_close_codes_do_not_make_series() -> None:
    """40 connections close with codes of their choosing before the hello: before the
    fix, each code was a new series of wsroom_disconnects_total."""
    ours = {int(code) for code in CloseCode}
    rng = random.Random(15)
    codes = rng.sample([code for code in range(3000, 5000) if code not in ours], 36)
    codes += [1000, 1001, 1003, 1014]  # standard codes keep their number
    async with spawn(APP, {"connect_rate_per_ip": 10_000.0,
                           "connect_burst_per_ip": 10_000}) as server:
        for code in codes:
            ws = await connect(server.url + "/ws")
            await ws.close(code, "made up")
        series: dict[tuple[str, str], float] = {}

        async def counted() -> bool:
            nonlocal series
            series = await disconnect_series(server)
            return sum(series.values()) >= len(codes)

        with anyio.fail_after(10):
            while not await counted():
                await anyio.sleep(0.05)
    labels = {code for code, _ in series}
    reasons = {reason for _, reason in series}
    bound = len(CLOSE_CODE_LABELS) * len(reasons)
    assert labels <= CLOSE_CODE_LABELS
    assert len(series) <= bound
    # What the made-up codes became: their buckets, and the standard codes themselves.
    assert labels == {"3xxx", "4xxx", "1000", "1001", "1003", "1014"}, labels
    ABUSE.record(
        "40 closes before the hello, 36 made-up codes (3000-4999) and 4 standard ones",
        f"wsroom_disconnects_total series <= {len(CLOSE_CODE_LABELS)} code labels "
        f"(wsroom's codes, 1000-1015, 3xxx, 4xxx, other) x {len(reasons)} close "
        f"reason(s) = {bound}",
        f"{len(series)} series: code={','.join(sorted(labels))}")


async def test_the_python_client_survives_pings_during_its_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn pings every 50 ms; each client keeps its loop busy across a ping
    interval before it leaves, so a ping waits unread when its close frame goes out."""
    answer = _websocket.WebSocket._answer
    while_closing = 0

    async def counting(self: _websocket.WebSocket, ping: Any) -> None:
        nonlocal while_closing
        if self._ws.state is not _websocket.ConnectionState.OPEN:
            while_closing += 1
        await answer(self, ping)

    monkeypatch.setattr(_websocket.WebSocket, "_answer", counting)
    closes, failures = 25, []
    async with spawn(APP, {"ping_interval": 5.0},
                     args=["--ws-ping-interval", "0.05", "--ws-ping-timeout", "5"]
                     ) as server:
        for _ in range(closes):
            try:
                async with Client(server.url + "/ws") as client:
                    await client.wait_connected()
                    time.sleep(0.12)  # a busy client: pings wait in the socket buffer
                assert client.closed is not None
                assert client.closed.code == 1000
            except Exception as exc:  # counted, then asserted (an ExceptionGroup too)
                failures.append(repr(exc))
    assert failures == []
    assert while_closing >= 1  # the race did happen
    ABUSE.record(
        f"Python client closes {closes} times, uvicorn pinging every 50 ms "
        "(--ws-ping-interval 0.05), a ping unread as each close goes out",
        "0 clients dead with an exception (was LocalProtocolError in LOCAL_CLOSING)",
        f"{len(failures)} dead of {closes}; {while_closing} ping(s) read while closing, "
        "not answered")


async def test_error_details_never_echo_markup() -> None:
    """An unknown event named with markup, and payloads carrying it in a value, a dict
    key, an unexpected field, and in a validator's message that quotes its input."""
    async with spawn(APP) as server, \
            Player.connect(server.url + "/ws") as player:
        unknown = await player.request(MARK, None, ref="u")
        bad = await player.request("order", {"item": MARK, "quantity": MARK,
                                             "notes": {MARK: MARK}, MARK: MARK}, ref="b")
        quoted = await player.request("order", {"item": SHORT, "quantity": 1}, ref="q")
        ok = await player.request("order", {"item": "pear", "quantity": 1}, ref="ok")
    assert (unknown["type"], unknown["code"]) == ("error", "unknown_event")
    assert (bad["type"], bad["code"]) == ("error", "invalid_data")
    assert ok == {"type": "reply", "ref": "ok", "data": "ok"}
    assert quoted["code"] == "invalid_data"
    details = [unknown["detail"], bad["detail"], quoted["detail"]]
    for detail in details:
        assert MARK not in detail
        assert "script" not in detail
        assert "alert" not in detail
        assert "<b>" not in detail
    assert bad["detail"] == (
        "item: String should have at most 20 characters; quantity: Input should be a "
        "valid integer, unable to parse string as an integer; notes.<key>: Input should "
        "be a valid integer, unable to parse string as an integer")
    assert quoted["detail"] == "item: Value error"  # the validator's words quote it
    ABUSE.record(
        f"unknown event named {MARK}; an order with it as a value, a dict key, an "
        "unexpected field, and in a validator's ValueError",
        "error details contain none of it (0 bytes of the input)",
        " | ".join(json.dumps(detail) for detail in details))


async def test_the_server_log_holds_no_markup_either() -> None:
    """wsroom's own log lines (INFO) for the same attack hold none of the input."""
    async with spawn(APP, environ={"WSROOM_TEST_LOG_LEVEL": "DEBUG"}) as server:
        async with Player.connect(server.url + "/ws") as player:
            await player.request(MARK, None, ref="u")
            await player.request("order", {"item": MARK, "notes": {MARK: 1}}, ref="b")
            ws = player.ws
        await wait_for(lambda: "closed, reason=client_closed" in server.log())
        log = server.log()
    wsroom_lines = [line for line in log.splitlines() if " wsroom." in line]
    assert wsroom_lines
    assert not [line for line in wsroom_lines if "script" in line], wsroom_lines
    assert ws.closed is not None
    ABUSE.record(
        f"the same attack, wsroom's loggers at DEBUG ({len(wsroom_lines)} lines)",
        "no line of wsroom's loggers holds the input",
        f"{sum('script' in line for line in wsroom_lines)} line(s) with it")
