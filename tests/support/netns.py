"""Fault injection for tests/faults/test_faults.py: a network namespace for the server, joined
to the root namespace (where the test's clients live) by a veth pair, nftables rules for
faults, and the table of measured bounds printed at the end of the run.

Layout, per test module run (names carry the pid, so concurrent runs do not collide)::

    root namespace (clients)            namespace wsf<pid> (uvicorn, 0.0.0.0:8000)
    wsfa<pid> 10.77.X.1/24  <-- veth -->  wsfb<pid> 10.77.X.2/24

Faults drop packets where they *arrive* (an ``input`` hook restricted to the veth, in the
receiving namespace: client-to-server packets in the server's namespace, the others in
the root namespace), so that to TCP a fault looks like a lossy network, never like a
local send error. Every fault is one nftables table per namespace, deleted on exit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

PORT = 8000
"""The server's port inside its namespace (nothing else listens there)."""


# ----------------------------------------------------------------- the report table


@dataclass
class FaultReport:
    """Rows of (case, expected bound, measured), printed by tests/conftest.py's
    ``pytest_terminal_summary`` when there are any."""

    title: str = "fault injection: bounds measured (tests/faults/test_faults.py)"
    header: tuple[str, str, str] = ("case", "expected bound", "measured")
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, case: str, bound: str, measured: str) -> None:
        self.rows.append((case, bound, measured))

    def write(self, terminal: Any) -> None:
        if not self.rows:
            return
        header = self.header
        widths = [min(limit, max(len(row[i]) for row in [header, *self.rows]))
                  for i, limit in enumerate((34, 40, 70))]
        terminal.write_sep("=", self.title)
        rule = "-+-".join("-" * width for width in widths)
        for row in [header, *self.rows]:
            cells = [textwrap.wrap(cell, width) for cell, width in zip(row, widths, strict=True)]
            for line in itertools.zip_longest(*cells, fillvalue=""):
                terminal.write_line(" | ".join(
                    part.ljust(width) for part, width in zip(line, widths, strict=True)))
            terminal.write_line(rule)


REPORT = FaultReport()
"""The session's collector (one per pytest process)."""

ABUSE = FaultReport("abuse: bounds measured (tests/abuse/)",
                    ("attack", "bound (from the configuration)", "measured"))
"""The abuse suite's collector (tests/abuse/)."""


# ---------------------------------------------------------------------- the network


def _run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _free_subnet() -> int:
    used = {int(m) for m in re.findall(r"inet 10\.77\.(\d+)\.", _run("ip", "-4", "-o", "addr"))}
    start = os.getpid() % 250
    for step in range(250):
        candidate = 1 + (start + step) % 250
        if candidate not in used:
            return candidate
    raise RuntimeError("no free 10.77.X.0/24 subnet")


@dataclass
class Fault:
    """One fault in place: `at` is the wall-clock time its rules went in; `dropped`
    counts the packets they dropped (read when the fault is removed)."""

    lab: Lab
    table: str
    at: float = 0.0
    placed: list[bool] = field(default_factory=list)  # True: in the server's namespace
    dropped: int = 0

    def nft(self, in_ns: bool, *args: str, stdin: str | None = None) -> str:
        if in_ns:
            return self.lab.in_ns("nft", *args, stdin=stdin)
        return _run("nft", *args, stdin=stdin)

    def count(self) -> int:
        """Packets dropped so far, both directions."""
        total = 0
        for in_ns in self.placed:
            listing = self.nft(in_ns, "list", "table", "inet", self.table)
            total += sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))
        return total


