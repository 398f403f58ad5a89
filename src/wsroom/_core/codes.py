"""Close codes and error codes: the numbers and strings clients act on.

Close codes follow DESIGN.md §3. The library range is split in two so that a client
can decide what to do from the code alone: 3000-3499 means "reconnect (with backoff,
resuming)", 3500-3999 means "do not reconnect". Applications get the same split in
4000-4499 / 4500-4999.
"""

from __future__ import annotations

from enum import Enum, IntEnum

__all__ = ["CloseCode", "ErrorCode", "should_reconnect"]


class CloseCode(IntEnum):
    """WebSocket close codes used by wsroom.

    The `reconnect` property tells whether a well-behaved client reconnects (with
    full-jitter backoff and a resume) after receiving the code.
    """

    NORMAL = 1000
    """Normal closure."""
    GOING_AWAY = 1001
    """The endpoint is going away."""
    MESSAGE_TOO_BIG = 1009
    """A message exceeded `max_message_bytes`."""
    INTERNAL_ERROR = 1011
    """The server hit an unexpected condition (a bug, or an app hook that raised)."""
    SERVICE_RESTART = 1012
    """The server is restarting: reconnect (to another worker) and resume."""
    TRY_AGAIN_LATER = 1013
    """The server is over capacity, draining, or its `authenticate`/`on_connect` hooks
    exceeded ``hook_timeout``: reconnect later."""

    SLOW_CONSUMER = 3008
    """The client's outbound queue reached its bound: reconnect and resume."""
    INSUFFICIENT_STATE = 3010
    """A gap was seen in a stream: reconnect and resume."""
    NO_PONG = 3012
    """No frame arrived within `pong_timeout` after a ping (server side only)."""
    RATE_LIMITED = 3013
    """The client sent too many messages: reconnect after a backoff."""

    INVALID_TOKEN = 3500
    """Authentication failed, or the resume token is invalid or expired."""
    BAD_REQUEST = 3501
    """Protocol violation (e.g. the first frame was not a valid `hello`)."""
    HANDSHAKE_TIMEOUT = 3502
    """No `hello` within `handshake_timeout`."""
    REPLACED = 3503
    """Replaced by a newer connection of the same session."""
    CONNECTION_LIMIT = 3504
    """A per-address limit (``max_connections_per_ip``, ``connect_rate_per_ip``)
    refused the connection, on a server that cannot answer the upgrade with HTTP 429
    (the global ``max_connections`` closes with 1013)."""
    FORBIDDEN_ORIGIN = 3507
    """The `Origin` header is not allowed."""
    ERROR_BUDGET = 3509
    """Too many consecutive bad messages."""
    IDLE_TIMEOUT = 3511
    """No application message within `idle_timeout` (wsroom addition, see docs)."""

    def __str__(self) -> str:  # the number, on every Python version
        return str(self.value)

    @property
    def reconnect(self) -> bool:
        """Whether a client should reconnect (and resume) after this code."""
        return should_reconnect(int(self))


def should_reconnect(code: int) -> bool:
    """Tell whether a client reconnects after a close with `code`.

    Standard codes 1001, 1006, 1011, 1012 and 1013 and the ranges 3000-3499 and
    4000-4499 mean "reconnect"; everything else (1000, 1008, 1009, 3500-3999,
    4500-4999, ...) means "stay closed".
    """
    if code in (1001, 1006, 1011, 1012, 1013):
        return True
    return 3000 <= code <= 3499 or 4000 <= code <= 4499


class ErrorCode(str, Enum):
    """Machine-readable `code` of an `error` frame."""

    BAD_JSON = "bad_json"
    """The frame was not valid JSON."""
    BAD_FRAME = "bad_frame"
    """Valid JSON, but not a frame of the wire contract (or a binary frame)."""
    UNKNOWN_EVENT = "unknown_event"
    """No handler is registered for the event."""
    INVALID_DATA = "invalid_data"
    """The event's `data` failed the handler's validation."""
    RATE_LIMITED = "rate_limited"
    """The client sent messages faster than the hub's ``rate_limit``; this one was
    dropped (persisting closes the connection with 3013)."""
    INTERNAL = "internal"
    """The handler (or its payload model's validator) raised, its reply could not be
    encoded, or was too large; details are in the server log, never in the frame."""

    def __str__(self) -> str:
        return self.value
