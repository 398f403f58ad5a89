"""Run a wsroom app under uvicorn with production defaults (``wsroom run module:app``), and
the listening socket that makes the kernel let go of a peer wsroom has given up on.

Why a socket of its own: when wsroom closes a connection (3008 slow consumer, 3012 no
pong, a close that timed out), uvicorn closes the transport, and asyncio keeps the socket
and its file descriptor until the write buffer is sent. ASGI gives the app no abort. A peer
that stopped acknowledging keeps the socket until TCP gives up (``tcp_retries2``: about
15 minutes); a peer that still acknowledges but never reads (a zero window) keeps it for
ever. `listen_socket` sets ``TCP_USER_TIMEOUT`` on the listening socket, and every accepted
socket inherits it: the kernel then aborts a connection whose data stays unacknowledged,
or unsent behind a zero window, for that long (Linux 5.11 and later count the zero-window
case from the first probe, however many probes the peer acknowledges). The abort wakes the
transport, which closes the file descriptor. Keepalive (``SO_KEEPALIVE`` with
``TCP_KEEPIDLE``, ``TCP_KEEPINTVL``, ``TCP_KEEPCNT``) does the same for a peer that vanished
while nothing was in flight.

The bound: a peer that stops acknowledging or stops reading loses its socket and file
descriptor at most `user_timeout` after wsroom releases it (plus the kernel's timer
granularity, a fraction of a second). A peer that keeps reading, however slowly, is not
cut by the kernel: what it still has to read is bounded by the server's write buffers.

`main` is ``wsroom run``: uvicorn with that socket, ``--ws-max-size`` matched to the hub's
``max_message_bytes``, uvicorn's own WebSocket pings off (wsroom pings itself), proxy
headers only when ``--forwarded-allow-ips`` is given, and a graceful-shutdown timeout. The
options on other platforms: ``TCP_USER_TIMEOUT`` and the keepalive tunables are set where
the platform has them (Linux has all of them).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any

from ._core.config import HubConfig
from ._runtime.hub import Hub

__all__ = ["DEFAULT_USER_TIMEOUT", "listen_socket", "main", "ws_max_size_for"]

DEFAULT_USER_TIMEOUT = 30.0
"""Seconds a connection's data may stay unacknowledged (or unsent behind a zero window)
before the kernel aborts it."""

DEFAULT_MAX_MESSAGE_BYTES = HubConfig().max_message_bytes

logger = logging.getLogger("wsroom.runner")


def listen_socket(host: str = "127.0.0.1", port: int = 8000, *,
                  user_timeout: float | None = DEFAULT_USER_TIMEOUT,
                  keepalive_idle: float = 15.0, keepalive_interval: float = 5.0,
                  keepalive_count: int = 3, backlog: int = 2048) -> socket.socket:
    """A bound, listening TCP socket whose accepted connections the kernel aborts when
    their peer is gone.

    Args:
        host: the address to listen on (IPv6 when it contains ``:``).
        port: the port (0 for any free port).
        user_timeout: seconds a connection's sent data may stay unacknowledged, or its
            data unsent behind a zero window, before the kernel aborts the connection
            (``TCP_USER_TIMEOUT``, inherited by accepted sockets); it also bounds
            keepalive. None leaves the kernel's default (about 15 minutes of
            retransmissions, for ever behind an acknowledged zero window).
        keepalive_idle: seconds without traffic before the first keepalive probe.
        keepalive_interval: seconds between keepalive probes.
        keepalive_count: unanswered probes before the connection is aborted (when
            `user_timeout` is None; with it, the user timeout decides).
        backlog: connections waiting to be accepted (the kernel caps it at
            ``net.core.somaxconn``).

    Give it to uvicorn (``uvicorn.Server(config).run(sockets=[sock])``, or ``--fd`` in a
    child process after ``sock.set_inheritable(True)``) or to hypercorn (a bind of
    ``fd://{sock.fileno()}``).
    """
    if user_timeout is not None and user_timeout <= 0:
        raise ValueError("user_timeout must be positive, or None")
    if keepalive_idle <= 0 or keepalive_interval <= 0 or keepalive_count < 1:
        raise ValueError("keepalive_idle and keepalive_interval must be positive, "
                         "keepalive_count at least 1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        tunables = [("TCP_KEEPIDLE", max(1, round(keepalive_idle))),
                    ("TCP_KEEPINTVL", max(1, round(keepalive_interval))),
                    ("TCP_KEEPCNT", keepalive_count)]
        if user_timeout is not None:
            tunables.append(("TCP_USER_TIMEOUT", max(1, round(user_timeout * 1000))))
        for name, value in tunables:
            option = getattr(socket, name, None)
            if option is None:
                if name == "TCP_USER_TIMEOUT":
                    logger.warning("this platform has no TCP_USER_TIMEOUT: a peer that "
                                   "stops reading keeps its socket until TCP gives up")
                continue
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def ws_max_size_for(module: Any) -> int | None:
    """The largest ``max_message_bytes`` of the `Hub` instances among a module's globals
    (uvicorn's ``--ws-max-size`` for that app), or None when it has none."""
    sizes = [value.config.max_message_bytes for value in vars(module).values()
             if isinstance(value, Hub)]
    return max(sizes) if sizes else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsroom run",
        description="Serve an ASGI app with a wsroom Hub under uvicorn, with production "
                    "defaults: --ws-max-size from the hub's max_message_bytes, uvicorn's "
                    "own WebSocket pings off, proxy headers off unless "
                    "--forwarded-allow-ips is given, a graceful-shutdown timeout, and a "
                    "listening socket whose connections the kernel aborts once their "
                    "peer stops acknowledging or reading for --user-timeout seconds.")
    parser.add_argument("app", metavar="MODULE:ATTRIBUTE",
                        help="the ASGI app, e.g. app:app")
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument("--app-dir", default=".",
                        help="directory put first on sys.path to import the app "
                             "(default: the current directory)")
    parser.add_argument("--ws-max-size", type=int, default=None, metavar="BYTES",
                        help="largest WebSocket message uvicorn reads; default: the largest "
                             "max_message_bytes of the Hub instances among the app "
                             "module's globals, else --max-message-bytes")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        metavar="BYTES",
                        help="--ws-max-size when the app module has no Hub among its "
                             "globals (default: %(default)s, HubConfig's default)")
    parser.add_argument("--ws", choices=["websockets-sansio", "wsproto"],
                        default="websockets-sansio",
                        help="uvicorn's WebSocket implementation (default: %(default)s)")
    parser.add_argument("--ws-per-message-deflate", action="store_true",
                        help="allow per-message compression (default: off)")
    parser.add_argument("--user-timeout", type=float, default=DEFAULT_USER_TIMEOUT,
                        metavar="SECONDS",
                        help="the kernel aborts a connection whose data stays "
                             "unacknowledged, or unsent behind a zero window, this long "
                             "(TCP_USER_TIMEOUT; default: %(default)g); 0 for the kernel's "
                             "default")
    parser.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                        help="trust X-Forwarded-For/-Proto from these proxies "
                             "(comma-separated); default: proxy headers off")
    parser.add_argument("--timeout-graceful-shutdown", type=int, default=20,
                        metavar="SECONDS",
                        help="uvicorn's wait for the app after SIGTERM; above the hub's "
                             "shutdown_timeout (default: %(default)s)")
    parser.add_argument("--backlog", type=int, default=2048, help="default: %(default)s")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info"],
                        help="default: %(default)s (never debug in production: the "
                             "websockets library logs frames)")
    parser.add_argument("--no-access-log", action="store_true",
                        help="turn uvicorn's access log off")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``wsroom run MODULE:ATTRIBUTE [options]``; returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import uvicorn
    except ImportError:
        print("wsroom run: needs uvicorn (pip install 'wsroom[run]')", file=sys.stderr)
        return 2
    library = {"websockets-sansio": "websockets", "wsproto": "wsproto"}[args.ws]
    if importlib.util.find_spec(library) is None:
        print(f"wsroom run: --ws {args.ws} needs {library} (pip install "
              f"{'wsroom[run]' if library == 'websockets' else library!r})", file=sys.stderr)
        return 2
    if ":" not in args.app:
        print(f"wsroom run: {args.app!r}: expected MODULE:ATTRIBUTE", file=sys.stderr)
        return 2
    sys.path.insert(0, args.app_dir)
    proxy = args.forwarded_allow_ips is not None
    config = uvicorn.Config(
        args.app, host=args.host, port=args.port, ws=args.ws,
        ws_ping_interval=None, ws_ping_timeout=None,
        ws_per_message_deflate=args.ws_per_message_deflate,
        proxy_headers=proxy, forwarded_allow_ips=args.forwarded_allow_ips if proxy else None,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown, backlog=args.backlog,
        log_level=args.log_level, access_log=not args.no_access_log, workers=1)
    config.load()  # imports the app, after uvicorn has configured logging
    ws_max_size = args.ws_max_size
    if ws_max_size is None:
        module = importlib.import_module(args.app.split(":", 1)[0])
        found = ws_max_size_for(module)
        ws_max_size = args.max_message_bytes if found is None else found
        source = "--max-message-bytes" if found is None else "the app's Hub"
    else:
        source = "--ws-max-size"
    config.ws_max_size = ws_max_size
    sock = listen_socket(args.host, args.port, user_timeout=args.user_timeout or None,
                         backlog=args.backlog)
    log = logging.getLogger("uvicorn.error")
    log.info("wsroom run: ws-max-size %d (%s), TCP user timeout %s, proxy headers %s",
             ws_max_size, source,
             f"{args.user_timeout:g} s" if args.user_timeout else "the kernel's",
             "on" if proxy else "off")

    class Server(uvicorn.Server):
        # uvicorn logs where it listens only for the sockets it binds itself.
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = sock.getsockname()[:2]
                log.info("wsroom run: serving on http://%s:%d (Press CTRL+C to quit)",
                         f"[{host}]" if ":" in host else host, port)

    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
