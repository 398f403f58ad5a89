"""Several worker processes behind a load balancer, sharing a Redis (issue 6).

Two uvicorn processes run tests/apps/worker_app.py on one `RedisBackplane` prefix (unique
per test) with the same ``resume_secrets``. In front of them a small TCP load balancer
(`Balancer`, in this process) has one listening port per route: route "a" forwards to
worker A, route "b" to worker B. Clients are `wsroom.client.Client`s on the balancer.

The main test kills worker A with SIGKILL and checks what the docs promise (scaling.md,
recovery.md): A's members turn *away* for the others (never a leave), A's clients resume
on B once the balancer sends them there, and each gets every message published
meanwhile, exactly once and in order, with ``recovered: true``. A second test sends
personal messages (`Hub.send_to`) across workers; a third checks that an idle worker's
Redis subscriber stays connected and the worker ready (a readiness probe must not flap:
redis-py 8's RESP3 once hid the subscriber's pongs, and it reconnected every 3 s).

asyncio only (redis-py). Uses the Redis on 127.0.0.1:6379 ($WSROOM_REDIS_URL); without
it the tests are skipped, except on CI (CI=true), where they fail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskGroup

from support import ServerProcess, spawn
from support.redis import REDIS_URL
from wsroom.client import Client, Message

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ROOM = "table"
SECRET = "worker-e2e-secret-0123456789abcdef"
CONFIG = {"resume_secrets": [SECRET], "ping_interval": 1.0, "pong_timeout": 2.0,
          "resume_window": 30.0}
FAILOVER_DELAY = 6.0
"""Seconds from worker A's death until the balancer sends A's clients to B."""
AWAY_BOUND = 6.0
"""A dead worker's members must show away within this (dead after 3 s without a
refresh, refreshes every 1 s, plus scheduling slack on a loaded machine)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py is asyncio-only


# ------------------------------------------------------------------ the balancer


class Balancer:
    """A TCP load balancer with one listening port per route. A route forwards each new
    connection to its backend port, or, while it has none (its backend is down and no
    other was chosen yet), accepts and closes it at once, so that clients back off and
    retry. A connection forwarded to a backend lasts as long as both of its ends."""

    def __init__(self, tg: TaskGroup) -> None:
        self._tg = tg
        self.routes: dict[str, int | None] = {}
        self.ports: dict[str, int] = {}
        self.refused: Counter[str] = Counter()
        self.forwarded: Counter[tuple[str, int]] = Counter()

    async def add(self, route: str, backend: int) -> str:
        """Listen for `route`; return its ``ws://`` URL."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(SocketAttribute.local_port)
        self.routes[route], self.ports[route] = backend, port

        async def serve() -> None:
            async with listener:
                await listener.serve(lambda stream: self._handle(route, stream))

        self._tg.start_soon(serve)
        return f"ws://127.0.0.1:{port}/ws"

    def down(self, route: str) -> None:
        """The route's backend failed its health check: refuse until `fail_over`."""
        self.routes[route] = None

    def fail_over(self, route: str, backend: int, after: float) -> None:
        """Refuse `route` now; send it to `backend` `after` seconds from now."""
        self.down(route)

        async def later() -> None:
            await anyio.sleep(after)
            self.routes[route] = backend

        self._tg.start_soon(later)

    async def _handle(self, route: str, client: SocketStream) -> None:
        async with client:
            backend = self.routes[route]
            if backend is None:
                self.refused[route] += 1
                return
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", backend)
            except OSError:
                self.refused[route] += 1
                return
            self.forwarded[route, backend] += 1
            async with upstream, anyio.create_task_group() as tg:
                async def pipe(source: SocketStream, sink: SocketStream) -> None:
                    try:
                        async for chunk in source:
                            await sink.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    finally:
                        tg.cancel_scope.cancel()  # one end is gone: close both

                tg.start_soon(pipe, client, upstream)
                tg.start_soon(pipe, upstream, client)