@dataclass
class Lab:
    """The namespace pair, or why it could not be set up (`problem`)."""

    ns: str = ""
    host_if: str = ""
    ns_if: str = ""
    host_ip: str = ""
    ns_ip: str = ""
    problem: str | None = None
    _tables: Iterator[int] = field(default_factory=itertools.count)

    def require(self) -> None:
        """Fail on CI (``CI=true``: the suite must run there), else skip."""
        if self.problem is not None:
            message = f"fault injection needs network namespaces and nftables: {self.problem}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)

    @property
    def url(self) -> str:
        return f"http://{self.ns_ip}:{PORT}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.ns_ip}:{PORT}/ws"

    def in_ns(self, *args: str, stdin: str | None = None) -> str:
        return _run("ip", "netns", "exec", self.ns, *args, stdin=stdin)

    # ------------------------------------------------------------------- faults

    @contextmanager
    def fault(self, to_server: str, to_client: str) -> Iterator[Fault]:
        """Apply nftables rules (a match, then ``drop``) to the packets arriving at the
        server (in its namespace) and at the clients (in the root namespace, on this
        veth only) until exit, when both tables are deleted."""
        fault = Fault(self, f"wsfault_{os.getpid()}_{next(self._tables)}")
        try:
            for in_ns, iface, match in ((True, self.ns_if, to_server),
                                        (False, self.host_if, to_client)):
                script = (f"table inet {fault.table} {{\n chain input {{\n"
                          f"  type filter hook input priority -10; policy accept;\n"
                          f'  iifname "{iface}" {match} counter drop\n }}\n}}\n')
                fault.nft(in_ns, "-f", "-", stdin=script)
                fault.placed.append(in_ns)
            fault.at = time.time()
            yield fault
        finally:
            fault.dropped = fault.count()
            for in_ns in fault.placed:
                fault.nft(in_ns, "delete", "table", "inet", fault.table)

    def blackhole(self, client_port: int) -> AbstractContextManager[Fault]:
        """Drop every packet of one client's TCP connection, both ways (no FIN, no RST)."""
        return self.fault(f"tcp sport {client_port}", f"tcp dport {client_port}")

    def loss(self, percent: int) -> AbstractContextManager[Fault]:
        """Drop `percent` % of the server's TCP packets at random, each direction."""
        rule = f"numgen random mod 100 < {percent}"
        return self.fault(f"tcp dport {PORT} {rule}", f"tcp sport {PORT} {rule}")

    def tcp_counters(self) -> dict[str, int]:
        """The server namespace's TCP counters (/proc/net/snmp: OutSegs,
        RetransSegs...); only the server's traffic is in there."""
        lines = [line.split() for line in self.in_ns("cat", "/proc/net/snmp").splitlines()
                 if line.startswith("Tcp:")]
        return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:], strict=True)}

    def link(self, up: bool) -> float:
        """Set the server's end of the veth down or up; return the wall-clock time."""
        self.in_ns("ip", "link", "set", "dev", self.ns_if, "up" if up else "down")
        return time.time()


@contextmanager
def lab() -> Iterator[Lab]:
    """Create the namespace and the veth pair; delete both on exit. When that is not
    possible, yield a Lab whose `problem` says why (its tests call `Lab.require`)."""
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        yield Lab(problem=f"{' and '.join(missing)} not installed (apt-get install "
                          "iproute2 nftables)")
        return
    if os.geteuid() != 0:
        yield Lab(problem="they need root")
        return
    pid = os.getpid()
    subnet = _free_subnet()
    net = Lab(ns=f"wsf{pid}", host_if=f"wsfa{pid}", ns_if=f"wsfb{pid}",
              host_ip=f"10.77.{subnet}.1", ns_ip=f"10.77.{subnet}.2")
    created = False
    try:
        try:
            _run("ip", "netns", "add", net.ns)
            created = True
            _run("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", net.ns_if,
                 "netns", net.ns)
            _run("ip", "addr", "add", f"{net.host_ip}/24", "dev", net.host_if)
            _run("ip", "link", "set", "dev", net.host_if, "up")
            net.in_ns("ip", "addr", "add", f"{net.ns_ip}/24", "dev", net.ns_if)
            net.in_ns("ip", "link", "set", "dev", net.ns_if, "up")
            net.in_ns("ip", "link", "set", "dev", "lo", "up")
            net.in_ns("nft", "list", "ruleset")  # nftables usable in there
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            net.problem = str(exc)
        yield net
    finally:
        if created:
            # Deleting the host end removes the pair at once (a namespace's own
            # devices are destroyed asynchronously after `netns del`).
            subprocess.run(["ip", "link", "del", net.host_if], capture_output=True,
                           check=False)
            subprocess.run(["ip", "netns", "del", net.ns], capture_output=True, check=False)


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """Some of the kernel's TCP_INFO of a connected socket: ``backoff`` (retransmission
    timeouts in a row), ``rto`` and ``last_data_recv`` (ms), ``unacked`` (segments)."""
    fields = struct.unpack_from("8B14I", sock.getsockopt(socket.IPPROTO_TCP,
                                                         socket.TCP_INFO, 104))
    return {"backoff": fields[4], "rto": fields[8] // 1000, "unacked": fields[12],
            "last_data_recv": fields[19]}


