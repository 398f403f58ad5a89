"""Run every scenario against every peer and write the report (markdown and PNG plots).

    python -m benchmarks.run [--quick] [--out docs/benchmarks.md] [--reps 3]
                             [--only SCENARIO ...] [--peers PEER ...]

Each measurement starts a fresh server pinned to core 0 (``taskset -c 0``) and one load
client process pinned to core 1; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = "0", "1"
SIZE = 200  # bytes of JSON data per message


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    kind: str  # how the client speaks to it: raw, sio, wsroom
    app: str | None  # module:app on uvicorn, or None for its own server
    uvicorn_args: tuple[str, ...] = ()  # as the peer's own docs recommend


PEERS = [
    Peer("websockets", "websockets (own server + broadcast)", "raw", None),
    Peer("starlette-loop", "Starlette, loop of send_text", "raw",
         "benchmarks.servers.starlette_loop:app"),
    Peer("starlette-queue", "Starlette, queue + writer per client", "raw",
         "benchmarks.servers.starlette_queue:app"),
    Peer("socketio", "python-socketio (ASGI)", "sio", "benchmarks.servers.socketio_app:app"),
    # wsroom's deploy guide: its own heartbeat replaces uvicorn's protocol pings.
    Peer("wsroom", "wsroom", "wsroom", "benchmarks.servers.wsroom_app:app",
         ("--ws-ping-interval", "0")),
]
# wsroom on a RedisBackplane (the redis_fanout scenario only): one worker, or two worker
# processes of one cluster. The same app serves the scenario's in-memory reference row.
REDIS_PEERS = [
    Peer("wsroom-redis", "wsroom, Redis backplane, 1 worker", "wsroom",
         "benchmarks.servers.wsroom_redis:app", ("--ws-ping-interval", "0")),
    Peer("wsroom-redis-2w", "wsroom, Redis backplane, 2 workers", "wsroom",
         "benchmarks.servers.wsroom_redis:app", ("--ws-ping-interval", "0")),
]
PEER = {p.name: p for p in [*PEERS, *REDIS_PEERS]}
BASELINES = ("websockets", "socketio")  # ratio columns
REDIS_URL = os.environ.get("WSROOM_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Scenario:
    id: str
    title: str
    what: str
    metrics: list[tuple[str, str, str]]  # (key, column heading, format)
    peers: list[str] = field(default_factory=lambda: [p.name for p in PEERS])
    ratios: bool = True  # ratio columns against BASELINES (for the first metric)
    baselines: dict[str, str] | None = None  # peer -> column heading, instead of BASELINES
    labels: dict[str, str] = field(default_factory=dict)  # row labels, instead of PEER's
    # A second table: (heading, text, metrics), without ratio columns.
    more: tuple[str, str, list[tuple[str, str, str]]] | None = None

    def label(self, name: str) -> str:
        return self.labels.get(name) or PEER[name].label

    def ratio_columns(self) -> dict[str, str]:
        if not self.ratios:
            return {}
        return self.baselines or {b: f"× {b}" for b in BASELINES}


def params(quick: bool) -> dict[str, dict[str, Any]]:
    """Sizes of every scenario: full, or --quick (seconds, for the smoke test)."""
    if quick:
        return {
            "fanout_small": {"n": 20, "m": 500},
            "fanout_large": {"n": 100, "m": 50},
            "latency": {"n": 20, "rate": 20, "m": 20},
            "slow": {"n": 5, "m": 2000, "timeout": 5},
            "idle": {"n": 100, "settle": 0.5},
            "idle_10k": {"n": 300, "window": 2.0, "steady_after": 1.0},
            "storm": {"n": 50, "k": 20, "p": 20},
            "redis_fanout": {"n": 20, "m": 500},
        }
    return {
        "fanout_small": {"n": 100, "m": 4000},
        "fanout_large": {"n": 1000, "m": 1000},
        "latency": {"n": 100, "rate": 20, "m": 300},  # 15 s
        # M: several times what the server's kernel buffers for the stalled client (its
        # socket's send buffer autotunes up to net.ipv4.tcp_wmem's max, 4 MiB here).
        "slow": {"n": 20, "m": 40000, "timeout": 60},
        "idle": {"n": 1000, "settle": 3.0},
        # Two windows: right after the ramp, and steady (a minute later), each 30 s (one
        # whole heartbeat cycle).
        "idle_10k": {"n": 10000, "settle": 3.0, "window": 30.0, "steady_after": 60.0},
        "storm": {"n": 1000, "k": 50, "p": 50},
        "redis_fanout": {"n": 100, "m": 4000},  # as fanout_small
    }


def scenarios(p: dict[str, dict[str, Any]]) -> list[Scenario]:
    fs, fl, lat, slow = p["fanout_small"], p["fanout_large"], p["latency"], p["slow"]
    idle, big, storm = p["idle"], p["idle_10k"], p["storm"]
    rf = p["redis_fanout"]
    return [
        Scenario("fanout_small", f"Fan-out throughput, N={fs['n']}",
                 f"{fs['n']} clients in one room; the server publishes {fs['m']} messages "
                 "back to back. Deliveries/s = messages received, summed over the clients, "
                 "per second from the publish request to the last delivery.",
                 [("per_s", "deliveries/s", ",.0f"), ("client_cpu", "client CPU", ".0%")]),
        Scenario("fanout_large", f"Fan-out throughput, N={fl['n']}",
                 f"As above with {fl['n']} clients and {fl['m']} messages.",
                 [("per_s", "deliveries/s", ",.0f"), ("client_cpu", "client CPU", ".0%")]),
        Scenario("latency", f"Latency at {lat['rate']} broadcasts/s to {lat['n']} clients",
                 f"{lat['m']} messages at {lat['rate']}/s; latency of every delivery, from "
                 "the server's publish call (a timestamp in the message) to the client's "
                 "frame callback.",
                 [("p99_ms", "p99 ms", ".2f"), ("p50_ms", "p50 ms", ".2f"),
                  ("max_ms", "max ms", ".1f")]),
        Scenario("slow", f"One client never reads ({slow['n']} readers)",
                 f"{slow['n']} clients read {slow['m']:,} messages published back to back, "
                 "on a fresh server, with and without one more client (receive buffer "
                 "4 KiB) that stops reading its socket. Relative = the readers' deliveries/s "
                 "with it over without it, per repetition (a stuck publisher is given "
                 f"{slow['timeout']} s). Server peak RSS: with it. Then the stalled client "
                 "reads again: what it got, its close code and, for wsroom, whether its "
                 "resume replayed every message exactly once.",
                 [("relative", "relative", ".2f"), ("per_s", "readers' deliveries/s", ",.0f"),
                  ("base_per_s", "without it", ",.0f"), ("peak_rss_mib", "server peak RSS MiB",
                                                         ".0f"),
                  ("outcome", "stalled client", "s")]),
        Scenario("idle", f"Idle memory per connection (N={idle['n']})",
                 f"Server RSS with {idle['n']} idle connections (handshake done, in the "
                 "room, heartbeats running) minus RSS before any, divided by N.",
                 [("kib_per_conn", "KiB/connection", ".1f"), ("rss_mib", "RSS MiB", ".1f")]),
        Scenario("idle_10k", f"{big['n']:,} idle connections to wsroom",
                 f"wsroom with {big['n']:,} idle connections and its default heartbeats "
                 f"(ping every 30 s): the server's CPU over {big['window']:g} s right after "
                 f"the ramp, and over {big['window']:g} s more from {big['steady_after']:g} s "
                 "after that (steady), with the full garbage collections (generation 2) the "
                 "server ran in each window; and its RSS.",
                 [("cpu_pct", "CPU % after the ramp", ".2f"),
                  ("full_gcs", "full GCs in it", ".0f"),
                  ("steady_cpu_pct", "CPU % steady", ".2f"),
                  ("steady_full_gcs", "full GCs in it", ".0f"),
                  ("rss_mib", "RSS MiB", ".1f"),
                  ("kib_per_conn", "KiB/connection", ".1f"), ("connect_s", "connect s", ".1f")],
                 peers=["wsroom"], ratios=False),
        Scenario("storm", f"Reconnect storm ({storm['n']:,} wsroom clients)",
                 f"{storm['n']:,} clients get {storm['k']} messages, all drop at once (no "
                 f"close frame), {storm['p']} more are published, and all resume at once. "
                 "Time from the first reconnect until every client has been replayed what "
                 "it missed; exact = every client saw every offset exactly once.",
                 [("seconds", "seconds", ".2f"), ("welcomed_s", "all welcomed s", ".2f"),
                  ("exact", "exact replay", "s")],
                 peers=["wsroom"], ratios=False),
        Scenario("redis_fanout", f"Fan-out through Redis, N={rf['n']}",
                 f"wsroom on its Redis backplane (`wsroom.redis.RedisBackplane`, the Redis "
                 f"at `{REDIS_URL}`, keys under a prefix of their own, deleted after each "
                 f"measurement). {rf['n']} clients; the app publishes {rf['m']:,} "
                 "messages back to back on worker A (as in the fan-out scenarios). **1 "
                 "worker**: every client on A. **2 workers**: two uvicorn processes of one "
                 f"cluster, {rf['n'] // 2} clients on each; B gets the messages from Redis. "
                 "Both workers are pinned to core 0, as every server here (the load client "
                 "has core 1): they share one core, so the 2-worker row shows what the "
                 "second hop costs, not what a second core would give. The harness does not "
                 "pin Redis. The reference row is the same app on the "
                 "in-memory backplane, measured in this scenario. Deliveries/s: summed over "
                 "all clients, from the publish request to the last delivery; per worker: "
                 "that worker's clients, to their own last delivery. Every client must get "
                 "every message in offset order, else the row is an error.",
                 [("per_s", "deliveries/s", ",.0f"), ("a_per_s", "A's clients", ",.0f"),
                  ("b_per_s", "B's clients", ",.0f"), ("client_cpu", "client CPU", ".0%"),
                  ("in_order", "all in order", "s")],
                 peers=["wsroom", "wsroom-redis", "wsroom-redis-2w"],
                 baselines={"wsroom": "× in memory"},
                 labels={"wsroom": "wsroom, in memory, 1 worker"},
                 more=("Where the time goes",
                       "Per published message, in µs, over the measured publish (from the "
                       "request to the last delivery): the wall time of A's publish loop; "
                       "of it, the time A awaited the backplane's `publish` (on Redis: the "
                       "publish script's round trip, then the delivery to A's own clients; "
                       "in memory: the delivery to the queues); the CPU time of worker A, "
                       "of worker B, and of the whole Redis server (`INFO cpu`, user + "
                       "system), and of it the time Redis spent running scripts "
                       "(`INFO commandstats`, EVALSHA: the publish script, and the workers' "
                       "once-a-second liveness scripts). Redis's figures are the whole "
                       "server's: they include any other client of that Redis. Then how "
                       "many messages each worker wrote per WebSocket frame (wsroom batches "
                       "the messages queued for a client into one frame): each frame costs "
                       "a send.",
                       [("loop_us", "publish loop on A", ".1f"),
                        ("backplane_us", "awaiting publish", ".1f"),
                        ("a_cpu_us", "worker A CPU", ".1f"),
                        ("b_cpu_us", "worker B CPU", ".1f"),
                        ("redis_cpu_us", "Redis CPU", ".1f"),
                        ("script_us", "Redis, in scripts", ".1f"),
                        ("a_batch", "msgs/frame A", ".2f"),
                        ("b_batch", "msgs/frame B", ".2f")])),
    ]


# ------------------------------------------------------------------------ processes
def pinned(core: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", core, *cmd] if shutil.which("taskset") else cmd


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by children


@contextlib.contextmanager
def server(peer: Peer, log: Path,
           env: dict[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """A fresh server process pinned to its core; yields (port, pid)."""
    port = free_port()
    if peer.app is None:
        cmd = [sys.executable, "-m", "benchmarks.servers.websockets_lib", str(port)]
    else:
        cmd = [sys.executable, "-m", "uvicorn", peer.app, "--host", "127.0.0.1",
               "--port", str(port), "--ws", "websockets-sansio", "--loop", loop_name(),
               "--backlog", "4096", "--log-level", "warning", "--no-access-log",
               *peer.uvicorn_args]
    # WSROOM_BENCH_SRC: measure the wsroom of another checkout (its src/ folder), e.g.
    # to see what a change bought.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("WSROOM_BENCH_SRC")) if p)
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    with log.open("a") as out:
        proc = subprocess.Popen(pinned(SERVER_CORE, cmd), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{peer.name} did not start, see {log}") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LoadClient:
    """The load client process, pinned to the other core."""

    def __init__(self, spec: dict[str, Any], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            pinned(CLIENT_CORE, [sys.executable, "-m", "benchmarks.client", json.dumps(spec)]),
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log.open("a"), text=True)

    def event(self, timeout: float) -> dict[str, Any]:
        """The next JSON line (ready or result) from the client."""
        assert self.proc.stdout is not None
        # A client that hangs is killed by the timer; readline then returns "".
        killer = _Timer(timeout, self.proc.kill)
        try:
            line = self.proc.stdout.readline()
        finally:
            killer.cancel()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"load client failed (exit {self.proc.returncode}), "
                               f"see {self.log}")
        return dict(json.loads(line))

    def go(self) -> None:
        """Answer a "ready": the client goes on."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        result = self.event(timeout)
        self.proc.wait(timeout)
        return result


