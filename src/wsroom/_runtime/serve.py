"""Serving one WebSocket: admission, the accept, the reader, and the hand-offs to the
handshake and the dispatcher (see ``peer.py`` for the theory of operation)."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskGroup

from wsroom._asgi.transport import Disconnected
from wsroom._core.codes import ErrorCode
from wsroom._core.protocol import BadFrame, Hello, Msg, Pong, error_frame, parse_client_frame
from wsroom._core.queue import frame_size
from wsroom._core.rate import Verdict
from wsroom._core.state import CloseReason, disposition
from wsroom._runtime.dispatch import Dispatcher
from wsroom._runtime.handshake import handshake
from wsroom._runtime.peer import Peer

__all__ = ["serve"]

log = logging.getLogger("wsroom.connection")


async def serve(peer: Peer) -> None:
    """Serve the connection until it ends, then release everything it held."""
    runtime = peer.runtime
    registry = runtime.registry
    metrics = runtime.telemetry.metrics
    origins = registry.origins
    if origins is not None and not origins.allows(
            peer.transport.request.headers.get("origin")):
        metrics.refused[str(CloseReason.FORBIDDEN_ORIGIN)] += 1
        await _refuse(peer, CloseReason.FORBIDDEN_ORIGIN)
        return
    refused = registry.admit(peer)
    rejection = None
    if refused is not None:
        rejection, retry_after = refused
        metrics.refused[str(rejection)] += 1
        if rejection in (CloseReason.IP_LIMIT, CloseReason.IP_RATE
                         ) and peer.transport.can_deny:
            await _refuse(peer, rejection, status=429,
                               headers=[("retry-after", str(retry_after))])
            return
    try:
        try:
            accepted = await peer.transport.accept()
        except Exception as exc:  # e.g. the client left during the upgrade
            log.info("%s: accept failed: %s", peer.tag(), type(exc).__name__)
            accepted = False
        if not accepted:
            peer.peer_closed = True
            peer.sm.finish(CloseReason.CLIENT_CLOSED)
            return
        peer.accepted = True
        if not peer.sm.closing:  # a shutdown may have asked to close meanwhile
            peer.sm.accept()
        if rejection is not None:
            peer.request_close(rejection)
        try:
            async with anyio.create_task_group() as tg:
                peer.scope = tg.cancel_scope
                peer.tg = tg
                peer.sender.wake_writer()
                if rejection is None:
                    # The reader runs in this task: one task less per connection.
                    runtime.timers.schedule(
                        peer, anyio.current_time() + runtime.config.handshake_timeout)
                    await _reader(peer, tg)
        finally:
            peer.tg = None
            if peer.inbox is not None:
                peer.inbox.close()
    except anyio.get_cancelled_exc_class():
        peer.request_close(CloseReason.CANCELLED)
        raise
    except BaseException:
        peer.request_close(CloseReason.INTERNAL_ERROR)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await peer.release()

async def _refuse(peer: Peer, reason: CloseReason, status: int = 403,
                  headers: list[tuple[str, str]] | None = None) -> None:
    """Refuse the upgrade itself (an HTTP status: 403 unless the server can send
    another): nothing was accepted or registered."""
    peer.sm.finish(reason)
    log.log(disposition(reason).log_level, "%s: refused, reason=%s", peer.tag(), reason)
    try:
        with anyio.move_on_after(peer.runtime.config.close_timeout):
            if status == 403:
                await peer.transport.refuse(int(disposition(reason).code or 1008))
            else:
                await peer.transport.deny(status, headers or [])
    except Exception as exc:  # the client left meanwhile
        log.debug("%s: refusal not sent: %s", peer.tag(), type(exc).__name__)
    finally:
        peer.released = True
        peer.runtime.registry.forget(peer, reason)

async def _reader(peer: Peer, tg: TaskGroup) -> None:
    hello_seen = False
    transport = peer.transport
    runtime = peer.runtime
    limit = runtime.config.max_message_bytes
    counters = runtime.telemetry.counters
    metrics = runtime.telemetry.metrics
    message: str | bytes | Disconnected | None = None
    frame: Hello | Pong | Msg | None = None
    while True:
        # Nothing received or parsed stays alive while the next frame is awaited
        # (an idle connection would keep its hello, or its last pong, for good).
        message = frame = None
        try:
            message = await transport.receive()
        except Exception as exc:
            log.warning("%s: receive failed: %s", peer.tag(), type(exc).__name__)
            peer.finish(CloseReason.RECEIVE_FAILED)
            return
        if isinstance(message, Disconnected):
            peer.peer_closed = True
            peer.peer_code = message.code
            log.debug("%s: peer closed with %d", peer.tag(), message.code)
            peer.finish(CloseReason.CLIENT_CLOSED)
            return
        heartbeat = peer.heartbeat
        if heartbeat is not None:
            heartbeat.frame_received()
        if peer.sm.closing:
            continue  # read on until the peer answers our close
        counters.messages_in += 1
        size = len(message) if isinstance(message, bytes) else frame_size(message)
        metrics.received_bytes += size
        if size > limit:  # before any parsing
            peer.request_close(CloseReason.MESSAGE_TOO_BIG)
            continue
        first = not hello_seen
        if isinstance(message, bytes):
            if first:
                peer.request_close(CloseReason.BAD_HANDSHAKE)
            else:
                peer.bad(ErrorCode.BAD_FRAME, "binary frames are not accepted", None)
            continue
        try:
            frame = parse_client_frame(message)
        except BadFrame as exc:
            if first:
                peer.request_close(CloseReason.BAD_HANDSHAKE)
            else:
                peer.bad(exc.code, exc.detail, None)
            continue
        if first:
            if not isinstance(frame, Hello):
                peer.request_close(CloseReason.BAD_HANDSHAKE)
                continue
            # Authenticate beside the reader, which keeps watching the socket: a
            # client that vanishes mid-authentication is released at once.
            hello_seen = True
            peer.hook_deadline = anyio.current_time() + runtime.config.hook_timeout
            runtime.timers.schedule(peer, peer.hook_deadline)
            tg.start_soon(handshake, peer, frame, name=f"wsroom handshake {peer.id}")
        elif isinstance(frame, Pong):
            _confirm(peer)
            now = anyio.current_time()
            rtt = None if heartbeat is None else heartbeat.pong_received(frame.id, now)
            if rtt is not None:
                metrics.heartbeat_rtt.observe(rtt)
            elif peer.rate is not None:
                # An unsolicited pong costs like a message (not answered: an error
                # frame for each would let a flood amplify itself).
                verdict = peer.rate.check(now)
                if verdict is Verdict.REFUSE:
                    metrics.dropped["rate_limited"] += 1
                elif verdict is Verdict.CLOSE:
                    peer.request_close(CloseReason.RATE_LIMITED)
        elif isinstance(frame, Msg):
            _confirm(peer)
            verdict, why = _rate(peer, anyio.current_time())
            if verdict is Verdict.ALLOW:
                await _to_dispatcher(peer, frame, tg)
            elif verdict is Verdict.REFUSE:
                metrics.dropped[why] += 1
                peer.push(error_frame(
                    ErrorCode.RATE_LIMITED, "too many messages: slow down", frame.ref))
            else:
                peer.request_close(CloseReason.RATE_LIMITED)
        else:
            peer.bad(ErrorCode.BAD_FRAME, "hello was already received", None)

def _rate(peer: Peer, now: float) -> tuple[Verdict, str]:
    """The connection's rate limit, then its member's (across its connections): the
    verdict on a message, and which budget refused it."""
    rate = peer.rate
    if rate is not None and not rate.take(now):
        return rate.refuse(), "rate_limited"
    member_rates = peer.runtime.member_rates
    identity = peer.identity
    if (member_rates is not None and identity is not None
            and not member_rates.allow(identity.id, now)):
        return (Verdict.REFUSE if rate is None else rate.refuse()), "member_rate_limited"
    if rate is not None:
        rate.allowed()
    return Verdict.ALLOW, ""


def _confirm(peer: Peer) -> None:
    """A frame after the welcome: the client holds the newest resume token."""
    session = peer.session
    if session is not None and session.connection is peer and peer.welcomed:
        peer.runtime.membership.confirm(session)


async def _to_dispatcher(peer: Peer, frame: Msg, tg: TaskGroup) -> None:
    heartbeat = peer.heartbeat
    inbox = peer.inbox
    if inbox is None:
        # On the first message only: a connection that only listens (most of a
        # room) never pays for the dispatcher task and its inbox.
        inbox, receive = anyio.create_memory_object_stream[Msg](
            peer.runtime.config.inbox_size)
        peer.inbox = inbox
        tg.start_soon(Dispatcher(peer).run, receive, name=f"wsroom dispatcher {peer.id}")
    if heartbeat is not None:
        heartbeat.message_received(anyio.current_time())
    try:
        try:
            inbox.send_nowait(frame)
        except anyio.WouldBlock:
            if heartbeat is not None:
                heartbeat.pause()
            try:
                await inbox.send(frame)
            finally:
                if heartbeat is not None:
                    heartbeat.resume(anyio.current_time())
    except anyio.BrokenResourceError:
        # The dispatcher stopped (and closed its end) because the connection is
        # closing: the message is not handled, as any message read while closing.
        pass

