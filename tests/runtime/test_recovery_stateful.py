"""Session resume and recovery on the real hub runtime, in process (no sockets).

1. A hypothesis state machine drives a running `Hub` (on trio, in a background thread
   reached through an AnyIO blocking portal, under a *manual* `MockClock`: virtual time
   only moves when a rule jumps it) with random interleavings of publishes, inbox
   sends, dropped transports (1006/1001, and a 1000 goodbye), resumes (with publishes
   racing the handshake), slow consumers evicted with 3008, server-side closes and
   jumps of the clock past the resume window. After every step, once every task of
   the hub is blocked (``trio.testing.wait_all_tasks_blocked``), it checks what each
   simulated client saw:

   - per stream and epoch the offsets it got are gap-free and duplicate-free, unless
     a welcome said ``recovered: false`` for that stream (with a ``snapshot`` frame at
     that very position), which is the client's new base;
   - every message is the one published at its ``(stream, epoch, offset)``, and a
     connected client has everything published on its streams (nothing missing);
   - a resume within the window resumes the same session, and replays every stream
     whose gap the history still covers (``recovered: true`` is not optional); after the
     window it gets a new session;
   - the hub's registries (connections, sessions, detached sessions, presence) match
     the model.

2. Virtual-clock tests (trio ``MockClock``, autojump) of the window's boundary and of
   resume-token expiry (``HubConfig.resume_token_ttl`` against the hub's ``clock``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)
from trio.testing import MockClock, wait_all_tasks_blocked

from support import MemoryTransport, Peer, serve_peer, serve_transport, server_peer
from wsroom import CloseCode, Connection, Handshake, Hub, HubConfig, Identity, RoomConfig
from wsroom._asgi.transport import Disconnected
from wsroom._backplane import Envelope, MemoryBackplane
from wsroom._core.codes import should_reconnect
from wsroom._core.history import HistoryLimits

# ------------------------------------------------------------------------ shared set-up

WINDOW = 8.0
"""The resume window of the state machine's hub (dyadic: clock sums stay exact)."""
HISTORY = 5
"""Messages kept per stream (rooms and inboxes): a longer outage is not recovered."""
MAX_QUEUE = 4
"""Each client's queue bound in messages: a stalled client is evicted quickly."""
WALL = 1_700_000_000.0
ROOMS_OF = {"p0": ("a", "b"), "p1": ("a",), "p2": ("b",)}
"""The members of the state machine and the rooms their `on_connect` joins."""
INBOX = "@inbox"


def _json(text: str) -> Any:
    return json.loads(text)


class RecordingBackplane(MemoryBackplane):
    """The in-memory backplane, recording every numbered message *before* it is
    delivered (so the model knows it before any client can receive it)."""

    def __init__(self, on_envelope: Callable[[Envelope], None]) -> None:
        super().__init__()
        self.log: list[Envelope] = []
        self._on_envelope = on_envelope

    def bind(self, deliver: Any, lost: Any) -> None:
        def recording(envelope: Envelope) -> None:
            self.log.append(envelope)
            self._on_envelope(envelope)
            deliver(envelope)

        super().bind(recording, lost)

    def current(self, key: str) -> tuple[str, int] | None:
        history = self._streams.get(key)
        return None if history is None else (history.epoch, history.offset)


