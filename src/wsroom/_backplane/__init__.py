"""Backplanes: where streams are numbered, kept and fanned out (see `base`)."""

from wsroom._backplane.base import (
    Backplane,
    Envelope,
    PresenceOp,
    SessionRecord,
    SharedState,
    StaleSession,
    StateEvents,
)
from wsroom._backplane.memory import MemoryBackplane

__all__ = ["Backplane", "Envelope", "MemoryBackplane", "PresenceOp", "SessionRecord",
           "SharedState", "StaleSession", "StateEvents"]
