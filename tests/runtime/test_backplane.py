"""The in-memory backplane (``wsroom._backplane.memory.MemoryBackplane``), and the two
backplane interfaces (``Backplane`` for streams, ``SharedState`` for what shared
backplanes share besides).

It numbers each stream's messages, keeps their bounded history and delivers them
synchronously, in offset order, to the callback the hub bound. A stream is forgotten
when it is closed: opened again, it starts a new epoch.
"""

from __future__ import annotations

import json

import anyio
import pytest

from support import running, wait_for
from wsroom import CloseCode, Connection, Hub, SharedState
from wsroom._backplane import Backplane, Envelope, MemoryBackplane
from wsroom._core.history import HistoryLimits, Recovery
from wsroom._core.protocol import msg_frame_from, msg_payload

pytestmark = pytest.mark.anyio

LIMITS = HistoryLimits()


class Bound:
    """A backplane bound to a recording callback."""

    def __init__(self) -> None:
        self.backplane = MemoryBackplane()
        self.delivered: list[Envelope] = []
        self.lost: list[str] = []
        self.backplane.bind(self.delivered.append, self.lost.append)

    async def publish(self, stream: str, n: int, *, wire_name: str | None = None
                      ) -> list[Envelope]:
        return [await self.backplane.publish(stream, wire_name or stream,
                                             msg_payload("e", {"n": k}))
                for k in range(n)]


async def test_open_creates_a_stream_with_a_fresh_epoch_at_offset_zero() -> None:
    backplane = MemoryBackplane()
    assert isinstance(backplane, Backplane)
    assert len(backplane) == 0
    epoch, offset = await backplane.open("lobby", LIMITS)
    assert isinstance(epoch, str)
    assert epoch
    assert offset == 0
    assert len(backplane) == 1
    assert await backplane.position("lobby") == (epoch, 0)
    other, _ = await backplane.open("other", LIMITS)
    assert other != epoch
    assert len(backplane) == 2


async def test_open_again_returns_the_same_stream() -> None:
    bound = Bound()
    backplane = bound.backplane
    epoch, _ = await backplane.open("lobby", LIMITS)
    assert await backplane.open("lobby", LIMITS) == (epoch, 0)
    await bound.publish("lobby", 3)
    # Another local member opens it: same epoch, its current offset, history intact.
    assert await backplane.open("lobby", HistoryLimits(max_messages=1)) == (epoch, 3)
    assert len(backplane) == 1
    recovery = await backplane.since("lobby", epoch, 0)
    assert recovery.recovered
    assert len(recovery.frames) == 3


async def test_publish_numbers_frames_and_delivers_them_synchronously_in_order() -> None:
    bound = Bound()
    backplane = bound.backplane
    epoch, _ = await backplane.open("lobby", LIMITS)
    payloads = [msg_payload("chat", {"text": "hi"}), msg_payload("chat", "é€😀"),
                msg_payload("move", None)]
    returned = []
    for number, payload in enumerate(payloads, start=1):
        envelope = await backplane.publish("lobby", "lobby", payload)
        # Delivered during publish: the callback saw it before publish returned.
        assert bound.delivered[-1] is envelope
        assert len(bound.delivered) == number
        returned.append(envelope)
    assert bound.delivered == returned
    assert [e.offset for e in returned] == [1, 2, 3]
    assert await backplane.position("lobby") == (epoch, 3)
    for envelope, payload in zip(returned, payloads, strict=True):
        assert envelope.stream == "lobby"
        assert envelope.epoch == epoch
        assert envelope.frame == msg_frame_from("lobby", epoch, envelope.offset, payload)
        assert envelope.size == len(envelope.frame.encode("utf-8"))
        assert envelope.key is None
        assert envelope.exclude is None
    frames = [json.loads(e.frame) for e in returned]
    assert frames == [
        {"type": "msg", "stream": "lobby", "epoch": epoch, "offset": 1, "event": "chat",
         "data": {"text": "hi"}},
        {"type": "msg", "stream": "lobby", "epoch": epoch, "offset": 2, "event": "chat",
         "data": "é€😀"},
        {"type": "msg", "stream": "lobby", "epoch": epoch, "offset": 3, "event": "move",
         "data": None},
    ]
    assert list(frames[0]) == ["type", "stream", "epoch", "offset", "event", "data"]
    assert returned[1].size > len(returned[1].frame)  # bytes, not characters


async def test_publish_passes_key_and_exclude_through() -> None:
    bound = Bound()
    await bound.backplane.open("lobby", LIMITS)
    envelope = await bound.backplane.publish("lobby", "lobby", msg_payload("e", 1),
                                             key=("lobby", "cursor"), exclude="session-1")
    assert bound.delivered == [envelope]
    assert envelope.key == ("lobby", "cursor")
    assert envelope.exclude == "session-1"