class StallableTransport(MemoryTransport):
    """A memory transport whose sends can be held (a client that stopped reading)."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False
        self._gate = anyio.Event()

    def stall(self) -> None:
        if not self.stalled:
            self.stalled = True
            self._gate = anyio.Event()

    def unstall(self) -> None:
        self.stalled = False
        self._gate.set()

    async def send(self, text: str) -> None:
        while self.stalled:
            await self._gate.wait()
        await super().send(text)


@dataclass
class SimClient:
    """One simulated client: what it saw, and the model of its session."""

    name: str
    rooms: tuple[str, ...]
    violations: list[str]
    # current connection
    transport: StallableTransport | None = None
    conn: Connection | None = None
    pump_scope: anyio.CancelScope | None = None
    connected: bool = False
    welcomed: bool = False
    # protocol state (kept across connections, as a real client does)
    token: str | None = None
    session: str | None = None
    positions: dict[str, tuple[str, int]] = field(default_factory=dict)
    awaiting_snapshot: dict[str, tuple[str, int]] = field(default_factory=dict)
    last_code: int | None = None
    # the current hello, and what the model expects of its welcome
    asked: dict[str, tuple[str, int]] = field(default_factory=dict)
    expect_session: str | None = None
    forbid_session: str | None = None
    expect_recovered: dict[str, bool | None] = field(default_factory=dict)
    # model of the session: "none", "live" or "detached" (since `detached_at`)
    sess_state: str = "none"
    detached_at: float = 0.0
    received: int = 0

    def fail(self, text: str) -> None:
        self.violations.append(f"{self.name}: {text}")

    def session_alive(self, now: float) -> bool:
        return self.sess_state == "live" or (
            self.sess_state == "detached" and now < self.detached_at + WINDOW)

    def key(self, stream: str) -> str:
        return f"{INBOX}/{self.session}" if stream == INBOX else stream


class ResumeMachine(RuleBasedStateMachine):
    """See the module docstring (1.)."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []
        self.notes: list[str] = []  # hypothesis events, reported from the main thread
        self.clients = [SimClient(name, rooms, self.violations)
                        for name, rooms in ROOMS_OF.items()]
        self.published: dict[tuple[str, str], dict[int, int]] = {}
        self.counter = 0
        self.clock = MockClock()  # rate 0, no autojump: time moves only by jump()
        self.transports: list[StallableTransport] = []
        self._portal_cm = start_blocking_portal("trio", {"clock": self.clock})
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        try:
            self._main_future, _ = self.portal.start_task(self._main)
            for client in self.clients:
                self._call(self._connect, client, ())
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise

    # ------------------------------------------------------------ the hub's thread

    def _call(self, func: Any, *args: Any) -> Any:
        """Run `func(*args)` in the hub's loop, then wait until every task is blocked
        (the virtual clock does not move meanwhile); a wedged hub fails in 30 s."""

        async def wrapped() -> Any:
            result = await func(*args)
            await wait_all_tasks_blocked()
            return result

        future: Future[Any] = self.portal.start_task_soon(wrapped)
        return future.result(timeout=30)

    async def _main(self, *, task_status: Any) -> None:
        self.backplane = RecordingBackplane(self._numbered)
        limits = HistoryLimits(max_messages=HISTORY, max_age=1e9)
        config = HubConfig(
            resume_window=WINDOW, ping_interval=1e6, pong_timeout=1e6,
            max_queue_messages=MAX_QUEUE, inbox_history=limits,
            default_room=RoomConfig(history=limits),
        )

        async def authenticate(handshake: Handshake) -> Identity:
            return Identity(id=str(handshake.auth))

        async def snapshot(conn: Connection, stream: str) -> Any:
            return {"stream": stream}

        # On a fixed wall clock tokens never expire here (see the tests below).
        hub = Hub(config, authenticate=authenticate, snapshot=snapshot,
                  backplane=self.backplane, clock=lambda: WALL)

        @hub.on_connect
        async def join(conn: Connection) -> None:
            assert conn.identity is not None
            for room in ROOMS_OF[conn.identity.id]:
                await conn.join(room)

        self.hub = hub
        self.stop = anyio.Event()
        self.backplane.log.clear()
        async with hub.run(), anyio.create_task_group() as tg:
            self.tg = tg
            task_status.started()
            await self.stop.wait()
            await hub.shutdown()
            await wait_all_tasks_blocked()  # the clients read their close frames
            tg.cancel_scope.cancel()

    def teardown(self) -> None:
        try:
            connected = self._live()
            self._call(self._stop)
            self._main_future.result(timeout=30)
            # The drain flushed what was queued (checked like any frame) and told
            # every client to reconnect; the hub holds no connection.
            assert not self.violations, "\n".join(self.violations)
            for client in connected:
                assert not client.connected, client.name
                assert client.last_code == CloseCode.SERVICE_RESTART, client.name
            assert self.hub.stats().connections == 0
        finally:
            for transport in self.transports:
                transport.close_streams()
            self._portal_cm.__exit__(None, None, None)

    async def _stop(self) -> None:
        for client in self.clients:
            if client.transport is not None:
                client.transport.unstall()
        self.clock.autojump_threshold = 0  # let the drain's timeouts run
        self.stop.set()

    # ---------------------------------------------------------------- client side

    async def _pump(self, client: SimClient, transport: StallableTransport) -> None:
        with anyio.CancelScope() as scope:
            client.pump_scope = scope
            async for item in transport.from_server:
                if isinstance(item, Disconnected):
                    self._closed(client, item.code)
                    return
                for line in item.split("\n"):
                    frame = _json(line)
                    if frame["type"] == "ping":
                        await transport.client_send({"type": "pong", "id": frame["id"]})
                    else:
                        self._frame(client, frame)

    def _closed(self, client: SimClient, code: int) -> None:
        """The client's connection ended (the server closed, or the client dropped)."""
        now = anyio.current_time()
        client.connected = False
        client.last_code = code
        if client.pump_scope is not None:
            client.pump_scope.cancel()
        if not client.welcomed:
            client.fail(f"connection closed with {code} before its welcome")
            client.sess_state = "none"
        elif should_reconnect(code):
            client.sess_state, client.detached_at = "detached", now
        else:
            client.sess_state = "none"
        self.notes.append(f"closed {code}")

    def _frame(self, client: SimClient, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "welcome":
            self._welcome(client, frame)
        elif not client.welcomed:
            client.fail(f"{kind} frame before the welcome")
        elif kind == "snapshot":
            stream = frame["stream"]
            expected = client.awaiting_snapshot.pop(stream, None)
            if expected != (frame["epoch"], frame["offset"]):
                client.fail(f"snapshot {frame} where {expected} was expected")
            elif frame["data"] != {"stream": stream}:
                client.fail(f"snapshot data {frame['data']}")
        elif kind == "msg":
            self._msg(client, frame)
        elif kind not in ("presence", "reply"):
            client.fail(f"unexpected frame {frame}")

    def _welcome(self, client: SimClient, frame: dict[str, Any]) -> None:
        if client.welcomed:
            client.fail("a second welcome")
        session = frame["session"]
        streams = frame["streams"]
        if set(streams) != {INBOX, *client.rooms}:
            client.fail(f"welcome streams {sorted(streams)}")
        if client.expect_session is not None and session != client.expect_session:
            client.fail("a resume within the window did not resume the session")
        if client.forbid_session is not None and session == client.forbid_session:
            client.fail("an ended or expired session was resumed")
        resumed = session == client.session
        if client.awaiting_snapshot:
            client.fail(f"snapshots never came: {client.awaiting_snapshot}")
        client.awaiting_snapshot = {}
        positions: dict[str, tuple[str, int]] = {}
        for stream, info in streams.items():
            position = (info["epoch"], info["offset"])
            asked = client.asked.get(stream)
            if info["recovered"]:
                self.notes.append("stream recovered")
                if not resumed or asked != position:
                    client.fail(f"recovered {stream} at {position}, asked {asked}, "
                                f"resumed={resumed}")
            else:
                self.notes.append("stream not recovered" if asked else "stream new")
                client.awaiting_snapshot[stream] = position
            positions[stream] = position
            expected = client.expect_recovered.get(stream)
            if expected is not None and expected != info["recovered"]:
                client.fail(f"{stream}: recovered={info['recovered']}, expected "
                            f"{expected} (asked {asked}, gap within history "
                            f"{HISTORY}: {expected})")
        client.positions = positions
        client.session = session
        client.token = frame["resume"]
        client.welcomed = True
        client.sess_state = "live"

    def _msg(self, client: SimClient, frame: dict[str, Any]) -> None:
        client.received += 1
        stream, epoch, offset = frame["stream"], frame["epoch"], frame["offset"]
        if stream in client.awaiting_snapshot:
            client.fail(f"msg {stream}/{offset} before its snapshot")
        position = client.positions.get(stream)
        if position is None:
            client.fail(f"msg on unknown stream {stream}")
        elif position[0] != epoch:
            client.fail(f"msg of epoch {epoch} on {stream}, client is at {position}")
        elif offset <= position[1]:
            client.fail(f"duplicate {stream}/{offset} (at {position[1]})")
        elif offset != position[1] + 1:
            client.fail(f"gap on {stream}: {offset} after {position[1]}")
        published = self.published.get((client.key(stream), epoch), {})
        if published.get(offset) != frame["data"]["n"]:
            client.fail(f"{stream}/{epoch}/{offset} carries {frame['data']}, published "
                        f"{published.get(offset)}")
        client.positions[stream] = (epoch, offset)

    # ------------------------------------------------------------------- helpers

    def _numbered(self, envelope: Envelope) -> None:
        """The backplane numbered a message: the model learns it before delivery."""
        numbered = self.published.setdefault((envelope.stream, envelope.epoch), {})
        if envelope.offset != len(numbered) + 1:
            self.violations.append(f"backplane numbered {envelope.stream} "
                                   f"{envelope.offset} after {len(numbered)}")
        numbered[envelope.offset] = _json(envelope.frame)["data"]["n"]

    def _record(self, start: int) -> list[Envelope]:
        """The messages numbered since log index `start`."""
        return self.backplane.log[start:]

    async def _publish(self, room: str) -> None:
        self.counter += 1
        start = len(self.backplane.log)
        offset = await self.hub.publish(room, "m", {"n": self.counter})
        envelopes = self._record(start)
        members = [c for c in self.clients
                   if room in c.rooms and c.session_alive(anyio.current_time())]
        if offset is None:
            assert not members, (room, members)
            assert not envelopes
        else:
            assert [(e.stream, e.offset) for e in envelopes] == [(room, offset)]

    async def _connect(self, client: SimClient,
                       racing: tuple[tuple[str, int], ...]) -> None:
        """(Re)connect: resume with the last token and positions if the last close
        says so, else start afresh; `racing` rooms are published to during the
        handshake, each after that many scheduling rounds."""
        now = anyio.current_time()
        hello: dict[str, Any] = {"type": "hello", "v": 1, "auth": client.name}
        client.asked, client.expect_recovered = {}, {}
        client.expect_session = client.forbid_session = None
        resume = client.token is not None and (
            client.last_code is None or should_reconnect(client.last_code))
        if resume:
            hello["resume"] = client.token
            hello["streams"] = {s: {"epoch": e, "offset": o}
                                for s, (e, o) in client.positions.items()}
            client.asked = dict(client.positions)
            alive = client.session_alive(now)
            if alive:
                client.expect_session = client.session
            else:
                client.forbid_session = client.session
            for stream, (epoch, offset) in client.asked.items():
                current = self.backplane.current(client.key(stream))
                if not alive or current is None or current[0] != epoch:
                    client.expect_recovered[stream] = False
                    continue
                gap = current[1] - offset
                if gap > HISTORY:
                    client.expect_recovered[stream] = False
                elif gap + sum(room == stream for room, _ in racing) <= HISTORY:
                    client.expect_recovered[stream] = True
                else:
                    client.expect_recovered[stream] = None  # the race decides
            self.notes.append("resume " + ("within window" if alive else "after window"))
        else:
            if client.session is not None and client.sess_state == "none":
                client.forbid_session = client.session
            client.positions = {}
        client.awaiting_snapshot = {}
        transport = StallableTransport()
        self.transports.append(transport)
        peer = server_peer(self.hub, transport)
        client.transport, client.conn = transport, peer.connection
        client.connected, client.welcomed = True, False
        self.tg.start_soon(serve_peer, peer)
        self.tg.start_soon(self._pump, client, transport)
        await transport.client_send(hello)
        for room, rounds in racing:
            for _ in range(rounds):
                await anyio.lowlevel.checkpoint()
            await self._publish(room)

    def _live(self) -> list[SimClient]:
        return [c for c in self.clients if c.connected]

    def _pick(self, clients: list[SimClient], index: int) -> SimClient:
        return clients[index % len(clients)]

    # --------------------------------------------------------------------- rules

    @rule(room=st.sampled_from(["a", "b"]), count=st.integers(1, 3))
    def publish(self, room: str, count: int) -> None:
        async def run() -> None:
            for _ in range(count):
                await self._publish(room)

        self._call(run)

    @rule(name=st.sampled_from(sorted(ROOMS_OF)))
    def send_to(self, name: str) -> None:
        async def run() -> None:
            self.counter += 1
            start = len(self.backplane.log)
            sent = await self.hub.send_to(name, "m", {"n": self.counter})
            envelopes = self._record(start)
            client = next(c for c in self.clients if c.name == name)
            alive = client.session_alive(anyio.current_time())
            assert sent == int(alive), (sent, client)
            expected = [f"{INBOX}/{client.session}"] if alive else []
            assert [e.stream for e in envelopes] == expected

        self._call(run)

    @precondition(lambda self: any(c.connected for c in self.clients))
    @rule(index=st.integers(0, 2), code=st.sampled_from([1006, 1006, 1001, 1000]))
    def drop(self, index: int, code: int) -> None:
        """The client's transport goes away without a close frame (1006), or the
        client goes away (1001), or says goodbye (1000: its session ends)."""
        client = self._pick(self._live(), index)

        async def run() -> None:
            assert client.transport is not None
            await client.transport.client_disconnect(code)
            self._closed(client, code)

        self._call(run)

    @precondition(lambda self: any(not c.connected for c in self.clients))
    @rule(index=st.integers(0, 2),
          racing=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 4)),
                          max_size=MAX_QUEUE - 1))
    def reconnect(self, index: int, racing: list[tuple[str, int]]) -> None:
        client = self._pick([c for c in self.clients if not c.connected], index)
        self._call(self._connect, client, tuple(racing))
        if client.connected and not client.welcomed:
            client.fail("no welcome")

    @rule(seconds=st.sampled_from([0.5, 2.0, WINDOW - 0.5, WINDOW, WINDOW + 0.5]))
    def advance_clock(self, seconds: float) -> None:
        async def run() -> None:
            self.clock.jump(seconds)
            await anyio.lowlevel.checkpoint()

        self._call(run)

    @precondition(lambda self: any(c.connected for c in self.clients))
    @rule(index=st.integers(0, 2), seconds=st.sampled_from([WINDOW - 0.5, WINDOW]),
          published=st.integers(0, HISTORY + 1))
    def outage(self, index: int, seconds: float, published: int) -> None:
        """A drop, then messages and a silence around the window's length, then the
        resume (the rules above do this too, but rarely in this order)."""
        client = self._pick(self._live(), index)

        async def run() -> None:
            assert client.transport is not None
            await client.transport.client_disconnect(1006)
            self._closed(client, 1006)
            await wait_all_tasks_blocked()
            for number in range(published):
                await self._publish(client.rooms[number % len(client.rooms)])
            await wait_all_tasks_blocked()  # a slow consumer's eviction ends first
            self.clock.jump(seconds)
            await wait_all_tasks_blocked()
            await self._connect(client, ())

        self._call(run)

    @precondition(lambda self: any(c.connected for c in self.clients))
    @rule(index=st.integers(0, 2))
    def evict_slow_consumer(self, index: int) -> None:
        """The client stops reading; the room keeps publishing: its queue overflows
        and the hub closes it with 3008 (the others are not affected)."""
        client = self._pick(self._live(), index)

        async def run() -> None:
            assert client.transport is not None
            client.transport.stall()
            # The writer takes what is queued and blocks in send(); MAX_QUEUE + 1 more
            # overflow the queue. (How much it took first depends on the scheduling.)
            for _ in range(4 * MAX_QUEUE):
                await self._publish(client.rooms[0])
                await wait_all_tasks_blocked()
                if not client.connected:
                    break
            assert not client.connected, "a stalled client was not evicted"
            assert client.last_code == CloseCode.SLOW_CONSUMER, client.last_code

        self._call(run)

    @precondition(lambda self: any(c.connected for c in self.clients))
    @rule(index=st.integers(0, 2))
    def stall(self, index: int) -> None:
        client = self._pick(self._live(), index)
        assert client.transport is not None
        self._call(self._sync, client.transport.stall)

    @precondition(lambda self: any(c.connected and c.transport is not None
                                   and c.transport.stalled for c in self.clients))
    @rule(index=st.integers(0, 2))
    def unstall(self, index: int) -> None:
        client = self._pick([c for c in self._live() if c.transport is not None
                             and c.transport.stalled], index)
        assert client.transport is not None
        self._call(self._sync, client.transport.unstall)

    @precondition(lambda self: any(c.connected and c.transport is not None
                                   and not c.transport.stalled for c in self.clients))
    @rule(index=st.integers(0, 2), code=st.sampled_from([4000, 1012, 1000]))
    def server_close(self, index: int, code: int) -> None:
        """The app closes the connection: 4000 and 1012 mean "reconnect", 1000 not."""
        client = self._pick([c for c in self._live() if c.transport is not None
                             and not c.transport.stalled], index)
        assert client.conn is not None
        self._call(self._sync, client.conn.close, code)

    async def _sync(self, func: Any, *args: Any) -> None:
        func(*args)
        await anyio.lowlevel.checkpoint()

    # ---------------------------------------------------------------- invariants

    @invariant()
    def everything_consistent(self) -> None:
        # Computed in the hub's thread, where nothing runs meanwhile.
        problems: list[str] = self._call(self._check)
        for note in sorted(set(self.notes)):
            event(note)
        self.notes.clear()
        assert not self.violations, "\n".join(self.violations)
        assert not problems, "\n".join(problems)

    async def _check(self) -> list[str]:
        problems: list[str] = []
        hub = self.hub
        now = anyio.current_time()
        alive = [c for c in self.clients if c.session_alive(now)]
        detached = [c for c in alive if c.sess_state == "detached"]
        stats = hub.stats()
        counts = (stats.connections, stats.sessions, stats.detached_sessions)
        expected = (len(self._live()), len(alive), len(detached))
        if counts != expected:
            registry = hub._membership.sessions
            hub_detached = [(s.member, s.detached_at) for s in registry._detached.values()]
            problems.append(f"(connections, sessions, detached) = {counts}, model "
                            f"{expected} at t={now}: {self._describe()}; the hub's "
                            f"detached sessions: {hub_detached}")
        for client in self.clients:
            if client.session_alive(now) and client.session not in hub._membership.sessions:
                problems.append(f"{client.name}: session missing: {self._describe()}")
            if not client.connected or not client.welcomed:
                continue
            assert client.transport is not None
            if client.awaiting_snapshot:
                problems.append(f"{client.name}: no snapshot for "
                                f"{client.awaiting_snapshot}")
            if client.transport.stalled:
                continue
            for stream, position in client.positions.items():
                current = self.backplane.current(client.key(stream))
                if current != position:
                    problems.append(f"{client.name}: {stream} at {position}, the stream "
                                    f"is at {current}: messages missing")
        for room in ("a", "b"):
            roster = {e.member: e.status.value for e in hub.presence(room)}
            model = {c.name: "online" if c.connected and c.welcomed else "away"
                     for c in alive if room in c.rooms}
            if roster != model:
                problems.append(f"presence of {room}: {roster}, model {model}")
        return problems

    def _describe(self) -> str:
        return ", ".join(f"{c.name}:{c.sess_state}@{c.detached_at}"
                         f"{'+conn' if c.connected else ''}" for c in self.clients)


