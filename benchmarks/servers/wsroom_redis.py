"""wsroom on a `RedisBackplane` (the ``redis_fanout`` scenario): the app of
``wsroom_app.py`` (same hub configuration, same ``/ws``, ``/count``, ``/publish``,
``/closes``), its hub on Redis, and timed.

Several processes of it with the same prefix and secret are one cluster: a message
published on one reaches the room's members on all. Environment:

- ``WSROOM_BENCH_BACKPLANE``: ``redis`` (default) or ``memory`` (the same timed app on
  the in-memory backplane: the scenario's reference row);
- ``WSROOM_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``);
- ``WSROOM_BENCH_REDIS_PREFIX``: the key prefix (``benchmarks.run`` makes one per
  measurement and deletes its keys afterwards);
- ``WSROOM_BENCH_RESUME_SECRET``: the workers' shared resume secret (required on Redis).

``GET /timing``: JSON of the last ``/publish`` loop: ``n`` messages, ``loop_s`` (the
loop's wall time) and ``backplane_s`` (of which awaiting the backplane's ``publish``:
on Redis the publish script's round trip, then the local delivery; in memory the
delivery to the local queues), ``calls``; and the hub's counters ``messages_out`` and
``frames_out`` so far (a frame carries a batch of messages).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from wsroom import Backplane, MemoryBackplane

from .wsroom_app import build

TIMING: dict[str, float] = {"n": 0, "loop_s": 0.0, "backplane_s": 0.0, "calls": 0}


def timed(cls: type[Backplane]) -> type[Backplane]:
    """`cls` whose `publish` adds its duration to TIMING."""

    class Timed(cls):  # type: ignore[valid-type,misc]
        async def publish(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await super().publish(*args, **kwargs)
            finally:
                TIMING["backplane_s"] += time.perf_counter() - t0
                TIMING["calls"] += 1

    Timed.__name__ = Timed.__qualname__ = f"Timed{cls.__name__}"
    return Timed


async def on_publish(loop: Callable[[], Awaitable[int]]) -> int:
    TIMING.update(n=0, loop_s=0.0, backplane_s=0.0, calls=0)
    t0 = time.perf_counter()
    n = await loop()
    TIMING.update(n=n, loop_s=time.perf_counter() - t0)
    return n


async def timing(request: Request) -> JSONResponse:
    stats = hub.stats()
    return JSONResponse({**TIMING, "messages_out": stats.messages_out,
                         "frames_out": stats.frames_out})


def make_backplane() -> tuple[Backplane, list[str] | None]:
    if os.environ.get("WSROOM_BENCH_BACKPLANE", "redis") == "memory":
        return timed(MemoryBackplane)(), None
    from wsroom.redis import RedisBackplane

    backplane = timed(RedisBackplane)(
        os.environ.get("WSROOM_REDIS_URL", "redis://127.0.0.1:6379/0"),
        prefix=os.environ["WSROOM_BENCH_REDIS_PREFIX"])
    return backplane, [os.environ["WSROOM_BENCH_RESUME_SECRET"]]


_backplane, _secrets = make_backplane()
hub, app = build(_backplane, resume_secrets=_secrets, on_publish=on_publish,
                 routes=[Route("/timing", timing)])