@asynccontextmanager
async def balancer() -> AsyncIterator[Balancer]:
    async with anyio.create_task_group() as tg:
        yield Balancer(tg)
        tg.cancel_scope.cancel()


# ------------------------------------------------------------------ the clients


class Recorder(Client):
    """A `Client` that also keeps, through its ``on_frame`` callback, every presence
    frame (with its arrival time), every raw ``msg`` frame (before the client's own
    de-duplication) and every welcome."""

    def __init__(self, url: str, name: str, **kwargs: Any) -> None:
        super().__init__(url, auth={"name": name}, min_backoff=0.2, max_backoff=1.0,
                         on_frame=self.frame, **kwargs)
        self.name = name
        self.presence_log: list[tuple[float, dict[str, Any]]] = []
        self.raw: list[dict[str, Any]] = []
        self.welcomes: list[dict[str, Any]] = []
        self.raw_at_welcome: list[int] = []  # len(raw) at each welcome
        self.received: list[Message] = []

    def frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "presence":
            self.presence_log.append((anyio.current_time(), frame))
        elif kind == "msg":
            self.raw.append(frame)
        elif kind == "welcome":
            self.welcomes.append(frame)
            self.raw_at_welcome.append(len(self.raw))

    async def consume(self) -> None:
        async for item in self.messages():
            assert isinstance(item, Message), f"{self.name}: unexpected {item}"
            self.received.append(item)

    def room(self) -> list[Message]:
        return [m for m in self.received if m.stream == ROOM]

    def status(self, member: str) -> str | None:
        entry = self.presence.get(ROOM, {}).get(member)
        return None if entry is None else str(entry["status"])

    def describe(self) -> str:
        frames = "\n    ".join(f"{at:.2f} {frame}" for at, frame in self.presence_log)
        return (f"{self.name}: connects={self.connects} attempts={self.attempts} "
                f"session={self.session} closed={self.closed}\n"
                f"  welcomes: {self.welcomes}\n  presence frames:\n    {frames}")


async def eventually(predicate: Callable[[], bool], timeout: float, what: str,
                     diagnose: Callable[[], str] = lambda: "") -> None:
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)
        return
    pytest.fail(f"not within {timeout}s: {what}\n{diagnose()}")


async def start(stack: AsyncExitStack, tg: TaskGroup,
                clients: list[Recorder]) -> None:
    """Connect `clients`, each consuming in `tg`, and wait until all are welcomed."""
    for client in clients:
        await stack.enter_async_context(client)
        tg.start_soon(client.consume)
    with anyio.fail_after(15):
        for client in clients:
            await client.wait_connected()


def http_url(server: ServerProcess) -> str:
    return server.url.replace("ws://", "http://")


def port_of(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def publish(http: httpx.AsyncClient, server: ServerProcess, tag: str,
                  n: int = 1) -> list[int]:
    response = await http.get(http_url(server) + "/publish", params={"n": n, "tag": tag})
    response.raise_for_status()
    return list(response.json()["offsets"])


async def stats(http: httpx.AsyncClient, server: ServerProcess) -> dict[str, Any]:
    response = await http.get(http_url(server) + "/stats")
    response.raise_for_status()
    return dict(response.json())


async def ready_stats(http: httpx.AsyncClient, server: ServerProcess) -> dict[str, Any]:
    """`stats` of a worker that must be ready."""
    state = await stats(http, server)
    assert state["ready"], f"worker not ready: {state}\n{logs(server)}"
    return state


@asynccontextmanager
async def workers(prefix: str, count: int = 2) -> AsyncIterator[list[ServerProcess]]:
    environ = {"WSROOM_REDIS_URL": REDIS_URL, "WSROOM_REDIS_PREFIX": prefix}
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(
            spawn("worker_app:app", CONFIG, environ=environ)) for _ in range(count)]
        yield servers


