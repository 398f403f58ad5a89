"""Exceptions of the public API."""

from __future__ import annotations

from wsroom._core.codes import ErrorCode

__all__ = ["BackplaneUnavailable", "ClientError", "HubNotRunning", "MessageTooLarge",
           "Reject", "WsroomError"]


def check_close(code: int, reason: str) -> None:
    """Validate a close code and reason that the server is about to send.

    Raises:
        ValueError: if the code may not be sent or the reason exceeds 123 bytes.
    """
    if not 1000 <= code <= 4999 or code in (1004, 1005, 1006, 1015) or 1016 <= code <= 2999:
        raise ValueError(f"{code} is not a close code that may be sent")
    if len(reason.encode()) > 123:
        raise ValueError("a close reason is at most 123 bytes")


class WsroomError(Exception):
    """Base class of wsroom's exceptions."""


class ClientError(WsroomError):
    """Raise in a handler to answer the client with an `error` frame.

    The connection stays open and the error does not count against the error budget:
    use it for requests that are well-formed but not allowed ("not your turn").

    Args:
        code: machine-readable error code (an `ErrorCode` or an app-defined string).
        detail: human-readable explanation, sent to the client as is.
    """

    def __init__(self, code: str | ErrorCode, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else str(code))
        self.code = str(code)
        self.detail = detail


class Reject(WsroomError):
    """Raise in `authenticate`, `on_connect` or a handler to close the connection.

    Args:
        code: the close code; applications use 4000-4499 (client reconnects) and
            4500-4999 (client must not reconnect).
        reason: a short reason sent in the close frame (at most 123 bytes).

    Raises:
        ValueError: if the code is outside 1000-4999 or the reason is too long.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        check_close(code, reason)
        super().__init__(f"rejected with close code {code}")
        self.code = code
        self.reason = reason


class MessageTooLarge(WsroomError, ValueError):
    """A message to publish is larger than a client's outbound queue can ever hold."""


class HubNotRunning(WsroomError, RuntimeError):
    """The hub was used outside `Hub.run()` (or its lifespan)."""


class BackplaneUnavailable(WsroomError, ConnectionError):
    """The backplane cannot publish now (e.g. its Redis server is unreachable).

    Usually nothing was published; after a timeout the outcome is unknown (the
    message may have been numbered and delivered). ``hub.ready`` tells when the
    backplane is back.
    """
