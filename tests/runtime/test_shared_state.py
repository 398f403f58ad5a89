"""Sessions and presence shared by two hubs over Redis, in one process (asyncio).

Two `Hub`s on `RedisBackplane`s with one key prefix are two workers: a client resumes
on the other worker with exact replay, rosters show the members of both, a session
that moves is dropped by the worker it left, and a worker that stops refreshing is
declared dead (its members away, not gone). The multi-process proof with real uvicorn
workers and SIGKILL is tests/e2e/test_workers_e2e.py.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

from support import MemoryTransport, Peer, serve_transport, wait_for
from support.redis import REDIS_URL, delete_prefix, redis_or_skip
from wsroom import Connection, Handshake, Hub, HubConfig, Identity

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio"])

SECRETS = ["s" * 32]


def make_hub(prefix: str, **config: Any) -> Hub:
    from wsroom.redis import RedisBackplane

    async def authenticate(handshake: Handshake) -> Identity:
        name = str(handshake.auth["name"])
        return Identity(id=name, info={"name": name})

    hub = Hub(HubConfig(resume_secrets=SECRETS, ping_interval=5, pong_timeout=5,
                        connect_rate_per_ip=None, **config),
              authenticate=authenticate,
              backplane=RedisBackplane(REDIS_URL, prefix=prefix))

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("table")

    return hub


TRANSPORTS: list[MemoryTransport] = []


class Client:
    """A client of one hub over an in-memory transport."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.peer: Peer | None = None

    async def connect(self, hub: Hub, tg: anyio.abc.TaskGroup,
                      resume: dict[str, Any] | None = None) -> Peer:
        transport = MemoryTransport()
        TRANSPORTS.append(transport)
        peer = Peer(transport)
        tg.start_soon(serve_transport, hub, transport)
        tg.start_soon(peer.pump)
        hello: dict[str, Any] = {"type": "hello", "v": 1, "auth": {"name": self.name}}
        if resume is not None:
            hello.update(resume)
        await transport.client_send(hello)
        await wait_for(lambda: any(f["type"] == "welcome" for f in peer.frames))
        self.peer = peer
        return peer

    def welcome(self) -> dict[str, Any]:
        assert self.peer is not None
        return next(f for f in self.peer.frames if f["type"] == "welcome")

    def msgs(self) -> list[dict[str, Any]]:
        assert self.peer is not None
        return [f for f in self.peer.frames if f["type"] == "msg" and f["stream"] == "table"]

    def roster(self) -> dict[str, str]:
        """The room's roster as this client knows it: member -> status."""
        assert self.peer is not None
        roster: dict[str, str] = {}
        for frame in self.peer.frames:
            if frame["type"] != "presence" or frame["room"] != "table":
                continue
            if "state" in frame:
                roster = {e["id"]: e["status"] for e in frame["state"]}
            for entry in frame.get("joins", ()):
                roster[entry["id"]] = entry["status"]
            for member in frame.get("leaves", ()):
                roster.pop(member, None)
        return roster

    def left(self) -> list[str]:
        assert self.peer is not None
        return [m for f in self.peer.frames if f["type"] == "presence"
                for m in f.get("leaves", ())]

    def resume(self) -> dict[str, Any]:
        welcome = self.welcome()
        last = self.msgs()[-1]["offset"] if self.msgs() else welcome["streams"]["table"][
            "offset"]
        inbox = welcome["streams"]["@inbox"]
        return {"resume": welcome["resume"], "streams": {
            "table": {"epoch": welcome["streams"]["table"]["epoch"], "offset": last},
            "@inbox": {"epoch": inbox["epoch"], "offset": inbox["offset"]}}}


@asynccontextmanager
async def two_workers(**config: Any) -> AsyncIterator[tuple[Hub, Hub, anyio.abc.TaskGroup]]:
    """Two hubs sharing a Redis prefix of their own (`config`: more HubConfig fields)."""
    redis_or_skip()
    prefix = f"wsroom-test-{secrets.token_hex(4)}"
    a, b = make_hub(prefix, **config), make_hub(prefix, **config)
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(a.run())
            await stack.enter_async_context(b.run())
            tg = await stack.enter_async_context(anyio.create_task_group())
            yield a, b, tg
            tg.cancel_scope.cancel()
    finally:
        for transport in TRANSPORTS:
            transport.close_streams()
        TRANSPORTS.clear()
        delete_prefix(prefix)