ResumeMachine.TestCase.settings = settings(
    max_examples=75, stateful_step_count=25, deadline=None)
TestResumeMachine = ResumeMachine.TestCase


# ------------------------------------------------------ virtual-clock boundary tests

@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def _hub(clock: Callable[[], float] = time.time, **config: Any) -> Hub:
    async def authenticate(handshake: Handshake) -> Identity:
        return Identity(id=str(handshake.auth))

    hub = Hub(HubConfig(ping_interval=1e6, pong_timeout=1e6, **config),
              authenticate=authenticate, clock=clock)

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("lobby")

    return hub


async def _open(tg: anyio.abc.TaskGroup, hub: Hub, hello: dict[str, Any],
                transports: list[MemoryTransport]) -> Peer:
    """Connect a peer, send `hello` and let everything run (the clock stays put)."""
    transport = MemoryTransport()
    transports.append(transport)
    peer = Peer(transport)
    tg.start_soon(serve_transport, hub, transport)
    tg.start_soon(peer.pump)
    await transport.client_send(hello)
    await wait_all_tasks_blocked()
    return peer


def _welcome(peer: Peer) -> dict[str, Any]:
    welcomes = [f for f in peer.frames if f["type"] == "welcome"]
    assert len(welcomes) == 1, peer.frames
    return welcomes[0]


