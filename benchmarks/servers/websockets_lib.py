"""Peer 1: the websockets library's own asyncio server and `websockets.broadcast`.

Not ASGI: run as ``python -m benchmarks.servers.websockets_lib PORT``. The control
endpoints are answered by `process_request` before any upgrade.
"""

from __future__ import annotations

import asyncio
import sys
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, broadcast, serve

from .common import encode, publish_loop, query

CLIENTS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    CLIENTS.add(ws)
    try:
        async for _ in ws:  # nothing is expected from clients
            pass
    finally:
        CLIENTS.discard(ws)


async def publish_one(data: dict[str, object]) -> None:
    broadcast(CLIENTS, encode(data))  # synchronous: writes to every buffer, no waiting
    await asyncio.sleep(0)  # let the connections run between messages


async def process_request(connection: ServerConnection, request):  # type: ignore[no-untyped-def]
    path, _, qs = request.path.partition("?")
    if path == "/count":
        return connection.respond(HTTPStatus.OK, f"{len(CLIENTS)}\n")
    if path == "/publish":
        n = await publish_loop(*query(qs), publish_one)
        return connection.respond(HTTPStatus.OK, f"{n}\n")
    return None


async def main(port: int) -> None:
    # open_timeout=None: /publish is answered in process_request, i.e. during that
    # request's opening handshake, and a long publish loop (N=1,000: over 10 s) must
    # not be cut by the default 10 s handshake timeout (it was, in the first runs).
    async with serve(handler, "127.0.0.1", port, process_request=process_request,
                     max_size=2**20, backlog=4096, open_timeout=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
