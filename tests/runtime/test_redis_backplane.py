"""RedisBackplane under concurrency and faults (asyncio only: redis-py).

The fault tests run their own ``redis-server`` on a free port (no persistence), which
they kill, restart, stop and continue; the others use the Redis on 127.0.0.1:6379
with a unique key prefix. Without Redis they are skipped, except on CI (CI=true).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import Player, hub_app, serve
from support.redis import REDIS_URL, delete_prefix, redis_or_skip
from wsroom import BackplaneUnavailable, Connection, Envelope, HistoryLimits, Hub, HubConfig
from wsroom._core.protocol import msg_payload
from wsroom.testing import Recorder

pytestmark = pytest.mark.anyio

LIMITS = HistoryLimits()
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py is asyncio-only


@asynccontextmanager
async def backplanes(count: int, url: str = REDIS_URL, **kwargs: Any
                     ) -> AsyncIterator[list[Recorder]]:
    """`count` started RedisBackplanes, bound to recorders."""
    from wsroom.redis import RedisBackplane

    async with AsyncExitStack() as stack:
        tg = await stack.enter_async_context(anyio.create_task_group())
        recorders = []
        for _ in range(count):
            backplane = RedisBackplane(url, **kwargs)
            recorder = Recorder(backplane)
            await backplane.start(tg)
            stack.push_async_callback(backplane.aclose)
            recorders.append(recorder)
        yield recorders


def offsets(envelopes: list[Envelope]) -> list[int]:
    return [e.offset for e in envelopes]


def contiguous_per_epoch(envelopes: list[Envelope]) -> dict[str, list[int]]:
    """The delivered offsets per epoch; each run must be consecutive and epochs must
    not come back once left."""
    runs: dict[str, list[int]] = {}
    current = None
    for envelope in envelopes:
        if envelope.epoch != current:
            assert envelope.epoch not in runs, "an epoch came back"
            current = envelope.epoch
            runs[current] = []
        run = runs[current]
        assert not run or envelope.offset == run[-1] + 1, f"a silent gap: {run[-3:]} " \
            f"then {envelope.offset}"
        run.append(envelope.offset)
    return runs


async def wait_until(predicate: Any, timeout: float = 15) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


# ------------------------------------------------------------ an own redis-server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a free port, without persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_ready(self) -> None:
        import redis

        client = redis.asyncio.Redis.from_url(self.url, socket_timeout=1)
        try:
            with anyio.fail_after(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except (redis.RedisError, OSError):
                        await anyio.sleep(0.02)
        finally:
            await client.aclose()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    async def command(self, *args: Any) -> Any:
        import redis

        client = redis.asyncio.Redis.from_url(self.url, socket_timeout=2,
                                              decode_responses=True)
        try:
            return await client.execute_command(*args)
        finally:
            await client.aclose()


@pytest.fixture
async def server() -> AsyncIterator[RedisServer]:
    if not os.path.exists(REDIS_SERVER):  # noqa: ASYNC240
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed (CI=true)")
        pytest.skip("redis-server is not installed")
    redis_or_skip()
    server = RedisServer()
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
            server.kill()


# --------------------------------------------------------------------- concurrency


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 12),
                               st.sampled_from([0.0, 0.0, 0.001, 0.003])),
                     min_size=1, max_size=5),
       opener=st.integers(0, 2))
async def test_concurrent_publishers_never_duplicate_or_skip_an_offset(
        plan: list[tuple[int, int, float]], opener: int) -> None:
    """Publishers on two instances, in random numbers and paces: the offsets returned
    are exactly 1..N, each instance delivers 1..N in order, and the history holds
    exactly that. `opener`: which instances open the stream first (2: both at once)."""
    redis_or_skip()
    prefix = f"wsroom-test-{secrets.token_hex(6)}"
    try:
        async with backplanes(2, prefix=prefix) as recorders:
            if opener == 2:
                async with anyio.create_task_group() as tg:
                    for recorder in recorders:
                        tg.start_soon(recorder.backplane.open, "room", LIMITS)
            else:
                await recorders[opener].backplane.open("room", LIMITS)
                await recorders[1 - opener].backplane.open("room", LIMITS)
            returned: list[Envelope] = []

            async def publisher(index: int, count: int, pause: float) -> None:
                backplane = recorders[index].backplane
                for n in range(count):
                    returned.append(await backplane.publish(
                        "room", "room", msg_payload("e", [index, n]), limits=LIMITS))
                    if pause:
                        await anyio.sleep(pause)

            async with anyio.create_task_group() as tg:
                for index, count, pause in plan:
                    tg.start_soon(publisher, index, count, pause)
            total = sum(count for _, count, _ in plan)
            assert sorted(offsets(returned)) == list(range(1, total + 1))
            by_offset = sorted(returned, key=lambda e: e.offset)
            for recorder in recorders:
                assert await recorder.wait("room", total) == by_offset
            await anyio.sleep(0.05)
            epoch = by_offset[0].epoch
            for recorder in recorders:
                assert recorder.of("room") == by_offset
                assert recorder.lost == []
                recovery = await recorder.backplane.since("room", epoch, 0)
                assert recovery.recovered
                assert recovery.frames == tuple(e.frame for e in by_offset)
    finally:
        delete_prefix(prefix)


async def test_bytes_are_accounted_as_frame_sizes(prefix: str) -> None:
    """The meta's byte count is the sum of the retained frames' sizes."""
    limits = HistoryLimits(max_bytes=2000)
    async with backplanes(1, prefix=prefix) as (recorder,):
        await recorder.backplane.open("room", limits)
        envelopes = [await recorder.backplane.publish(
            "room", "room", msg_payload("e", "é" * n), limits=limits) for n in range(40)]
        import redis

        client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            meta = client.hgetall(f"{prefix}:{{room}}:m")
            ids = [entry_id for entry_id, _ in client.xrange(f"{prefix}:{{room}}:s")]
        finally:
            client.close()
        kept = [e for e in envelopes if f"{e.offset}-0" in ids]
        assert [f"{e.offset}-0" for e in kept] == ids
        assert kept[-1] is envelopes[-1]
        assert int(meta["b"]) == sum(e.size for e in kept) <= 2000
        assert sum(e.size for e in envelopes[-len(kept) - 1:]) > 2000


async def test_start_refuses_trio() -> None:
    """redis-py runs on asyncio only: a clear error on trio."""
    redis_or_skip()
    from wsroom.redis import RedisBackplane

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            with pytest.raises(RuntimeError, match="asyncio only"):
                await RedisBackplane().start(tg)

    await anyio.to_thread.run_sync(lambda: anyio.run(main, backend="trio"))


# -------------------------------------------------------------------------- faults


async def test_redis_restarted_mid_stream(server: RedisServer) -> None:
    """SIGKILL while a publisher runs, then a restart without data: publishes fail
    meanwhile, health goes down and up, the open streams are lost (new epoch), no
    offset is reused within an epoch and no delivery skips silently."""
    async with backplanes(2, server.url, ping_interval=0.2, ping_timeout=1.0) as (a, b):
        epoch, _ = await a.backplane.open("room", LIMITS)
        await b.backplane.open("room", LIMITS)
        returned: list[Envelope] = []
        failures = 0
        health: list[tuple[bool, bool]] = []
        stop = anyio.Event()

        async def publisher() -> None:
            nonlocal failures
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    returned.append(await a.backplane.publish(
                        "room", "room", msg_payload("e", n), limits=LIMITS))
                except BackplaneUnavailable:
                    failures += 1
                await anyio.sleep(0.005)

        async def watch() -> None:
            while not stop.is_set():
                state = (a.backplane.healthy, b.backplane.healthy)
                if not health or health[-1] != state:
                    health.append(state)
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            tg.start_soon(watch)
            await wait_until(lambda: len(returned) >= 30)
            server.kill()
            await wait_until(lambda: not a.backplane.healthy and not b.backplane.healthy)
            before = failures
            await wait_until(lambda: failures >= before + 3)
            server.start()
            await server.wait_ready()
            await wait_until(lambda: a.backplane.healthy and b.backplane.healthy)
            count = len(returned)
            await wait_until(lambda: len(returned) >= count + 30)
            stop.set()
        assert failures >= 3
        assert health[0] == (True, True)
        assert (False, False) in health
        assert health[-1] == (True, True)
        assert a.lost
        assert b.lost
        assert set(a.lost) == set(b.lost) == {"room"}
        epochs = list(dict.fromkeys(e.epoch for e in returned))
        assert epochs[0] == epoch
        assert len(epochs) == 2, "one new epoch after the restart"
        for each in epochs:  # one publisher: 1, 2, 3, ... in each epoch, never reused
            assert offsets([e for e in returned if e.epoch == each]) == list(
                range(1, 1 + sum(e.epoch == each for e in returned)))
        for recorder in (a, b):
            runs = contiguous_per_epoch(recorder.of("room"))
            assert list(runs) == epochs
            assert runs[epoch][0] == 1
            # The last messages of the new epoch arrived.
            assert runs[epochs[1]][-1] == returned[-1].offset
        # Everything published before the kill was delivered on both.
        acked = [e.offset for e in returned if e.epoch == epoch]
        assert offsets(a.of("room"))[:len(acked)] == acked
        assert b.backplane.stats["lost"] >= 1
        assert a.backplane.stats["publish_errors"] == failures


async def test_subscriber_killed_catches_up_from_history(server: RedisServer) -> None:
    """CLIENT KILL TYPE pubsub while messages flow: both subscribers reconnect and
    catch up from the history; nobody is told to resume; every message once, in
    order."""
    async with backplanes(2, server.url, ping_interval=0.2, ping_timeout=1.0) as (a, b):
        await a.backplane.open("room", LIMITS)
        await b.backplane.open("room", LIMITS)
        returned: list[Envelope] = []
        stop = anyio.Event()

        async def publisher() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                returned.append(await a.backplane.publish(
                    "room", "room", msg_payload("e", n), limits=LIMITS))
                await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            for kills in range(1, 4):
                await wait_until(lambda: len(returned) >= 20)
                killed = await server.command("CLIENT", "KILL", "TYPE", "pubsub")
                assert killed == 2
                await wait_until(lambda kills=kills: all(
                    r.backplane.healthy and r.backplane.stats["reconnects"] == kills
                    for r in (a, b)))
                returned_now = len(returned)
                await wait_until(lambda: len(returned) >= returned_now + 20)  # noqa: B023
            stop.set()
        total = len(returned)
        assert offsets(returned) == list(range(1, total + 1))
        for recorder in (a, b):
            assert offsets(await recorder.wait("room", total)) == list(range(1, total + 1))
            assert recorder.lost == []
            assert recorder.backplane.stats["reconnects"] == 3
        assert b.backplane.stats["caught_up"] >= 1


async def test_subscriber_killed_too_long_for_the_history_is_lost(
        server: RedisServer) -> None:
    """The same, but more was published meanwhile than the history keeps: the
    stream is lost there (its clients resume), and delivery goes on after it."""
    limits = HistoryLimits(max_messages=3)
    async with backplanes(2, server.url, ping_interval=0.2, ping_timeout=1.0) as (a, b):
        await a.backplane.open("room", limits)
        epoch, _ = await b.backplane.open("room", limits)
        for n in range(5):
            await a.backplane.publish("room", "room", msg_payload("e", n), limits=limits)
        await b.wait("room", 5)
        assert await server.command("CLIENT", "KILL", "TYPE", "pubsub") == 2
        for n in range(5, 45):  # faster than a reconnection (>= 50 ms)
            await a.backplane.publish("room", "room", msg_payload("e", n), limits=limits)
        await wait_until(lambda: b.backplane.healthy and b.lost == ["room"])
        await a.backplane.publish("room", "room", msg_payload("e", 45), limits=limits)
        await b.wait("room", 6)
        assert offsets(b.of("room")) == [1, 2, 3, 4, 5, 46]
        assert {e.epoch for e in b.of("room")} == {epoch}
        assert b.backplane.stats["lost"] == 1
        # `a` delivered its own publishes as they were made: nothing to catch up.
        assert offsets(a.of("room")) == list(range(1, 47))
        assert a.lost == []


async def test_half_open_subscriber_connection_is_detected(server: RedisServer) -> None:
    """Redis stopped (SIGSTOP): the socket stays open but nothing answers. The PINGs
    find out (healthy goes False) within ping_timeout; after SIGCONT it recovers."""
    async with backplanes(2, server.url, ping_interval=0.2, ping_timeout=1.0) as (a, b):
        await a.backplane.open("room", LIMITS)
        await b.backplane.open("room", LIMITS)
        await a.backplane.publish("room", "room", msg_payload("e", 1), limits=LIMITS)
        await b.wait("room", 1)
        server.signal(signal.SIGSTOP)
        started = anyio.current_time()
        try:
            await wait_until(lambda: not a.backplane.healthy and not b.backplane.healthy,
                             timeout=10)
            detected = anyio.current_time() - started
            assert detected < 1.0 + 0.2 + 1.0  # ping_timeout + ping_interval + slack
            await anyio.sleep(1.5)  # reconnection attempts against a stopped server
            assert not a.backplane.healthy
        finally:
            server.signal(signal.SIGCONT)
        await wait_until(lambda: a.backplane.healthy and b.backplane.healthy)
        await a.backplane.publish("room", "room", msg_payload("e", 2), limits=LIMITS)
        for recorder in (a, b):
            assert offsets(await recorder.wait("room", 2)) == [1, 2]
            assert recorder.lost == []
            assert recorder.backplane.stats["reconnects"] >= 1


# ----------------------------------------------------------------- two real hubs


async def test_two_hubs_share_a_room_through_redis(prefix: str) -> None:
    """Clients of one room on two hubs (two uvicorn servers, two RedisBackplanes)
    receive what either hub publishes, in one order, without gaps."""
    from wsroom.redis import RedisBackplane

    secret = secrets.token_bytes(32)
    hubs = [Hub(HubConfig(ping_interval=5, pong_timeout=5, resume_secrets=[secret]),
                backplane=RedisBackplane(REDIS_URL, prefix=prefix)) for _ in range(2)]
    for hub in hubs:
        @hub.on_connect
        async def join(conn: Connection) -> None:
            await conn.join("room")

    async with AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve(hub_app(hub))) for hub in hubs]
        players = [await stack.enter_async_context(Player.connect(url + "/ws"))
                   for url in urls for _ in range(2)]
        for hub in hubs:
            assert hub.ready
        for player in players:
            assert player.welcome is not None
            assert player.welcome["streams"]["room"]["offset"] == 0
        epoch = players[0].welcome["streams"]["room"]["epoch"]  # type: ignore[index]

        async def publisher(index: int) -> None:
            for n in range(25):
                await hubs[index].publish("room", "e", [index, n])
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher, 0)
            tg.start_soon(publisher, 1)
        seen = []
        for player in players:
            msgs = await player.collect(50)
            assert [m["offset"] for m in msgs] == list(range(1, 51))
            assert {m["epoch"] for m in msgs} == {epoch}
            seen.append([tuple(m["data"]) for m in msgs])
        assert all(order == seen[0] for order in seen)
        assert sorted(seen[0]) == sorted((i, n) for i in range(2) for n in range(25))


# -------------------------------------------------------------------- shared state

SHARED_CALLS: list[tuple[str, tuple[Any, ...], str]] = [
    ("save_session", ("RECORD", 30), "saving a session"),
    ("claim_session", ("s1", "ann", 1, 30), "claiming a session"),
    ("detach_session", ("s1", 60), "detaching a session"),
    ("end_session", ("s1",), "ending a session"),
    ("announce", ("OP",), "announcing a roster change"),
    ("roster", ("lobby",), "roster of room 'lobby'"),
    ("refresh", (["s1"], 30, 60), "liveness refresh"),
    ("session_owners", (["s1"],), "session owners"),
    ("disconnect_sessions", (["s1"], 4000, "bye"), "disconnecting sessions"),
    ("member_sessions", ("ann",), "sessions of member 'ann'"),
]


def _args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    from wsroom import PresenceOp, SessionRecord

    fill = {"RECORD": SessionRecord("s1", "ann", 1, (1,), ()),
            "OP": PresenceOp("lobby", "attach", "ann", "s1")}
    return tuple(fill.get(arg, arg) if isinstance(arg, str) else arg for arg in args)


@pytest.mark.parametrize(("method", "args", "what"), SHARED_CALLS,
                         ids=[call[0] for call in SHARED_CALLS])
async def test_shared_state_errors_are_backplane_unavailable(
        method: str, args: tuple[Any, ...], what: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every shared-state operation maps a Redis or socket error the same way: a
    warning, and BackplaneUnavailable naming what failed; no counter moves."""
    redis_or_skip()
    from wsroom import SharedState
    from wsroom.redis import RedisBackplane

    idle = RedisBackplane(f"redis://127.0.0.1:{free_port()}/0")
    assert isinstance(idle, SharedState)
    assert idle.shared
    with pytest.raises(RuntimeError, match="not started"):
        await getattr(idle, method)(*_args(args))
    async with backplanes(1, f"redis://127.0.0.1:{free_port()}/0") as (recorder,):
        backplane = recorder.backplane
        assert not backplane.healthy  # nothing listens there
        before = dict(backplane.counters())
        caplog.clear()
        with pytest.raises(BackplaneUnavailable, match=f"^Redis: {what} failed: ") as info:
            await getattr(backplane, method)(*_args(args))
        assert info.value.__cause__ is not None
        assert [r.getMessage() for r in caplog.records if r.name == "wsroom.redis"
                and r.getMessage().startswith(f"redis backplane: {what} failed: ")]
        assert backplane.counters() == before
        assert recorder.events.count(("reannounce",)) == 0


