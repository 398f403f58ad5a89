"""Backplanes: where streams are numbered, kept and fanned out (see `base`)."""

from wsroom._backplane.base import (
    Backplane,
    Envelope,
    MemoryBackplane,
    PresenceOp,
    SessionRecord,
    StaleSession,
    StateEvents,
)

__all__ = ["Backplane", "Envelope", "MemoryBackplane", "PresenceOp", "SessionRecord",
           "StaleSession", "StateEvents"]