# ----------------------------------------------------------------------- the server


@dataclass
class Server:
    """uvicorn with tests/apps/fault_app.py, in the lab's namespace."""

    lab: Lab
    process: anyio.abc.Process
    log_path: Path
    final_log: str | None = None  # kept once the server is gone

    def log(self) -> str:
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    async def get(self, path: str) -> Any:
        return await self._http("GET", path)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self._http("POST", path, body)

    async def _http(self, method: str, path: str, body: Any = None) -> Any:
        # A new connection each time (no pooled socket in the server's fd count), and
        # no proxy from the environment.
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            response = await client.request(method, self.lab.url + path, json=body,
                                            headers={"Connection": "close"})
        response.raise_for_status()
        return response.json()

    async def stats(self) -> dict[str, Any]:
        return dict(await self.get("/stats"))


@asynccontextmanager
async def server(net: Lab, config: dict[str, Any]) -> AsyncIterator[Server]:
    """Run ``uvicorn fault_app:app`` in the lab's namespace with these HubConfig fields
    (WSROOM_TEST_CONFIG); kill it on exit.

    uvicorn's own WebSocket pings are off (``--ws-ping-interval 0``): wsroom's
    application heartbeat is under test, and uvicorn's (20 s, then 1011) would add
    closes of its own when a lossy link stalls TCP for that long."""
    net.require()
    env = {**os.environ, "WSROOM_TEST_CONFIG": json.dumps(config),
           "PYTHONWARNINGS": "default::ResourceWarning"}
    command = [sys.executable, "-m", "uvicorn", "fault_app:app",
               "--app-dir", str(Path(__file__).parents[1] / "apps"), "--host", "0.0.0.0",
               "--port", str(PORT), "--ws", "websockets-sansio", "--log-level", "info",
               "--timeout-graceful-shutdown", "5", "--ws-ping-interval", "0"]
    # "Uvicorn running on": bound after the startup.
    async with _in_namespace(net, command, env, "Uvicorn running on", "faults") as srv:
        yield srv


@asynccontextmanager
async def _in_namespace(net: Lab, command: list[str], env: dict[str, str], ready: str,
                        name: str) -> AsyncIterator[Server]:
    """Run `command` in the lab's namespace until its log says `ready`; kill it on exit.
    ``ip netns exec`` execs it: ``Server.process.pid`` is the command's own pid."""
    fd, log_name = tempfile.mkstemp(prefix=f"wsroom-{name}-", suffix=".log")
    with os.fdopen(fd, "wb") as log_file:
        process = await anyio.open_process(["ip", "netns", "exec", net.ns, *command],
                                           env=env, stdout=log_file, stderr=subprocess.STDOUT)
    srv = Server(net, process, Path(log_name))
    try:
        with anyio.fail_after(30):
            while ready not in srv.log():
                if process.returncode is not None:
                    raise RuntimeError(f"server exited early:\n{srv.log()}")
                await anyio.sleep(0.05)
        yield srv
    except BaseException:
        # Shown with the failure (pytest's captured stdout): what the server said.
        print(f"---- server log ({log_name}), last 60 lines ----\n{srv.log_tail(60)}")
        raise
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.move_on_after(10, shield=True):
            await process.wait()
        await process.aclose()
        srv.final_log = srv.log()
        os.unlink(log_name)


# ------------------------------------- the kernel's share: wsroom run, hypercorn (issue 15)

KERNEL_SERVERS = ("runner", "hypercorn")
"""How `kernel_server` starts the fault app: ``wsroom run`` (uvicorn on
`wsroom.runner.listen_socket`), or hypercorn on the same socket (an ``fd://`` bind)."""