# ------------------------------------------------------------------- keys and TTLs


async def key_ttls(prefix: str) -> dict[str, int]:
    """Every key under `prefix`, with its TTL in ms (-1: none)."""
    import redis

    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        return {key: int(await client.pttl(key)) for key in keys}
    finally:
        await client.aclose()


async def redis_command(*args: Any) -> Any:
    import redis

    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


def record(session: str, member: str = "ann", rooms: tuple[str, ...] = ("lobby",)
           ) -> Any:
    from wsroom import SessionRecord

    return SessionRecord(session, member, 1, (1,), rooms, {"name": member})


async def test_a_sessions_keys_live_as_its_record_and_go_when_it_ends(prefix: str) -> None:
    """The record, the member's session set, the worker's set and the inbox stream
    (history and meta) all live as long as the session may still be resumed, and are
    deleted when it ends; the roster entry goes with a single remove."""
    from wsroom import PresenceOp

    async with backplanes(1, prefix=prefix) as (rec,):
        bp = rec.backplane
        state = rec.state
        inbox = "@inbox/s1"
        await bp.open(inbox, LIMITS)
        await bp.open("lobby", LIMITS)
        assert await state.save_session(record("s1"), 5)
        await state.announce(PresenceOp("lobby", "attach", "ann", "s1", worker=bp.worker))
        await bp.publish(inbox, "@inbox", msg_payload("note", 1), limits=LIMITS)
        await bp.publish("lobby", "lobby", msg_payload("e", 1), limits=LIMITS)
        ttls = await key_ttls(prefix)
        p = prefix
        hold = 120_000 + 60_000  # the default window and the detached margin
        assert set(ttls) == {f"{p}:sess:s1", f"{p}:member:ann", f"{p}:wsess:{bp.worker}",
                             f"{p}:{{{inbox}}}:s", f"{p}:{{{inbox}}}:m", f"{p}:pres:lobby",
                             f"{p}:seq", f"{p}:{{lobby}}:s", f"{p}:{{lobby}}:m"}
        assert all(ttl >= 0 for ttl in ttls.values()), ttls
        assert ttls[f"{p}:sess:s1"] <= 5000
        # An inbox never lives for meta_ttl: at most hold, and not less than its record.
        for key in (f"{p}:member:ann", f"{p}:{{{inbox}}}:m"):
            assert 5000 <= ttls[key] <= hold
        assert ttls[f"{p}:{{{inbox}}}:s"] <= LIMITS.max_age * 1000
        for key in (f"{p}:wsess:{bp.worker}", f"{p}:pres:lobby", f"{p}:seq"):
            assert ttls[key] <= hold

        await redis_command("PEXPIRE", f"{p}:{{{inbox}}}:m", 6000)
        await redis_command("PEXPIRE", f"{p}:{{{inbox}}}:s", 6000)
        await bp.refresh(["s1"], 5, 2)  # the window is 2 s now
        hold = 2000 + 60_000
        ttls = await key_ttls(prefix)
        assert ttls[f"{p}:workers"] <= hold
        for key in (f"{p}:member:ann", f"{p}:{{{inbox}}}:m", f"{p}:{{{inbox}}}:s"):
            assert 6000 < ttls[key] <= hold  # refreshed with the record

        await state.detach_session("s1", 2)
        ttls = await key_ttls(prefix)
        keep = 2000 + 60_000  # the window and the margin: the record outlives its due
        for key in (f"{p}:sess:s1", f"{p}:{{{inbox}}}:m", f"{p}:{{{inbox}}}:s"):
            assert 5000 < ttls[key] <= keep
        assert 0 <= ttls[f"{p}:detached"] <= keep

        await bp.close(inbox)
        await state.end_session("s1")
        ttls = await key_ttls(prefix)
        assert set(ttls) == {f"{p}:seq", f"{p}:workers", f"{p}:{{lobby}}:s",
                             f"{p}:{{lobby}}:m"}
        assert all(ttl >= 0 for ttl in ttls.values()), ttls