def _resume_hello(name: str, welcome: dict[str, Any], lobby_offset: int | None = None
                  ) -> dict[str, Any]:
    streams = {s: {"epoch": i["epoch"], "offset": i["offset"]}
               for s, i in welcome["streams"].items()}
    if lobby_offset is not None:
        streams["lobby"]["offset"] = lobby_offset
    return {"type": "hello", "v": 1, "auth": name, "resume": welcome["resume"],
            "streams": streams}


def _roster(hub: Hub) -> dict[str, str]:
    return {e.member: e.status.value for e in hub.presence("lobby")}


def _leaves(peer: Peer) -> list[str]:
    return [m for f in peer.frames if f["type"] == "presence" for m in f.get("leaves", ())]


EPS = 1e-3


@pytest.mark.anyio
async def test_a_detached_session_is_resumable_until_just_before_the_window_ends() -> None:
    hub = _hub(resume_window=60.0)
    transports: list[MemoryTransport] = []
    async with hub.run(), anyio.create_task_group() as tg:
        observer = await _open(tg, hub, {"type": "hello", "v": 1, "auth": "obs"}, transports)
        alice = await _open(tg, hub, {"type": "hello", "v": 1, "auth": "alice"}, transports)
        first = _welcome(alice)
        start = anyio.current_time()
        await alice.transport.client_disconnect(1006)
        await wait_all_tasks_blocked()
        assert anyio.current_time() == start
        assert (hub.stats().sessions, hub.stats().detached_sessions) == (2, 1)
        assert _roster(hub) == {"obs": "online", "alice": "away"}
        await hub.publish("lobby", "missed", 1)

        await anyio.sleep_until(start + 60.0 - EPS)
        await wait_all_tasks_blocked()
        assert (hub.stats().sessions, hub.stats().detached_sessions) == (2, 1)
        assert _roster(hub) == {"obs": "online", "alice": "away"}
        assert _leaves(observer) == []

        again = await _open(tg, hub, _resume_hello("alice", first), transports)
        welcome = _welcome(again)
        assert welcome["session"] == first["session"]
        assert welcome["streams"]["lobby"] == {**first["streams"]["lobby"],
                                               "recovered": True}
        assert [(f["event"], f["data"]) for f in again.frames if f["type"] == "msg"] == [
            ("missed", 1)]
        assert hub.stats().resumes == {"recovered": 1}
        # The resume cancelled the expiry: long after the old deadline it is still live.
        await anyio.sleep(120.0)
        await wait_all_tasks_blocked()
        assert (hub.stats().sessions, hub.stats().detached_sessions) == (2, 0)
        assert _roster(hub) == {"obs": "online", "alice": "online"}
        assert _leaves(observer) == []
        tg.cancel_scope.cancel()
    for transport in transports:
        transport.close_streams()