async def test_the_wire_name_is_used_in_the_frame_and_the_key_in_the_envelope() -> None:
    bound = Bound()
    epoch, _ = await bound.backplane.open("@inbox/abc", LIMITS)
    (envelope,) = await bound.publish("@inbox/abc", 1, wire_name="@inbox")
    assert envelope.stream == "@inbox/abc"
    assert json.loads(envelope.frame)["stream"] == "@inbox"
    assert (await bound.backplane.since("@inbox/abc", epoch, 0)).frames == (envelope.frame,)


async def test_streams_are_numbered_independently_and_delivered_in_publish_order() -> None:
    bound = Bound()
    backplane = bound.backplane
    await backplane.open("a", LIMITS)
    await backplane.open("b", LIMITS)
    for stream in ("a", "b", "a", "a", "b"):
        await bound.publish(stream, 1)
    assert [(e.stream, e.offset) for e in bound.delivered] == [
        ("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2),
    ]


async def test_since_recovers_exactly_the_tail() -> None:
    bound = Bound()
    backplane = bound.backplane
    epoch, _ = await backplane.open("lobby", LIMITS)
    frames = tuple(e.frame for e in await bound.publish("lobby", 5))
    for offset in range(6):
        assert await backplane.since("lobby", epoch, offset) == Recovery(
            True, frames[offset:], epoch, 5
        )


async def test_since_is_not_recovered_for_another_epoch_or_a_future_offset() -> None:
    bound = Bound()
    backplane = bound.backplane
    epoch, _ = await backplane.open("lobby", LIMITS)
    await bound.publish("lobby", 3)
    failed = Recovery(False, (), epoch, 3)
    assert await backplane.since("lobby", epoch + "x", 1) == failed
    assert await backplane.since("lobby", epoch + "x", 3) == failed
    assert await backplane.since("lobby", epoch, 4) == failed
    assert await backplane.since("lobby", epoch, -1) == failed


async def test_since_is_not_recovered_when_the_history_was_pruned() -> None:
    bound = Bound()
    backplane = bound.backplane
    epoch, _ = await backplane.open("lobby", HistoryLimits(max_messages=2))
    frames = tuple(e.frame for e in await bound.publish("lobby", 5))
    assert await backplane.since("lobby", epoch, 3) == Recovery(True, frames[3:], epoch, 5)
    assert await backplane.since("lobby", epoch, 5) == Recovery(True, (), epoch, 5)
    for offset in (0, 1, 2):
        assert await backplane.since("lobby", epoch, offset) == Recovery(False, (), epoch, 5)


async def test_since_is_not_recovered_when_the_history_aged_out() -> None:
    bound = Bound()
    backplane = bound.backplane
    epoch, _ = await backplane.open("lobby", HistoryLimits(max_age=0.01))
    await bound.publish("lobby", 2)
    await anyio.sleep(0.05)
    assert await backplane.since("lobby", epoch, 0) == Recovery(False, (), epoch, 2)
    assert await backplane.since("lobby", epoch, 2) == Recovery(True, (), epoch, 2)


async def test_close_forgets_the_stream_and_a_new_open_starts_a_new_epoch() -> None:
    bound = Bound()
    backplane = bound.backplane
    old, _ = await backplane.open("lobby", LIMITS)
    await bound.publish("lobby", 3)
    await backplane.close("lobby")
    assert len(backplane) == 0
    assert await backplane.since("lobby", old, 1) == Recovery(False, (), "", 0)
    new, offset = await backplane.open("lobby", LIMITS)
    assert new != old
    assert offset == 0
    # A client of the old stream cannot mistake the new offsets for the old ones.
    (envelope,) = await bound.publish("lobby", 1)
    assert (envelope.epoch, envelope.offset) == (new, 1)
    assert await backplane.since("lobby", old, 0) == Recovery(False, (), new, 1)
    assert await backplane.since("lobby", old, 3) == Recovery(False, (), new, 1)
    assert await backplane.since("lobby", new, 0) == Recovery(True, (envelope.frame,), new, 1)


async def test_close_of_an_unknown_stream_is_harmless() -> None:
    backplane = MemoryBackplane()
    await backplane.close("nowhere")
    await backplane.open("lobby", LIMITS)
    await backplane.close("nowhere")
    assert len(backplane) == 1


async def test_publish_to_a_stream_that_is_not_open_raises_key_error() -> None:
    bound = Bound()
    backplane = bound.backplane
    with pytest.raises(KeyError):
        await backplane.publish("lobby", "lobby", msg_payload("e", 1))
    await backplane.open("lobby", LIMITS)
    await backplane.close("lobby")
    with pytest.raises(KeyError):
        await backplane.publish("lobby", "lobby", msg_payload("e", 1))
    assert bound.delivered == []
    assert len(backplane) == 0  # publishing did not create it


async def test_since_and_position_of_an_unknown_stream() -> None:
    backplane = MemoryBackplane()
    assert await backplane.since("nowhere", "e", 0) == Recovery(False, (), "", 0)
    with pytest.raises(KeyError):
        await backplane.position("nowhere")
    assert len(backplane) == 0  # asking did not create it


# -------------------------------------------------------------- the two interfaces


class Streams(MemoryBackplane):
    """A custom backplane, written against the stream interface only."""


class LegacyShared(MemoryBackplane):
    """Written for the old single interface: says shared, but is no SharedState."""

    shared = True


class Shared(MemoryBackplane, SharedState):
    """A custom shared backplane (its shared state trivial)."""

    worker = "w1"

    def bind_state(self, events: object) -> None:
        pass

    async def save_session(self, record: object, ttl: float) -> bool:
        return True

    async def claim_session(self, session: str, member: str, generation: int,
                            ttl: float) -> None:
        return None

    async def detach_session(self, session: str, window: float) -> None:
        pass

    async def end_session(self, session: str) -> None:
        pass

    async def announce(self, op: object) -> None:
        pass

    async def roster(self, room: str) -> list[object]:  # type: ignore[override]
        return []

    async def refresh(self, sessions: list[str], ttl: float, window: float) -> None:
        pass

    async def session_owners(self, sessions: list[str]) -> dict[str, str | None]:
        return {}

    async def disconnect_sessions(self, sessions: list[str], code: int, reason: str
                                  ) -> int:
        return 0

    async def member_sessions(self, member: str) -> list[str]:
        return []


class ShareNothing(Shared):
    """Implements SharedState but says it is not shared."""

    @property
    def shared(self) -> bool:
        return False


def test_the_memory_backplane_is_streams_only() -> None:
    backplane = MemoryBackplane()
    assert isinstance(backplane, Backplane)
    assert not isinstance(backplane, SharedState)
    assert backplane.shared is False
    assert backplane.worker == "local"
    for method in ("bind_state", "save_session", "claim_session", "member_sessions",
                   "roster", "refresh", "disconnect_sessions"):
        assert not hasattr(backplane, method), method  # no NotImplementedError stubs
    with pytest.raises(AttributeError):
        backplane.shared = True  # type: ignore[misc]


def test_shared_is_derived_from_the_interfaces() -> None:
    assert Streams().shared is False
    Streams().bind(lambda envelope: None, lambda stream: None)
    shared = Shared()
    assert shared.shared is True
    shared.bind(lambda envelope: None, lambda stream: None)


def test_saying_shared_without_implementing_shared_state_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"LegacyShared says shared = True but does not "
                                        r"implement wsroom\.SharedState"):
        LegacyShared().bind(lambda envelope: None, lambda stream: None)
    with pytest.raises(TypeError, match="LegacyShared says shared = True"):
        Hub(backplane=LegacyShared())
    with pytest.raises(TypeError, match="ShareNothing implements SharedState"):
        ShareNothing().bind(lambda envelope: None, lambda stream: None)


