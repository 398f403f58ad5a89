"""wsroom: WebSocket rooms for ASGI apps that survive real networks.

The public API is what this module exports; everything in ``wsroom._*`` is private.
"""

from wsroom._asgi.static import static_files
from wsroom._asgi.transport import Handshake
from wsroom._backplane import (
    Backplane,
    Envelope,
    MemoryBackplane,
    PresenceOp,
    SessionRecord,
    SharedState,
    StaleSession,
    StateEvents,
)
from wsroom._core.codes import CloseCode, ErrorCode, should_reconnect
from wsroom._core.config import HubConfig, RoomConfig
from wsroom._core.errors import (
    BackplaneUnavailable,
    ClientError,
    HubNotRunning,
    MessageTooLarge,
    Reject,
    WsroomError,
)
from wsroom._core.history import HistoryLimits, Recovery
from wsroom._core.identity import Identity
from wsroom._core.presence import PresenceEntry, PresenceStatus
from wsroom._core.queue import Policy
from wsroom._runtime.connection import Connection
from wsroom._runtime.hub import Hub, HubStats, MessageContext

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
    "SharedState",
    "StaleSession",
    "StateEvents",
    "WsroomError",
    "should_reconnect",
    "static_files",
)
