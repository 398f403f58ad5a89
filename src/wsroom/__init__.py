"""wsroom: WebSocket rooms for ASGI apps that survive real networks.

The public API is what this module exports; everything in ``wsroom._*`` is private.
"""

from ._backplane import (
    Backplane,
    Envelope,
    MemoryBackplane,
    PresenceOp,
    SessionRecord,
    StaleSession,
    StateEvents,
)
from ._codes import CloseCode, ErrorCode, should_reconnect
from ._config import HubConfig, RoomConfig
from ._connection import Connection, Identity
from ._errors import (
    BackplaneUnavailable,
    ClientError,
    HubNotRunning,
    MessageTooLarge,
    Reject,
    WsroomError,
)
from ._handlers import MessageContext
from ._history import HistoryLimits, Recovery
from ._hub import Hub, HubStats
from ._presence import PresenceEntry, PresenceStatus
from ._queue import Policy
from ._static import static_files
from ._transport import Handshake

__version__ = "0.1.0.dev0"

__all__ = (
    "Backplane",
    "BackplaneUnavailable",
    "ClientError",
    "CloseCode",
    "Connection",
    "Envelope",
    "ErrorCode",
    "Handshake",
    "HistoryLimits",
    "Hub",
    "HubConfig",
    "HubNotRunning",
    "HubStats",
    "Identity",
    "MessageContext",
    "MemoryBackplane",
    "MessageTooLarge",
    "Policy",
    "PresenceOp",
    "PresenceEntry",
    "PresenceStatus",
    "Recovery",
    "Reject",
    "RoomConfig",
    "SessionRecord",
    "StaleSession",
    "StateEvents",
    "WsroomError",
    "should_reconnect",
    "static_files",
)