@pytest.mark.anyio
async def test_a_client_resumes_on_the_other_worker_with_exact_replay() -> None:
    async with two_workers() as (a, b, tg):
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        # Each sees the other online, whichever worker holds whom.
        await wait_for(lambda: ann.roster() == {"ann": "online", "bob": "online"})
        await wait_for(lambda: bob.roster() == {"ann": "online", "bob": "online"})
        for n in range(5):
            await (a if n % 2 else b).publish("table", "n", n)
        await wait_for(lambda: len(ann.msgs()) == 5 and len(bob.msgs()) == 5)
        assert [m["offset"] for m in ann.msgs()] == [m["offset"] for m in bob.msgs()]

        # Ann's connection to A is lost; she is away for Bob, never gone.
        resume = ann.resume()
        assert ann.peer is not None
        await ann.peer.transport.client_disconnect(1006)
        await wait_for(lambda: bob.roster().get("ann") == "away")
        for n in range(5, 10):
            await b.publish("table", "n", n)

        # She comes back on B: the session moves, the missed messages are replayed.
        again = Client("ann")
        await again.connect(b, tg, resume=resume)
        welcome = again.welcome()
        assert welcome["session"] == ann.welcome()["session"]
        assert welcome["streams"]["table"]["recovered"] is True
        await wait_for(lambda: len(again.msgs()) == 5)
        assert [m["data"] for m in again.msgs()] == [5, 6, 7, 8, 9]
        await wait_for(lambda: bob.roster().get("ann") == "online")
        assert "ann" not in bob.left()
        await wait_for(lambda: a.stats().sessions == 0)  # A forgot the moved session
        assert b.stats().sessions == 2
        assert b.stats().resumes.get("recovered") == 1


@pytest.mark.anyio
async def test_send_to_reaches_a_member_on_the_other_worker() -> None:
    async with two_workers() as (a, b, tg):
        ann = Client("ann")
        await ann.connect(a, tg)
        assert await b.send_to("ann", "whisper", "psst") == 1
        assert ann.peer is not None
        await wait_for(lambda: any(f["type"] == "msg" and f["stream"] == "@inbox"
                                   for f in ann.peer.frames))


@pytest.mark.anyio
async def test_a_session_that_ends_leaves_every_roster_once() -> None:
    async with two_workers() as (a, b, tg):
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        await wait_for(lambda: bob.roster() == {"ann": "online", "bob": "online"})
        assert ann.peer is not None
        await ann.peer.transport.client_disconnect(1000)  # goodbye: the session ends
        await wait_for(lambda: bob.roster() == {"bob": "online"})
        assert bob.left() == ["ann"]
        await wait_for(lambda: a.stats().sessions == 0)


@pytest.mark.anyio
async def test_a_worker_that_stops_refreshing_is_dead_its_members_away_not_gone() -> None:
    async with two_workers() as (a, b, tg):
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        await wait_for(lambda: bob.roster() == {"ann": "online", "bob": "online"})
        resume = ann.resume()

        async def silent(*args: Any) -> None:
            """A worker frozen or killed: it refreshes no more."""

        a.backplane.refresh = silent  # type: ignore[method-assign]
        b.backplane._state.dead_after_ms = 600  # type: ignore[attr-defined]
        await wait_for(lambda: bob.roster().get("ann") == "away", timeout=10)
        await b.publish("table", "n", "while ann's worker was dead")

        again = Client("ann")
        await again.connect(b, tg, resume=resume)
        assert again.welcome()["streams"]["table"]["recovered"] is True
        await wait_for(lambda: [m["data"] for m in again.msgs()] == [
            "while ann's worker was dead"])
        await wait_for(lambda: bob.roster().get("ann") == "online")
        assert bob.left() == []


@pytest.mark.anyio
async def test_disconnect_ends_a_member_on_the_other_worker() -> None:
    """A kick on one worker reaches the member wherever it is connected."""
    async with two_workers() as (a, b, tg):
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        await wait_for(lambda: bob.roster() == {"ann": "online", "bob": "online"})
        assert await b.disconnect("ann", 4501, "kicked") == 1
        assert ann.peer is not None
        assert await ann.peer.wait_closed() == 4501
        await wait_for(lambda: bob.roster() == {"bob": "online"})
        await wait_for(lambda: a.stats().sessions == 0)
        assert bob.left() == ["ann"]


@pytest.mark.anyio
async def test_backplane_events_are_metrics() -> None:
    from wsroom.metrics import HubCollector

    async with two_workers() as (a, _, _tg):
        # Up once its subscriber is connected (on a loaded machine, not at once).
        await wait_for(lambda: a.backplane.healthy)
        a.backplane.stats["reconnects"] += 1  # type: ignore[attr-defined]
        families = {f.name: f for f in HubCollector(a).collect()}
        samples = {s.labels["event"]: s.value
                   for s in families["wsroom_backplane_events"].samples}
        assert samples["reconnects"] == 1
        assert samples["lost"] == 0
        assert [s.value for s in families["wsroom_backplane_up"].samples] == [1]


