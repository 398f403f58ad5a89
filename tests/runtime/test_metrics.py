"""Prometheus exposition (`wsroom.metrics`) and the hub's histograms (`_metrics.Histogram`).

The collector reads a hub (in memory, or filled by hand); `metrics_app` is also served by a
real server (uvicorn on asyncio, hypercorn on trio) and fetched over HTTP."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute

import wsroom.metrics
from support import MemoryTransport, Player, running, serve, serve_transport, wait_for
from wsroom import Connection, Hub, MemoryBackplane, MessageContext
from wsroom._core.codes import CloseCode
from wsroom._core.metrics import (
    CLOSE_CODE_LABELS,
    CloseCodeCounter,
    Histogram,
    Metrics,
    close_code_label,
)
from wsroom._core.state import CloseReason
from wsroom.metrics import HubCollector, metrics_app

Labels = frozenset[tuple[str, str]]


class Scrape:
    """Parsed exposition text: families' types, and samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in self.samples, f"duplicate sample {key}"
                self.samples[key] = sample.value
                self.types[sample.name] = family.type

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def labelled(self, name: str, **constant: str) -> dict[Labels, float]:
        """Samples of `name` with the `constant` labels, by their other labels."""
        found = {}
        for (sample, labels), value in self.samples.items():
            if sample == name and set(constant.items()) <= labels:
                found[frozenset(labels - set(constant.items()))] = value
        return found


def scrape(collector: Any) -> Scrape:
    return Scrape(generate_latest(collector).decode())


