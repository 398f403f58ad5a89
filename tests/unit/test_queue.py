"""The per-client outbound queue (``wsroom._core.queue``): bounds, policies, order, batching."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from wsroom._core.queue import OutboundQueue, Policy, PushResult, frame_size


def queued(queue: OutboundQueue) -> list[str]:
    """The queued frames, oldest first, without consuming them.

    Reads the private deque: the invariants below are about the whole content after
    every step, which the public API (``pop_batch``) can only show by consuming it.
    """
    return [item.frame for item in queue._items]


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(("max_bytes", "max_messages"), [(0, 1), (1, 0), (-1, 5), (5, -1)])
def test_bounds_must_be_positive(max_bytes: int, max_messages: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        OutboundQueue(max_bytes, max_messages)


@pytest.mark.parametrize(("frame", "size"), [("", 0), ("abc", 3), ("é", 2), ("€", 3), ("😀", 4),
                                             ('{"t":"ü"}', 10)])
def test_frame_size_is_utf8_length(frame: str, size: int) -> None:
    assert frame_size(frame) == size


@given(st.text())
def test_frame_size_matches_encoding(frame: str) -> None:
    assert frame_size(frame) == len(frame.encode("utf-8"))


def test_push_measures_the_frame_when_size_is_not_given() -> None:
    queue = OutboundQueue(max_bytes=6, max_messages=10)
    assert queue.push("€€") is PushResult.QUEUED  # 6 bytes on the wire, 2 characters
    assert queue.bytes == 6
    assert queue.push("a") is PushResult.OVERFLOW
    assert queue.bytes == 6
    assert len(queue) == 1


def test_message_bound() -> None:
    queue = OutboundQueue(max_bytes=1000, max_messages=2)
    assert queue.push("a") is PushResult.QUEUED
    assert queue.push("b") is PushResult.QUEUED
    assert queue.push("c") is PushResult.OVERFLOW
    assert queue.pop_batch(1000) == ["a", "b"]


def test_byte_bound_is_inclusive() -> None:
    queue = OutboundQueue(max_bytes=10, max_messages=10)
    assert queue.push("x", size=4) is PushResult.QUEUED
    assert queue.push("y", size=6) is PushResult.QUEUED  # exactly at the bound
    assert queue.bytes == 10
    assert queue.push("z", size=1) is PushResult.OVERFLOW


@pytest.mark.parametrize("policy", list(Policy))
def test_a_frame_larger_than_the_bound_never_fits(policy: Policy) -> None:
    queue = OutboundQueue(max_bytes=10, max_messages=10)
    assert queue.push("big", size=11, policy=policy, key="k") is PushResult.OVERFLOW
    assert len(queue) == 0
    assert queue.bytes == 0


def test_the_queue_shares_frames_instead_of_copying_them() -> None:
    frame = "".join(["payload-"] * 100)  # built at runtime: not an interned constant
    queue = OutboundQueue(max_bytes=10_000, max_messages=10)
    queue.push(frame)
    assert queue.pop_batch(10_000)[0] is frame


def test_disconnect_overflows_and_discards_nothing() -> None:
    queue = OutboundQueue(max_bytes=10, max_messages=10)
    queue.push("a", size=5)
    queue.push("b", size=5)
    assert queue.push("c", size=1) is PushResult.OVERFLOW
    assert queued(queue) == ["a", "b"]
    assert queue.discarded_total == 0
    assert queue.last_discarded == 0


def test_drop_oldest_discards_only_as_many_oldest_frames_as_needed() -> None:
    queue = OutboundQueue(max_bytes=10, max_messages=10)
    for frame in "abcde":
        queue.push(frame, size=2, policy=Policy.DROP_OLDEST)
    assert queue.push("f", size=3, policy=Policy.DROP_OLDEST) is PushResult.DISCARDED
    assert queued(queue) == ["c", "d", "e", "f"]
    assert queue.last_discarded == 2
    assert queue.discarded_total == 2
    assert queue.bytes == 9


def test_drop_oldest_skips_frames_of_other_policies() -> None:
    queue = OutboundQueue(max_bytes=10, max_messages=3)
    queue.push("keep", size=2, policy=Policy.DISCONNECT)
    queue.push("old", size=2, policy=Policy.DROP_OLDEST)
    queue.push("tick", size=2, policy=Policy.COALESCE, key="k")
    assert queue.push("new", size=2, policy=Policy.DROP_OLDEST) is PushResult.DISCARDED
    assert queued(queue) == ["keep", "tick", "new"]
    # Now only the just-pushed DROP_OLDEST frame could go, and it is not enough.
    assert queue.push("x", size=9, policy=Policy.DROP_OLDEST) is PushResult.OVERFLOW
    assert queued(queue) == ["keep", "tick", "new"]


def test_drop_oldest_that_cannot_make_room_changes_nothing() -> None:
    queue = OutboundQueue(max_bytes=10, max_messages=10)
    queue.push("d1", size=3, policy=Policy.DROP_OLDEST)
    queue.push("x", size=5, policy=Policy.DISCONNECT)
    queue.push("d2", size=2, policy=Policy.DROP_OLDEST)
    # Dropping both d1 and d2 frees 5 bytes; 6 are needed.
    assert queue.push("big", size=6, policy=Policy.DROP_OLDEST) is PushResult.OVERFLOW
    assert queued(queue) == ["d1", "x", "d2"]
    assert queue.bytes == 10
    assert queue.discarded_total == 0


def test_coalesce_keeps_the_newest_frame_per_key() -> None:
    queue = OutboundQueue(max_bytes=100, max_messages=4)
    queue.push("a1", policy=Policy.COALESCE, key="a")
    queue.push("b1", policy=Policy.COALESCE, key="b")
    queue.push("a2", policy=Policy.COALESCE, key="a")
    queue.push("c1", policy=Policy.COALESCE, key="c")
    assert queue.push("b2", policy=Policy.COALESCE, key="b") is PushResult.DISCARDED
    # a1 is superseded by a2, b1 by the incoming b2; order of the survivors is kept.
    assert queued(queue) == ["a2", "c1", "b2"]
    assert queue.last_discarded == 2


def test_coalesce_without_superseded_frames_overflows() -> None:
    queue = OutboundQueue(max_bytes=100, max_messages=2)
    queue.push("a1", policy=Policy.COALESCE, key="a")
    queue.push("b1", policy=Policy.COALESCE, key="b")
    assert queue.push("c1", policy=Policy.COALESCE, key="c") is PushResult.OVERFLOW
    assert queue.push("n", policy=Policy.COALESCE, key=None) is PushResult.OVERFLOW
    assert queued(queue) == ["a1", "b1"]


def test_coalesce_never_discards_keyed_frames_of_other_policies() -> None:
    queue = OutboundQueue(max_bytes=100, max_messages=2)
    queue.push("a1", policy=Policy.DROP_OLDEST, key="a")
    queue.push("a2", policy=Policy.DISCONNECT, key="a")
    assert queue.push("a3", policy=Policy.COALESCE, key="a") is PushResult.OVERFLOW
    assert queued(queue) == ["a1", "a2"]


def test_coalesce_keys_are_opaque_and_scoped_by_the_caller() -> None:
    # The hub scopes keys by room, (room, key): equal app keys of two rooms never
    # supersede each other; the queue then overflows instead of losing table-1's frame.
    queue = OutboundQueue(max_bytes=1000, max_messages=2)
    queue.push("t1 p1 at 10", policy=Policy.COALESCE, key=("table-1", "p1"))
    queue.push("t2 p2 at 20", policy=Policy.COALESCE, key=("table-2", "p2"))
    result = queue.push("t2 p1 at 30", policy=Policy.COALESCE, key=("table-2", "p1"))
    assert result is PushResult.OVERFLOW
    assert queued(queue) == ["t1 p1 at 10", "t2 p2 at 20"]
    assert queue.push("t1 p1 at 40", policy=Policy.COALESCE,
                      key=("table-1", "p1")) is PushResult.DISCARDED
    assert queued(queue) == ["t2 p2 at 20", "t1 p1 at 40"]


def test_push_result_and_last_discarded_reset_on_every_push() -> None:
    queue = OutboundQueue(max_bytes=4, max_messages=10)
    queue.push("a", size=4, policy=Policy.DROP_OLDEST)
    assert queue.push("b", size=4, policy=Policy.DROP_OLDEST) is PushResult.DISCARDED
    assert queue.last_discarded == 1
    queue.pop_batch(100)
    assert queue.push("c", size=1) is PushResult.QUEUED
    assert queue.last_discarded == 0
    assert queue.discarded_total == 1


def test_push_control_bypasses_the_bounds_and_can_go_first() -> None:
    queue = OutboundQueue(max_bytes=4, max_messages=1)
    queue.push("m", size=4)
    queue.push_control("ping")
    queue.push_control("welcome", front=True)
    assert queued(queue) == ["welcome", "m", "ping"]
    queue.push_control("ping2", front=True)  # jumps the data, not the welcome
    assert queued(queue) == ["welcome", "ping2", "m", "ping"]
    queue.pop_batch(0)
    queue.pop_batch(0)
    assert queue.control_queued == 1
    queue.push_control("welcome", front=True)
    assert queue.bytes == 4 + 4 + 7
    assert len(queue) == 3
    # The queue is over its bounds now: every regular push overflows until it drains.
    for policy in Policy:
        assert queue.push("x", size=1, policy=policy, key="k") is PushResult.OVERFLOW
    assert queue.pop_batch(100) == ["welcome", "m", "ping"]
    assert queue.bytes == 0
    assert queue.push("x", size=1) is PushResult.QUEUED


def test_control_frames_are_never_discarded() -> None:
    queue = OutboundQueue(max_bytes=10, max_messages=3)
    queue.push_control("ping")
    queue.push("d", size=2, policy=Policy.DROP_OLDEST)
    assert queue.push("e", size=6, policy=Policy.DROP_OLDEST) is PushResult.DISCARDED
    assert queued(queue) == ["ping", "e"]


def test_pop_batch_returns_at_least_one_frame() -> None:
    queue = OutboundQueue(max_bytes=100, max_messages=10)
    assert queue.pop_batch(10) == []
    queue.push("large", size=50)
    queue.push("small", size=1)
    assert queue.pop_batch(10) == ["large"]
    assert queue.bytes == 1
    assert queue.pop_batch(0) == ["small"]
    assert queue.bytes == 0


def test_pop_batch_stops_at_the_first_frame_that_does_not_fit() -> None:
    queue = OutboundQueue(max_bytes=100, max_messages=10)
    for frame, size in [("a", 3), ("b", 3), ("c", 5), ("d", 1)]:
        queue.push(frame, size=size)
    # Sizes plus one newline between frames: "a\nb" is 7 bytes. "d" would fit after
    # "c", but frames are never reordered.
    assert queue.pop_batch(7) == ["a", "b"]
    assert queue.pop_batch(6) == ["c"]
    assert queue.pop_batch(6) == ["d"]
    assert len(queue) == 0
    assert queue.bytes == 0


def test_clear() -> None:
    queue = OutboundQueue(max_bytes=100, max_messages=10)
    queue.push("a")
    queue.push_control("ping")
    assert queue.clear() == 2
    assert len(queue) == 0
    assert queue.bytes == 0
    assert queue.pop_batch(100) == []


def test_policy_values() -> None:
    assert [str(policy) for policy in Policy] == ["disconnect", "drop_oldest", "coalesce"]
    assert Policy("coalesce") is Policy.COALESCE


# ------------------------------------------------------- stateful: one queue, every step


@dataclass(frozen=True)
class Meta:
    serial: int
    size: int
    policy: Policy
    key: str | None
    control: bool = False
    front: bool = False


def superseded(frames: list[Meta], incoming_key: str | None) -> list[Meta]:
    """Queued COALESCE frames with a newer frame of the same key (or the incoming one)."""
    seen = set() if incoming_key is None else {incoming_key}
    victims = []
    for meta in reversed(frames):
        if meta.policy is not Policy.COALESCE or meta.key is None or meta.control:
            continue
        if meta.key in seen:
            victims.append(meta)
        seen.add(meta.key)
    return victims


class QueueMachine(RuleBasedStateMachine):
    """Random pushes (every policy), control pushes, pops and clears on one queue.

    Every step checks what it changed against the documented contract; the invariants
    check the whole content after every step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.queue = OutboundQueue(1, 1)
        self.meta: dict[str, Meta] = {}
        self.serial = 0
        self.popped: list[str] = []

    @initialize(max_bytes=st.integers(1, 60), max_messages=st.integers(1, 8))
    def start(self, max_bytes: int, max_messages: int) -> None:
        self.queue = OutboundQueue(max_bytes, max_messages)

    # -- helpers

    def _name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def _metas(self, frames: list[str]) -> list[Meta]:
        return [self.meta[frame] for frame in frames]

    def _fits(self, frames: list[Meta], size: int) -> bool:
        queue = self.queue
        return (sum(m.size for m in frames) + size <= queue.max_bytes
                and len(frames) < queue.max_messages)

    # -- rules

    @rule(size=st.integers(1, 25), policy=st.sampled_from(Policy),
          key=st.sampled_from([None, "a", "b", "c"]))
    def push(self, size: int, policy: Policy, key: str | None) -> None:
        queue = self.queue
        frame = self._name("m")
        new = Meta(self.serial, size, policy, key)
        self.meta[frame] = new
        before = queued(queue)
        before_meta = self._metas(before)
        bytes_before, total_before = queue.bytes, queue.discarded_total

        result = queue.push(frame, size=size, policy=policy, key=key)
        after = queued(queue)

        # Could the policy have made room? OVERFLOW exactly when it could not.
        if policy is Policy.DISCONNECT:
            possible = self._fits(before_meta, size)
        elif policy is Policy.DROP_OLDEST:
            possible = self._fits(
                [m for m in before_meta if m.policy is not Policy.DROP_OLDEST or m.control],
                size)
        else:
            doomed = superseded(before_meta, key)
            possible = self._fits([m for m in before_meta if m not in doomed], size)
        assert (result is PushResult.OVERFLOW) == (not possible)

        if result is PushResult.OVERFLOW:
            assert after == before, "OVERFLOW must leave the queue unchanged"
            assert queue.bytes == bytes_before
            assert queue.last_discarded == 0
            assert queue.discarded_total == total_before
            return

        assert after[-1] == frame
        kept = after[:-1]
        kept_set = set(kept)
        assert kept == [f for f in before if f in kept_set], "survivors keep their order"
        removed = self._metas([f for f in before if f not in kept_set])
        assert queue.last_discarded == len(removed)
        assert queue.discarded_total == total_before + len(removed)
        assert (result is PushResult.DISCARDED) == bool(removed)
        assert queue.bytes == bytes_before + size - sum(m.size for m in removed)
        # A successful push never leaves the queue beyond its bounds, control frames
        # included (they count toward the total that the push must fit in).
        assert queue.bytes <= queue.max_bytes
        assert len(queue) <= queue.max_messages

        if self._fits(before_meta, size):
            assert not removed, "nothing is discarded when the frame fits"
        for meta in removed:
            assert not meta.control, "control frames are never discarded"
            assert meta.policy is policy, "a frame is only discarded under its own policy"
            assert meta.policy is not Policy.DISCONNECT

        if policy is Policy.DROP_OLDEST and removed:
            candidates = [m for m in before_meta
                          if m.policy is Policy.DROP_OLDEST and not m.control]
            assert removed == candidates[: len(removed)], "the oldest go first"
            # ... and no more of them than needed.
            spared = [m for m in before_meta if m not in removed[:-1]]
            assert not self._fits(spared, size)
        if policy is Policy.COALESCE and removed:
            assert removed == sorted(superseded(before_meta, key), key=lambda m: m.serial)
            after_meta = self._metas(after)
            for meta in removed:
                assert any(m.key == meta.key and m.policy is Policy.COALESCE
                           and m.serial > meta.serial for m in after_meta), (
                    "a coalesced frame is always superseded by a newer one that stays"
                )
            keys = [m.key for m in after_meta if m.policy is Policy.COALESCE and m.key]
            assert len(keys) == len(set(keys)), "after coalescing, one frame per key"

    @rule(pad=st.integers(0, 12), front=st.booleans())
    def push_control(self, pad: int, front: bool) -> None:
        queue = self.queue
        frame = self._name("c") + "." * pad
        self.meta[frame] = Meta(self.serial, frame_size(frame), Policy.DISCONNECT, None,
                                control=True, front=front)
        before, bytes_before = queued(queue), queue.bytes
        queue.push_control(frame, front=front)
        # front: ahead of all data, behind the control frames already at the front.
        lead = 0
        while lead < len(before) and self.meta[before[lead]].control:
            lead += 1
        expected = [*before[:lead], frame, *before[lead:]] if front else [*before, frame]
        assert queued(queue) == expected
        assert queue.bytes == bytes_before + frame_size(frame)

    @rule(max_bytes=st.integers(0, 70))
    def pop_batch(self, max_bytes: int) -> None:
        queue = self.queue
        before, bytes_before = queued(queue), queue.bytes
        out = queue.pop_batch(max_bytes)
        if not before:
            assert out == []
            return
        assert out, "a non-empty queue always yields at least one frame"
        assert out == before[: len(out)], "oldest first"
        sizes = [self.meta[f].size for f in before]
        batch = sum(sizes[: len(out)])
        on_wire = batch + len(out) - 1  # newline separators between frames
        assert on_wire <= max_bytes or len(out) == 1
        if len(out) < len(before):
            assert on_wire + 1 + sizes[len(out)] > max_bytes, "as large as allowed"
        assert queued(queue) == before[len(out):]
        assert queue.bytes == bytes_before - batch
        self.popped.extend(out)

    @rule()
    def clear(self) -> None:
        count = len(queued(self.queue))
        assert self.queue.clear() == count
        assert len(self.queue) == 0
        assert self.queue.bytes == 0

    # -- invariants

    @invariant()
    def accounting(self) -> None:
        frames = queued(self.queue)
        assert len(self.queue) == len(frames)
        assert self.queue.bytes == sum(self.meta[f].size for f in frames)

    @invariant()
    def bounds(self) -> None:
        queue = self.queue
        metas = self._metas(queued(queue))
        regular = [m for m in metas if not m.control]
        assert sum(m.size for m in regular) <= queue.max_bytes
        assert len(regular) <= queue.max_messages
        if len(regular) == len(metas):
            assert queue.bytes <= queue.max_bytes
            assert len(queue) <= queue.max_messages

    @invariant()
    def fifo(self) -> None:
        in_order = [m.serial for m in self._metas(queued(self.queue)) if not m.front]
        assert in_order == sorted(in_order)
        sent = [m.serial for m in self._metas(self.popped) if not m.front]
        assert sent == sorted(sent)


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ------------------------------------------ property: fan-out to several members' queues