def logs(*servers: ServerProcess) -> str:
    return "\n".join(f"===== worker {index} log =====\n{server.log()[-6000:]}"
                     for index, server in enumerate(servers))


# ------------------------------------------------------------------ the tests


async def test_worker_killed_clients_resume_on_another(prefix: str) -> None:
    started = anyio.current_time()
    async with (workers(prefix) as (worker_a, worker_b), balancer() as lb,
                httpx.AsyncClient(timeout=10) as http, anyio.create_task_group() as tg,
                AsyncExitStack() as stack):
        # (The clients enter `stack` after `tg`: they close first, which ends their
        # `consume` tasks.)
        url_a = await lb.add("a", port_of(worker_a))
        url_b = await lb.add("b", port_of(worker_b))
        on_a = [Recorder(url_a, f"a{i}") for i in range(3)]
        on_b = [Recorder(url_b, f"b{i}") for i in range(3)]
        everyone = on_a + on_b
        names = [c.name for c in everyone]
        a_names = [c.name for c in on_a]

        def diagnose() -> str:
            return "\n".join(c.describe() for c in everyone) + "\n" + logs(worker_a,
                                                                            worker_b)

        await start(stack, tg, everyone)

        # 1. Everyone sees the whole roster online, wherever it is connected.
        await eventually(lambda: all(all(c.status(n) == "online" for n in names)
                                     and len(c.presence.get(ROOM, {})) == 6
                                     for c in everyone),
                         10, "every client sees 6 members online", diagnose)
        settled = [len(c.presence_log) for c in everyone]
        for state in (await ready_stats(http, worker_a), await ready_stats(http, worker_b)):
            assert sorted(e["id"] for e in state["presence"]) == sorted(names)
            assert {e["status"] for e in state["presence"]} == {"online"}
            assert state["stats"]["sessions"] == 3

        # 2. Publishes from A and from B, interleaved: one order for everyone.
        published: list[int] = []
        for number in range(50):
            published += await publish(http, worker_a, f"A{number}")
            published += await publish(http, worker_b, f"B{number}")
        assert sorted(published) == list(range(1, 101)), published
        await eventually(lambda: all(len(c.room()) >= 100 for c in everyone), 15,
                         "every client gets the 100 messages", diagnose)
        reference = [(m.epoch, m.offset, m.data) for m in everyone[0].room()]
        assert [offset for _, offset, _ in reference] == list(range(1, 101))
        assert len({epoch for epoch, _, _ in reference}) == 1
        assert Counter(d["tag"] for _, _, d in reference) == Counter(
            [f"A{n}" for n in range(50)] + [f"B{n}" for n in range(50)])
        for client in everyone[1:]:
            assert [(m.epoch, m.offset, m.data) for m in client.room()] == reference, \
                client.name

        # 3. Worker A dies. The balancer's health check takes A out at once and sends
        # its route to B after FAILOVER_DELAY; B keeps publishing meanwhile (10/s).
        stop_publishing = anyio.Event()
        outage: list[int] = []

        async def publish_on_b() -> None:
            number = 0
            while not stop_publishing.is_set():
                outage.extend(await publish(http, worker_b, f"O{number}"))
                number += 1
                await anyio.sleep(0.1)

        roster_samples: list[list[str]] = []

        async def sample_roster_on_b() -> None:
            while not stop_publishing.is_set():
                state = await stats(http, worker_b)
                roster_samples.append(sorted(e["id"] for e in state["presence"]))
                await anyio.sleep(0.25)

        tg.start_soon(publish_on_b)
        tg.start_soon(sample_roster_on_b)
        await anyio.sleep(0.5)
        lb.fail_over("a", port_of(worker_b), FAILOVER_DELAY)
        killed_at = anyio.current_time()
        worker_a.process.kill()
        await worker_a.process.wait()
        await anyio.sleep(0.3)  # the publish in flight at the kill has returned
        at_kill = max(published + outage)  # A may have delivered up to this one

        await eventually(lambda: all(c.status(n) == "away" for c in on_b for n in a_names),
                         AWAY_BOUND, "B's clients see A's members away", diagnose)
        away_after = anyio.current_time() - killed_at
        for client in on_b:  # B's own members stay online throughout
            assert all(client.status(c.name) == "online" for c in on_b), client.describe()
        assert not any(c.connected for c in on_a), "A's clients are still connected"

        # 4. After the balancer's delay, A's clients resume on B.
        await eventually(lambda: all(c.connects >= 2 and c.connected for c in on_a),
                         FAILOVER_DELAY + 10, "A's clients resume on B", diagnose)
        resumed_after = anyio.current_time() - killed_at
        assert resumed_after >= FAILOVER_DELAY - 0.5  # not before the balancer allowed
        await eventually(lambda: all(c.status(n) == "online" for c in everyone
                                     for n in names),
                         10, "everyone sees everyone online again", diagnose)
        await anyio.sleep(1.0)  # a few more publishes after the resumes
        stop_publishing.set()
        await anyio.sleep(0.2)
        last = max(published + outage)
        assert sorted(published + outage) == list(range(1, last + 1))
        assert last - at_kill >= 30, f"only {last - at_kill} published during the outage"
        # B's own roster never lost A's members either.
        assert len(roster_samples) >= 10
        missing = [sample for sample in roster_samples if sample != sorted(names)]
        assert not missing, f"B's roster lost members: {missing}\n{diagnose()}"
        await eventually(lambda: all(len(c.room()) >= last for c in everyone), 15,
                         f"every client gets all {last} messages", diagnose)

        # Every client: every message once, in order, no gap, the same sequence.
        reference = [(m.epoch, m.offset, m.data) for m in on_b[0].room()]
        assert [offset for _, offset, _ in reference] == list(range(1, last + 1))
        for client in everyone:
            assert [(m.epoch, m.offset, m.data) for m in client.room()] == reference, \
                client.name
            raw = [(f["epoch"], f["offset"]) for f in client.raw if f["stream"] == ROOM]
            duplicates = [key for key, n in Counter(raw).items() if n > 1]
            assert not duplicates, f"{client.name}: frames sent twice: {duplicates}"
        for client in on_a:
            first, resumed = client.welcomes[0], client.welcomes[-1]
            assert len(client.welcomes) == 2, client.describe()
            assert resumed["session"] == first["session"], client.describe()
            assert client.recovered(ROOM) is True, client.describe()
            assert client.recovered("@inbox") is True, client.describe()
            # The resumed connection went on right after the last message the dead
            # worker delivered: the replay holds what was published meanwhile.
            before = [f["offset"] for f in client.raw[:client.raw_at_welcome[1]]
                      if f["stream"] == ROOM]
            after = [f["offset"] for f in client.raw[client.raw_at_welcome[1]:]
                     if f["stream"] == ROOM]
            assert before == list(range(1, len(before) + 1)), client.name
            assert after == list(range(len(before) + 1, last + 1)), client.name
            assert len(before) <= at_kill

        # Presence: never a leave, on any client, at any time; no roster after the
        # first full one misses a member; B's observers saw A's members away.
        for client in everyone:
            for _, frame in client.presence_log:
                assert not frame.get("leaves"), f"{client.name} saw a leave: {frame}\n" \
                    + diagnose()
        for client, seen in zip(everyone, settled, strict=True):
            for _, frame in client.presence_log[seen:]:
                if "state" in frame:
                    assert sorted(e["id"] for e in frame["state"]) == sorted(names), \
                        f"{client.name}: a roster without some member: {frame}"
        for client in on_b:
            for name in a_names:
                statuses = [e["status"] for at, f in client.presence_log if at > killed_at
                            for e in f.get("joins", ()) if e["id"] == name]
                assert statuses == ["away", "online"], (client.name, name, statuses)

        # 5. B holds all six sessions, live; it is ready.
        state = await ready_stats(http, worker_b)
        assert state["stats"]["sessions"] == 6
        assert state["stats"]["detached_sessions"] == 0
        assert state["stats"]["connections"] == 6
        assert state["stats"]["resumes"].get("recovered") == 3, state["stats"]
        assert sorted(e["id"] for e in state["presence"]) == sorted(names)
        assert {e["status"] for e in state["presence"]} == {"online"}
        assert lb.refused["a"] >= 1  # A's clients did retry during the delay


    print(f"\nworkers e2e: away after {away_after:.2f}s, resumed after "
          f"{resumed_after:.2f}s, {len(outage)} messages during the outage, "
          f"{anyio.current_time() - started:.1f}s in all")