@pytest.mark.anyio
async def test_a_detached_session_expires_exactly_when_the_window_ends() -> None:
    hub = _hub(resume_window=60.0)
    transports: list[MemoryTransport] = []
    async with hub.run(), anyio.create_task_group() as tg:
        observer = await _open(tg, hub, {"type": "hello", "v": 1, "auth": "obs"}, transports)
        alice = await _open(tg, hub, {"type": "hello", "v": 1, "auth": "alice"}, transports)
        first = _welcome(alice)
        await anyio.sleep(5.0)  # the window starts at the drop, not at the welcome
        start = anyio.current_time()
        await alice.transport.client_disconnect(1006)
        await wait_all_tasks_blocked()
        session = hub._membership.sessions.get(first["session"])
        assert session is not None
        assert session.detached_at == start

        await anyio.sleep_until(start + 60.0 - EPS)
        await wait_all_tasks_blocked()
        assert (hub.stats().sessions, hub.stats().detached_sessions) == (2, 1)
        assert "alice" in _roster(hub)
        assert _leaves(observer) == []

        await anyio.sleep_until(start + 60.0)
        await wait_all_tasks_blocked()
        assert anyio.current_time() == start + 60.0
        assert (hub.stats().sessions, hub.stats().detached_sessions) == (1, 0)
        assert _roster(hub) == {"obs": "online"}
        assert _leaves(observer) == ["alice"]  # exactly one leave

        # The token is still valid, but its session is gone: a new session, nothing
        # recovered.
        again = await _open(tg, hub, _resume_hello("alice", first), transports)
        welcome = _welcome(again)
        assert welcome["session"] != first["session"]
        assert not any(s["recovered"] for s in welcome["streams"].values())
        assert hub.stats().resumes == {"new_session": 1}
        tg.cancel_scope.cancel()
    for transport in transports:
        transport.close_streams()