def single(collector: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def labels(**pairs: str) -> Labels:
    return frozenset(pairs.items())


NAMES = {
    "wsroom_connections": "gauge",
    "wsroom_sessions": "gauge",
    "wsroom_rooms": "gauge",
    "wsroom_admitted_connections_total": "counter",
    "wsroom_messages_received_total": "counter",
    "wsroom_messages_sent_total": "counter",
    "wsroom_frames_sent_total": "counter",
    "wsroom_received_bytes_total": "counter",
    "wsroom_sent_bytes_total": "counter",
    "wsroom_handler_errors_total": "counter",
    "wsroom_queued_bytes": "gauge",
    "wsroom_history_bytes": "gauge",
    "wsroom_send_queue_depth_messages_bucket": "histogram",
    "wsroom_heartbeat_rtt_seconds_bucket": "histogram",
    "wsroom_broadcast_duration_seconds_bucket": "histogram",
    "wsroom_resumes_total": "counter",
    "wsroom_backplane_up": "gauge",
}


# ------------------------------------------------------------------ the collector


def filled_hub() -> Hub:
    """A hub (not running) whose counters were set by hand."""
    hub = Hub()
    hub.telemetry.counters.connections_total = 7
    hub.telemetry.counters.messages_in = 11
    hub.telemetry.counters.messages_out = 13
    hub.telemetry.counters.frames_out = 5
    hub.telemetry.counters.handler_errors = 2
    # Not exported: wsroom_dropped_messages_total is metrics.dropped.
    hub.telemetry.counters.discarded = 99
    hub.telemetry.counters.resumes.update({"recovered": 3, "rejected": 1})
    metrics = hub.telemetry.metrics
    metrics.received_bytes = 1234
    metrics.sent_bytes = 5678
    metrics.refused.update({"origin": 2, "over_capacity": 1})
    metrics.disconnects.update({(1000, "client_closed"): 4, (3012, "no_pong"): 1,
                                (1006, "send_failed"): 2})
    metrics.dropped.update({"drop_oldest": 6, "coalesce": 3})
    for depth in (0, 1, 3, 3, 5000):
        metrics.queue_depth.observe(depth)
    for rtt in (0.002, 0.02, 0.2):
        metrics.heartbeat_rtt.observe(rtt)
    metrics.broadcast_duration.observe(0.0003)
    return hub


def test_every_metric_is_exported_with_its_type() -> None:
    result = scrape(single(HubCollector(Hub())))
    for name, kind in NAMES.items():
        assert result.types.get(name) == kind, name
    # Labelled counters without any count yet still have their HELP and TYPE.
    for name in ("wsroom_refused_total", "wsroom_disconnects_total",
                 "wsroom_dropped_messages_total"):
        assert f"# TYPE {name} counter" in result.text
    assert not any(name.startswith(("process_", "python_")) for name, _ in result.samples)


def test_counters_and_gauges_of_an_idle_hub() -> None:
    result = scrape(single(HubCollector(filled_hub())))
    assert result.labelled("wsroom_connections") == {
        labels(state="handshake"): 0, labels(state="open"): 0, labels(state="closing"): 0}
    assert result.labelled("wsroom_sessions") == {labels(state="live"): 0,
                                                  labels(state="detached"): 0}
    assert result.value("wsroom_rooms") == 0
    assert result.value("wsroom_admitted_connections_total") == 7
    assert result.value("wsroom_messages_received_total") == 11
    assert result.value("wsroom_messages_sent_total") == 13
    assert result.value("wsroom_frames_sent_total") == 5
    assert result.value("wsroom_received_bytes_total") == 1234
    assert result.value("wsroom_sent_bytes_total") == 5678
    assert result.value("wsroom_handler_errors_total") == 2
    assert result.value("wsroom_queued_bytes") == 0
    assert result.value("wsroom_backplane_up") == 1
    assert result.labelled("wsroom_refused_total") == {
        labels(reason="origin"): 2, labels(reason="over_capacity"): 1}
    assert result.labelled("wsroom_disconnects_total") == {
        labels(code="1000", reason="client_closed"): 4,
        labels(code="3012", reason="no_pong"): 1,
        labels(code="1006", reason="send_failed"): 2,
    }
    assert result.labelled("wsroom_dropped_messages_total") == {
        labels(reason="drop_oldest"): 6, labels(reason="coalesce"): 3}
    # Every known result is there from the start, at 0 until it happens.
    assert result.labelled("wsroom_resumes_total") == {
        labels(result="recovered"): 3, labels(result="not_recovered"): 0,
        labels(result="new_session"): 0, labels(result="rejected"): 1}


def test_histograms_are_cumulative_with_count_and_sum() -> None:
    result = scrape(single(HubCollector(filled_hub())))
    depth = {dict(k)["le"]: v for k, v in
             result.labelled("wsroom_send_queue_depth_messages_bucket").items()}
    assert depth["0.0"] == 1
    assert depth["1.0"] == 2
    assert depth["2.0"] == 2
    assert depth["4.0"] == 4
    assert depth["4096.0"] == 4
    assert depth["+Inf"] == 5
    values = [depth[le] for le in sorted(depth, key=float)]
    assert values == sorted(values)
    assert result.value("wsroom_send_queue_depth_messages_count") == 5
    assert result.value("wsroom_send_queue_depth_messages_sum") == 5007

    rtt = {float(dict(k)["le"]): v for k, v in
           result.labelled("wsroom_heartbeat_rtt_seconds_bucket").items()}
    assert rtt[0.001] == 0
    assert rtt[0.0025] == 1
    assert rtt[0.025] == 2
    assert rtt[0.25] == 3
    assert rtt[float("inf")] == 3
    assert result.value("wsroom_heartbeat_rtt_seconds_count") == 3
    assert result.value("wsroom_heartbeat_rtt_seconds_sum") == pytest.approx(0.222)

    fanout = {float(dict(k)["le"]): v for k, v in
              result.labelled("wsroom_broadcast_duration_seconds_bucket").items()}
    assert fanout[0.00025] == 0
    assert fanout[0.0005] == 1
    assert result.value("wsroom_broadcast_duration_seconds_count") == 1
    assert result.value("wsroom_broadcast_duration_seconds_sum") == pytest.approx(0.0003)


def test_the_histograms_bucket_bounds_match_the_hubs() -> None:
    metrics = Metrics()
    result = scrape(single(HubCollector(Hub())))
    for name, histogram in (("wsroom_send_queue_depth_messages", metrics.queue_depth),
                            ("wsroom_heartbeat_rtt_seconds", metrics.heartbeat_rtt),
                            ("wsroom_broadcast_duration_seconds", metrics.broadcast_duration)):
        bounds = sorted(float(dict(k)["le"]) for k in result.labelled(f"{name}_bucket"))
        assert bounds == [*histogram.bounds, float("inf")]


def test_an_unhealthy_backplane_reports_0() -> None:
    hub = Hub()

    class Down(type(hub.backplane)):  # type: ignore[misc]
        @property
        def healthy(self) -> bool:
            return False

    hub.backplane.__class__ = Down
    assert scrape(single(HubCollector(hub))).value("wsroom_backplane_up") == 0


def test_the_collector_reads_at_scrape_time() -> None:
    hub = Hub()
    registry = single(HubCollector(hub))
    assert scrape(registry).value("wsroom_sent_bytes_total") == 0
    hub.telemetry.metrics.sent_bytes += 10
    hub.telemetry.metrics.refused["origin"] += 1
    result = scrape(registry)
    assert result.value("wsroom_sent_bytes_total") == 10
    assert result.value("wsroom_refused_total", reason="origin") == 1


@pytest.mark.anyio
async def test_a_running_hub_with_a_connection() -> None:
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    @hub.on("chat")
    async def chat(ctx: MessageContext, data: str) -> None:
        await ctx.publish("lobby", "chat", data)

    registry = single(HubCollector(hub))
    async with running(hub, hello=False) as (peer, _):
        await wait_for(lambda: bool(hub.connections()))
        handshake = scrape(registry)
        assert handshake.labelled("wsroom_connections") == {
            labels(state="handshake"): 1, labels(state="open"): 0, labels(state="closing"): 0}

        await peer.transport.client_send({"type": "hello", "v": 1})
        await wait_for(lambda: any(f["type"] == "welcome" for f in peer.frames))
        await peer.transport.client_send({"type": "msg", "event": "chat", "data": "hi"})
        await wait_for(lambda: any(f["type"] == "msg" for f in peer.frames))

        result = scrape(registry)
        stats, metrics = hub.stats(), hub.telemetry.metrics  # no await since the scrape
        assert result.labelled("wsroom_connections") == {
            labels(state="handshake"): 0, labels(state="open"): 1, labels(state="closing"): 0}
        assert result.labelled("wsroom_sessions") == {labels(state="live"): 1,
                                                      labels(state="detached"): 0}
        assert result.value("wsroom_rooms") == 1
        assert result.value("wsroom_admitted_connections_total") == 1
        assert result.value("wsroom_messages_received_total") == stats.messages_in >= 2
        assert result.value("wsroom_messages_sent_total") == stats.messages_out >= 2
        assert result.value("wsroom_frames_sent_total") == stats.frames_out >= 1
        assert result.value("wsroom_received_bytes_total") == metrics.received_bytes
        assert result.value("wsroom_sent_bytes_total") == metrics.sent_bytes
        assert result.value("wsroom_queued_bytes") == stats.queued_bytes
        backplane = hub.backplane
        assert isinstance(backplane, MemoryBackplane)
        # The chat in the room's history (its payload's size, within the frame's).
        assert result.value("wsroom_history_bytes") == backplane.history_bytes > 0
        assert result.value("wsroom_send_queue_depth_messages_count") == \
            metrics.queue_depth.count
        assert result.value("wsroom_broadcast_duration_seconds_count") == \
            metrics.broadcast_duration.count


@pytest.mark.anyio
async def test_client_chosen_close_codes_are_bucketed() -> None:
    """40 connections closing with made-up codes before the hello add at most one series
    per bucket, and `Hub.stats()` does not grow with them either."""
    hub = Hub()
    registry = single(HubCollector(hub))
    codes = [1000, 1001, 1015, 3012, 3999, 4000, 4321, 4999, 2999, 5000, 65535, 0,
             *range(3100, 3114), *range(4100, 4114)]
    assert len(codes) == 40
    async with hub.run():
        for code in codes:
            transport = MemoryTransport()
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_transport, hub, transport)
                await wait_for(lambda: bool(hub.connections()))
                await transport.client_disconnect(code)
            transport.close_streams()
    result = scrape(registry)
    series = result.labelled("wsroom_disconnects_total")
    found = {dict(key)["code"] for key in series}
    assert found <= CLOSE_CODE_LABELS
    assert found == {"1000", "1001", "1015", "3012", "3xxx", "4xxx", "other"}
    assert sum(series.values()) == 40
    assert series[labels(code="4xxx", reason="client_closed")] == 17
    assert set(hub.stats().closes) == {"client_closed"}