class PeakRSS:
    """Samples a process' RSS every 50 ms in a thread; `mib` is the peak."""

    def __init__(self, proc: Any) -> None:
        import threading
        self.proc, self.peak, self._stop = proc, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


class _Timer:
    def __init__(self, seconds: float, action: Any) -> None:
        import threading
        self._t = threading.Timer(seconds, action)
        self._t.daemon = True
        self._t.start()

    def cancel(self) -> None:
        self._t.cancel()


# ------------------------------------------------------------------------ measurements
def fanout(peer: Peer, p: dict[str, Any], log: Path, slow: bool) -> dict[str, Any]:
    import psutil
    with server(peer, log) as (port, pid):
        spec = {"kind": peer.kind, "port": port, "size": SIZE, "scenario": "fanout",
                "n": p["n"], "m": p["m"], "slow": slow, "timeout": p.get("timeout", 120)}
        with PeakRSS(psutil.Process(pid)) as peak:
            result = LoadClient(spec, log).event(300)
    return {**result, "peak_rss_mib": peak.mib}


def idle(peer: Peer, p: dict[str, Any], log: Path) -> dict[str, Any]:
    import psutil
    with server(peer, log) as (port, pid):
        proc = psutil.Process(pid)
        time.sleep(0.5)
        rss0 = proc.memory_info().rss
        client = LoadClient({"kind": peer.kind, "port": port, "scenario": "idle",
                             "n": p["n"]}, log)
        ready = client.event(600)
        time.sleep(p.get("settle", 1.0))
        out = {"connect_s": ready["connect_s"]}
        if "window" in p:
            out.update(cpu_window(proc, port, p["window"], peer.kind == "wsroom"))
        if "steady_after" in p:
            time.sleep(p["steady_after"])
            steady = cpu_window(proc, port, p["window"], peer.kind == "wsroom")
            out.update({f"steady_{name}": value for name, value in steady.items()})
        rss1 = proc.memory_info().rss
        result = client.finish(120)
    return {**result, **out, "rss_mib": rss1 / 2**20,
            "kib_per_conn": (rss1 - rss0) / p["n"] / 1024}