@pytest.mark.anyio
async def test_late_words_from_the_worker_a_session_left_are_ignored() -> None:
    """A worker that has not yet heard that its session moved may still expire it or
    announce its departure: neither touches the session now held elsewhere."""
    from wsroom._backplane.base import PresenceOp, SessionRecord

    async with two_workers() as (a, b, tg):
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        session = ann.welcome()["session"]
        resume = ann.resume()
        assert ann.peer is not None
        await ann.peer.transport.client_disconnect(1006)
        again = Client("ann")
        await again.connect(b, tg, resume=resume)
        await wait_for(lambda: bob.roster().get("ann") == "online")
        late = a._backplane
        await late.announce(PresenceOp("table", "remove", "ann", session, worker=late.worker))
        await late.announce(PresenceOp("table", "detach", "ann", session, worker=late.worker))
        await late.end_session(session)
        stale = SessionRecord(session, "ann", 1, (1,), ("table",), {})
        assert await late.save_session(stale, 30) is False  # it moved on
        owners = await b.backplane.session_owners([session])
        assert owners == {session: b.backplane.worker}
        await b.publish("table", "n", "after the late words")
        await wait_for(lambda: any(m["data"] == "after the late words" for m in bob.msgs()))
        assert bob.roster().get("ann") == "online"
        assert bob.left() == []


@pytest.mark.anyio
async def test_member_info_is_encoded_like_frames_and_never_blocks_the_outbox() -> None:
    """Identity info with values JSON cannot encode natively (a datetime) travels like
    in frames; a bad value must not stop every later announcement of the worker."""
    import datetime

    async with two_workers() as (a, b, tg):
        original = a._runtime._authenticate
        assert original is not None

        async def with_a_date(handshake: Handshake) -> Identity:
            identity = await original(handshake)
            return Identity(id=identity.id, info={"since": datetime.datetime(2026, 11, 26)})

        a._runtime._authenticate = with_a_date
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        await wait_for(lambda: bob.roster() == {"ann": "online", "bob": "online"})
        assert a._membership.outbox is not None
        assert await a._membership.outbox.flush(5)


@pytest.mark.anyio
async def test_a_resume_on_the_same_worker_while_changes_wait_is_saved_after_the_detach(
) -> None:
    """A save still queued when the client drops, then resumes here: the record must end
    live (a resume after the detach is saved after it), or the shared expiry would end
    the session under a connected client."""
    async with two_workers() as (a, _b, tg):
        assert a._membership.outbox is not None
        ann = Client("ann")
        await ann.connect(a, tg)
        assert await a._membership.outbox.flush(5)
        session_id = ann.welcome()["session"]
        session = a._membership.sessions.get(session_id)
        assert session is not None
        release = anyio.Event()

        async def blocked() -> None:
            await release.wait()

        a._membership.outbox._push(blocked)  # the outbox is busy (a slow Redis, a backlog)
        a._membership.outbox.session_changed(session)  # e.g. a confirm: a save waits
        resume = ann.resume()
        assert ann.peer is not None
        await ann.peer.transport.client_disconnect(1006)
        await wait_for(lambda: a.stats().detached_sessions == 1)
        again = Client("ann")
        await again.connect(a, tg, resume=resume)
        release.set()
        assert await a._membership.outbox.flush(5)
        owners = await a.backplane.session_owners([session_id])
        assert owners == {session_id: a.backplane.worker}


# ------------------------------------------------------------------- no ghosts