@pytest.mark.anyio
async def test_no_label_value_comes_from_a_client() -> None:
    """Clients choose event names, stream names in their hello, frames that are not
    frames, and close codes: none of it appears in a label, and every labelled family
    keeps to its fixed set."""
    hub = Hub()

    @hub.on("chat")
    async def chat(ctx: MessageContext, data: int) -> None:
        return None

    registry = single(HubCollector(hub))
    async with hub.run():
        for n in range(12):
            transport = MemoryTransport()
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_transport, hub, transport)
                await transport.client_send({"type": "hello", "v": 1, "streams": {
                    f"MARK-room-{n}": {"epoch": f"MARK-{n}", "offset": n}}})
                await wait_for(lambda: hub.stats().rooms == 0 and bool(hub.connections()))
                await transport.client_send({"type": "msg", "event": f"MARK-event-{n}"})
                await transport.client_send({"type": "msg", "event": "chat",
                                             "data": f"MARK-data-{n}"})
                await transport.client_send({"type": f"MARK-type-{n}"})
                await transport.client_send(f"MARK-not-json-{n}")
                frames: list[dict[str, Any]] = []
                with anyio.fail_after(10):
                    while sum(frame["type"] == "error" for frame in frames) < 4:
                        frames += await transport.client_frames()
                        await anyio.sleep(0.01)
                await transport.client_disconnect(3000 + 97 * n)
            transport.close_streams()
    result = scrape(registry)
    for (name, sample_labels), _ in result.samples.items():
        for label, value in sample_labels:
            assert "MARK" not in value, (name, label, value)
    codes = {dict(key)["code"] for key in result.labelled("wsroom_disconnects_total")}
    assert codes <= CLOSE_CODE_LABELS
    assert len(result.labelled("wsroom_disconnects_total")) <= len(CLOSE_CODE_LABELS)
    stats = hub.stats()
    assert set(stats.closes) <= {str(reason) for reason in CloseReason}
    assert not any("MARK" in key for key in (*stats.closes, *stats.resumes))