def cpu_window(proc: Any, port: int, seconds: float, gc_stats: bool) -> dict[str, Any]:
    """The server's CPU (% of a core) over the next `seconds`, and how many full garbage
    collections it ran meanwhile (servers with a ``/gc`` route: wsroom's)."""
    gcs0 = get_json(port, "/gc") if gc_stats else None
    cpu0, t0 = proc.cpu_times(), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = proc.cpu_times(), time.monotonic()
    gcs1 = get_json(port, "/gc") if gc_stats else None
    busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    out: dict[str, Any] = {"cpu_pct": 100 * busy / (t1 - t0) if t1 > t0 else 0.0}
    if gcs0 is not None and gcs1 is not None:
        out["full_gcs"] = gcs1[2] - gcs0[2]
    return out


def redis_client() -> Any:
    import redis
    return redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=2,
                                decode_responses=True)


def redis_counters(client: Any) -> tuple[float, int]:
    """Redis's CPU seconds (user + system, every thread) and the µs it spent in EVALSHA."""
    cpu = client.info("cpu")
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            int(stats.get("usec", 0)))


def delete_prefix(prefix: str) -> None:
    client = redis_client()
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
    finally:
        client.close()


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return json.loads(answer.read())


def cpu_seconds(proc: Any) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def redis_fanout(name: str, p: dict[str, Any], log: Path) -> dict[str, Any]:
    """The same app on the in-memory backplane (`name` wsroom) or on Redis, with one
    worker or two; the CPU of the workers and of Redis around the measured publish."""
    import psutil
    on_redis = name != "wsroom"
    workers = 2 if name == "wsroom-redis-2w" else 1
    prefix = f"wsroom-bench-{secrets.token_hex(6)}"
    env = {"WSROOM_BENCH_BACKPLANE": "redis" if on_redis else "memory",
           "WSROOM_REDIS_URL": REDIS_URL, "WSROOM_BENCH_REDIS_PREFIX": prefix,
           "WSROOM_BENCH_RESUME_SECRET": secrets.token_urlsafe(32)}
    rc = redis_client() if on_redis else None
    m = p["m"]
    try:
        if rc is not None:
            rc.ping()  # a clear error if Redis is not there
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(server(PEER["wsroom-redis"], log, env))
                       for _ in range(workers)]
            procs = [psutil.Process(pid) for _, pid in servers]
            spec = {"kind": "wsroom", "scenario": "redis_fanout", "size": SIZE,
                    "ports": [port for port, _ in servers], "n": p["n"], "m": m,
                    "timeout": p.get("timeout", 120)}
            client = LoadClient(spec, log)
            try:
                client.event(300)  # connected, warmed up
                before = [get_json(port, "/timing") for port, _ in servers]
                cpu0 = [cpu_seconds(proc) for proc in procs]
                redis0 = redis_counters(rc) if rc is not None else None
                client.go()
                result = client.event(300)
                cpu1 = [cpu_seconds(proc) for proc in procs]
                redis1 = redis_counters(rc) if rc is not None else None
                after = [get_json(port, "/timing") for port, _ in servers]
                client.proc.wait(30)
            finally:
                client.kill()
    finally:
        if rc is not None:
            rc.close()
            delete_prefix(prefix)
    timing = after[0]
    if timing["n"] != m:
        raise RuntimeError(f"worker A's last publish loop was of {timing['n']} messages, "
                           f"not {m}")
    us = 1e6 / m
    result.update(loop_us=timing["loop_s"] * us, backplane_us=timing["backplane_s"] * us,
                  a_cpu_us=(cpu1[0] - cpu0[0]) * us)
    for worker, t0, t1 in zip("ab", before, after, strict=False):
        frames = t1["frames_out"] - t0["frames_out"]
        if frames:
            result[f"{worker}_batch"] = (t1["messages_out"] - t0["messages_out"]) / frames
    if workers > 1:
        result["b_cpu_us"] = (cpu1[1] - cpu0[1]) * us
    if redis0 is not None and redis1 is not None:
        result.update(redis_cpu_us=(redis1[0] - redis0[0]) * us,
                      script_us=(redis1[1] - redis0[1]) / m)
    return result


