"""`wsroom.runner`: the listening socket's options (and that accepted sockets inherit
them), and ``wsroom run``'s arguments: --help, the ws-max-size derived from the app's
Hub, uvicorn's settings, a missing uvicorn. uvicorn itself is not started here: its
``Server.run`` is replaced by one that records what it was given (tests/faults/ run the
real thing)."""

from __future__ import annotations

import secrets
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsroom import Hub, HubConfig
from wsroom._cli import main as wsroom_main
from wsroom.runner import DEFAULT_USER_TIMEOUT, listen_socket, main, ws_max_size_for

linux_only = pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"),
                                reason="TCP_USER_TIMEOUT is Linux's")


def tcp_options(sock: socket.socket) -> dict[str, int]:
    return {
        "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    }


@linux_only
def test_listen_socket_sets_the_user_timeout_and_keepalive_and_accepted_sockets_inherit_them(
) -> None:
    expected = {"user_timeout": 4500, "keepalive": 1, "idle": 7, "interval": 2, "count": 4}
    with listen_socket("127.0.0.1", 0, user_timeout=4.5, keepalive_idle=7,
                       keepalive_interval=2, keepalive_count=4) as listener:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert tcp_options(listener) == expected
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted:
                assert tcp_options(accepted) == expected


@linux_only
def test_listen_socket_defaults() -> None:
    with listen_socket("127.0.0.1", 0) as listener:
        assert tcp_options(listener) == {"user_timeout": round(DEFAULT_USER_TIMEOUT * 1000),
                                         "keepalive": 1, "idle": 15, "interval": 5,
                                         "count": 3}
        assert listener.getsockname()[0] == "127.0.0.1"
        assert listener.family == socket.AF_INET


@linux_only
def test_listen_socket_without_user_timeout_leaves_the_kernels_default() -> None:
    with listen_socket("127.0.0.1", 0, user_timeout=None) as listener:
        assert tcp_options(listener)["user_timeout"] == 0


def test_listen_socket_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = listen_socket("::1", 0)
    except OSError as exc:  # no ::1 on this host
        pytest.skip(str(exc))
    with listener:
        assert listener.family == socket.AF_INET6


@pytest.mark.parametrize("kwargs", [{"user_timeout": 0}, {"user_timeout": -1},
                                    {"keepalive_idle": 0}, {"keepalive_count": 0}])
def test_listen_socket_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        listen_socket("127.0.0.1", 0, **kwargs)


def test_ws_max_size_is_the_largest_max_message_bytes_of_the_modules_hubs() -> None:
    module = types.ModuleType("app")
    assert ws_max_size_for(module) is None
    module.hub = Hub(HubConfig(max_message_bytes=1000))
    assert ws_max_size_for(module) == 1000
    module.other = Hub(HubConfig(max_message_bytes=3000))
    module.not_a_hub = HubConfig(max_message_bytes=9000)
    assert ws_max_size_for(module) == 3000


def test_wsroom_help_lists_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert wsroom_main(["--help"]) == 0
    assert "run MODULE:APP" in capsys.readouterr().out


def test_wsroom_run_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        wsroom_main(["run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--app-dir", "--ws-max-size", "--max-message-bytes",
                   "--user-timeout", "--forwarded-allow-ips", "--timeout-graceful-shutdown"):
        assert option in out


@pytest.mark.parametrize(("ws", "library"), [("websockets-sansio", "websockets"),
                                             ("wsproto", "wsproto")])
def test_wsroom_run_without_the_websocket_library_is_a_one_line_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ws: str,
        library: str) -> None:
    monkeypatch.setitem(sys.modules, library, None)  # find_spec: None
    assert wsroom_main(["run", "app:app", "--ws", ws]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"needs {library}" in err


def test_wsroom_run_without_uvicorn_is_a_one_line_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn: ImportError
    assert wsroom_main(["run", "app:app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "uvicorn" in err
    assert "wsroom[run]" in err


# --------------------------------------------------------------- wsroom run, unstarted


APP = """\
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from wsroom import Hub, HubConfig
{hubs}
app = Starlette(routes=[WebSocketRoute("/ws", {endpoint})])
"""


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """What uvicorn.Server.run would have served: its config and sockets."""
    import uvicorn

    seen: dict[str, Any] = {}

    def run(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        seen["config"] = self.config
        seen["sockets"] = sockets
        seen["options"] = ([tcp_options(sock) for sock in sockets or []]
                           if hasattr(socket, "TCP_USER_TIMEOUT") else None)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    path = list(sys.path)
    yield seen
    sys.path[:] = path


def write_app(tmp_path: Path, hubs: str, endpoint: str = "hub.endpoint") -> str:
    name = f"wsroom_run_app_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text(APP.format(hubs=hubs, endpoint=endpoint))
    return name


def test_run_derives_ws_max_size_from_the_apps_hub_and_sets_production_defaults(
        tmp_path: Path, served: dict[str, Any]) -> None:
    name = write_app(tmp_path, "hub = Hub(HubConfig(max_message_bytes=12345))")
    assert main([f"{name}:app", "--app-dir", str(tmp_path), "--port", "0",
                 "--user-timeout", "7"]) == 0
    config = served["config"]
    assert config.ws_max_size == 12345
    assert config.ws == "websockets-sansio"
    assert config.ws_ping_interval is None
    assert config.ws_per_message_deflate is False
    assert config.proxy_headers is False
    assert config.timeout_graceful_shutdown == 20
    (sock,) = served["sockets"]
    assert sock.fileno() == -1  # closed once uvicorn is done with it
    if served["options"] is not None:
        assert served["options"][0]["user_timeout"] == 7000


def test_run_without_a_hub_in_the_module_uses_max_message_bytes(
        tmp_path: Path, served: dict[str, Any]) -> None:
    # The hub is in a list, not a global of the module: the scan does not find it.
    name = write_app(tmp_path, "hubs = [Hub(HubConfig(max_message_bytes=100))]",
                     endpoint="hubs[0].endpoint")
    assert main([f"{name}:app", "--app-dir", str(tmp_path), "--port", "0"]) == 0
    assert served["config"].ws_max_size == HubConfig().max_message_bytes == 65536
    assert main([f"{name}:app", "--app-dir", str(tmp_path), "--port", "0",
                 "--max-message-bytes", "4096"]) == 0
    assert served["config"].ws_max_size == 4096


def test_run_options_override_the_defaults(tmp_path: Path, served: dict[str, Any]) -> None:
    name = write_app(tmp_path, "hub = Hub(HubConfig(max_message_bytes=12345))")
    assert main([f"{name}:app", "--app-dir", str(tmp_path), "--port", "0",
                 "--ws-max-size", "70000", "--forwarded-allow-ips", "10.0.0.1",
                 "--timeout-graceful-shutdown", "30", "--ws", "wsproto",
                 "--user-timeout", "0"]) == 0
    config = served["config"]
    assert config.ws_max_size == 70000
    assert config.proxy_headers is True
    assert config.forwarded_allow_ips == "10.0.0.1"
    assert config.timeout_graceful_shutdown == 30
    assert config.ws == "wsproto"
    if served["options"] is not None:
        assert served["options"][0]["user_timeout"] == 0


def test_run_refuses_an_app_without_a_colon(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["app"]) == 2
    assert "MODULE:ATTRIBUTE" in capsys.readouterr().err