@pytest.mark.parametrize(("code", "label"), [
    (1000, "1000"), (1004, "1004"), (1005, "1005"), (1006, "1006"), (1015, "1015"),
    (1016, "other"), (999, "other"), (2999, "other"), (3000, "3xxx"), (3008, "3008"),
    (3511, "3511"), (3512, "3xxx"), (3999, "3xxx"), (4000, "4xxx"), (4999, "4xxx"),
    (5000, "other"), (-1, "other"), (1 << 20, "other"),
    ("4xxx", "4xxx"), ("1000", "1000"), ("<script>", "other"),
])
def test_close_code_labels(code: int | str, label: str) -> None:
    assert close_code_label(code) == label
    assert label in CLOSE_CODE_LABELS


def test_every_wsroom_code_keeps_its_number() -> None:
    for code in CloseCode:
        assert close_code_label(int(code)) == str(int(code))
    assert len(CLOSE_CODE_LABELS) == len({*range(1000, 1016), *map(int, CloseCode)}) + 3


@given(st.integers(-(1 << 31), 1 << 31), st.sampled_from(["client_closed", "app"]))
def test_the_counter_buckets_whatever_the_code(code: int, reason: str) -> None:
    counter = CloseCodeCounter()
    counter[(code, reason)] += 1
    counter[(code, reason)] += 1
    ((label, seen), count), = counter.items()
    assert (label, seen, count) == (close_code_label(code), reason, 2)
    assert counter[(label, reason)] == 2 == counter[(code, reason)]


# ------------------------------------------------------------------ constant labels


