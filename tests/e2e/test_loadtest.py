"""The load-test CLI (wsroom.loadtest): smoke runs against real servers (a small hub and
the example game), argument errors. No timing assertions: only what must hold on any
machine (no gap, deliveries, resumes recorded with their results)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from support import hub_app, load_game, serve
from wsroom import Connection, Handshake, Hub, Identity, MessageContext, _cli
from wsroom.loadtest import Histogram, main


@pytest.fixture
def anyio_backend() -> str:
    # The CLI runs its own event loop (asyncio) in a thread; the server runs here.
    return "asyncio"


def say_hub(**kwargs: Any) -> Hub:
    """Everyone in one room; ``say`` is broadcast to it as ``said``."""
    hub = Hub(**kwargs)

    @hub.on_connect
    async def joined(conn: Connection) -> None:
        await conn.join("lobby")

    @hub.on("say")
    async def say(ctx: MessageContext, data: Any) -> None:
        await ctx.publish("lobby", "said", data)

    return hub


async def run_cli(argv: list[str]) -> int:
    return await anyio.to_thread.run_sync(main, argv)


def check_report(report: dict[str, Any], clients: int) -> None:
    assert report["gaps"] == 0, report
    assert report["holes"] == report["duplicates"] == 0
    assert report["sent"] > 0
    assert report["deliveries"] > 0
    # Everyone is in the room: a message comes back to (about) every client.
    assert report["deliveries"] > report["sent"]
    assert report["ever_connected"] == clients
    latency = report["latency_ms"]
    assert set(latency) == {"count", "mean", "p50", "p95", "p99", "max"}
    assert latency["count"] > 0
    assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    resumes = report["resumes"]
    assert report["drops"] > 0  # 20 clients, 0.2 drops/s each, 2 s
    assert resumes["total"] > 0
    assert resumes["total"] == (resumes["recovered"] + resumes["not_recovered"]
                                + resumes["new_session"])
    assert report["errors"]["total"] == 0, report["errors"]
    assert report["passed"] is True


@pytest.mark.anyio
@pytest.mark.e2e
async def test_a_hub_under_load_with_drops(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    async with serve(hub_app(say_hub())) as url:
        status = await run_cli([
            f"{url}/ws", "--clients", "20", "--duration", "2", "--rate", "2",
            "--drop", "0.2", "--event", "say", "--echo-event", "said",
            "--data", '{"from": "bot{client}", "text": "{probe}"}', "--fire-and-forget",
            "--seed", "7", "--quiet", "--json", str(out)])
    report = json.loads(out.read_text())
    assert status == 0, report
    assert report["mode"] == "fire_and_forget"
    check_report(report, 20)
    assert report["reply_latency_ms"]["count"] == 0


@pytest.mark.anyio
@pytest.mark.e2e
async def test_the_example_game_under_load_with_drops(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    app = load_game().create_app(f"sqlite+aiosqlite:///{tmp_path / 'game.db'}")
    out = tmp_path / "report.json"
    async with serve(app) as url:
        status = await run_cli([
            f"{url}/ws", "--game", "--clients", "20", "--duration", "2", "--ramp", "0.5",
            "--drop", "0.2", "--seed", "7", "--json", str(out)])
    report = json.loads(out.read_text())
    assert status == 0, report
    assert report["mode"] == "request"
    assert isinstance(report["game"], str)
    check_report(report, 20)
    assert report["replies"] > 0
    assert report["reply_latency_ms"]["count"] == report["replies"]
    printed = capsys.readouterr()
    assert "latency" in printed.out
    assert "result: PASS" in printed.out
    assert "connected" in printed.err  # the progress line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_game_setup_failing_is_a_clear_error(capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    assert main([f"ws://127.0.0.1:{free_port()}/ws", "--game", "-n", "2", "-q"]) == 2
    err = capsys.readouterr().err
    assert "setup failed" in err
    assert "/api/games" in err


SCENARIO = """
import dataclasses

from wsroom.loadtest import Options, SetupError


def bots(options: Options) -> Options:
    # One auth per client, and a label for the report.
    auths = [{"name": f"bot{number}"} for number in range(options.clients)]
    return dataclasses.replace(options, auths=auths, labels={"table": "t1"})


async def broken(options: Options) -> Options:
    raise SetupError("no table for you")


def crashing(options: Options) -> Options:
    raise RuntimeError("oops")


not_callable = 3
"""


@pytest.fixture
def scenario_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with a scenario module (``bots_scenario.py``), the current one."""
    (tmp_path / "bots_scenario.py").write_text(SCENARIO)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def names_hub(seen: list[str]) -> Hub:
    """`say_hub`, noting the name of every client that connects."""
    async def authenticate(handshake: Handshake) -> Identity:
        name = str(handshake.auth["name"])
        seen.append(name)
        return Identity(name)

    return say_hub(authenticate=authenticate)


