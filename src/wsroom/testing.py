"""A conformance suite for backplanes (needs pytest and AnyIO's pytest plugin).

Subclass `BackplaneConformance` in a test module and say how to make a backplane:

```python
from contextlib import asynccontextmanager

from wsroom.testing import BackplaneConformance


class TestMyBackplane(BackplaneConformance):
    shared = True                     # several instances share streams
    forgets_closed_streams = False    # a closed stream keeps its epoch and history

    @asynccontextmanager
    async def make_backplane(self):
        backplane = MyBackplane(...)
        yield backplane               # the suite binds, starts and closes it
```

A backplane that is shared implements `SharedState` beside `Backplane` (sessions and
presence shared by the workers); the suite then also checks its shared state, through
two backplanes made in one test.

Every test is an ``anyio`` test: set the ``anyio_backend`` fixture to the async
libraries the backplane supports.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import anyio
import pytest

from wsroom._backplane.base import (
    Backplane,
    Envelope,
    PresenceOp,
    SessionRecord,
    SharedState,
    StaleSession,
)
from wsroom._core.history import HistoryLimits, Recovery
from wsroom._core.protocol import msg_frame_from, msg_payload

__all__ = ["BackplaneConformance", "Recorder"]

LIMITS = HistoryLimits()


async def _until(condition: Callable[[], bool], within: float) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polled
            await anyio.sleep(0.005)


class _StateEvents:
    """The `StateEvents` a shared backplane reported, as ``(method, *args)`` tuples."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    def presence(self, op: PresenceOp) -> None:
        self.seen.append(("presence", op))

    def session_moved(self, session: str) -> None:
        self.seen.append(("session_moved", session))

    def session_ended(self, session: str) -> None:
        self.seen.append(("session_ended", session))

    def disconnect(self, session: str, code: int, reason: str) -> None:
        self.seen.append(("disconnect", session, code, reason))

    def resynced(self) -> None:
        self.seen.append(("resynced",))

    def reannounce(self) -> None:
        self.seen.append(("reannounce",))


class Recorder:
    """What a backplane delivered and reported lost (it stands in for the hub); for a
    `SharedState` backplane also what it reported through `StateEvents` (`events`)."""

    def __init__(self, backplane: Backplane) -> None:
        self.backplane = backplane
        self.delivered: list[Envelope] = []
        self.lost: list[str] = []
        self.events: list[tuple[object, ...]] = []
        """The `StateEvents` calls of a shared backplane, as ``(method, *args)``."""
        backplane.bind(self.delivered.append, self.lost.append)
        if isinstance(backplane, SharedState):
            state = _StateEvents()
            self.events = state.seen
            backplane.bind_state(state)

    @property
    def state(self) -> SharedState:
        """The backplane's shared state (skips the test if it has none)."""
        if not isinstance(self.backplane, SharedState):
            pytest.skip("the backplane has no shared state")
        return self.backplane

    async def event(self, *event: object, within: float = 10) -> None:
        """Wait until the backplane reported `event`, e.g. ``("session_moved", id)``."""
        await _until(lambda: event in self.events, within)

    def of(self, stream: str) -> list[Envelope]:
        """The envelopes delivered for `stream`, in delivery order."""
        return [e for e in self.delivered if e.stream == stream]

    async def wait(self, stream: str, count: int, within: float = 10) -> list[Envelope]:
        """Wait until `count` envelopes of `stream` were delivered; return them."""
        await _until(lambda: len(self.of(stream)) >= count, within)
        return self.of(stream)


def _offsets(envelopes: list[Envelope]) -> list[int]:
    return [e.offset for e in envelopes]


