"""The load client: one process (pinned to its own core by run.py), picows connections.

Run by ``benchmarks.run`` as ``python -m benchmarks.client SPEC_JSON``; it prints JSON
lines on stdout: ``{"event": "ready"}`` when an idle scenario holds its connections (it
then waits for a line on stdin), and finally ``{"event": "result", ...}``.

Three ways to speak to a server (``kind`` in the spec):

- ``raw``: plain WebSocket, one message per text frame (websockets, Starlette peers);
- ``sio``: engine.io v4 over WebSocket, written out by hand (open ``0``, connect ``40``,
  events ``42[...]``, ping ``2`` / pong ``3``); python-socketio's own client would cost
  far more per connection than the server under test;
- ``wsroom``: wsroom's wire protocol (hello, welcome, pong, resume with positions), raw
  too, splitting every text frame on newlines (batches); offsets are kept to check replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOM = "bench"
HANDSHAKE_TIMEOUT = 120.0
WARM_UP = 5  # messages published before any measurement


class Run:
    """Counters shared by the readers of one measurement."""

    def __init__(self) -> None:
        self.received = 0
        self.target = 1 << 62
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.latencies: list[float] | None = None

    def arm(self, target: int) -> None:
        self.received = 0
        self.target = target
        self.done = asyncio.get_running_loop().create_future()


class Client(WSListener):
    def __init__(self, kind: str, run: Run, *, track: bool = False, ordered: bool = False,
                 hello: dict[str, Any] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.kind = kind
        self.run = run
        self.track = track  # keep wsroom offsets
        # Check that wsroom offsets arrive one after the other (cheaply: no JSON parsing)
        # and note when the last frame came.
        self.ordered = ordered
        self.last_offset = 0
        self.disorder = 0  # messages whose offset was not the previous one's + 1
        self.last_at = 0.0
        self.hello = hello or {"type": "hello", "v": 1}
        self.count = 0
        self.offsets: list[int] = []
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.token: str | None = None
        self.epoch: str | None = None
        self.recovered: bool | None = None
        self.position = 0  # the welcome's offset
        self.transport: WSTransport | None = None

    # ---------------------------------------------------------------- picows callbacks
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.kind == "wsroom":
            self._send(json.dumps(self.hello))
        elif self.kind == "raw":
            self.ready.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            data = frame.get_payload_as_bytes()
            if self.kind == "raw":
                self._got(1, (data,))
            elif self.kind == "wsroom":
                self._wsroom(data)
            else:
                self._sio(data)
        elif kind == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            transport.send_close(self.close_code)
            transport.disconnect()

    # ---------------------------------------------------------------- protocols
    def _send(self, text: str | bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, text.encode() if isinstance(text, str) else text)

    def _got(self, n: int, frames: Any) -> None:
        self.count += n
        run = self.run
        if run.latencies is not None:
            now = time.monotonic()
            for raw in frames:
                run.latencies.append(now - _publish_time(self.kind, raw))
        run.received += n
        if run.received >= run.target and not run.done.done():
            run.done.set_result(None)

    def _wsroom(self, data: bytes) -> None:
        msgs = []
        for line in data.split(b"\n"):
            if line.startswith(b'{"type":"msg"'):
                msgs.append(line)
                if self.track:
                    self.offsets.append(json.loads(line)["offset"])
                if self.ordered:
                    start = line.index(b'"offset":') + 9
                    offset = int(line[start:line.index(b",", start)])
                    if offset != (self.last_offset or self.position) + 1:
                        self.disorder += 1
                    self.last_offset = offset
            elif line.startswith(b'{"type":"ping"'):
                self._send(f'{{"type":"pong","id":{json.loads(line)["id"]}}}')
            elif line.startswith(b'{"type":"welcome"'):
                welcome = json.loads(line)
                self.token = welcome["resume"]
                stream = welcome["streams"][ROOM]
                self.epoch = stream["epoch"]
                self.recovered = stream["recovered"]
                self.position = max(self.position, stream["offset"])
                if not self.ready.done():
                    self.ready.set_result(None)
        if msgs:
            if self.ordered:
                self.last_at = time.monotonic()
            self._got(len(msgs), msgs)

    def _sio(self, data: bytes) -> None:
        if data.startswith(b"42"):
            self._got(1, (data,))
        elif data == b"2":
            self._send(b"3")
        elif data.startswith(b"40"):
            if not self.ready.done():
                self.ready.set_result(None)
        elif data.startswith(b"0"):
            self._send(b"40")

    # ---------------------------------------------------------------- helpers
    def resume_hello(self) -> dict[str, Any]:
        """The hello of a resume after the last message this client received."""
        return {"type": "hello", "v": 1, "resume": self.token,
                "streams": {ROOM: {"epoch": self.epoch,
                                    "offset": max([self.position, *self.offsets])}}}


def _publish_time(kind: str, raw: bytes) -> float:
    if kind == "sio":
        return float(json.loads(raw[2:])[1]["t"])
    obj = json.loads(raw)
    return float(obj["data"]["t"] if kind == "wsroom" else obj["t"])


def url(kind: str, port: int) -> str:
    if kind == "sio":
        return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
    return f"ws://127.0.0.1:{port}/ws"


async def connect(kind: str, port: int, run: Run, n: int, *, track: bool = False,
                  ordered: bool = False, rcvbuf: int | None = None, parallel: int = 100,
                  hellos: list[dict[str, Any]] | None = None) -> list[Client]:
    """Open n connections (at most `parallel` handshakes at once); wait until ready."""
    gate = asyncio.Semaphore(parallel)

    def small_socket(parsed: Any) -> socket.socket | None:
        if rcvbuf is None:
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        return sock

    async def one(i: int) -> Client:
        async with gate:
            hello = hellos[i] if hellos else None
            _, client = await ws_connect(
                lambda: Client(kind, run, track=track, ordered=ordered, hello=hello),
                url(kind, port),
                websocket_handshake_timeout=HANDSHAKE_TIMEOUT, socket_factory=small_socket,
                max_frame_size=1 << 24)
            assert isinstance(client, Client)
            await asyncio.wait_for(client.ready, HANDSHAKE_TIMEOUT)
            return client

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                 .encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path}: {head[:100]!r}")
    return body.decode().strip()


async def wait_members(port: int, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while int(await http_get(port, "/count")) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {n} members after {timeout} s")
        await asyncio.sleep(0.05)


async def measure(port: int, run: Run, target: int, query: str,
                  timeout: float) -> dict[str, Any]:
    """Ask the server to publish; wait until `target` deliveries (or `timeout`)."""
    run.arm(target)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    publish = asyncio.create_task(http_get(port, f"/publish?{query}"))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(run.done), timeout)
    t1 = time.monotonic()
    cpu = time.process_time() - cpu0
    # A server whose publish loop is stuck (on a client that does not read) never
    # answers: give it a moment, then stop waiting.
    done, _ = await asyncio.wait([publish], timeout=5)
    if not done:
        publish.cancel()
    return {"deliveries": run.received, "expected": target, "seconds": t1 - t0,
            "per_s": run.received / (t1 - t0), "complete": run.received >= target,
            "publish_done": bool(done), "client_cpu": cpu / (t1 - t0)}


async def warm_up(port: int, run: Run, n: int) -> None:
    """A few messages first, so that no scenario measures one-time costs."""
    await measure(port, run, n * WARM_UP, f"n={WARM_UP}", 30)


# -------------------------------------------------------------------- scenarios
async def fanout(spec: dict[str, Any]) -> dict[str, Any]:
    """N readers (and maybe one client that stops reading); M messages as fast as the
    server can publish them; deliveries/s over the readers."""
    kind, port, n, m = spec["kind"], spec["port"], spec["n"], spec["m"]
    run = Run()
    await connect(kind, port, run, n)
    await wait_members(port, n)
    await warm_up(port, run, n)
    slow: Client | None = None
    if spec["slow"]:
        slow_run = Run()
        (slow,) = await connect(kind, port, slow_run, 1, track=kind == "wsroom",
                                rcvbuf=4096)
        assert slow.transport is not None
        slow.transport.underlying_transport.pause_reading()
    await wait_members(port, n + (1 if slow else 0))
    result = await measure(port, run, n * m, f"n={m}&size={spec['size']}",
                           spec["timeout"])
    if slow is None and not result["complete"]:
        # Every reader reads: a shortfall is a failed run (e.g. the publish request
        # failed), not a throughput.
        raise RuntimeError(f"incomplete: {result['deliveries']} of {n * m} deliveries "
                           f"(publish answered: {result['publish_done']})")
    if slow is not None:
        result["slow"] = await slow_outcome(spec, slow)
    return result


async def slow_outcome(spec: dict[str, Any], slow: Client) -> dict[str, Any]:
    """The stalled client reads again: what did it get? wsroom's resumes."""
    kind, port, m = spec["kind"], spec["port"], spec["m"]
    received_stalled = slow.count
    assert slow.transport is not None
    slow.transport.underlying_transport.resume_reading()
    deadline = time.monotonic() + 15
    while slow.count < m and not slow.closed.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not slow.closed.done():
        await asyncio.wait([slow.closed], timeout=1)
    out: dict[str, Any] = {"received_before_close": slow.count, "m": m,
                           "close_code": slow.close_code,
                           "closed": slow.closed.done(), "stalled_count": received_stalled}
    if kind != "wsroom" or not slow.closed.done():
        return out
    first, start = list(slow.offsets), slow.position
    run = Run()
    (again,) = await connect(kind, port, run, 1, track=True, hellos=[slow.resume_hello()])
    deadline = time.monotonic() + 15
    while (not again.offsets or max(again.offsets) < start + m) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    offsets = first + again.offsets
    out["server_closes"] = json.loads(await http_get(port, "/closes"))
    out.update(recovered=again.recovered, replayed=len(again.offsets),
               exactly_once=sorted(offsets) == list(range(start + 1, start + m + 1)))
    return out


