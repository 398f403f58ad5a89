"""Running the app's handlers for one connection, one message at a time.

The dispatcher is created on a connection's first application message (a client that
only listens never needs it). It runs each handler inside the app's per-message scope;
a handler that raises costs an `error` frame and a unit of the error budget, never the
connection's other tasks. Messages received before the welcome wait for it.
"""

from __future__ import annotations

import logging

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from pydantic import ValidationError

from wsroom._core.codes import ErrorCode
from wsroom._core.errors import ClientError, Reject
from wsroom._core.protocol import Msg, error_frame, reply_frame, safe_errors
from wsroom._core.queue import frame_size
from wsroom._core.state import CloseReason
from wsroom._runtime.peer import Peer

__all__ = ["Dispatcher"]

log = logging.getLogger("wsroom.connection")


class Dispatcher:
    """The handler task of one connection, and its bounded inbox."""

    __slots__ = ("_peer",)

    def __init__(self, peer: Peer) -> None:
        self._peer = peer

    async def run(self, inbox: MemoryObjectReceiveStream[Msg]) -> None:
        peer = self._peer
        with inbox:
            if not peer.welcomed:  # messages sent before the welcome wait for it
                if peer.welcome_event is None:
                    peer.welcome_event = anyio.Event()
                await peer.welcome_event.wait()
            async for frame in inbox:
                if peer.sm.closing:
                    return
                await self.dispatch(frame)
                if peer.heartbeat is not None:
                    peer.heartbeat.message_handled(anyio.current_time())

    async def dispatch(self, frame: Msg) -> None:
        peer = self._peer
        runtime = peer.runtime
        route = runtime.handlers.get(frame.event)
        if route is None:
            # The event name is the client's: never echoed (it may be markup, or a
            # secret sent by mistake).
            peer.bad(ErrorCode.UNKNOWN_EVENT, "no handler for this event", frame.ref)
            return
        data = frame.data
        if route.adapter is not None:
            try:
                data = route.adapter.validate_python(data)
            except ValidationError as exc:
                peer.bad(ErrorCode.INVALID_DATA,
                         safe_errors(exc, names=route.names, root="data"), frame.ref)
                return
            except Exception:  # a validator of the app's model has a bug
                runtime.telemetry.counters.handler_errors += 1
                log.exception("%s: validating the data of event %r raised", peer.tag(),
                              frame.event)
                peer.bad(ErrorCode.INTERNAL, "internal error", frame.ref)
                return
        ctx = runtime.make_context(peer.connection, frame.event, frame.ref)
        try:
            scope_factory = runtime.message_scope
            if scope_factory is None:
                result = await route.handler(ctx, data)
            else:
                async with scope_factory(ctx) as ctx.scope:
                    result = await route.handler(ctx, data)
            reply = None if frame.ref is None else reply_frame(frame.ref, result)
        except ClientError as exc:
            peer.push(error_frame(exc.code, exc.detail, frame.ref))
            return
        except Reject as exc:
            peer.request_close(CloseReason.APP, exc.code, exc.reason)
            return
        except Exception:
            runtime.telemetry.counters.handler_errors += 1
            log.exception("%s: handler for event %r raised (or returned a value that "
                          "is not JSON-serializable)", peer.tag(), frame.event)
            peer.bad(ErrorCode.INTERNAL, "internal error", frame.ref)
            return
        peer.budget.success()
        if reply is None:
            return
        size = frame_size(reply)
        limit = peer.sender.queue.max_bytes
        if size > limit:
            log.error("%s: the reply to event %r is %d bytes, over max_queue_bytes=%d",
                      peer.tag(), frame.event, size, limit)
            reply = error_frame(ErrorCode.INTERNAL, "reply too large", frame.ref)
            size = frame_size(reply)
        peer.push(reply, size)
