"""What every server publishes, built the same way for every peer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

ROOM = "bench"
EVENT = "m"


def payload(seq: int, size: int) -> dict[str, Any]:
    """One message: its number, the server's publish time (CLOCK_MONOTONIC, shared by
    every process of the machine) and padding up to about `size` bytes of JSON."""
    return {"seq": seq, "t": time.monotonic(), "pad": "x" * max(0, size - 40)}


def encode(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def query(qs: str | bytes) -> tuple[int, int, float]:
    """n, size, rate from a query string."""
    if isinstance(qs, bytes):
        qs = qs.decode()
    args = dict(p.split("=", 1) for p in qs.split("&") if "=" in p)
    return int(args.get("n", "1")), int(args.get("size", "200")), float(args.get("rate", "0"))


async def publish_loop(n: int, size: int, rate: float,
                       publish_one: Callable[[dict[str, Any]], Awaitable[object]]) -> int:
    """Call `publish_one` n times, back to back (rate 0) or on a fixed schedule."""
    start = time.monotonic()
    for seq in range(1, n + 1):
        if rate > 0:
            delay = start + (seq - 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await publish_one(payload(seq, size))
    return n
