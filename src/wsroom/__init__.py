"""wsroom: WebSocket rooms for ASGI apps that survive real networks.

The public API is what this module exports; everything in ``wsroom._*`` is private.
"""

from ._codes import CloseCode, ErrorCode, should_reconnect
from ._config import HubConfig, RoomConfig
from ._connection import Connection, Identity
from ._errors import ClientError, HubNotRunning, MessageTooLarge, Reject, WsroomError
from ._handlers import MessageContext
from ._history import HistoryLimits
from ._hub import Hub, HubStats
from ._presence import PresenceEntry, PresenceStatus
from ._queue import Policy
from ._static import static_files
from ._transport import Handshake

__version__ = "0.1.0.dev0"

__all__ = (
    "ClientError",
    "CloseCode",
    "Connection",
    "ErrorCode",
    "Handshake",
    "HistoryLimits",
    "Hub",
    "HubConfig",
    "HubNotRunning",
    "HubStats",
    "Identity",
    "MessageContext",
    "MessageTooLarge",
    "Policy",
    "PresenceEntry",
    "PresenceStatus",
    "Reject",
    "RoomConfig",
    "WsroomError",
    "should_reconnect",
    "static_files",
)
