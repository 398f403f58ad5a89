"""Admission control: the client's address behind trusted proxies, per-address caps on
open connections and on the connection rate, and the session cap."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from support import MemoryTransport, Player, hub_app, serve, serve_transport, wait_for
from wsroom import Hub, HubConfig
from wsroom._core.admission import Admission, Refusal, TrustedProxies, client_key
from wsroom._runtime.connection import Connection
from wsroom.client._websocket import HandshakeRejected, connect

# ------------------------------------------------------------------ client address

XFF = "x-forwarded-for"


@pytest.mark.parametrize(("peer", "values", "expected"), [
    # A peer that is not a trusted proxy: its own address, whatever the header says.
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
    # nginx appended the client's address: the rightmost untrusted one wins, the
    # entries the client wrote itself (further left) are never believed.
    ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
    ("10.0.0.2", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
    ("10.0.0.2", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # two header lines
    # Two trusted hops (a load balancer in front of nginx).
    ("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.0.0.7"], "198.51.100.1"),
    # Everything trusted: the leftmost.
    ("10.0.0.2", ["10.0.0.8, 10.0.0.7"], "10.0.0.8"),
    # No header from the proxy: the proxy itself.
    ("10.0.0.2", [], "10.0.0.2"),
    # Garbage where an address should be: the hop that wrote it is the client.
    ("10.0.0.2", ["198.51.100.1, unknown"], "10.0.0.2"),
    ("10.0.0.2", ["198.51.100.1, _hidden, 10.0.0.7"], "10.0.0.7"),
    # Ports and IPv6.
    ("10.0.0.2", ["198.51.100.1:5555"], "198.51.100.1"),
    ("10.0.0.2", ["2001:db8::1"], "2001:db8::1"),
    ("10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::1"),
    ("::ffff:10.0.0.2", ["198.51.100.1"], "198.51.100.1"),  # v4-mapped peer
])
def test_the_client_address_comes_from_trusted_proxies_only(
        peer: str, values: list[str], expected: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/24"])
    assert proxies.client_address(peer, values) == expected


def test_the_forwarded_header_of_rfc_7239() -> None:
    proxies = TrustedProxies(["10.0.0.2"], header="forwarded")
    assert proxies.client_address("10.0.0.2", [
        'for=6.6.6.6;proto=https, for="[2001:db8:cafe::17]:4711";by=10.0.0.2',
    ]) == "2001:db8:cafe::17"
    assert proxies.client_address("10.0.0.2", ["For=198.51.100.1"]) == "198.51.100.1"
    assert proxies.client_address("10.0.0.2", ["for=unknown"]) == "10.0.0.2"
    assert proxies.client_address("10.0.0.2", ["proto=https"]) == "10.0.0.2"


def test_without_a_peer_address_the_client_is_unknown() -> None:
    assert TrustedProxies([]).client_address(None, ["1.2.3.4"]) == "unknown"


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("198.51.100.1") == "198.51.100.1"
    assert client_key("unknown") == "unknown"


def test_the_config_checks_proxies_and_header() -> None:
    with pytest.raises(ValueError, match="not an IP address or network"):
        HubConfig(trusted_proxies=["nginx.local"])
    with pytest.raises(TypeError, match="list of addresses"):
        HubConfig(trusted_proxies="10.0.0.1")
    with pytest.raises(ValueError, match="proxy_header"):
        HubConfig(proxy_header="x-real-ip")
    with pytest.raises(ValueError, match="must be positive"):
        HubConfig(max_connections_per_ip=0)
    assert HubConfig(trusted_proxies=["10.0.0.0/8", "::1"]).trusted_proxies == (
        "10.0.0.0/8", "::1")


# ------------------------------------------------------------------ the limits


def test_the_per_address_cap_counts_open_connections() -> None:
    admission = Admission(max_per_ip=2, rate=None, burst=1)
    assert admission.admit("a", 0).refusal is None
    assert admission.admit("a", 0).refusal is None
    assert admission.admit("a", 0).refusal is Refusal.IP_LIMIT
    assert admission.admit("b", 0).refusal is None  # others are not affected
    admission.release("a")
    assert admission.admit("a", 0).refusal is None
    for _ in range(3):
        admission.release("a")
    admission.release("b")
    assert len(admission) == 0  # nothing remembered once everyone left


def test_the_rate_limit_refills_and_says_when() -> None:
    admission = Admission(max_per_ip=None, rate=2.0, burst=3)
    assert [admission.admit("a", 0).refusal for _ in range(3)] == [None] * 3
    refused = admission.admit("a", 0)
    assert refused.refusal is Refusal.IP_RATE
    assert refused.retry_after == 1  # half a second, rounded up to whole seconds
    assert admission.admit("a", 0.49).refusal is Refusal.IP_RATE
    assert admission.admit("a", 0.5).refusal is None  # one token back
    assert admission.admit("b", 0.5).refusal is None


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans(),
                          st.floats(min_value=0, max_value=0.5)), max_size=200))
def test_the_limits_hold_for_any_sequence(steps: list[tuple[str, bool, float]]) -> None:
    """Never more than `max_per_ip` open per key, never more admissions in a window
    than its rate allows (burst + rate * elapsed), whatever the order of events."""
    rate, burst, cap = 4.0, 3, 2
    admission = Admission(max_per_ip=cap, rate=rate, burst=burst)
    now = 0.0
    open_: dict[str, int] = {}
    admitted: dict[str, int] = {}
    for key, connect_, dt in steps:
        now += dt
        if connect_:
            if admission.admit(key, now).refusal is None:
                open_[key] = open_.get(key, 0) + 1
                admitted[key] = admitted.get(key, 0) + 1
        elif open_.get(key):
            open_[key] -= 1
            admission.release(key)
        assert open_.get(key, 0) <= cap
        assert admission.open_count(key) == open_.get(key, 0)
        assert admitted.get(key, 0) <= burst + rate * now + 1e-6


def test_the_rate_table_forgets_clients_that_went_quiet() -> None:
    admission = Admission(max_per_ip=None, rate=10.0, burst=5)
    for index in range(5000):
        key = f"10.{index >> 8}.{index & 255}.1"
        admission.admit(key, index * 0.001)
        admission.release(key)  # short connections
    # Keys swept once refilled (0.5 s): the table stays near the active ones.
    assert len(admission) < 2100


# ------------------------------------------------------------------ the runtime


@pytest.mark.anyio
async def test_a_refusal_sends_429_with_retry_after_before_anything_is_accepted() -> None:
    hub = Hub(HubConfig(max_connections_per_ip=1, connect_rate_per_ip=None))
    async with hub.run():
        first = MemoryTransport()
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_transport, hub, first)
            await wait_for(lambda: first.accepted)
            second = MemoryTransport()
            await serve_transport(hub, second)
            assert second.denied == (429, [("retry-after", "1")])
            assert not second.accepted
            # A server without the denial-response extension: accepted, closed 3504.
            third = MemoryTransport(can_deny=False)
            await serve_transport(hub, third)
            assert third.accepted
            assert third.close_code == 3504
            # Another address is not affected.
            other = MemoryTransport(client=("198.51.100.7", 1))
            tg.start_soon(serve_transport, hub, other)
            await wait_for(lambda: other.accepted)
            assert hub.stats().connections == 2
            await first.client_disconnect(1000)
            await other.client_disconnect(1000)
    for transport in (first, second, third, other):
        transport.close_streams()
    assert hub.stats().closes["ip_limit"] == 2
    assert len(hub._registry.admission) == 0


@pytest.mark.anyio
@pytest.mark.e2e
async def test_per_address_caps_on_a_real_server() -> None:
    """Two open connections per address, the third refused with HTTP 429 and a
    Retry-After; once one leaves, a new one gets in."""
    hub = Hub(HubConfig(max_connections_per_ip=2, connect_rate_per_ip=None))
    async with serve(hub_app(hub)) as url:
        async with Player.connect(url + "/ws") as one, Player.connect(url + "/ws"):
            with pytest.raises(HandshakeRejected) as refused:
                await connect(url + "/ws")
            assert refused.value.status == 429
            assert refused.value.headers.get("retry-after") == "1"
            await one.ws.close()
            await wait_for(lambda: hub.stats().connections == 1)
            async with Player.connect(url + "/ws") as again:
                assert again.welcome is not None
        await wait_for(lambda: hub.stats().connections == 0)
    assert hub.stats().closes["ip_limit"] == 1


@pytest.mark.anyio
@pytest.mark.e2e
async def test_the_connection_rate_per_address_on_a_real_server() -> None:
    hub = Hub(HubConfig(connect_rate_per_ip=0.5, connect_burst_per_ip=3))
    async with serve(hub_app(hub)) as url:
        for _ in range(3):
            async with Player.connect(url + "/ws") as player:
                assert player.welcome is not None
        with pytest.raises(HandshakeRejected) as refused:
            await connect(url + "/ws")
        assert refused.value.status == 429
        assert int(refused.value.headers["retry-after"]) in (1, 2)
        await wait_for(lambda: hub.stats().connections == 0)
    assert hub.stats().closes["ip_rate"] == 1
    assert hub.stats().connections_total == 3


@pytest.mark.anyio
@pytest.mark.e2e
async def test_forged_forwarding_headers_are_ignored_unless_the_peer_is_trusted() -> None:
    """A client that is not a trusted proxy cannot pick its address with
    X-Forwarded-For (to escape its limit, or to exhaust someone else's); a trusted
    proxy's header is believed, per forwarded client."""
    untrusted = Hub(HubConfig(max_connections_per_ip=1, connect_rate_per_ip=None,
                              trusted_proxies=["10.9.9.9"]))
    async with serve(hub_app(untrusted)) as url, \
            Player.connect(url + "/ws", headers=[(XFF, "198.51.100.1")]):
        assert [c.client_address for c in untrusted.connections()] == ["127.0.0.1"]
        with pytest.raises(HandshakeRejected) as refused:
            await connect(url + "/ws", headers=[(XFF, "198.51.100.2")])
        assert refused.value.status == 429

    trusted = Hub(HubConfig(max_connections_per_ip=1, connect_rate_per_ip=None,
                            trusted_proxies=["127.0.0.1"]))
    async with serve(hub_app(trusted)) as url, \
            Player.connect(url + "/ws", headers=[(XFF, "6.6.6.6, 198.51.100.1")]), \
            Player.connect(url + "/ws", headers=[(XFF, "198.51.100.2")]):
        assert sorted(c.client_address for c in trusted.connections()) == [
            "198.51.100.1", "198.51.100.2"]
        with pytest.raises(HandshakeRejected):  # the same forwarded client again
            await connect(url + "/ws", headers=[(XFF, "7.7.7.7, 198.51.100.1")])


# ------------------------------------------------------------------ the session cap


@pytest.mark.anyio
async def test_the_sessions_detached_longest_ago_end_beyond_the_cap() -> None:
    """Clients that drop without coming back (anonymous, or an attacker) cannot grow
    the detached sessions past `max_detached_sessions`: the oldest ends early (one
    presence leave), the newer ones still resume."""
    hub = Hub(HubConfig(max_detached_sessions=2, connect_rate_per_ip=None))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    transports = [MemoryTransport() for _ in range(4)]
    async with hub.run(), anyio.create_task_group() as tg:
        for transport in transports:
            tg.start_soon(serve_transport, hub, transport)
            await transport.client_send({"type": "hello", "v": 1})
            await wait_for(lambda t=transport: bool(t.sent))  # welcomed
        for transport in transports[:3]:
            await transport.client_disconnect(1006)  # lost: detached for the window
        await wait_for(lambda: hub.stats().connections == 1)
        stats = hub.stats()
        assert (stats.sessions, stats.detached_sessions) == (3, 2)
        assert hub.telemetry.metrics.sessions_ended["evicted"] == 1
        roster = {entry.member: entry.status.value for entry in hub.presence("lobby")}
        assert sorted(roster.values()) == ["away", "away", "online"]
        await transports[3].client_disconnect(1000)
        await wait_for(lambda: hub.stats().connections == 0)
    for transport in transports:
        transport.close_streams()


def test_a_proxy_on_a_unix_socket_can_be_trusted() -> None:
    assert TrustedProxies([]).client_address(None, ["198.51.100.1"]) == "unknown"
    unix = TrustedProxies(["unix"])
    assert unix.client_address(None, ["6.6.6.6, 198.51.100.1"]) == "198.51.100.1"
    assert unix.client_address(None, []) == "unknown"
    assert unix.client_address("10.0.0.2", ["198.51.100.1"]) == "10.0.0.2"  # not trusted


@pytest.mark.anyio
async def test_clients_without_an_address_are_not_limited_together() -> None:
    """A Unix socket without a trusted proxy: every client would share one limit."""
    hub = Hub(HubConfig(max_connections_per_ip=1))
    transports = [MemoryTransport(client=None) for _ in range(3)]
    async with hub.run(), anyio.create_task_group() as tg:
        for transport in transports:
            tg.start_soon(serve_transport, hub, transport)
        await wait_for(lambda: all(t.accepted for t in transports))
        assert hub.stats().connections == 3
        for transport in transports:
            await transport.client_disconnect(1000)
    for transport in transports:
        transport.close_streams()