async def test_a_roster_read_drops_sessions_whose_record_is_gone(prefix: str) -> None:
    """A record that expired while no worker could end its session (every worker was
    down) leaves a ghost in the roster: reading the roster removes it, with exactly one
    ``remove`` published, and the roster key goes with its last entry."""
    from wsroom import PresenceOp

    async with backplanes(2, prefix=prefix) as (a, b):
        await b.backplane.open("lobby", LIMITS)  # b hears the room's roster changes
        for sid, member in (("s1", "ann"), ("s2", "bob")):
            assert await a.state.save_session(record(sid, member), 30)
            await a.state.announce(PresenceOp("lobby", "attach", member, sid,
                                              worker=a.backplane.worker))
        await redis_command("DEL", f"{prefix}:sess:s1")  # expired
        roster = await b.state.roster("lobby")
        assert [(op.kind, op.session) for op in roster] == [("attach", "s2")]
        assert await b.state.roster("lobby") == roster  # already gone
        await b.event("presence", PresenceOp("lobby", "remove", "ann", "s1"))
        removes = [e for e in b.events if e[0] == "presence"
                   and e[1].kind == "remove"]  # type: ignore[union-attr]
        assert len(removes) == 1
        await redis_command("DEL", f"{prefix}:sess:s2")
        assert await a.state.roster("lobby") == []
        assert f"{prefix}:pres:lobby" not in await key_ttls(prefix)