def test_two_hubs_in_one_registry_with_constant_labels() -> None:
    first, second = filled_hub(), Hub()
    second.telemetry.metrics.refused["origin"] = 5
    registry = CollectorRegistry()
    app = metrics_app(first, registry=registry, labels={"worker": "1"})
    registry.register(HubCollector(second, labels={"worker": "2"}))

    text = anyio.run(get_body, app)
    result = Scrape(text)
    assert result.value("wsroom_admitted_connections_total", worker="1") == 7
    assert result.value("wsroom_admitted_connections_total", worker="2") == 0
    assert result.labelled("wsroom_refused_total", worker="1") == {
        labels(reason="origin"): 2, labels(reason="over_capacity"): 1}
    assert result.labelled("wsroom_refused_total", worker="2") == {labels(reason="origin"): 5}
    assert result.value("wsroom_heartbeat_rtt_seconds_count", worker="1") == 3
    assert result.value("wsroom_heartbeat_rtt_seconds_count", worker="2") == 0
    assert result.value("wsroom_send_queue_depth_messages_bucket", worker="2", le="+Inf") == 0
    # One HELP and TYPE per name, every sample of a name after its TYPE line.
    assert text.count("# TYPE wsroom_rooms gauge") == 1
    assert text.count("# TYPE wsroom_admitted_connections_total counter") == 1
    current = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif line and not line.startswith("#"):
            assert current is not None, line
            assert line.startswith(current), line
    # A registry of the caller's: no process metrics added.
    assert not any(name.startswith("process_") for name, _ in result.samples)


def test_constant_labels_are_checked() -> None:
    hub = Hub()
    with pytest.raises(ValueError, match="used by wsroom"):
        HubCollector(hub, labels={"reason": "x"})
    with pytest.raises(ValueError, match="invalid Prometheus label name"):
        HubCollector(hub, labels={"bad-name": "x"})
    with pytest.raises(ValueError, match="invalid Prometheus label name"):
        HubCollector(hub, labels={"__reserved": "x"})
    with pytest.raises(TypeError, match="must be a str"):
        HubCollector(hub, labels={"worker": 1})  # type: ignore[dict-item]


# ------------------------------------------------------------------ the ASGI app


