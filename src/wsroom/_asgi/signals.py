"""Drain the hub on SIGINT/SIGTERM *before* the ASGI server closes the sockets.

Why this exists: on a signal, uvicorn stops listening, sends close 1012 to every open
WebSocket at once (dropping whatever the app still had queued), waits for the app's
tasks, and only then runs the lifespan shutdown. A drain in the lifespan shutdown is
therefore too late under uvicorn. So while the hub runs in the main thread, its lifespan
puts this handler in front of the server's: the first SIGINT/SIGTERM runs the hub's
graceful shutdown (1013 to newcomers, 1012 in batches after flushing, bounded by
``shutdown_timeout``), then restores the server's handler and re-raises the signal, so
the server shuts down as it always does, with nothing left to close. A second signal
during the drain goes straight to the server's handler (a forced exit stays possible).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import anyio

__all__ = ["drain_on_signals"]

log = logging.getLogger("wsroom.hub")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _threadsafe_scheduler() -> Callable[[Callable[[], object]], object] | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return loop.call_soon_threadsafe
    try:
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    except (ImportError, RuntimeError):  # pragma: no cover - neither loop
        return None


@asynccontextmanager
async def drain_on_signals(drain: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """While inside, the first SIGINT/SIGTERM runs `drain`, then re-raises the signal
    to the handler that was installed before (the ASGI server's)."""
    schedule = _threadsafe_scheduler()
    if threading.current_thread() is not threading.main_thread() or schedule is None:
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    trigger = anyio.Event()

    def restore() -> None:
        while previous:
            sig, handler = previous.popitem()
            signal.signal(sig, handler)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if received:  # a second signal: no more waiting
            restore()
            signal.raise_signal(signum)
            return
        received.append(signum)
        schedule(trigger.set)

    async def watch() -> None:
        await trigger.wait()
        log.info("signal %s: draining before the server shuts down",
                 signal.Signals(received[0]).name)
        with anyio.CancelScope(shield=True):
            await drain()
        if previous:
            restore()
            signal.raise_signal(received[0])

    for sig in _SIGNALS:
        previous[sig] = signal.signal(sig, on_signal)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, name="wsroom signal watcher")
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        restore()