@pytest.mark.anyio
@pytest.mark.e2e
@pytest.mark.parametrize("spec", ["bots_scenario:bots", "./bots_scenario.py:bots"])
async def test_a_scenario_plug_in_sets_the_clients_up(scenario_dir: Path, spec: str) -> None:
    """A module or a file, from the current directory: its callable gets the options
    and returns those of the run (the auths, one per client; labels for the report)."""
    seen: list[str] = []
    out = scenario_dir / "report.json"
    async with serve(hub_app(names_hub(seen))) as url:
        status = await run_cli([
            f"{url}/ws", "--scenario", spec, "--clients", "3", "--duration", "1",
            "--rate", "2", "--event", "say", "--echo-event", "said", "--quiet",
            "--json", str(out)])
    report = json.loads(out.read_text())
    assert status == 0, report
    assert report["table"] == "t1"
    assert sorted(set(seen)) == ["bot0", "bot1", "bot2"]
    assert report["gaps"] == 0
    assert report["deliveries"] > 0


@pytest.mark.parametrize(("spec", "message"), [
    ("bots_scenario:broken", "no table for you"),
    ("bots_scenario:crashing", "the scenario failed: RuntimeError: oops"),
])
def test_a_failing_scenario_is_a_setup_error(scenario_dir: Path, spec: str, message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([f"ws://127.0.0.1:{free_port()}/ws", "--scenario", spec, "-q"]) == 2
    err = capsys.readouterr().err
    assert f"error: setup failed: {message}" in err


@pytest.mark.parametrize(("spec", "message"), [
    ("bots_scenario:not_callable", "bots_scenario has no callable 'not_callable'"),
    ("bots_scenario:missing", "bots_scenario has no callable 'missing'"),
    ("no_such_module:scenario", "cannot import no_such_module"),
    ("missing/file.py:scenario", "no such file: missing/file.py"),
])
def test_a_scenario_that_cannot_be_loaded_is_a_usage_error(
        scenario_dir: Path, spec: str, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ws://127.0.0.1:8000/ws", "--scenario", spec])
    assert exited.value.code == 2
    assert f"--scenario: {message}" in capsys.readouterr().err


def test_the_tool_knows_no_application() -> None:
    """The example game's HTTP API lives in its scenario, in examples/."""
    import wsroom.loadtest

    source = Path(wsroom.loadtest.__file__).read_text()
    assert "/api/" not in source
    assert "credential" not in source


@pytest.mark.parametrize(("argv", "message"), [
    (["http://127.0.0.1:8000/ws"], "URL must be ws://"),
    (["ws://127.0.0.1:8000/ws", "--clients", "0"], "--clients/-n: must be >= 1"),
    (["ws://127.0.0.1:8000/ws", "--clients", "many"], "not a number"),
    (["ws://127.0.0.1:8000/ws", "--rate", "0"], "--rate/-r: must be > 0"),
    (["ws://127.0.0.1:8000/ws", "--drop", "1.5"], "--drop: must be between 0 and 1"),
    (["ws://127.0.0.1:8000/ws", "--data", "{text}"], "--data: not valid JSON"),
    (["ws://127.0.0.1:8000/ws", "--data", "[1, 2]"], "--data must contain"),
    (["ws://127.0.0.1:8000/ws", "--game", "--auth", "{}"], "not allowed with argument"),
    (["ws://127.0.0.1:8000/ws", "--game", "--scenario", "m:f"], "not allowed with --game"),
    (["ws://127.0.0.1:8000/ws", "--auth-file", "/nonexistent/auths"], "--auth-file"),
    (["ws://127.0.0.1:8000/ws", "--header", "nocolon"], "expected 'Name: value'"),
    ([], "the following arguments are required: url"),
])
def test_argument_errors_say_what_is_wrong(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: wsroom loadtest")


def test_loadtest_is_accepted_as_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["loadtest", "--help"])
    assert exited.value.code == 0
    assert "messages per second PER CLIENT" in capsys.readouterr().out


def test_the_wsroom_command_names_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["--help"]) == 0
    assert "loadtest URL" in capsys.readouterr().out
    assert _cli.main([]) == 2
    assert "wsroom: no command" in capsys.readouterr().err
    assert _cli.main(["load"]) == 2
    assert "unknown command 'load'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        _cli.main(["loadtest", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: wsroom loadtest")


def test_the_wsroom_command_without_the_client_extra_says_so() -> None:
    """`wsroom --help` works without wsproto; `wsroom loadtest` says what is missing in one
    line (a process of its own, where importing wsproto fails)."""
    script = ("import sys; sys.modules['wsproto'] = None\n"
              "from wsroom._cli import main\n"
              "assert main(['--help']) == 0\n"
              "sys.exit(main(['loadtest', 'ws://127.0.0.1:1/ws']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "usage: wsroom COMMAND" in done.stdout
    assert done.stderr.strip() == ("wsroom loadtest: wsroom's client needs wsproto (the "
                                   "'client' extra): pip install 'wsproto>=1.2'")


def test_python_dash_m_wsroom_is_the_wsroom_command() -> None:
    done = subprocess.run([sys.executable, "-m", "wsroom", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: wsroom COMMAND")


def test_histogram_quantiles_are_within_one_percent() -> None:
    histogram = Histogram()
    assert histogram.quantile(0.5) is None
    for millisecond in range(1, 1001):
        histogram.record(millisecond / 1000)
    assert histogram.count == 1000
    assert histogram.max == 1.0
    for q in (0.5, 0.95, 0.99):
        assert histogram.quantile(q) == pytest.approx(q, rel=0.011)
    summary = histogram.summary()
    assert summary["max"] == 1000.0
    assert summary["mean"] == pytest.approx(500.5)