async def test_a_roster_entry_without_a_record_is_spared_for_a_grace_period(
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry announced before its session's record exists (the hub always saves
    first; a direct caller of the API may not) is kept for `UNSAVED_GRACE_MS`, then
    pruned like any entry whose record is gone. A remove always applies."""
    from wsroom import PresenceOp
    from wsroom._backplane import redis_state

    async with backplanes(1, prefix=prefix) as (a,):
        me = a.backplane.worker
        ann = PresenceOp("lobby", "attach", "ann", "s1", {"name": "Ann"}, worker=me)
        await a.state.announce(ann)
        assert await a.state.roster("lobby") == [ann]  # within the grace period
        monkeypatch.setattr(redis_state, "UNSAVED_GRACE_MS", 0)
        await anyio.sleep(0.01)
        assert await a.state.roster("lobby") == []
        assert f"{prefix}:pres:lobby" not in await key_ttls(prefix)
        assert await a.state.save_session(record("s1"), 30)
        await a.state.announce(ann)
        await redis_command("DEL", f"{prefix}:sess:s1")
        await a.state.announce(PresenceOp("lobby", "remove", "ann", "s1", worker=me))
        assert f"{prefix}:pres:lobby" not in await key_ttls(prefix)


async def test_a_refresh_prunes_the_rosters_of_the_rooms_open_here(prefix: str) -> None:
    """A ghost in a room that stays open on a live worker (nobody reloads its roster)
    goes at the next refresh (the rooms open here are checked in turn), and the
    roster of a room open here lives on. A session that a live worker still holds
    live keeps its entry even if its record vanished."""
    from wsroom import PresenceOp

    async with backplanes(1, prefix=prefix) as (a,):
        bp, me = a.backplane, a.backplane.worker
        await bp.open("lobby", LIMITS)
        for sid, member in (("s1", "ann"), ("s2", "bob"), ("s3", "cid")):
            assert await a.state.save_session(record(sid, member), 30)
            await a.state.announce(PresenceOp("lobby", "attach", member, sid, worker=me))
        await a.state.detach_session("s1", 2)
        await redis_command("DEL", f"{prefix}:sess:s1")  # detached, then expired
        # Live here, and this worker alive: kept even without its record (a stall
        # longer than the record's TTL; the worker saves it again).
        await redis_command("DEL", f"{prefix}:sess:s3")
        await redis_command("PEXPIRE", f"{prefix}:pres:lobby", 1000)
        await bp.refresh(["s2", "s3"], 30, 2)
        entries = await redis_command("HKEYS", f"{prefix}:pres:lobby")
        assert sorted(entries) == ["s2", "s3"]
        assert (await key_ttls(prefix))[f"{prefix}:pres:lobby"] > 1000  # held here
        await a.event("presence", PresenceOp("lobby", "remove", "ann", "s1"))


async def test_the_roster_sweep_takes_the_open_rooms_in_turn_within_a_budget(
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep checks rooms until its budget of roster entries is spent (at least one
    room, however large), and the next sweep goes on from the next room; a refresh out
    of `SWEEP_EVERY` sweeps."""
    from wsroom import PresenceOp
    from wsroom._backplane import redis_state

    monkeypatch.setattr(redis_state, "PRUNE_BUDGET", 1)
    async with backplanes(1, prefix=prefix) as (a,):
        bp, me = a.backplane, a.backplane.worker
        rooms = ["r0", "r1", "r2"]
        for n, room in enumerate(rooms):
            await bp.open(room, LIMITS)
            assert await a.state.save_session(record(f"s{n}", f"m{n}", (room,)), 30)
            await a.state.announce(PresenceOp(room, "attach", f"m{n}", f"s{n}", worker=me))
            await a.state.detach_session(f"s{n}", 2)
            await redis_command("DEL", f"{prefix}:sess:s{n}")

        async def left() -> list[str]:
            return [room for room in rooms if f"{prefix}:pres:{room}" in await key_ttls(prefix)]

        await bp.refresh([], 30, 2)  # sweeps r0 (its one entry spends the budget)
        assert await left() == ["r1", "r2"]
        for _ in range(redis_state.SWEEP_EVERY - 1):
            await bp.refresh([], 30, 2)  # no sweep
        assert await left() == ["r1", "r2"]
        await bp.refresh([], 30, 2)
        assert await left() == ["r2"]