def _keys(prefix: str) -> dict[str, int]:
    """Every key under `prefix` with its TTL in ms (-1: none)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return {key: int(client.pttl(key))
                for key in client.scan_iter(match=f"{prefix}:*", count=1000)}
    finally:
        client.close()


def _hkeys(key: str) -> list[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return sorted(client.hkeys(key))
    finally:
        client.close()


def _crash(hub: Hub) -> None:
    """The worker is gone for Redis: no refresh, no handover, no ending (SIGKILL)."""

    async def silent(*args: Any) -> Any:
        return True

    for method in ("refresh", "save_session", "detach_session", "end_session", "announce"):
        setattr(hub.backplane, method, silent)


@pytest.mark.anyio
async def test_every_worker_gone_past_the_session_ttl_then_a_new_one_shows_no_ghost(
) -> None:
    """Every worker dies (no handover), and stays down longer than the sessions'
    records live: nobody could end them, so the roster in Redis still names them. The
    first worker that opens the room again drops them: nobody shows online but the
    newcomer, and the roster key only holds the newcomer."""
    redis_or_skip()
    prefix = f"wsroom-test-{secrets.token_hex(4)}"
    window = 0.5
    names = [f"m{n}" for n in range(5)]
    try:
        async with anyio.create_task_group() as tg:
            old = make_hub(prefix, resume_window=window)
            async with old.run():
                clients = [Client(name) for name in names]
                for client in clients:
                    await client.connect(old, tg)
                await wait_for(lambda: clients[-1].roster() == dict.fromkeys(names,
                                                                             "online"))
                assert old._membership.outbox is not None
                assert await old._membership.outbox.flush(5)
                _crash(old)
            # The records live the session TTL (window + 3 refreshes) after the last
            # refresh; the roster entries outlive them: ghosts, until a worker looks.
            await wait_for(lambda: not any(":sess:" in key for key in _keys(prefix)),
                           timeout=15)
            assert len(_hkeys(f"{prefix}:pres:table")) == 5
            hold = (window + 60) * 1000  # the window and the detached margin
            assert 0 <= _keys(prefix)[f"{prefix}:pres:table"] <= hold

            new = make_hub(prefix, resume_window=window)
            async with new.run():
                carl = Client("carl")
                await carl.connect(new, tg)
                await wait_for(lambda: carl.roster() == {"carl": "online"})
                assert [e.member for e in new.presence("table")] == ["carl"]
                assert _hkeys(f"{prefix}:pres:table") == [carl.welcome()["session"]]
                keys = _keys(prefix)
                assert all(ttl >= 0 for ttl in keys.values()), keys
                await wait_for(lambda: f"{prefix}:wsess:{old.backplane.worker}"
                               not in _keys(prefix), timeout=10)  # reaped
                assert carl.left() == []  # the ghosts were never shown to carl
            tg.cancel_scope.cancel()
    finally:
        for transport in TRANSPORTS:
            transport.close_streams()
        TRANSPORTS.clear()
        delete_prefix(prefix)


@pytest.mark.anyio
async def test_a_ghost_in_a_room_open_on_a_live_worker_leaves_once_without_a_reload(
) -> None:
    """A worker dies and its session's record vanishes before any worker could reap it
    (here: deleted at once): the room stays open on the other worker, which never
    reloads its roster. Its refresh checks the rosters of its rooms in turn: the ghost
    leaves, exactly once."""
    async with two_workers() as (a, b, tg):
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        await wait_for(lambda: bob.roster() == {"ann": "online", "bob": "online"})
        assert a._membership.outbox is not None
        assert await a._membership.outbox.flush(5)
        _crash(a)
        session = ann.welcome()["session"]
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            client.delete(f"{b.backplane._prefix}:sess:{session}")  # type: ignore[attr-defined]
        finally:
            client.close()
        await wait_for(lambda: bob.roster() == {"bob": "online"}, timeout=10)
        await anyio.sleep(1.5)  # more refreshes: still one leave
        assert bob.left() == ["ann"]


@pytest.mark.anyio
async def test_a_live_session_whose_record_expired_is_saved_again_and_never_leaves(
) -> None:
    """A worker that stalled longer than its records live (here: ann's record deleted)
    finds at its next refresh that a live session's record is gone: it saves it again,
    and meanwhile the other worker's roster sweep spares ann (her worker is alive and
    holds her live): Bob never sees her leave."""
    async with two_workers() as (a, b, tg):
        ann, bob = Client("ann"), Client("bob")
        await ann.connect(a, tg)
        await bob.connect(b, tg)
        await wait_for(lambda: bob.roster() == {"ann": "online", "bob": "online"})
        assert a._membership.outbox is not None
        assert await a._membership.outbox.flush(5)
        session = ann.welcome()["session"]
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            client.delete(f"{a.backplane._prefix}:sess:{session}")  # type: ignore[attr-defined]
            await wait_for(lambda: client.exists(
                f"{a.backplane._prefix}:sess:{session}") == 1,  # type: ignore[attr-defined]
                timeout=5)
        finally:
            client.close()
        assert await b.backplane.session_owners([session]) == {session: a.backplane.worker}
        await anyio.sleep(6)  # a sweep of B's rooms (every 5 refreshes) went by
        assert bob.roster() == {"ann": "online", "bob": "online"}
        assert bob.left() == []


@pytest.mark.anyio
async def test_sessions_taken_over_from_another_worker_count_toward_the_members_cap(
        ) -> None:
    """One member opens sessions on A, drops them and resumes each on B: B adopts them,
    and each adoption beyond `max_sessions_per_member` ends the member's oldest session
    on B (a red team's finding: adoptions did not count, and B held any number)."""
    async with two_workers(max_sessions_per_member=2) as (a, b, tg):
        for _ in range(3):
            clients = [Client("mallory") for _ in range(2)]
            for client in clients:
                await client.connect(a, tg)
            resumes = [client.resume() for client in clients]
            for client in clients:
                assert client.peer is not None
                await client.peer.transport.client_disconnect(1006)
            await wait_for(lambda: a.stats().connections == 0)
            for resume in resumes:
                await Client("mallory").connect(b, tg, resume=resume)
            await wait_for(lambda: a.stats().sessions == 0)  # all moved to B
            assert b.stats().sessions <= 2
        assert b.telemetry.metrics.sessions_ended["member_limit"] == 4