@pytest.mark.anyio
async def test_a_resume_token_works_until_just_before_its_ttl_and_not_after() -> None:
    wall = [1_000_000.0]
    hub = _hub(lambda: wall[0], resume_window=10_000.0, resume_token_ttl=100.0)
    transports: list[MemoryTransport] = []
    async with hub.run(), anyio.create_task_group() as tg:
        alice = await _open(tg, hub, {"type": "hello", "v": 1, "auth": "alice"}, transports)
        first = _welcome(alice)
        await alice.transport.client_disconnect(1006)
        await wait_all_tasks_blocked()

        wall[0] = 1_000_100.0 - EPS  # the first token expires at 1_000_100
        second = await _open(tg, hub, _resume_hello("alice", first), transports)
        welcome = _welcome(second)
        assert welcome["session"] == first["session"]
        assert hub.stats().resumes == {"recovered": 1}
        issued_at = wall[0]  # the new token expires at issued_at + 100
        await second.transport.client_disconnect(1006)
        await wait_all_tasks_blocked()

        for late in (issued_at + 100.0, issued_at + 100.0 + EPS):
            wall[0] = late
            refused = await _open(tg, hub, _resume_hello("alice", welcome), transports)
            assert await refused.wait_closed() == CloseCode.INVALID_TOKEN
            assert [f["type"] for f in refused.frames] == []
        assert hub.stats().resumes == {"recovered": 1, "rejected": 2}
        # The refusals did not touch the session: the token, still valid a moment
        # earlier, resumes it.
        assert (hub.stats().sessions, hub.stats().detached_sessions) == (1, 1)
        wall[0] = issued_at + 100.0 - EPS
        third = await _open(tg, hub, _resume_hello("alice", welcome), transports)
        assert _welcome(third)["session"] == first["session"]
        assert hub.stats().resumes == {"recovered": 2, "rejected": 2}
        tg.cancel_scope.cancel()
    for transport in transports:
        transport.close_streams()


# Regression: a fresh MemoryBackplane has __len__ == 0, so ``backplane or
# MemoryBackplane()`` silently replaced the backplane the hub was given.
def test_an_explicit_empty_backplane_is_used() -> None:
    backplane = MemoryBackplane()
    assert Hub(backplane=backplane)._backplane is backplane