async def latency(spec: dict[str, Any]) -> dict[str, Any]:
    """N readers; the server publishes at a fixed rate; publish-to-receive latency of
    every delivery (CLOCK_MONOTONIC is shared by the processes of one machine)."""
    kind, port, n, m = spec["kind"], spec["port"], spec["n"], spec["m"]
    run = Run()
    await connect(kind, port, run, n)
    await wait_members(port, n)
    await warm_up(port, run, n)
    run.latencies = []
    result = await measure(port, run, n * m, f"n={m}&size={spec['size']}&rate={spec['rate']}",
                           spec["timeout"])
    lat = sorted(run.latencies)
    result.update(p50_ms=1000 * lat[len(lat) // 2], p99_ms=1000 * lat[int(len(lat) * 0.99)],
                  max_ms=1000 * lat[-1], samples=len(lat))
    return result


async def idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Open N connections, report ready, hold them (answering heartbeats) until told."""
    kind, port, n = spec["kind"], spec["port"], spec["n"]
    run = Run()
    t0 = time.monotonic()
    clients = await connect(kind, port, run, n)
    await wait_members(port, n, timeout=300)
    connect_s = time.monotonic() - t0
    print(json.dumps({"event": "ready", "connect_s": connect_s}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    lost = sum(c.closed.done() for c in clients)
    return {"connections": n, "connect_s": connect_s, "lost": lost}


async def storm(spec: dict[str, Any]) -> dict[str, Any]:
    """N wsroom clients get K messages, all drop at once, P more are published, and
    all resume at once: time until every one has been replayed exactly P messages."""
    port, n, k, p = spec["port"], spec["n"], spec["k"], spec["p"]
    run = Run()
    clients = await connect("wsroom", port, run, n, track=True)
    await wait_members(port, n)
    before = await measure(port, run, n * k, f"n={k}&size={spec['size']}", spec["timeout"])
    for c in clients:
        assert c.transport is not None
        c.transport.disconnect()  # no close frame: as a network drop
    await asyncio.gather(*(asyncio.wait_for(c.closed, 10) for c in clients))
    await asyncio.sleep(0.5)  # the server sees the drops
    await http_get(port, f"/publish?n={p}&size={spec['size']}")
    run2 = Run()
    run2.arm(n * p)
    t0 = time.monotonic()
    again = await connect("wsroom", port, run2, n, track=True, parallel=n,
                          hellos=[c.resume_hello() for c in clients])
    welcomed_s = time.monotonic() - t0
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(run2.done), spec["timeout"])
    seconds = time.monotonic() - t0
    exact = all(sorted(a.offsets + b.offsets) == list(range(1, k + p + 1))
                for a, b in zip(clients, again, strict=True))
    return {"seconds": seconds, "welcomed_s": welcomed_s, "clients": n,
            "recovered": sum(bool(b.recovered) for b in again),
            "exactly_once": exact and before["complete"], "replayed": run2.received}


async def redis_fanout(spec: dict[str, Any]) -> dict[str, Any]:
    """wsroom workers of one cluster (``ports``: A first), the N clients split evenly
    between them; M messages published back to back on A. Every client must receive
    every message, in offset order. Reports ready after the warm-up and waits for a line
    on stdin before the measured publish (run.py samples the CPU of the workers and of
    Redis around it)."""
    ports, n, m = spec["ports"], spec["n"], spec["m"]
    run = Run()
    groups: list[list[Client]] = []
    for i, port in enumerate(ports):
        share = n // len(ports) + (1 if i < n % len(ports) else 0)
        groups.append(await connect("wsroom", port, run, share, ordered=True))
    for port, group in zip(ports, groups, strict=True):
        await wait_members(port, len(group))  # /count: the worker's own members
    await warm_up(ports[0], run, n)
    print(json.dumps({"event": "ready"}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    clients = [c for group in groups for c in group]
    before = {id(c): c.count for c in clients}
    t0 = time.monotonic()
    result = await measure(ports[0], run, n * m, f"n={m}&size={spec['size']}",
                           spec["timeout"])
    got = [c.count - before[id(c)] for c in clients]
    short = sum(g < m for g in got)
    disorder = sum(c.disorder for c in clients)
    if short or disorder or any(g > m for g in got):
        raise RuntimeError(
            f"incomplete fan-out: {short} of {n} clients got fewer than {m} messages "
            f"(least {min(got)}), {disorder} message(s) out of order "
            f"(publish answered: {result['publish_done']})")
    result["in_order"] = "yes"
    result["workers"] = len(ports)
    # Per worker: its clients' deliveries per second from the publish request to their
    # last delivery.
    for name, group in zip("ab", groups, strict=False):
        last = max(c.last_at for c in group)
        result[f"{name}_per_s"] = len(group) * m / (last - t0)
        result[f"{name}_last_s"] = last - t0
    return result


SCENARIOS = {"fanout": fanout, "latency": latency, "idle": idle, "storm": storm,
             "redis_fanout": redis_fanout}


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(SCENARIOS[spec["scenario"]](spec))
    print(json.dumps({"event": "result", **result}), flush=True)


if __name__ == "__main__":
    main()
