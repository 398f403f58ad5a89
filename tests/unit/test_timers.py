"""The hub's timers: every connection's deadlines served by one task."""

from __future__ import annotations

import math

import anyio
import pytest

from wsroom._runtime.timers import RESOLUTION, Timers

pytestmark = pytest.mark.anyio


class Target:
    def __init__(self, name: str, log: list[tuple[str, float]],
                 then: list[float | None] | None = None) -> None:
        self.name = name
        self.log = log
        self.then = list(then or [])
        self.timer_at = math.inf

    def on_timer(self, now: float) -> float | None:
        self.log.append((self.name, now))
        if self.name == "broken":
            raise RuntimeError("a bug")
        return self.then.pop(0) if self.then else None


async def test_due_times_are_served_in_order_and_rescheduling_replaces() -> None:
    timers = Timers()
    log: list[tuple[str, float]] = []
    start = anyio.current_time()
    a, b, c = Target("a", log), Target("b", log), Target("c", log)
    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run)
        timers.schedule(b, start + 0.2)
        timers.schedule(a, start + 0.1)
        timers.schedule(c, start + 0.15)
        timers.schedule(c, start + 0.3)  # replaces 0.15: served once, at 0.3
        await anyio.sleep(0.12)
        timers.schedule(a, start + 0.05)  # in the past: served at once, again
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    # (Where the second "a" falls among the others depends on how late this task woke.)
    assert sorted(name for name, _ in log) == ["a", "a", "b", "c"]
    first = dict(reversed(log))
    assert first["a"] < first["b"] < first["c"]  # in order of their due times
    for name, due in (("a", 0.1), ("b", 0.2), ("c", 0.3)):  # never early; c once, at 0.3
        assert first[name] >= start + due, name


async def test_a_deadline_just_ahead_of_now_does_not_spin() -> None:
    # Returning a time within RESOLUTION of the time served used to make the serving
    # loop pop the same entry for ever (the connection's hook deadline did this).
    timers = Timers()
    log: list[tuple[str, float]] = []
    start = anyio.current_time()
    target = Target("t", log)
    target.then = [start + 0.1 + RESOLUTION / 2, None]
    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run)
        timers.schedule(target, start + 0.1)
        with anyio.fail_after(5):
            while len(log) < 2:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert len(log) == 2
    assert log[1][1] > log[0][1]


async def test_a_failing_target_does_not_stop_the_others() -> None:
    timers = Timers()
    log: list[tuple[str, float]] = []
    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run)
        timers.schedule(Target("broken", log), start + 0.01)
        timers.schedule(Target("fine", log), start + 0.05)
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert [name for name, _ in log] == ["broken", "fine"]


async def test_cancelled_targets_are_not_served_and_do_not_pile_up() -> None:
    timers = Timers()
    log: list[tuple[str, float]] = []
    start = anyio.current_time()
    targets = [Target(f"t{i}", log) for i in range(300)]
    for target in targets:
        timers.schedule(target, start + 3600)
    for target in targets[:250]:
        timers.cancel(target)
    # Stale entries are compacted away once they are most of the heap: a closed
    # connection is not kept alive until its next ping time.
    assert len(timers) < 300
    assert len(timers) >= 50
    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run)
        for target in targets[250:]:
            timers.schedule(target, start)  # due now
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert sorted(name for name, _ in log) == sorted(f"t{i}" for i in range(250, 300))