MEMBERS = ("m0", "m1", "m2")
ROOMS = ("r0", "r1", "r2")


@st.composite
def fan_out_scenarios(draw: st.DrawFn) -> tuple[dict[str, Policy], dict[str, tuple[str, ...]],
                                                 dict[str, tuple[int, int]], list[tuple]]:
    policies = {room: draw(st.sampled_from(Policy)) for room in ROOMS}
    members = {room: tuple(m for m in MEMBERS if draw(st.booleans())) for room in ROOMS}
    bounds = {m: (draw(st.integers(10, 80)), draw(st.integers(1, 6))) for m in MEMBERS}
    publish = st.tuples(st.just("publish"), st.sampled_from(ROOMS), st.integers(1, 15),
                        st.sampled_from(["k0", "k1", "k2"]))
    pop = st.tuples(st.just("pop"), st.sampled_from(MEMBERS), st.integers(0, 40), st.just(""))
    ops = draw(st.lists(st.one_of(publish, publish, pop), max_size=60))
    return policies, members, bounds, ops


@settings(max_examples=200, deadline=None)
@given(fan_out_scenarios())
def test_fan_out_keeps_every_member_in_order_and_loses_only_under_the_room_policy(
    scenario: tuple[dict[str, Policy], dict[str, tuple[str, ...]],
                    dict[str, tuple[int, int]], list[tuple]],
) -> None:
    """A broadcast pushes one shared frame onto each member's queue under its room's
    policy; a member whose push overflows is disconnected (the runtime closes it).

    For every member still connected at the end, per room: offsets arrive strictly
    increasing; a ``disconnect`` room delivers every message; a ``coalesce`` room
    delivers the newest message of every key, and anything missing was superseded.
    Across rooms, frames arrive in publish order.
    """
    policies, members, bounds, ops = scenario
    queues = {m: OutboundQueue(*bounds[m]) for m in MEMBERS}
    disconnected: set[str] = set()
    received: dict[str, list[str]] = {m: [] for m in MEMBERS}
    published: dict[str, list[tuple[int, str]]] = defaultdict(list)  # room -> (offset, key)
    serial = 0

    for op, target, amount, key in ops:
        if op == "pop":
            if target not in disconnected:
                received[target].extend(queues[target].pop_batch(amount))
            continue
        room, policy = target, policies[target]
        offset = len(published[room]) + 1
        published[room].append((offset, key))
        serial += 1
        frame = f"{serial}|{room}|{offset}|{key}"
        for member in members[room]:
            if member in disconnected:
                continue
            # Coalescing keys are scoped to their room here; see
            # test_coalesce_keys_of_different_rooms_do_not_supersede_each_other.
            scoped = f"{room}/{key}" if policy is Policy.COALESCE else None
            result = queues[member].push(frame, size=amount, policy=policy, key=scoped)
            if result is PushResult.OVERFLOW:
                disconnected.add(member)
                queues[member].clear()

    for member in MEMBERS:
        if member not in disconnected:
            received[member].extend(queues[member].pop_batch(10**9))
        parsed = [frame.split("|") for frame in received[member]]
        serials = [int(s) for s, _, _, _ in parsed]
        assert serials == sorted(serials)
        assert len(set(serials)) == len(serials), "no frame is delivered twice"
        for room in ROOMS:
            got = [(int(o), k) for _, r, o, k in parsed if r == room]
            offsets = [o for o, _ in got]
            assert offsets == sorted(offsets)
            if member not in members[room]:
                assert not got
                continue
            if member in disconnected:
                continue
            if policies[room] is Policy.DISCONNECT:
                assert got == published[room], "a disconnect room never loses a message"
            elif policies[room] is Policy.COALESCE:
                newest = {k: o for o, k in published[room]}
                assert set(newest.values()) <= set(offsets), "newest per key survives"
                for o, k in published[room]:
                    if o not in offsets:
                        assert newest[k] > o, "only superseded messages are dropped"