async def test_send_to_reaches_members_on_other_workers(prefix: str) -> None:
    async with (workers(prefix) as (worker_a, worker_b), httpx.AsyncClient(timeout=10) as http,
                anyio.create_task_group() as tg, AsyncExitStack() as stack):
        ann = Recorder(worker_a.url + "/ws", "ann")  # on A only
        bob = Recorder(worker_b.url + "/ws", "bob")  # on B only
        cat_a = Recorder(worker_a.url + "/ws", "cat")  # one session on each worker
        cat_b = Recorder(worker_b.url + "/ws", "cat")
        clients = [ann, bob, cat_a, cat_b]
        await start(stack, tg, clients)

        def diagnose() -> str:
            return "\n".join(c.describe() for c in clients) + "\n" + logs(worker_a, worker_b)

        await eventually(lambda: all(len(c.presence.get(ROOM, {})) == 3 for c in clients),
                         10, "every client sees 3 members", diagnose)

        async def send_to(server: ServerProcess, member: str, text: str) -> int:
            response = await http.get(http_url(server) + "/send_to",
                                      params={"member": member, "text": text})
            response.raise_for_status()
            return int(response.json()["sessions"])

        assert await send_to(worker_b, "ann", "from B") == 1
        assert await send_to(worker_a, "bob", "from A") == 1
        assert await send_to(worker_a, "cat", "to both, from A") == 2
        assert await send_to(worker_b, "cat", "to both, from B") == 2
        assert await send_to(worker_b, "nobody", "lost") == 0

        def inbox(client: Recorder) -> list[str]:
            return [m.data["text"] for m in client.received
                    if m.stream == "@inbox" and m.event == "note"]

        expected = {ann: ["from B"], bob: ["from A"],
                    cat_a: ["to both, from A", "to both, from B"],
                    cat_b: ["to both, from A", "to both, from B"]}
        await eventually(lambda: all(inbox(c) == texts for c, texts in expected.items()),
                         10, "every personal message arrives once", diagnose)
        await anyio.sleep(0.3)  # and nothing more
        for client, texts in expected.items():
            assert inbox(client) == texts, client.name
            offsets = [m.offset for m in client.received if m.stream == "@inbox"]
            assert offsets == list(range(1, len(texts) + 1)), (client.name, offsets)


async def test_idle_worker_keeps_its_subscriber(prefix: str) -> None:
    """Without any fault, a worker's subscriber connection stays up and the worker
    stays ready (a readiness probe must not flap)."""
    async with workers(prefix, count=1) as (worker,), httpx.AsyncClient(timeout=10) as http:
        samples = []
        with anyio.move_on_after(7.5):  # more than twice the default ping_timeout (3 s)
            while True:
                samples.append(await stats(http, worker))
                await anyio.sleep(0.02)
        not_ready = sum(not sample["ready"] for sample in samples)
        reconnects = samples[-1]["backplane"]["reconnects"]
        assert (reconnects, not_ready) == (0, 0), (
            f"{reconnects} subscriber reconnect(s), not ready in {not_ready} of "
            f"{len(samples)} samples\n{logs(worker)}")