async def test_a_lost_record_of_a_live_session_makes_the_worker_announce_again(
        prefix: str) -> None:
    """A record this worker saved for a session it still holds live is gone (it
    expired while the worker stalled, or Redis lost its data): the refresh asks the
    hub to announce everything again (which saves it again). A session not saved yet
    (its welcome's save still queued) does not."""
    async with backplanes(1, prefix=prefix) as (a,):
        bp = a.backplane
        assert await a.state.save_session(record("s1"), 30)
        await bp.refresh(["s1", "s2"], 30, 2)  # new worker: announces once
        assert a.events.count(("reannounce",)) == 1
        await bp.refresh(["s1", "s2"], 30, 2)  # s2 was never saved: nothing lost
        assert a.events.count(("reannounce",)) == 1
        await redis_command("DEL", f"{prefix}:sess:s1")
        await bp.refresh(["s1", "s2"], 30, 2)
        assert a.events.count(("reannounce",)) == 2


async def test_live_sessions_inboxes_are_lengthened_a_slice_per_refresh(
        prefix: str) -> None:
    """The inboxes and member sets of live sessions get the hold TTL a slice of the
    sessions per refresh, so that each gets it within a quarter of (hold - ttl): no
    refresh touches them all, and none lives shorter than its record."""
    async with backplanes(1, prefix=prefix) as (a,):
        bp = a.backplane
        sids = [f"s{n}" for n in range(40)]
        for sid in sids:
            assert await a.state.save_session(record(sid, f"m-{sid}"), 5)
            await redis_command("HSET", f"{prefix}:{{@inbox/{sid}}}:m", "e", "x")
            await redis_command("PEXPIRE", f"{prefix}:{{@inbox/{sid}}}:m", 6000)
        clock = [1_000_000]
        bp._state._now_ms = lambda: clock[0]  # type: ignore[attr-defined]
        rounds = ((2000 + 60_000 - 5000) // 4) // 1000  # 14 refreshes, 1 s apart
        lengthened: list[int] = []
        for _ in range(rounds):
            clock[0] += 1000
            await bp.refresh(sids, 5, 2)
            ttls = await key_ttls(prefix)
            lengthened.append(sum(ttls[f"{prefix}:{{@inbox/{sid}}}:m"] > 6000
                                  for sid in sids))
        assert lengthened[0] <= -(-len(sids) // rounds) + 1
        assert lengthened[-1] == len(sids)
        ttls = await key_ttls(prefix)
        assert all(ttls[f"{prefix}:member:m-{sid}"] > 5000 for sid in sids)


async def test_when_every_worker_is_gone_only_room_metas_outlive_hold(
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker gone without a word (no detach, no end): within hold (here the
    margin is shortened to 0.5 s, so hold is 1 s) every key of the shared state and of
    the inboxes expires by itself; what is left is each room's meta (`meta_ttl`) and
    its history (`max_age`)."""
    from wsroom import PresenceOp
    from wsroom._backplane import redis_state

    monkeypatch.setattr(redis_state, "KEEP_MARGIN_MS", 500)
    short = HistoryLimits(max_age=30)
    async with backplanes(1, prefix=prefix) as (a,):
        bp, me = a.backplane, a.backplane.worker
        await bp.open("lobby", short)
        await bp.open("@inbox/s1", short)
        assert await a.state.save_session(record("s1"), 1)
        await a.state.announce(PresenceOp("lobby", "attach", "ann", "s1", worker=me))
        await bp.publish("@inbox/s1", "@inbox", msg_payload("note", 1), limits=short)
        await bp.publish("lobby", "lobby", msg_payload("e", 1), limits=short)
        await bp.refresh(["s1"], 1, 0.5)  # hold: max(1 s, 0.5 s + 0.5 s)
        await a.state.announce(PresenceOp("lobby", "attach", "ann", "s1", worker=me))
        await bp.refresh(["s1"], 1, 0.5)
        ttls = await key_ttls(prefix)
        assert all(ttl >= 0 for ttl in ttls.values()), ttls
    with anyio.fail_after(5):
        while set(await key_ttls(prefix)) != {f"{prefix}:{{lobby}}:m",
                                              f"{prefix}:{{lobby}}:s"}:
            await anyio.sleep(0.1)