async def call(app: Any, scope: dict[str, Any],
               messages: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Call an ASGI app in-process; return what it sent."""
    pending = list(messages or [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": "/", "raw_path": b"/",
            "query_string": b"", "headers": [], "server": ("127.0.0.1", 80)}


async def get_body(app: Any) -> str:
    start, body = await call(app, http_scope())
    assert start["status"] == 200
    return str(body["body"].decode())


@pytest.mark.anyio
async def test_the_default_registry_has_process_metrics() -> None:
    result = Scrape(await get_body(metrics_app(Hub())))
    assert "python_info" in {name for name, _ in result.samples}
    assert result.value("wsroom_rooms") == 0


@pytest.mark.anyio
async def test_head_has_headers_and_no_body() -> None:
    app = metrics_app(filled_hub())
    get_start, get_body_message = await call(app, http_scope("GET"))
    head_start, head_body = await call(app, http_scope("HEAD"))
    assert head_start["status"] == 200
    assert head_body["body"] == b""
    headers = dict(head_start["headers"])
    assert headers[b"content-type"] == CONTENT_TYPE_LATEST.encode()
    assert int(headers[b"content-length"]) > 0
    assert int(dict(get_start["headers"])[b"content-length"]) == \
        len(get_body_message["body"])


@pytest.mark.anyio
async def test_other_methods_get_405() -> None:
    start, body = await call(metrics_app(Hub()), http_scope("POST"))
    assert start["status"] == 405
    assert dict(start["headers"])[b"allow"] == b"GET, HEAD"
    assert b"405" in body["body"]


@pytest.mark.anyio
async def test_lifespan_is_acknowledged() -> None:
    sent = await call(metrics_app(Hub()), {"type": "lifespan", "asgi": {"version": "3.0"}},
                      [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    assert sent == [{"type": "lifespan.startup.complete"},
                    {"type": "lifespan.shutdown.complete"}]


@pytest.mark.anyio
async def test_a_websocket_scope_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="serves HTTP, not 'websocket'"):
        await call(metrics_app(Hub()), {"type": "websocket", "path": "/"}, [])


@pytest.mark.anyio
async def test_served_by_a_real_server_as_a_route_and_mounted() -> None:
    hub = Hub()
    app = Starlette(
        routes=[WebSocketRoute("/ws", hub.endpoint), Route("/metrics", metrics_app(hub)),
                Mount("/mounted", app=metrics_app(hub, labels={"via": "mount"}))],
        lifespan=hub.lifespan)
    async with serve(app) as ws_url, Player.connect(f"{ws_url}/ws"):
        await wait_for(lambda: hub.stats().connections_total == 1)
        base = ws_url.replace("ws://", "http://")
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            response = await http.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"] == CONTENT_TYPE_LATEST
            result = Scrape(response.text)
            assert result.value("wsroom_connections", state="open") == 1
            assert result.value("wsroom_sessions", state="live") == 1
            assert result.value("wsroom_admitted_connections_total") == 1
            assert "process_cpu_seconds_total" in {name for name, _ in result.samples}

            assert (await http.head("/metrics")).status_code == 200
            posted = await http.post("/metrics", content=b"x")
            assert posted.status_code == 405
            assert posted.headers["allow"] == "GET, HEAD"

            mounted = await http.get("/mounted", follow_redirects=True)
            assert mounted.status_code == 200
            assert Scrape(mounted.text).value("wsroom_admitted_connections_total", via="mount") == 1


@pytest.mark.anyio
async def test_served_alone_with_the_servers_lifespan() -> None:
    hub = filled_hub()
    async with serve(metrics_app(hub)) as ws_url, httpx.AsyncClient(timeout=10) as http:
        response = await http.get(ws_url.replace("ws://", "http://") + "/")
    assert response.status_code == 200
    assert Scrape(response.text).value("wsroom_admitted_connections_total") == 7


# ------------------------------------------------------------------ Histogram


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    histogram = Histogram([1, 2, 4])
    for value in (0.5, 1, 1.5, 2, 4, 4.5, 100):
        histogram.observe(value)
    assert histogram.cumulative() == [(1.0, 2), (2.0, 4), (4.0, 5), (float("inf"), 7)]
    assert histogram.count == 7
    assert histogram.sum == 113.5


@pytest.mark.parametrize("bounds", [[], [2, 1], [1, 1]])
def test_histogram_bounds_must_increase(bounds: list[float]) -> None:
    with pytest.raises(ValueError, match="increasing and not empty"):
        Histogram(bounds)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(bounds=st.lists(finite, min_size=1, max_size=20, unique=True).map(sorted),
       values=st.lists(finite, max_size=100))
def test_histogram_cumulative_property(bounds: list[float], values: list[float]) -> None:
    histogram = Histogram(bounds)
    for value in values:
        histogram.observe(value)
    cumulative = histogram.cumulative()
    assert [bound for bound, _ in cumulative] == [*bounds, float("inf")]
    counts = [count for _, count in cumulative]
    assert counts == sorted(counts)
    assert counts[-1] == histogram.count == len(values)
    for bound, count in cumulative:
        assert count == sum(1 for value in values if value <= bound)
    assert histogram.sum == sum(values, 0.0)


# ------------------------------------------------------------------ without the extra


@pytest.fixture
def without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`wsroom.metrics` reloaded as if prometheus_client were not installed."""
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.setitem(sys.modules, name, None)
    try:
        yield importlib.reload(wsroom.metrics)
    finally:
        monkeypatch.undo()
        importlib.reload(wsroom.metrics)


def test_without_prometheus_client_import_works_and_use_explains(
    without_prometheus_client: Any,
) -> None:
    module = without_prometheus_client
    with pytest.raises(ImportError, match=r"extra\): pip install 'prometheus-client"):
        module.HubCollector(Hub())
    with pytest.raises(ImportError, match=r"extra\): pip install 'prometheus-client"):
        module.metrics_app(Hub())
    # The hub counts all the same.
    hub = Hub()
    hub.telemetry.metrics.heartbeat_rtt.observe(0.01)
    assert hub.telemetry.metrics.heartbeat_rtt.count == 1


def test_the_module_is_whole_again_after_the_reload() -> None:
    assert scrape(single(wsroom.metrics.HubCollector(Hub()))).value("wsroom_rooms") == 0