def test_shared_state_is_abstract() -> None:
    class Partial(MemoryBackplane, SharedState):
        async def member_sessions(self, member: str) -> list[str]:
            return []

    with pytest.raises(TypeError, match="abstract"):
        Partial()


# ------------------------------------------------------------------ the hub's side


def lobby_hub() -> Hub:
    hub = Hub()

    @hub.on_connect
    async def join(conn: Connection) -> None:
        await conn.join("room")

    return hub


@pytest.mark.anyio
async def test_a_stream_the_backplane_lost_sends_its_clients_to_resume() -> None:
    hub = lobby_hub()
    async with running(hub) as (peer, _):
        await wait_for(lambda: any(f["type"] == "welcome" for f in peer.frames))
        hub.backplane._lost("room")
        assert await peer.wait_closed() == CloseCode.INSUFFICIENT_STATE
    assert hub.stats().closes == {"gap": 1}


@pytest.mark.anyio
async def test_a_renumbered_stream_is_a_gap_not_a_duplicate() -> None:
    """A backplane that lost a stream (Redis flushed) starts a new epoch at offset 1:
    the client must not take (new epoch, 1) for a duplicate of (old epoch, 1)."""
    hub = lobby_hub()
    async with running(hub) as (peer, _):
        await wait_for(lambda: any(f["type"] == "welcome" for f in peer.frames))
        assert await hub.publish("room", "e", 1) == 1
        await wait_for(lambda: any(f["type"] == "msg" for f in peer.frames))
        backplane = hub.backplane
        await backplane.close("room")
        await backplane.open("room", HistoryLimits())  # a new epoch
        assert await hub.publish("room", "e", 2) == 1
        assert await peer.wait_closed() == CloseCode.INSUFFICIENT_STATE
    assert [f["data"] for f in peer.frames if f["type"] == "msg"] == [1]