_HYPERCORN = """\
import asyncio, sys
from hypercorn.asyncio import serve
from hypercorn.config import Config
from wsroom.runner import listen_socket
sys.path.insert(0, sys.argv[1])
from fault_app import app
sock = listen_socket("0.0.0.0", int(sys.argv[2]), user_timeout=float(sys.argv[3]))
config = Config()
config.bind = [f"fd://{sock.fileno()}"]
config.websocket_max_message_size = int(sys.argv[4])
config.graceful_timeout = 5
asyncio.run(serve(app, config))
"""


@asynccontextmanager
async def kernel_server(net: Lab, config: dict[str, Any], *, via: str,
                        user_timeout: float) -> AsyncIterator[Server]:
    """Run tests/apps/fault_app.py in the lab's namespace with these HubConfig fields,
    ``via`` ``wsroom run`` or hypercorn, both on `wsroom.runner.listen_socket` with this
    user timeout (seconds) and a WebSocket size limit of the hub's ``max_message_bytes``;
    kill it on exit. ``Server.process.pid`` is the server's own pid (``ip netns exec``
    execs it)."""
    net.require()
    from wsroom import HubConfig

    apps = str(Path(__file__).parents[1] / "apps")
    env = {**os.environ, "WSROOM_TEST_CONFIG": json.dumps(config),
           "PYTHONWARNINGS": "default::ResourceWarning"}
    if via == "runner":
        command = [sys.executable, "-m", "wsroom._cli", "run", "fault_app:app", "--app-dir",
                   apps, "--host", "0.0.0.0", "--port", str(PORT), "--user-timeout",
                   str(user_timeout), "--timeout-graceful-shutdown", "5"]
        ready = "wsroom run: serving on"
    elif via == "hypercorn":
        max_size = HubConfig(**config).max_message_bytes
        command = [sys.executable, "-c", _HYPERCORN, apps, str(PORT), str(user_timeout),
                   str(max_size)]
        ready = "Running on"
    else:
        raise ValueError(via)
    async with _in_namespace(net, command, env, ready, f"kernel-{via}") as srv:
        yield srv


