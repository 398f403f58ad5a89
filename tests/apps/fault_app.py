"""A wsroom app for the fault-injection suite (tests/faults/test_faults.py), served by uvicorn
inside a network namespace.

Configured through the environment variable WSROOM_TEST_CONFIG (JSON of HubConfig
fields). A client names itself in its hello (``"auth": {"name": ...}``); a new session
joins 'lobby'. Besides the WebSocket route ``/ws`` it serves, over plain HTTP:

- ``GET /stats``: the hub's stats, the process's asyncio task count and open file
  descriptors, each live connection's outbound queue (bytes), the largest queue seen by
  the broadcaster (per member and in all), and a record of every connection welcomed
  and released (member, client port, close code, wall-clock time).
  A close (``: closing,`` in wsroom's log) also records, at that very moment, the
  kernel's TCP_INFO of the connection's socket: ``last_data_recv`` (ms since the last
  data segment from the client arrived), ``backoff`` (retransmission timeouts in a row),
  ``unacked``, ``rto`` (ms): the evidence that an eviction was, or was not, deserved.
- ``POST /broadcast {"rate", "size", "count"}``: publish ``{"n": k, "pad": ...}`` to
  'lobby' at `rate` messages/s on an absolute schedule (`count` messages, or until
  stopped); ``POST /broadcast/stop``: stop it, reply ``{"last": <last offset>}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import struct
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from wsroom import Connection, Handshake, Hub, HubConfig, Identity

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

ROOM = "lobby"


async def by_name(handshake: Handshake) -> Identity | None:
    auth = handshake.auth
    name = auth.get("name") if isinstance(auth, dict) else None
    return Identity(id=name if isinstance(name, str) else "anonymous")


hub = Hub(HubConfig(**json.loads(os.environ.get("WSROOM_TEST_CONFIG", "{}"))),
          authenticate=by_name)
connected: list[dict[str, Any]] = []
closed: list[dict[str, Any]] = []
ports: dict[str, int] = {}  # connection id -> the client's port
closing: dict[str, dict[str, Any]] = {}  # connection id -> what was seen as it closed


def tcp_info(port: int) -> dict[str, int] | None:
    """TCP_INFO of this process's socket connected to the client port `port`."""
    for name in os.listdir("/proc/self/fd"):
        try:
            # Sockets only: fromfd duplicates the fd, and on a file it raises before
            # the duplicate could be closed (one fd leaked per file, per call).
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, ValueError):
            continue
        try:
            peer = sock.getpeername()
            if not (isinstance(peer, tuple) and peer[1] == port):
                continue
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            continue
        finally:
            sock.close()
        # struct tcp_info: 8 bytes of u8 fields, then u32 fields.
        fields = struct.unpack_from("8B14I", raw)
        return {"backoff": fields[4], "rto": fields[8] // 1000, "unacked": fields[12],
                "last_data_sent": fields[17], "last_data_recv": fields[19]}
    return None


class SeeClosing(logging.Handler):
    """Notes every ``closing`` line of wsroom.connection with the socket's TCP_INFO."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if ": closing," not in message or not message.startswith("conn="):
            return
        conn = message[len("conn="):].split(" ", 1)[0].rstrip(":")
        port = ports.get(conn)
        closing[conn] = {"at": record.created, "line": message,
                         "tcp": tcp_info(port) if port is not None else None}


logging.getLogger("wsroom.connection").addHandler(SeeClosing())


def _record(conn: Connection, **extra: Any) -> dict[str, Any]:
    client = conn.client
    return {"conn": conn.id, "member": conn.identity.id if conn.identity else None,
            "port": client[1] if client else None, "at": time.time(), **extra}


@hub.on_connect
async def join(conn: Connection) -> None:
    if not conn.resumed:
        await conn.join(ROOM)
    record = _record(conn, resumed=conn.resumed)
    if record["port"] is not None:
        ports[conn.id] = record["port"]
    connected.append(record)


@hub.on_disconnect
async def left(conn: Connection) -> None:
    ports.pop(conn.id, None)
    closed.append(_record(conn, code=conn.close_code, closing=closing.pop(conn.id, None)))


class Broadcaster:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.last: int | None = None
        self.peak_queue: dict[str, int] = {}
        self.peak_total = 0

    async def run(self, rate: float, size: int, count: int | None) -> None:
        loop = asyncio.get_running_loop()
        pad = "x" * size
        start = loop.time()
        number = 0
        while count is None or number < count:
            number += 1
            self.last = await hub.publish(ROOM, "tick", {"n": number, "pad": pad})
            total = 0
            for conn in hub.connections():
                queued = conn.queued_bytes
                total += queued
                member = conn.identity.id if conn.identity else conn.id
                self.peak_queue[member] = max(self.peak_queue.get(member, 0), queued)
            self.peak_total = max(self.peak_total, total)
            await asyncio.sleep(max(0.0, start + number / rate - loop.time()))

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


broadcaster = Broadcaster()


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({
        "hub": dataclasses.asdict(hub.stats()),
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
        "queues": {(c.identity.id if c.identity else c.id): c.queued_bytes
                   for c in hub.connections()},
        "peak_queue": broadcaster.peak_queue,
        "peak_total": broadcaster.peak_total,
        "connected": connected,
        "closed": closed,
    })


async def broadcast(request: Request) -> JSONResponse:
    body = await request.json()
    await broadcaster.stop()
    broadcaster.task = asyncio.create_task(broadcaster.run(
        float(body.get("rate", 100)), int(body.get("size", 100)), body.get("count")))
    return JSONResponse({"started": True})


async def stop(request: Request) -> JSONResponse:
    await broadcaster.stop()
    return JSONResponse({"last": broadcaster.last})


app = Starlette(routes=[
    WebSocketRoute("/ws", hub.endpoint),
    Route("/stats", stats),
    Route("/broadcast", broadcast, methods=["POST"]),
    Route("/broadcast/stop", stop, methods=["POST"]),
], lifespan=hub.lifespan)
