"""Prometheus metrics of a hub (the ``prometheus`` extra).

A hub always counts (see `Hub.stats`); this module only reads those counts when Prometheus
scrapes, so it costs nothing between scrapes. Serve them with `metrics_app`:

```python
from starlette.routing import Route, WebSocketRoute
from wsroom.metrics import metrics_app

routes = [WebSocketRoute("/ws", hub.endpoint), Route("/metrics", metrics_app(hub))]
```

or add a `HubCollector` to a ``prometheus_client`` registry of your own. The metric names
are listed in [Logging and stats](../topics/logging.md#prometheus-metrics).

No label value comes from a client, so clients cannot add series: every label takes its
values from a fixed set, and the ``code`` of ``wsroom_disconnects_total`` (a client picks
the code it closes with) keeps its number only for wsroom's codes and the standard ones
(1000-1015); any other is counted as ``3xxx``, ``4xxx`` (the applications' range) or
``other`` (`wsroom._core.metrics.close_code_label`).

Importing this module works without ``prometheus_client``; `HubCollector` and `metrics_app`
raise `ImportError` then.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        PlatformCollector,
        ProcessCollector,
        generate_latest,
    )
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as exc:  # the extra is not installed
    _missing: ImportError | None = exc
else:
    _missing = None

if TYPE_CHECKING:
    from collections.abc import Iterable

    from starlette.types import ASGIApp, Receive, Scope, Send

    from wsroom._core.metrics import Histogram
    from wsroom._runtime.hub import Hub

__all__ = ["HubCollector", "metrics_app"]

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Label names the collector uses itself (``le``: histogram buckets).
_RESERVED = frozenset({"state", "reason", "code", "result", "le"})
# Reported from the start, so that rates of each exist before the first resume.
_RESUME_RESULTS = ("recovered", "not_recovered", "new_session", "rejected")


def _require() -> None:
    if _missing is not None:
        raise ImportError(
            "wsroom.metrics needs prometheus_client (the 'prometheus' extra): "
            "pip install 'prometheus-client>=0.20'"
        ) from _missing


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    checked = dict(labels or {})
    for name, value in checked.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ValueError(f"invalid Prometheus label name {name!r}")
        if name in _RESERVED:
            raise ValueError(f"label name {name!r} is used by wsroom's own metrics")
        if not isinstance(value, str):
            raise TypeError(f"the value of label {name!r} must be a str, not {value!r}")
    return checked


class HubCollector:
    """A ``prometheus_client`` collector of a hub's metrics, read at scrape time.

    Register it in a ``CollectorRegistry`` (or let `metrics_app` do it). Several hubs (in
    one process, e.g. one per app) can share a registry when each has its own constant
    `labels`; serve that registry with `metrics_app`, which writes each metric family
    once (other exporters repeat a family's ``# HELP`` and ``# TYPE`` lines per hub).

    Args:
        hub: the hub to report.
        labels: constant labels added to every sample, e.g. ``{"hub": "game"}``.

    Raises:
        ImportError: ``prometheus_client`` is not installed.
        ValueError: a label name is invalid, or one wsroom uses (``state``, ``reason``,
            ``code``, ``result``, ``le``).

    Example:
        ```python
        from prometheus_client import REGISTRY

        REGISTRY.register(HubCollector(hub))
        ```
    """

    def __init__(self, hub: Hub, *, labels: Mapping[str, str] | None = None) -> None:
        _require()
        self.hub = hub
        self._labels = _check_labels(labels)

    def collect(self) -> Iterator[Metric]:
        """The hub's metric families as they are now."""
        hub = self.hub
        stats = hub.stats()
        metrics = hub.telemetry.metrics
        names = list(self._labels)
        values = list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> Metric:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> Metric:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def labelled(family: GaugeMetricFamily | CounterMetricFamily,
                     samples: Iterable[tuple[tuple[str, ...], float]]) -> Metric:
            for extra, value in sorted(samples):
                family.add_metric([*values, *extra], value)
            return family

        def histogram(name: str, doc: str, observed: Histogram) -> Metric:
            family = HistogramMetricFamily(name, doc, labels=names)
            buckets = [("+Inf" if math.isinf(bound) else repr(bound), float(count))
                       for bound, count in observed.cumulative()]
            family.add_metric(values, buckets, observed.sum)
            return family

        yield labelled(
            GaugeMetricFamily("wsroom_connections",
                              "Connections registered, by state (handshake: before the "
                              "welcome).", labels=[*names, "state"]),
            (((state,), count) for state, count in hub.connection_states().items()))
        yield labelled(
            GaugeMetricFamily("wsroom_sessions",
                              "Sessions: live (with a connection), or detached (waiting "
                              "for a resume).", labels=[*names, "state"]),
            ((("live",), stats.sessions - stats.detached_sessions),
             (("detached",), stats.detached_sessions)))
        yield gauge("wsroom_rooms", "Rooms that exist.", stats.rooms)
        yield counter("wsroom_admitted_connections_total",
                      "Connections admitted since the hub started.", stats.connections_total)
        yield labelled(
            CounterMetricFamily("wsroom_refused", "WebSocket upgrades refused before a "
                                "connection was admitted, by reason.",
                                labels=[*names, "reason"]),
            (((reason,), count) for reason, count in metrics.refused.items()))
        yield labelled(
            CounterMetricFamily("wsroom_disconnects", "Connections ended, by close code "
                                "(1006: none was sent) and close reason. A code that is "
                                "neither wsroom's nor a standard one (1000-1015) is "
                                "bucketed: 3xxx, 4xxx (the applications' codes), other.",
                                labels=[*names, "code", "reason"]),
            (((code, reason), count) for (code, reason), count in metrics.disconnects.items()))
        yield counter("wsroom_messages_received_total", "Frames received from clients.",
                      stats.messages_in)
        yield counter("wsroom_messages_sent_total", "Messages written to clients.",
                      stats.messages_out)
        yield counter("wsroom_frames_sent_total",
                      "WebSocket frames written to clients (a batch counts once).",
                      stats.frames_out)
        yield counter("wsroom_received_bytes_total",
                      "Bytes of the frames received from clients.", metrics.received_bytes)
        yield counter("wsroom_sent_bytes_total", "Bytes of the frames written to clients.",
                      metrics.sent_bytes)
        yield labelled(
            CounterMetricFamily("wsroom_dropped_messages", "Messages not delivered or not "
                                "handled, by reason.", labels=[*names, "reason"]),
            (((reason,), count) for reason, count in metrics.dropped.items()))
        yield labelled(
            CounterMetricFamily("wsroom_sessions_ended", "Sessions ended, by reason "
                                "(closed, expired, disconnected, shutdown; ended early "
                                "by a budget: member_limit, address_quota, evicted).",
                                labels=[*names, "reason"]),
            (((reason,), count) for reason, count in metrics.sessions_ended.items()))
        yield counter("wsroom_handler_errors_total",
                      "Handler calls (or payload validators) that raised.",
                      stats.handler_errors)
        yield gauge("wsroom_queued_bytes", "Bytes waiting in all outbound queues.",
                    stats.queued_bytes)
        history_bytes = hub.backplane.history_bytes
        if history_bytes is not None:
            yield gauge("wsroom_history_bytes", "Bytes of stream history held in this "
                        "process (bounded by HubConfig.max_history_bytes).", history_bytes)
        yield histogram("wsroom_send_queue_depth_messages",
                        "Messages in a client's queue when its writer takes a batch.",
                        metrics.queue_depth)
        yield histogram("wsroom_heartbeat_rtt_seconds", "Seconds from a ping to its pong.",
                        metrics.heartbeat_rtt)
        yield histogram("wsroom_broadcast_duration_seconds",
                        "Seconds one publish spent delivering to the room's members in "
                        "this process.", metrics.broadcast_duration)
        yield labelled(
            CounterMetricFamily("wsroom_resumes", "Resume attempts, by result.",
                                labels=[*names, "result"]),
            (((result,), count) for result, count
             in {**dict.fromkeys(_RESUME_RESULTS, 0), **stats.resumes}.items()))
        yield gauge("wsroom_backplane_up",
                    "1 while the backplane can publish and deliver, else 0.",
                    1 if hub.backplane.healthy else 0)
        yield labelled(
            CounterMetricFamily("wsroom_backplane_events", "Backplane events (Redis: "
                                "reconnects, caught_up, lost, publish_errors).",
                                labels=[*names, "event"]),
            (((event,), count) for event, count in hub.backplane.counters().items()))


class _Merged:
    """A registry's families with the same name merged into one (several `HubCollector`
    in one registry), so that each name has one ``# HELP`` and ``# TYPE``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        # Keyed by type too, so that a counter and a gauge never merge.
        families: dict[tuple[str, str], Metric] = {}
        for family in self._registry.collect():
            key = (family.name, family.type)
            merged = families.get(key)
            if merged is None:
                merged = families[key] = Metric(
                    family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(family.samples)
        return families.values()


class _MetricsApp:
    """The ASGI app returned by `metrics_app`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._merged = _Merged(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # run as the server's app: nothing to start or stop
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            raise RuntimeError(f"wsroom.metrics.metrics_app serves HTTP, not {kind!r}")
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            body = b"405 Method Not Allowed: use GET\n"
            await send({"type": "http.response.start", "status": 405, "headers": [
                (b"allow", b"GET, HEAD"),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ]})
            await send({"type": "http.response.body", "body": body})
            return
        # In the event loop's thread: the hub's registries are not thread-safe.
        body = generate_latest(self._merged)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", CONTENT_TYPE_LATEST.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def metrics_app(
    hub: Hub,
    *,
    registry: CollectorRegistry | None = None,
    labels: Mapping[str, str] | None = None,
) -> ASGIApp:
    """An ASGI app serving the hub's metrics in Prometheus' text format (GET or HEAD).

    Add it as a route, ``Route("/metrics", metrics_app(hub))``, or mount it,
    ``app.mount("/metrics", metrics_app(hub))`` (then served at ``/metrics/``; ``/metrics``
    redirects there). Other methods get 405.

    Args:
        hub: the hub to report.
        registry: a ``prometheus_client`` registry to add the hub's `HubCollector` to,
            and to serve (with your own metrics, or other hubs'). By default, a new
            registry with the hub and the process' metrics (``process_*``,
            ``python_info``).
        labels: constant labels of the hub's metrics (see `HubCollector`); needed to
            tell hubs apart in one registry.

    Raises:
        ImportError: ``prometheus_client`` is not installed.
    """
    _require()
    collector = HubCollector(hub, labels=labels)
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    registry.register(collector)
    return _MetricsApp(registry)
