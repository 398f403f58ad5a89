"""The abuse suite, the kernel's share (issue 15): what wsroom gives up on, the server's
kernel must let go of too, and what uvicorn reads before wsroom sees it must be bounded.
Each test runs ``wsroom run`` (uvicorn on `wsroom.runner.listen_socket`) with
tests/apps/fault_app.py in a network namespace (tests/support/netns.py), replays one
attack, asserts a bound derived from the configuration and records ``attack | bound |
measured`` in the table printed at the end of the run (tests/conftest.py).

Like tests/faults/, these need root, ``ip`` and ``nft``: skipped without them, except on CI
(``CI=true``), where they fail. They take real seconds, so they run on asyncio only (the
server is uvicorn either way).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import anyio
import pytest

from support import netns
from support.netns import ABUSE, Lab, Server

pytestmark = [pytest.mark.anyio, pytest.mark.e2e,
              pytest.mark.parametrize("anyio_backend", ["asyncio"])]

MiB = 1024 * 1024
USER_TIMEOUT = 3.0
"""`listen_socket`'s user timeout here (30 s by default)."""
SLACK = 1.0
"""The kernel's timer granularity and this test's polling, on top of the user timeout."""
CONFIG = {"ping_interval": 1.0, "pong_timeout": 2.0, "close_timeout": 2.0,
          "max_queue_bytes": 256 * 1024, "max_connections_per_ip": None,
          "connect_rate_per_ip": None}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with netns.lab() as net:
        yield net


def _held(got: netns.Reclaimed) -> str:
    return (f"fds {got.base.fds} -> {got.peak.fds} -> {got.after.fds}, sockets "
            f"{got.base.sockets} -> {got.peak.sockets} -> {got.after.sockets}")


async def test_a_peer_that_never_reads_loses_its_socket_within_the_user_timeout(
        lab: Lab) -> None:
    bound = USER_TIMEOUT + SLACK
    async with netns.kernel_server(lab, CONFIG, via="runner",
                                   user_timeout=USER_TIMEOUT) as srv:
        got = await netns.never_reading_peer(srv, timeout=30)
    assert set(got.codes) <= {3008, 3012}, got.codes
    assert got.reclaimed_after <= bound
    assert got.after.fds <= got.base.fds
    assert got.after.sockets <= got.base.sockets
    ABUSE.record(
        "upgrade + hello, then never read (zero window, probes acked) while the room "
        "broadcasts",
        f"wsroom closes it (3008/3012); its socket and fd gone <= user timeout + "
        f"{SLACK:g} = {bound:g}s after the release",
        f"closed {got.codes}; gone {got.reclaimed_after:.2f}s after the release; "
        f"{_held(got)}")


async def test_vanishing_clients_lose_their_sockets_within_the_user_timeout(
        lab: Lab) -> None:
    count, bound = 100, USER_TIMEOUT + SLACK
    async with netns.kernel_server(lab, CONFIG, via="runner",
                                   user_timeout=USER_TIMEOUT) as srv:
        got = await netns.vanishing_peers(srv, count, timeout=30)
    assert got.codes == {3012: count}, got.codes
    assert got.reclaimed_after <= bound
    assert got.after.fds <= got.base.fds
    assert got.after.sockets <= got.base.sockets
    ABUSE.record(
        f"{count} clients vanish (no FIN, no RST) while the room broadcasts",
        f"3012 each; sockets and fds back at the baseline <= user timeout + {SLACK:g} = "
        f"{bound:g}s after the last release",
        f"{got.codes} {got.released_after:.2f}s after the fault; baseline "
        f"{got.reclaimed_after:.2f}s after the last release; {_held(got)}")


UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


async def _half_a_frame(host: str, frame_size: int, closes: list[int | None],
                        sent: list[int]) -> None:
    """Upgrade, then send the header of a `frame_size`-byte text frame and half of its
    payload (no hello), as fast as the server takes it; note the close code the server
    answers with, if any, and the bytes it took."""
    async with await anyio.connect_tcp(host, netns.PORT) as stream:
        await stream.send(UPGRADE)
        response = b""
        while b"\r\n\r\n" not in response:
            response += await stream.receive()
        assert response.startswith(b"HTTP/1.1 101 "), response[:100]
        rest = response.split(b"\r\n\r\n", 1)[1]
        header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", frame_size) + os.urandom(4)
        chunk = bytes(64 * 1024)
        total = 0
        with anyio.move_on_after(10):
            try:
                await stream.send(header)
                while total < frame_size // 2:
                    await stream.send(chunk)
                    total += len(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the server closed
        sent.append(total)
        code = None
        with anyio.move_on_after(2):
            try:
                while len(rest) < 4:
                    rest += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass
        if len(rest) >= 4 and rest[0] == 0x88:
            code = struct.unpack("!H", rest[2:4])[0]
        closes.append(code)


async def test_half_sent_huge_frames_without_hello_stay_within_ws_max_size(
        lab: Lab) -> None:
    """20 connections each send half of a 15 MiB frame with no hello: `wsroom run` gives
    uvicorn ``--ws-max-size`` = the hub's ``max_message_bytes`` (64 KiB), so the server's
    memory stays within that per connection (plus asyncio's 256 KiB read buffer), not
    uvicorn's default 16 MiB per frame (measured on main without the runner: +281 MiB)."""
    count, frame_size = 20, 15 * MiB
    ws_max_size = 65536  # fault_app's Hub: HubConfig's default max_message_bytes
    read_buffer = 256 * 1024  # asyncio's selector transport reads up to this at once
    slack = 16 * MiB
    bound = count * (ws_max_size + read_buffer) + slack
    async with netns.kernel_server(lab, CONFIG, via="runner",
                                   user_timeout=USER_TIMEOUT) as srv:
        assert f"ws-max-size {ws_max_size} (the app's Hub)" in srv.log()
        await anyio.sleep(0.5)
        base = netns.server_rss(srv)
        peak = base
        closes: list[int | None] = []
        sent: list[int] = []

        async def sample(srv: Server) -> None:
            nonlocal peak
            while True:
                peak = max(peak, netns.server_rss(srv))
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample, srv)
            async with anyio.create_task_group() as attackers:
                for _ in range(count):
                    attackers.start_soon(_half_a_frame, lab.ns_ip, frame_size, closes, sent)
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
        stats = await srv.stats()
    grew = peak - base
    assert grew <= bound, f"RSS grew by {grew / MiB:.1f} MiB"
    assert stats["hub"]["connections"] == 0
    ABUSE.record(
        f"{count} connections each send half of a {frame_size // MiB} MiB frame, no hello "
        "(wsroom run)",
        f"RSS growth <= {count} x (ws-max-size {ws_max_size // 1024} KiB + asyncio's "
        f"{read_buffer // 1024} KiB read buffer) + {slack // MiB} MiB = "
        f"{bound / MiB:.0f} MiB",
        f"RSS {base / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{grew / MiB:.1f} MiB); "
        f"{sum(n < frame_size // 2 for n in sent)} of {count} cut off by the server, "
        f"after <= {max(sent) / 1024:.0f} KiB of payload each; close frames seen: "
        f"{sorted({str(code) for code in closes})}")