@pytest.mark.anyio
class BackplaneConformance:
    """The behaviour every backplane must have; subclass it and implement
    `make_backplane`. The class attributes describe what may differ."""

    shared: bool = False
    """Several instances share streams (a publish on one is delivered on the others),
    sessions and presence: the backplane implements `SharedState`. Not shared:
    publishing to a stream that is not open raises KeyError."""

    forgets_closed_streams: bool = True
    """A closed stream is forgotten: opened again, it starts a new epoch. If False,
    it keeps its epoch, offset and history (other processes may still use it)."""

    delivers_during_publish: bool = True
    """A process's own publish is delivered to it before `publish` returns."""

    settle: float = 0.2
    """Seconds to wait for a duplicate delivery that must not come."""

    def make_backplane(self) -> AbstractAsyncContextManager[Backplane]:
        """An async context manager yielding a new backplane, neither bound nor
        started: the suite binds it, starts it and closes it (as the hub does). For a
        shared backplane, the backplanes made in one test share their streams."""
        raise NotImplementedError

    @asynccontextmanager
    async def recorders(self, count: int = 1) -> AsyncIterator[list[Recorder]]:
        """`count` bound and started backplanes, with their recorders. On exit, no
        stream may have been reported lost."""
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            recorders = []
            for _ in range(count):
                backplane = await stack.enter_async_context(self.make_backplane())
                recorder = Recorder(backplane)
                await backplane.start(tg)
                stack.push_async_callback(backplane.aclose)
                recorders.append(recorder)
            yield recorders
            for recorder in recorders:
                assert recorder.lost == [], "no stream may be lost in normal operation"

    async def publish(self, recorder: Recorder, stream: str, payloads: list[str], *,
                      limits: HistoryLimits = LIMITS, wire: str | None = None
                      ) -> list[Envelope]:
        """Publish `payloads` one after the other, as the hub does."""
        envelopes = []
        for payload in payloads:
            envelope = await recorder.backplane.publish(stream, wire or stream, payload,
                                                        limits=limits)
            if self.delivers_during_publish:
                assert recorder.of(stream)[-1] == envelope, "delivered during publish"
            envelopes.append(envelope)
        return envelopes

    @staticmethod
    def payloads(count: int, start: int = 0) -> list[str]:
        return [msg_payload("e", {"n": n}) for n in range(start, start + count)]

    # -------------------------------------------------------------------- numbering

    async def test_open_gives_a_new_stream_at_offset_zero(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            epoch, offset = await backplane.open("lobby", LIMITS)
            assert isinstance(epoch, str)
            assert epoch
            assert offset == 0
            assert await backplane.open("lobby", LIMITS) == (epoch, 0)  # idempotent
            other, _ = await backplane.open("other", LIMITS)
            assert other != epoch

    async def test_offsets_count_up_from_one_in_publish_order(self) -> None:
        async with self.recorders() as (recorder,):
            epoch, _ = await recorder.backplane.open("lobby", LIMITS)
            envelopes = await self.publish(recorder, "lobby", self.payloads(5))
            assert [(e.epoch, e.offset) for e in envelopes] == [(epoch, n)
                                                                for n in range(1, 6)]
            delivered = await recorder.wait("lobby", 5)
            assert delivered == envelopes
            # Opened again: the same stream, at its current offset.
            assert await recorder.backplane.open("lobby", LIMITS) == (epoch, 5)

    async def test_deliver_sees_each_stream_in_offset_order_exactly_once(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            await backplane.open("a", LIMITS)
            await backplane.open("b", LIMITS)
            for stream in ("a", "b", "a", "a", "b", "a"):
                await self.publish(recorder, stream, self.payloads(1))
            await recorder.wait("a", 4)
            await recorder.wait("b", 2)
            await anyio.sleep(self.settle)  # a duplicate would arrive now
            assert _offsets(recorder.of("a")) == [1, 2, 3, 4]
            assert _offsets(recorder.of("b")) == [1, 2]

    async def test_position(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            epoch, _ = await backplane.open("lobby", LIMITS)
            assert await backplane.position("lobby") == (epoch, 0)
            await self.publish(recorder, "lobby", self.payloads(3))
            await recorder.wait("lobby", 3)
            assert await backplane.position("lobby") == (epoch, 3)

    # -------------------------------------------------------------------- the history

    async def test_since_replays_exactly_what_followed_any_offset(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            epoch, _ = await backplane.open("lobby", LIMITS)
            envelopes = await self.publish(recorder, "lobby", self.payloads(6))
            frames = tuple(e.frame for e in envelopes)
            for offset in range(7):
                assert await backplane.since("lobby", epoch, offset) == Recovery(
                    True, frames[offset:], epoch, 6)

    async def test_since_is_all_or_nothing_when_trimmed_by_count(self) -> None:
        limits = HistoryLimits(max_messages=2)
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            epoch, _ = await backplane.open("lobby", limits)
            envelopes = await self.publish(recorder, "lobby", self.payloads(5),
                                           limits=limits)
            frames = tuple(e.frame for e in envelopes)
            assert await backplane.since("lobby", epoch, 3) == Recovery(True, frames[3:],
                                                                        epoch, 5)
            assert await backplane.since("lobby", epoch, 5) == Recovery(True, (), epoch, 5)
            for offset in (0, 1, 2):
                assert await backplane.since("lobby", epoch, offset) == Recovery(
                    False, (), epoch, 5)

    async def test_since_is_all_or_nothing_when_trimmed_by_bytes(self) -> None:
        # Offsets 1-6: frames of one size, about 1.1 kB; room for three, not four (frame
        # sizes count, with the stream name, epoch and offset, not payload sizes).
        payloads = [msg_payload("e", f"{n}" + "x" * 1000) for n in range(6)]
        limits = HistoryLimits(max_bytes=3900)
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            epoch, _ = await backplane.open("lobby", limits)
            envelopes = await self.publish(recorder, "lobby", payloads, limits=limits)
            (size,) = {e.size for e in envelopes}
            assert 3 * size <= limits.max_bytes < 4 * size
            frames = tuple(e.frame for e in envelopes)
            assert await backplane.since("lobby", epoch, 3) == Recovery(True, frames[3:],
                                                                        epoch, 6)
            for offset in (0, 1, 2):
                assert await backplane.since("lobby", epoch, offset) == Recovery(
                    False, (), epoch, 6)

    async def test_since_is_all_or_nothing_when_aged_out(self) -> None:
        limits = HistoryLimits(max_age=0.5)
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            epoch, _ = await backplane.open("lobby", limits)
            await self.publish(recorder, "lobby", self.payloads(2), limits=limits)
            await anyio.sleep(0.3)
            (fresh,) = await self.publish(recorder, "lobby", self.payloads(1, 2),
                                          limits=limits)
            await anyio.sleep(0.3)  # 1 and 2 are 0.6 s old now, 3 is 0.3 s old
            assert await backplane.since("lobby", epoch, 2) == Recovery(
                True, (fresh.frame,), epoch, 3)
            assert await backplane.since("lobby", epoch, 3) == Recovery(True, (), epoch, 3)
            for offset in (0, 1):
                assert await backplane.since("lobby", epoch, offset) == Recovery(
                    False, (), epoch, 3)
            await anyio.sleep(0.6)  # all of them aged out
            assert await backplane.since("lobby", epoch, 2) == Recovery(False, (), epoch, 3)
            assert await backplane.since("lobby", epoch, 3) == Recovery(True, (), epoch, 3)

    async def test_since_another_epoch_or_a_future_offset_is_not_recovered(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            epoch, _ = await backplane.open("lobby", LIMITS)
            await self.publish(recorder, "lobby", self.payloads(3))
            failed = Recovery(False, (), epoch, 3)
            assert await backplane.since("lobby", epoch + "x", 1) == failed
            assert await backplane.since("lobby", epoch + "x", 3) == failed
            assert await backplane.since("lobby", epoch, 4) == failed
            assert await backplane.since("lobby", epoch, -1) == failed
            assert (await backplane.since("lobby", epoch, 2)).recovered

    async def test_since_of_an_unknown_stream_is_not_recovered(self) -> None:
        async with self.recorders() as (recorder,):
            assert await recorder.backplane.since("nowhere", "e", 0) == Recovery(
                False, (), "", 0)

    # ---------------------------------------------------------------- streams' lives

    async def test_close_and_open_again(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            old, _ = await backplane.open("lobby", LIMITS)
            envelopes = await self.publish(recorder, "lobby", self.payloads(3))
            await recorder.wait("lobby", 3)
            await backplane.close("lobby")
            await backplane.close("nowhere")  # harmless
            epoch, offset = await backplane.open("lobby", LIMITS)
            if self.forgets_closed_streams:
                assert epoch != old
                assert offset == 0
                assert await backplane.since("lobby", old, 1) == Recovery(False, (),
                                                                          epoch, 0)
            else:
                assert (epoch, offset) == (old, 3)
                assert await backplane.since("lobby", old, 1) == Recovery(
                    True, tuple(e.frame for e in envelopes[1:]), old, 3)
            (envelope,) = await self.publish(recorder, "lobby", self.payloads(1))
            assert (envelope.epoch, envelope.offset) == (epoch, offset + 1)
            await recorder.wait("lobby", 4)
            await anyio.sleep(self.settle)
            assert recorder.of("lobby") == [*envelopes, envelope]

    async def test_publish_to_a_stream_that_is_not_open(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            if not self.shared:
                with pytest.raises(KeyError):
                    await backplane.publish("lobby", "lobby", msg_payload("e", 1))
                return
            # Shared: members may be elsewhere; it is numbered and kept, not delivered.
            first = await backplane.publish("lobby", "lobby", msg_payload("e", 1),
                                            limits=LIMITS)
            assert first.offset == 1
            epoch, offset = await backplane.open("lobby", LIMITS)
            assert (epoch, offset) == (first.epoch, 1)
            assert await backplane.since("lobby", epoch, 0) == Recovery(
                True, (first.frame,), epoch, 1)
            await anyio.sleep(self.settle)
            assert recorder.delivered == []

    # --------------------------------------------------------------------- contents

    async def test_key_and_exclude_are_carried(self) -> None:
        async with self.recorders(2 if self.shared else 1) as recorders:
            for recorder in recorders:
                await recorder.backplane.open("lobby", LIMITS)
            envelope = await recorders[0].backplane.publish(
                "lobby", "lobby", msg_payload("e", 1), key=("lobby", "cursor"),
                exclude="session-1", limits=LIMITS)
            plain = await recorders[0].backplane.publish(
                "lobby", "lobby", msg_payload("e", 2), limits=LIMITS)
            assert (envelope.key, envelope.exclude) == (("lobby", "cursor"), "session-1")
            for recorder in recorders:
                first, second = await recorder.wait("lobby", 2)
                assert first == envelope
                assert (first.key, first.exclude) == (("lobby", "cursor"), "session-1")
                assert second == plain
                assert (second.key, second.exclude) == (None, None)

    async def test_payloads_round_trip(self) -> None:
        payloads = [msg_payload("chat", "é€😀"), msg_payload("chat", "two\nlines"),
                    msg_payload("move", None), msg_payload("big", "x" * 100_000),
                    msg_payload("nested", {"a": [1, 2.5, True, {"b": "\u0000"}]})]
        async with self.recorders(2 if self.shared else 1) as recorders:
            for recorder in recorders:
                await recorder.backplane.open("lobby", LIMITS)
            epoch, _ = await recorders[0].backplane.open("lobby", LIMITS)
            envelopes = await self.publish(recorders[0], "lobby", payloads)
            for envelope, payload in zip(envelopes, payloads, strict=True):
                assert envelope.frame == msg_frame_from("lobby", epoch, envelope.offset,
                                                        payload)
                assert envelope.size == len(envelope.frame.encode())
            assert json.loads(envelopes[0].frame)["data"] == "é€😀"
            for recorder in recorders:
                assert await recorder.wait("lobby", len(payloads)) == envelopes
                recovery = await recorder.backplane.since("lobby", epoch, 0)
                assert recovery.frames == tuple(e.frame for e in envelopes)

    async def test_the_wire_name_of_an_inbox(self) -> None:
        async with self.recorders() as (recorder,):
            epoch, _ = await recorder.backplane.open("@inbox/abc", LIMITS)
            (envelope,) = await self.publish(recorder, "@inbox/abc", self.payloads(1),
                                             wire="@inbox")
            assert envelope.stream == "@inbox/abc"
            assert json.loads(envelope.frame)["stream"] == "@inbox"
            assert await recorder.wait("@inbox/abc", 1) == [envelope]
            assert (await recorder.backplane.since("@inbox/abc", epoch, 0)).frames == (
                envelope.frame,)

    # ---------------------------------------------------------------- shared streams

    async def test_shared_a_publish_is_delivered_everywhere_in_order(self) -> None:
        if not self.shared:
            pytest.skip("the backplane is not shared")
        async with self.recorders(2) as (a, b):
            epoch, _ = await a.backplane.open("lobby", LIMITS)
            assert await b.backplane.open("lobby", LIMITS) == (epoch, 0)
            published: list[Envelope] = []

            async def publisher(recorder: Recorder, start: int) -> None:
                for payload in self.payloads(20, start):
                    published.append(await recorder.backplane.publish(
                        "lobby", "lobby", payload, limits=LIMITS))

            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher, a, 0)
                tg.start_soon(publisher, b, 100)
            assert sorted(_offsets(published)) == list(range(1, 41))
            by_offset = sorted(published, key=lambda e: e.offset)
            for recorder in (a, b):
                assert await recorder.wait("lobby", 40) == by_offset
            await anyio.sleep(self.settle)
            assert a.of("lobby") == b.of("lobby") == by_offset
            assert await b.backplane.position("lobby") == (epoch, 40)
            assert (await a.backplane.since("lobby", epoch, 0)).frames == tuple(
                e.frame for e in by_offset)

    async def test_shared_only_open_streams_are_delivered(self) -> None:
        if not self.shared:
            pytest.skip("the backplane is not shared")
        async with self.recorders(2) as (a, b):
            await a.backplane.open("lobby", LIMITS)
            await b.backplane.open("lobby", LIMITS)
            await self.publish(a, "lobby", self.payloads(1))
            await b.wait("lobby", 1)
            await b.backplane.close("lobby")
            await self.publish(a, "lobby", self.payloads(2))
            await a.wait("lobby", 3)
            await anyio.sleep(self.settle)
            assert _offsets(b.of("lobby")) == [1]
            # Open again: it goes on from the stream's current position.
            assert (await b.backplane.open("lobby", LIMITS))[1] == 3
            await self.publish(a, "lobby", self.payloads(1))
            await b.wait("lobby", 2)
            assert _offsets(b.of("lobby")) == [1, 4]

    async def test_shared_is_what_the_class_implements(self) -> None:
        async with self.recorders() as (recorder,):
            backplane = recorder.backplane
            assert backplane.shared is self.shared
            assert isinstance(backplane, SharedState) is self.shared

    # ----------------------------------------------------------------- shared state

    async def test_shared_state_a_session_moves_to_the_worker_that_claims_it(self) -> None:
        if not self.shared:
            pytest.skip("the backplane is not shared")
        async with self.recorders(2) as (a, b):
            sa, sb = a.state, b.state
            assert sa.worker != sb.worker
            record = SessionRecord("s1", "ann", 2, (1, 2), ("lobby",), {"name": "Ann"})
            assert await sa.save_session(record, 30)
            assert await sb.member_sessions("ann") == ["s1"]
            assert await sb.session_owners(["s1", "nope"]) == {"s1": sa.worker,
                                                               "nope": None}
            assert await sb.claim_session("s1", "ann", 2, 30) == record
            await a.event("session_moved", "s1")
            assert await sa.session_owners(["s1"]) == {"s1": sb.worker}
            assert not await sa.save_session(record, 30)  # taken over: let it go
            with pytest.raises(StaleSession):
                await sa.claim_session("s1", "ann", 0, 30)
            assert await sa.claim_session("nope", "ann", 1, 30) is None
            # Detached on b: nobody holds it; claimed back on a, b is told.
            await sb.detach_session("s1", 60)
            assert await sa.session_owners(["s1"]) == {"s1": ""}
            assert await sa.claim_session("s1", "ann", 1, 30) == record
            await b.event("session_moved", "s1")
            await sa.end_session("s1")
            assert await sb.session_owners(["s1"]) == {"s1": None}
            assert await sb.member_sessions("ann") == []
            assert await sb.claim_session("s1", "ann", 2, 30) is None

    async def test_shared_state_rosters_in_order_of_arrival(self) -> None:
        if not self.shared:
            pytest.skip("the backplane is not shared")
        async with self.recorders(2) as (a, b):
            sa, sb = a.state, b.state
            await b.backplane.open("lobby", LIMITS)  # a worker with members there
            ann = PresenceOp("lobby", "attach", "ann", "s1", {"name": "Ann"},
                             {"device": "phone"}, sa.worker)
            await sa.announce(ann)
            await b.event("presence", ann)
            bob = PresenceOp("lobby", "attach", "bob", "s2", worker=sb.worker)
            await sb.announce(bob)
            assert await sa.roster("lobby") == [ann, bob]
            away = PresenceOp("lobby", "detach", "ann", "s1", {"name": "Ann"},
                              worker=sa.worker)
            await sa.announce(away)
            await b.event("presence", away)
            assert await sb.roster("lobby") == [away, bob]  # ann arrived first
            gone = PresenceOp("lobby", "remove", "ann", "s1", worker=sa.worker)
            await sa.announce(gone)
            await b.event("presence", gone)
            assert await sb.roster("lobby") == [bob]
            assert await sb.roster("elsewhere") == []

    async def test_shared_state_disconnect_sessions_held_elsewhere(self) -> None:
        if not self.shared:
            pytest.skip("the backplane is not shared")
        async with self.recorders(2) as (a, b):
            sa, sb = a.state, b.state
            assert await sa.save_session(SessionRecord("s1", "ann", 1, (1,), ()), 30)
            assert await sa.save_session(SessionRecord("s2", "ann", 1, (1,), ()), 30)
            await sa.detach_session("s2", 60)
            assert await sb.disconnect_sessions(["s1", "s2", "nope"], 4000, "bye") == 2
            # Live on a: its worker closes and ends it. Detached: ended at once.
            await a.event("disconnect", "s1", 4000, "bye")
            await a.event("session_ended", "s2")
            assert await sb.session_owners(["s1", "s2"]) == {"s1": sa.worker, "s2": None}
            assert await sb.disconnect_sessions([], 4000, "bye") == 0
            await sa.end_session("s1")
            assert await sb.member_sessions("ann") == []