def server_fds(srv: Server) -> int:
    """The server process's file descriptors of sockets, counted from outside
    (/proc/<pid>/fd). Only sockets: what connections hold (the log, pipes and the
    epoll are not under test)."""
    fds = Path(f"/proc/{srv.process.pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed in the meantime
            count += os.readlink(fd).startswith("socket:")
    return count


def server_rss(srv: Server) -> int:
    """The server process's resident memory, bytes (/proc/<pid>/status VmRSS)."""
    status = Path(f"/proc/{srv.process.pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert found is not None, status
    return int(found.group(1)) * 1024


def server_sockets(net: Lab) -> list[str]:
    """The server's TCP connections (``ss -tn`` in its namespace, local port PORT), in
    every state but LISTEN and TIME-WAIT (which holds neither a file descriptor nor a
    buffer): one line each, with its state and queues."""
    listing = net.in_ns("ss", "-tnH", "state", "connected", "exclude", "time-wait",
                        "sport", "=", f":{PORT}")
    return [line for line in listing.splitlines() if line.strip()]


@dataclass
class Held:
    """What the server holds: file descriptors and TCP connections."""

    fds: int
    sockets: int


async def held(srv: Server) -> Held:
    """The server's fds and sockets now (the lowest of a few samples: a request that is
    just ending may hold one for a moment)."""
    samples = []
    for _ in range(3):
        samples.append(Held(server_fds(srv), len(server_sockets(srv.lab))))
        await anyio.sleep(0.05)
    return Held(min(s.fds for s in samples), min(s.sockets for s in samples))


async def back_to(srv: Server, base: Held, timeout: float) -> float:
    """Wait until the server holds no more fds and sockets than `base`; return the
    wall-clock time it got there (fail after `timeout` s, showing what is left)."""
    deadline = time.time() + timeout
    while True:
        fds, sockets = server_fds(srv), server_sockets(srv.lab)
        if fds <= base.fds and len(sockets) <= base.sockets:
            return time.time()
        if time.time() > deadline:
            raise AssertionError(
                f"after {timeout:g}s the server still holds {fds} fds (baseline "
                f"{base.fds}) and {len(sockets)} sockets (baseline {base.sockets}):\n"
                + "\n".join(sockets[:10]))
        await anyio.sleep(0.1)


async def released(srv: Server, members: set[str], timeout: float) -> list[dict[str, Any]]:
    """The server's records (tests/apps/fault_app.py) of these members' connections being
    released, once all of them are."""
    with anyio.fail_after(timeout):
        while True:
            records = [r for r in (await srv.stats())["closed"] if r["member"] in members]
            if len(records) >= len(members):
                return records
            await anyio.sleep(0.2)


@dataclass
class Reclaimed:
    """One kernel-reclaim scenario's measurements (wall-clock seconds)."""

    base: Held
    peak: Held
    codes: dict[int, int]
    released_after: float  # from the fault (or the last read) to wsroom's last release
    reclaimed_after: float  # from wsroom's last release to fds and sockets at baseline
    after: Held


async def _warm(srv: Server) -> Held:
    from support import Player

    async with Player.connect(srv.lab.ws_url, auth={"name": "warm"}):
        pass
    await released(srv, {"warm"}, 10)
    await anyio.sleep(0.3)
    return await held(srv)


async def never_reading_peer(srv: Server, *, timeout: float) -> Reclaimed:
    """A client that completes the upgrade and its hello, then never reads again (a tiny
    receive buffer, so that its window closes at once; its kernel keeps acknowledging
    the server's zero-window probes) while its room broadcasts. wsroom closes it (3008,
    or 3012 if its pongs stop first) and releases it; then measure how long until the
    server's fds and sockets are back at the baseline."""
    from support import Player

    base = await _warm(srv)
    async with Player.connect(srv.lab.ws_url, auth={"name": "slow"},
                              receive_buffer=4096) as player:
        start = time.time()
        await srv.post("/broadcast", {"rate": 200, "size": 2000})
        peak = await held(srv)
        try:
            (record,) = await released(srv, {"slow"}, timeout)
            reclaimed_at = await back_to(srv, base, timeout)
        finally:
            await srv.post("/broadcast/stop")
        after = await held(srv)
        await player.ws.abort()
    return Reclaimed(base, peak, {record["code"]: 1}, record["at"] - start,
                     reclaimed_at - record["at"], after)


async def vanishing_peers(srv: Server, count: int, *, timeout: float) -> Reclaimed:
    """`count` clients whose packets all vanish at once (nftables, no FIN, no RST) while
    their room broadcasts: wsroom evicts them (3012) and releases them; then measure how
    long until the server's fds and sockets are back at the baseline."""
    from anyio.abc import SocketAttribute

    from support import Player
    from wsroom.client._websocket import ConnectionClosed

    async def pump(player: Player) -> None:  # reads, answering pings, until cut off
        with contextlib.suppress(ConnectionClosed):
            while True:
                await player.frame()

    base = await _warm(srv)
    names = {f"gone{i}" for i in range(count)}
    async with contextlib.AsyncExitStack() as stack:
        playing = [await stack.enter_async_context(
                       Player.connect(srv.lab.ws_url, auth={"name": name}))
                   for name in sorted(names)]
        async with anyio.create_task_group() as tg:
            for player in playing:
                tg.start_soon(pump, player)
            await srv.post("/broadcast", {"rate": 20, "size": 500})
            await anyio.sleep(1.5)
            peak = await held(srv)
            ports = ", ".join(str(p.ws._stream.extra(SocketAttribute.local_port))
                              for p in playing)
            try:
                with srv.lab.fault(f"tcp sport {{ {ports} }}",
                                   f"tcp dport {{ {ports} }}") as fault:
                    records = await released(srv, names, timeout)
                    last = max(r["at"] for r in records)
                    reclaimed_at = await back_to(srv, base, timeout)
            finally:
                await srv.post("/broadcast/stop")
            after = await held(srv)
            tg.cancel_scope.cancel()
        for player in playing:  # the client side never heard of it
            if player.ws.closed is None:  # (not reset by the server already)
                await player.ws.abort()
    codes: dict[int, int] = {}
    for record in records:
        codes[record["code"]] = codes.get(record["code"], 0) + 1
    return Reclaimed(base, peak, codes, last - fault.at, reclaimed_at - last, after)