def measure(scenario: str, peer: Peer, p: dict[str, Any], log: Path) -> dict[str, Any]:
    """One repetition of one scenario against one peer, each run on a fresh server."""
    if scenario == "redis_fanout":
        return redis_fanout(peer.name, p, log)
    if scenario in ("fanout_small", "fanout_large"):
        return fanout(peer, p, log, slow=False)
    if scenario == "slow":
        result = fanout(peer, p, log, slow=True)
        base = fanout(peer, p, log, slow=False)
        return {**result, "base_per_s": base["per_s"],
                "relative": result["per_s"] / base["per_s"]}
    if scenario in ("idle", "idle_10k"):
        return idle(peer, p, log)
    with server(peer, log) as (port, _):
        spec = {"kind": peer.kind, "port": port, "size": SIZE, "scenario": scenario, **p}
        if scenario == "latency":
            spec["timeout"] = p["m"] / p["rate"] + 30
        elif scenario == "storm":
            spec["timeout"] = 120
        else:
            raise ValueError(scenario)
        return LoadClient(spec, log).event(600)


def outcome(r: dict[str, Any]) -> str:
    """The stalled client's fate, in words."""
    s = r.get("slow") or {}
    if not s:
        return ""
    got = f"got {s['received_before_close']:,}/{s['m']:,}"
    if not s["closed"]:
        return f"not closed, {got}"
    text = f"closed {s['close_code'] or '1006 (no close frame)'}, {got}"
    if s.get("server_closes"):
        text += ", server: " + ", ".join(f"{k} {v}" for k, v in s["server_closes"].items())
    if "exactly_once" in s:
        text += (", resumed: every message exactly once" if s["exactly_once"]
                 else f", resumed: NOT exact (recovered={s['recovered']})")
    return text


