"""The connection's state machine and close-code selection, as data (sans-I/O).

Everything that decides how a connection ends lives in this file: the legal
transitions, and for every reason a connection can end, the close code sent, whether
queued frames are flushed first, and the log level. The runtime asks; it never decides.

States::

    CONNECTING --accept--> HANDSHAKING --welcome--> OPEN
         |                      |                     |
         +------ close ---------+------ close --------+--> CLOSING --finish--> CLOSED
         +--------------------------- finish (peer gone, socket dead) -------> CLOSED

The first close request wins: its reason and code are the ones reported, whatever
happens afterwards (a heartbeat timeout that fires while a slow-consumer close is under
way does not overwrite it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

from wsroom._core.codes import CloseCode

__all__ = ["CloseReason", "ConnState", "ConnectionStateMachine", "Disposition",
           "IllegalTransition", "disposition"]


class ConnState(Enum):
    """Lifecycle states of a connection."""

    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class CloseReason(str, Enum):
    """Why a connection ended. Drives its close code, flush, log level and metrics."""

    CLIENT_CLOSED = "client_closed"
    SEND_FAILED = "send_failed"
    RECEIVE_FAILED = "receive_failed"
    NO_PONG = "no_pong"
    SLOW_CONSUMER = "slow_consumer"
    MESSAGE_TOO_BIG = "message_too_big"
    ERROR_BUDGET = "error_budget"
    RATE_LIMITED = "rate_limited"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HOOK_TIMEOUT = "hook_timeout"
    BAD_HANDSHAKE = "bad_handshake"
    AUTH_FAILED = "auth_failed"
    RESUME_REJECTED = "resume_rejected"
    REPLACED = "replaced"
    SESSION_LIMIT = "session_limit"
    GAP = "gap"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"
    OVER_CAPACITY = "over_capacity"
    IP_LIMIT = "ip_limit"
    IP_RATE = "ip_rate"
    BACKPLANE_UNAVAILABLE = "backplane_unavailable"
    INTERNAL_ERROR = "internal_error"
    CANCELLED = "cancelled"
    APP = "app"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Disposition:
    """How to end a connection for a given reason."""

    code: int | None
    """Close code to send; ``None`` when no close frame can or should be sent."""
    flush: bool
    """Whether queued frames are written before the close frame."""
    log_level: int
    close_wait: float | None = None
    """Longest wait for the close frame to be handed over, if shorter than
    ``close_timeout``."""


_DEBUG, _INFO, _WARNING, _ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

_DISPOSITIONS: dict[CloseReason, Disposition] = {
    # The peer is gone or closed: nothing more can be said to it.
    CloseReason.CLIENT_CLOSED: Disposition(None, False, _INFO),
    CloseReason.SEND_FAILED: Disposition(None, False, _WARNING),
    CloseReason.RECEIVE_FAILED: Disposition(None, False, _WARNING),
    CloseReason.CANCELLED: Disposition(CloseCode.GOING_AWAY, False, _WARNING),
    # Faults of the peer or the network: close at once, the queue is worthless now
    # (a resuming client recovers it from history).
    # The peer is presumed dead: one second of slack for the close frame, no linger.
    CloseReason.NO_PONG: Disposition(CloseCode.NO_PONG, False, _WARNING, close_wait=1.0),
    CloseReason.SLOW_CONSUMER: Disposition(CloseCode.SLOW_CONSUMER, False, _WARNING),
    CloseReason.MESSAGE_TOO_BIG: Disposition(CloseCode.MESSAGE_TOO_BIG, False, _WARNING),
    CloseReason.ERROR_BUDGET: Disposition(CloseCode.ERROR_BUDGET, True, _WARNING),
    CloseReason.RATE_LIMITED: Disposition(CloseCode.RATE_LIMITED, True, _WARNING),
    # Refused before the upgrade (HTTP 403); 3507 only where a close frame is needed.
    CloseReason.FORBIDDEN_ORIGIN: Disposition(CloseCode.FORBIDDEN_ORIGIN, False, _INFO),
    CloseReason.HANDSHAKE_TIMEOUT: Disposition(CloseCode.HANDSHAKE_TIMEOUT, False, _INFO),
    CloseReason.BAD_HANDSHAKE: Disposition(CloseCode.BAD_REQUEST, True, _INFO),
    CloseReason.AUTH_FAILED: Disposition(CloseCode.INVALID_TOKEN, True, _INFO),
    CloseReason.RESUME_REJECTED: Disposition(CloseCode.INVALID_TOKEN, True, _INFO),
    # A newer connection took the session over: this one is a ghost or an old tab.
    CloseReason.REPLACED: Disposition(CloseCode.REPLACED, False, _INFO, close_wait=1.0),
    # The member's newest session took this one's place (max_sessions_per_member).
    CloseReason.SESSION_LIMIT: Disposition(CloseCode.REPLACED, True, _INFO),
    # The client resumes and recovers what is missing from history.
    CloseReason.GAP: Disposition(CloseCode.INSUFFICIENT_STATE, False, _WARNING),
    CloseReason.IDLE_TIMEOUT: Disposition(CloseCode.IDLE_TIMEOUT, True, _INFO),
    # Orderly ends: flush what is queued, then close.
    CloseReason.SHUTDOWN: Disposition(CloseCode.SERVICE_RESTART, True, _INFO),
    CloseReason.OVER_CAPACITY: Disposition(CloseCode.TRY_AGAIN_LATER, True, _WARNING),
    # Per-client admission limits: refused before the upgrade with HTTP 429 where the
    # server can answer with a status, else accepted and closed with 3504. Debug level:
    # a flood must not become a log flood (metrics count them).
    CloseReason.IP_LIMIT: Disposition(CloseCode.CONNECTION_LIMIT, False, _DEBUG),
    CloseReason.IP_RATE: Disposition(CloseCode.CONNECTION_LIMIT, False, _DEBUG),
    CloseReason.HOOK_TIMEOUT: Disposition(CloseCode.TRY_AGAIN_LATER, True, _WARNING),
    # The backplane (Redis) is down: come back later (to a worker whose is not).
    CloseReason.BACKPLANE_UNAVAILABLE: Disposition(CloseCode.TRY_AGAIN_LATER, True,
                                                   _WARNING),
    CloseReason.INTERNAL_ERROR: Disposition(CloseCode.INTERNAL_ERROR, True, _ERROR),
    CloseReason.APP: Disposition(CloseCode.NORMAL, True, _INFO),
}


def disposition(reason: CloseReason) -> Disposition:
    """Return how a connection ending for `reason` is closed."""
    return _DISPOSITIONS[reason]


class IllegalTransition(RuntimeError):
    """A transition that the state machine does not allow."""


_ACCEPT, _WELCOME, _CLOSE, _FINISH = "accept", "welcome", "close", "finish"

_TRANSITIONS: dict[tuple[ConnState, str], ConnState] = {
    (ConnState.CONNECTING, _ACCEPT): ConnState.HANDSHAKING,
    (ConnState.HANDSHAKING, _WELCOME): ConnState.OPEN,
    (ConnState.CONNECTING, _CLOSE): ConnState.CLOSING,
    (ConnState.HANDSHAKING, _CLOSE): ConnState.CLOSING,
    (ConnState.OPEN, _CLOSE): ConnState.CLOSING,
    (ConnState.CLOSING, _CLOSE): ConnState.CLOSING,
    (ConnState.CONNECTING, _FINISH): ConnState.CLOSED,
    (ConnState.HANDSHAKING, _FINISH): ConnState.CLOSED,
    (ConnState.OPEN, _FINISH): ConnState.CLOSED,
    (ConnState.CLOSING, _FINISH): ConnState.CLOSED,
    (ConnState.CLOSED, _FINISH): ConnState.CLOSED,
    (ConnState.CLOSED, _CLOSE): ConnState.CLOSED,
}


class ConnectionStateMachine:
    """Lifecycle of one connection, with the first close reason recorded."""

    __slots__ = ("close_code", "closing", "reason", "state")

    def __init__(self) -> None:
        self.state = ConnState.CONNECTING
        self.closing = False
        """True once a close was requested or the connection finished (an attribute,
        not a property: it is read on every delivery)."""
        self.reason: CloseReason | None = None
        self.close_code: int | None = None

    def _go(self, event: str) -> None:
        try:
            state = self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(
                f"cannot {event} a connection in state {self.state.value}"
            ) from None
        self.closing = state is ConnState.CLOSING or state is ConnState.CLOSED

    def accept(self) -> None:
        """The WebSocket handshake completed; the `hello` is awaited."""
        self._go(_ACCEPT)

    def welcome(self) -> None:
        """The `hello` was accepted; the connection is open for messages."""
        self._go(_WELCOME)

    def close(self, reason: CloseReason, code: int | None = None) -> bool:
        """Request a close. Returns True if this request is the one that counts.

        Args:
            reason: why the connection ends.
            code: overrides the reason's default close code (for `CloseReason.APP`).
        """
        first = self.reason is None
        self._go(_CLOSE)
        if first and self.state is ConnState.CLOSING:
            self.reason = reason
            chosen = disposition(reason).code if code is None else code
            self.close_code = None if chosen is None else int(chosen)
            return True
        return False

    def finish(self, reason: CloseReason) -> None:
        """The connection is over (peer gone, task group done). Idempotent."""
        if self.reason is None:
            self.reason = reason
            self.close_code = None
        self._go(_FINISH)

    @property
    def flush(self) -> bool:
        """Whether queued frames are written before the close frame."""
        return self.reason is not None and disposition(self.reason).flush
