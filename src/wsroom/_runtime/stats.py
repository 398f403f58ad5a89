"""What a hub counts: `Counters` (behind `Hub.stats`) and `Telemetry` (the counters and
the histograms behind `wsroom.metrics`).

Names: *stats* are the counters and registry sizes a program reads (`HubStats`);
*metrics* are what is exported to Prometheus, histograms included (`Metrics`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from wsroom._core.metrics import Metrics

__all__ = ["Counters", "HubStats", "Telemetry"]


@dataclass(slots=True)
class Counters:
    """The hub's running totals (see `HubStats` for their meaning)."""

    messages_in: int = 0
    messages_out: int = 0
    frames_out: int = 0
    discarded: int = 0
    handler_errors: int = 0
    connections_total: int = 0
    closes: Counter[str] = field(default_factory=Counter)
    resumes: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Telemetry:
    """Everything a hub counts, shared by its parts: the counters of `Hub.stats` and
    the metrics (histograms, labelled counters) of `wsroom.metrics`."""

    counters: Counters = field(default_factory=Counters)
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(frozen=True)
class HubStats:
    """A snapshot of a hub's registries and counters (see `Hub.stats`).

    Attributes:
        connections: connections currently registered (including handshakes).
        sessions: sessions that exist (live, and detached ones awaiting a resume).
        detached_sessions: sessions waiting for their client to resume.
        rooms: rooms that currently exist.
        members: distinct sessions that are in at least one room.
        queued_bytes: bytes waiting in all outbound queues.
        connections_total: connections admitted since the hub started.
        closes: connections ended, by close reason.
        messages_in: frames received from clients.
        messages_out: messages written to clients.
        frames_out: WebSocket frames written (a batch counts once).
        discarded: messages discarded by `drop_oldest` or `coalesce` policies.
        handler_errors: messages whose handler, or payload validator, raised (or whose
            reply could not be encoded).
        resumes: resume attempts by result: ``recovered`` (every stream replayed),
            ``not_recovered`` (some stream got a snapshot instead), ``new_session``
            (valid token, but the session had expired), ``rejected`` (3500).
    """

    connections: int
    sessions: int
    detached_sessions: int
    rooms: int
    members: int
    queued_bytes: int
    connections_total: int
    closes: dict[str, int]
    messages_in: int
    messages_out: int
    frames_out: int
    discarded: int
    handler_errors: int
    resumes: dict[str, int]