def derived(scenario: str, r: dict[str, Any]) -> dict[str, Any]:
    if scenario == "slow":
        r["outcome"] = outcome(r)
    if scenario == "storm":
        r["exact"] = "yes" if r["exactly_once"] and r["recovered"] == r["clients"] else "NO"
    if scenario == "redis_fanout" and "b_last_s" in r:
        r["b_lag_ms"] = 1000 * (r["b_last_s"] - r["a_last_s"])
    return r


# ------------------------------------------------------------------------ aggregation
def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(value: Any, spec: str) -> str:
    if spec == "s":
        return str(value)
    return format(value, spec)


def versions(redis_server: bool = False) -> dict[str, str]:
    out = {"python": platform.python_version(), "loop": loop_name(),
           "machine": f"{platform.system()} {platform.release()} {platform.machine()}, "
                      f"{os.cpu_count()} CPUs"}
    for dist in ("wsroom", "uvicorn", "starlette", "websockets", "python-socketio",
                 "python-engineio", "picows", "uvloop", "httptools", "matplotlib",
                 "redis"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    if redis_server:
        with contextlib.suppress(Exception):
            client = redis_client()
            try:
                out["Redis server"] = str(client.info("server")["redis_version"])
            finally:
                client.close()
    source = os.environ.get("WSROOM_BENCH_SRC")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=source or ROOT,
            capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=source or ROOT,
            capture_output=True, text=True, check=True).stdout.strip()
        out["wsroom commit"] = commit + (" + uncommitted changes in src/" if dirty else "")
    if source:
        out["wsroom source"] = source
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 repetition, small N: a smoke run of a minute at most")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--only", nargs="*", help="scenario ids to run")
    ap.add_argument("--peers", nargs="*", help="peers to run")
    ap.add_argument("--report-from", type=Path, metavar="RESULTS_JSON",
                    help="measure nothing: write the report (and plots) again from the "
                         "results.json of an earlier run (e.g. after a report change)")
    args = ap.parse_args(argv)
    if args.report_from is not None:
        from .report import write_report
        saved = json.loads(args.report_from.read_text())
        meta, results = saved["meta"], saved["results"]
        plan = [s for s in scenarios(meta["params"]) if s.id in results]
        out = args.out.resolve()
        write_report(out, out.parent / out.stem, plan, results, meta)
        print(f"wrote {out} from {args.report_from}")
        return 0
    reps = args.reps or (1 if args.quick else 3)
    p = params(args.quick)
    plan = [s for s in scenarios(p) if not args.only or s.id in args.only]
    out: Path = args.out.resolve()
    assets = out.parent / out.stem
    assets.mkdir(parents=True, exist_ok=True)
    log = assets / "run.log"
    log.write_text("")
    raise_nofile()

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started = time.monotonic()
    for sc in plan:
        for name in sc.peers:
            if args.peers and name not in args.peers:
                continue
            runs = results.setdefault(sc.id, {}).setdefault(name, [])
            for rep in range(reps):
                t = time.monotonic()
                try:
                    r = derived(sc.id, measure(sc.id, PEER[name], p[sc.id], log))
                except Exception as exc:  # recorded in the report, not fatal
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                runs.append(r)
                print(f"{sc.id:13} {name:16} rep {rep + 1}: "
                      f"{ {k: r[k] for k, _, _ in sc.metrics if k in r} or r} "
                      f"({time.monotonic() - t:.1f} s)", flush=True)
    from .report import write_report
    meta = {"versions": versions(redis_server="redis_fanout" in results), "reps": reps,
            "quick": args.quick, "params": p,
            "seconds": time.monotonic() - started,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    (assets / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                    indent=1, default=str))
    write_report(out, assets, plan, results, meta)
    print(f"wrote {out} and {assets}/ in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
