"""Heartbeat and idle deadlines (``wsroom._core.heartbeat``), driven with explicit ``now``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsroom._core.heartbeat import Beat, Heartbeat, Tick


def make(interval: float = 30, timeout: float = 10, idle: float | None = None) -> Heartbeat:
    return Heartbeat(ping_interval=interval, pong_timeout=timeout, idle_timeout=idle, now=0)


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ping_interval": 0, "pong_timeout": 10},
        {"ping_interval": 30, "pong_timeout": 0},
        {"ping_interval": -1, "pong_timeout": 10},
        {"ping_interval": 30, "pong_timeout": 10, "idle_timeout": 0},
    ],
)
def test_intervals_must_be_positive(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        Heartbeat(now=0, **kwargs)


def test_ping_every_interval() -> None:
    hb = make(interval=30, timeout=10)
    assert hb.poll(0) == Tick(Beat.NOTHING, 30, 0)
    assert hb.poll(29.999) == Tick(Beat.NOTHING, 30, 0)
    assert hb.poll(30) == Tick(Beat.PING, 40, 1)  # wake for the pong deadline
    hb.frame_received()
    assert hb.poll(35) == Tick(Beat.NOTHING, 60, 1)
    assert hb.poll(60) == Tick(Beat.PING, 70, 2)
    hb.frame_received()
    assert hb.poll(90) == Tick(Beat.PING, 100, 3)


def test_the_schedule_starts_at_construction_time() -> None:
    hb = Heartbeat(ping_interval=5, pong_timeout=2, now=1000)
    assert hb.poll(1000) == Tick(Beat.NOTHING, 1005, 0)
    assert hb.poll(1005).beat is Beat.PING


def test_no_pong_exactly_at_the_deadline() -> None:
    hb = make(interval=30, timeout=10)
    hb.poll(30)
    assert hb.poll(39.999).beat is Beat.NOTHING
    assert hb.poll(40) == Tick(Beat.NO_PONG, 40)


def test_no_pong_keeps_being_reported() -> None:
    hb = make(interval=30, timeout=10)
    hb.poll(30)
    assert hb.poll(40).beat is Beat.NO_PONG
    assert hb.poll(41).beat is Beat.NO_PONG


@pytest.mark.parametrize("how", ["frame", "message", "pong", "stale pong"])
def test_any_frame_clears_the_deadline(how: str) -> None:
    hb = make(interval=30, timeout=10)
    assert hb.poll(30).beat is Beat.PING
    if how == "frame":
        hb.frame_received()
    elif how == "message":
        hb.message_received(35)
    elif how == "pong":
        assert hb.pong_received(1, 35) == 5
    else:
        assert hb.pong_received(99, 35) is None
    assert hb.poll(40) == Tick(Beat.NOTHING, 60, 1)
    assert hb.poll(59).beat is Beat.NOTHING
    # The next ping opens a new deadline.
    assert hb.poll(60) == Tick(Beat.PING, 70, 2)
    assert hb.poll(70).beat is Beat.NO_PONG


def test_a_frame_before_the_ping_does_not_answer_it() -> None:
    hb = make(interval=30, timeout=10)
    hb.frame_received()
    hb.poll(30)
    assert hb.poll(40).beat is Beat.NO_PONG


def test_later_pings_do_not_push_back_the_deadline() -> None:
    # pong_timeout longer than ping_interval: pings pile up, the first one counts.
    hb = make(interval=2, timeout=5)
    assert hb.poll(2) == Tick(Beat.PING, 4, 1)
    assert hb.poll(4) == Tick(Beat.PING, 6, 2)
    assert hb.poll(6) == Tick(Beat.PING, 7, 3)
    assert hb.poll(7) == Tick(Beat.NO_PONG, 7)


def test_pong_round_trip_time() -> None:
    hb = make(interval=30, timeout=10)
    assert hb.rtt is None
    assert hb.pong_received(0, 1) is None  # nothing was pinged yet
    hb.poll(30)
    assert hb.pong_received(1, 30.25) == pytest.approx(0.25)
    assert hb.rtt == pytest.approx(0.25)
    assert hb.pong_received(1, 30.5) is None  # a second answer is unsolicited
    hb.poll(60)
    assert hb.pong_received(1, 61) is None  # answers an older ping
    assert hb.rtt == pytest.approx(0.25)
    assert hb.pong_received(2, 60.5) == pytest.approx(0.5)
    assert hb.rtt == pytest.approx(0.5)


def test_no_eviction_while_paused() -> None:
    hb = make(interval=30, timeout=10, idle=50)
    hb.poll(30)
    hb.pause()
    tick = hb.poll(35)
    assert tick.beat is Beat.NOTHING
    assert tick.wake_at > 40  # no wake-up for the suspended pong deadline
    assert hb.poll(45).beat is Beat.NOTHING
    assert hb.poll(55).beat is Beat.NOTHING  # idle is suspended too
    assert hb.poll(60).beat is Beat.PING  # pings go on while paused
    assert hb.poll(1000).beat is Beat.PING


def test_the_deadline_restarts_on_resume() -> None:
    hb = make(interval=30, timeout=10)
    hb.poll(30)
    hb.pause()
    assert hb.poll(50).beat is Beat.NOTHING
    hb.resume(55)
    assert hb.poll(55) == Tick(Beat.NOTHING, 60, 1)
    hb2 = make(interval=100, timeout=10)
    hb2.poll(100)
    hb2.pause()
    hb2.resume(150)
    assert hb2.poll(150) == Tick(Beat.NOTHING, 160, 1)
    assert hb2.poll(159.9).beat is Beat.NOTHING
    assert hb2.poll(160).beat is Beat.NO_PONG


def test_resume_without_an_open_deadline_opens_none() -> None:
    hb = make(interval=30, timeout=10)
    hb.pause()
    hb.resume(5)
    assert hb.poll(29).beat is Beat.NOTHING
    assert hb.poll(30).beat is Beat.PING
    hb.frame_received()
    hb.pause()
    hb.resume(31)
    assert hb.poll(59) == Tick(Beat.NOTHING, 60, 1)


def test_a_ping_sent_while_paused_is_timed_from_the_resume() -> None:
    hb = make(interval=30, timeout=10)
    hb.pause()
    assert hb.poll(30).beat is Beat.PING
    hb.resume(45)
    assert hb.poll(54).beat is Beat.NOTHING
    assert hb.poll(55).beat is Beat.NO_PONG


def test_idle_timeout() -> None:
    hb = make(interval=30, timeout=10, idle=25)
    assert hb.poll(0) == Tick(Beat.NOTHING, 25, 0)
    hb.message_received(20)
    assert hb.poll(25) == Tick(Beat.NOTHING, 30, 0)
    hb.frame_received()  # a pong is not an application message
    assert hb.pong_received(0, 30) is None
    assert hb.poll(44.9).beat in (Beat.NOTHING, Beat.PING)
    assert hb.poll(45) == Tick(Beat.IDLE, 45)


def test_no_idle_timeout_by_default() -> None:
    hb = make(interval=30, timeout=10)
    now = 0.0
    while now <= 3000:
        tick = hb.poll(now)
        assert tick.beat in (Beat.NOTHING, Beat.PING)
        hb.pong_received(tick.ping_id, now)
        assert tick.wake_at > now
        now = tick.wake_at
    assert tick.ping_id == 100


def test_no_pong_is_reported_before_idle() -> None:
    hb = make(interval=30, timeout=10, idle=40)
    hb.poll(30)
    assert hb.poll(40).beat is Beat.NO_PONG


# ----------------------------------------------------------------------- properties


@dataclass
class Run:
    pings: list[int] = field(default_factory=list)
    evicted_at: float | None = None
    polls: int = 0


def simulate(
    interval: int,
    timeout: int,
    frames: list[tuple[int, str]],
    pauses: list[tuple[int, int]],
    until: int,
    repoll_on_resume: bool = False,
) -> Run:
    """Drive a Heartbeat like the runtime does, from t=0.

    The watchdog polls at every ``wake_at`` it gets; optionally also right after a
    resume (a resume can make the deadline earlier than the last ``wake_at``, which
    was computed while paused). Frames and pause/resume happen at their own times; at
    equal times they come before the poll, so a frame that arrives at a ping's instant
    does not answer that ping.
    """
    hb = make(interval=interval, timeout=timeout)
    run = Run()
    events: list[tuple[float, int, str, int]] = [(t, 0, kind, 0) for t, kind in frames]
    for start, end in pauses:
        events += [(start, 1, "pause", 0), (end, 1, "resume", 0)]
    events.sort()
    next_poll: float = 0
    paused_now = False
    while True:
        if events and events[0][0] <= next_poll:
            now, _, kind, _ = events.pop(0)
            if kind == "pause":
                hb.pause()
                paused_now = True
            elif kind == "resume":
                hb.resume(now)
                paused_now = False
                if repoll_on_resume:
                    next_poll = now
            elif kind == "frame":
                hb.frame_received()
            elif kind == "message":
                hb.message_received(now)
            else:
                hb.pong_received(len(run.pings), now)
            continue
        now = next_poll
        tick = hb.poll(now)
        run.polls += 1
        if tick.beat is Beat.NO_PONG:
            assert not paused_now, "no eviction while paused"
            run.evicted_at = now
            return run
        assert tick.beat is not Beat.IDLE
        if tick.beat is Beat.PING:
            run.pings.append(int(now))
            assert tick.ping_id == len(run.pings)
        assert tick.wake_at > now, "time always moves on"
        next_poll = tick.wake_at
        if now > until:
            return run


FRAME_KINDS = st.sampled_from(["frame", "message", "pong"])


@st.composite
def traffic(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, str]], list[tuple[int, int]]]:
    interval = draw(st.integers(1, 12))
    timeout = draw(st.integers(1, 12))
    times = draw(st.lists(st.integers(0, 120), max_size=40))
    frames = sorted((t, draw(FRAME_KINDS)) for t in times)
    return interval, timeout, frames, []


@st.composite
def traffic_with_pauses(
    draw: st.DrawFn,
) -> tuple[int, int, list[tuple[int, str]], list[tuple[int, int]]]:
    interval, timeout, frames, _ = draw(traffic())
    cuts = sorted(set(draw(st.lists(st.integers(1, 130), max_size=8))))
    pauses = list(zip(cuts[::2], cuts[1::2], strict=False))
    # The reader is blocked while paused: no frame is received in a pause.
    frames = [(t, k) for t, k in frames if not any(a <= t <= b for a, b in pauses)]
    return interval, timeout, frames, pauses


def check_run(
    interval: int,
    timeout: int,
    frames: list[tuple[int, str]],
    pauses: list[tuple[int, int]],
    repoll_on_resume: bool = False,
) -> None:
    last_frame = max((t for t, _ in frames), default=0)
    last_resume = max((b for _, b in pauses), default=0)
    silent_from = max(last_frame, last_resume)
    bound = silent_from + interval + timeout
    run = simulate(interval, timeout, frames, pauses, until=bound + interval,
                   repoll_on_resume=repoll_on_resume)

    # Pings are sent every ping_interval, paused or not.
    assert run.pings == [interval * k for k in range(1, len(run.pings) + 1)]

    # No ghost survives: evicted at most ping_interval + pong_timeout after the peer
    # (or the server, if it was pausing the reader) last spoke.
    assert run.evicted_at is not None, run
    assert run.evicted_at <= bound

    # No false eviction: some ping went unanswered for at least pong_timeout, counted
    # from the ping or from a resume after it, with no frame in between.
    n = run.evicted_at
    assert not any(a <= n < b for a, b in pauses)
    resumes = [b for _, b in pauses if b <= n]

    def unanswered(ping: int) -> bool:
        start = max([ping, *(r for r in resumes if r >= ping)])
        return n - start >= timeout and not any(ping < t <= n for t, _ in frames)

    assert any(unanswered(p) for p in run.pings if p <= n), run


@settings(max_examples=300, deadline=None)
@given(traffic())
def test_evicted_if_and_only_if_silent_for_pong_timeout_after_a_ping(
    scenario: tuple[int, int, list[tuple[int, str]], list[tuple[int, int]]],
) -> None:
    check_run(*scenario)


@settings(max_examples=300, deadline=None)
@given(traffic_with_pauses(), st.booleans())
def test_pauses_never_evict_and_restart_the_deadline(
    scenario: tuple[int, int, list[tuple[int, str]], list[tuple[int, int]]],
    repoll_on_resume: bool,
) -> None:
    check_run(*scenario, repoll_on_resume=repoll_on_resume)


@settings(max_examples=200, deadline=None)
@given(
    interval=st.floats(0.01, 100, allow_nan=False),
    timeout_ratio=st.floats(0.001, 20, allow_nan=False),
    pings_answered=st.floats(0, 50, allow_nan=False),
)
def test_silent_peer_is_evicted_within_interval_plus_timeout(
    interval: float, timeout_ratio: float, pings_answered: float
) -> None:
    """Real-valued times, a peer that answers every ping until `silent_at`."""
    timeout = interval * timeout_ratio
    silent_at = interval * pings_answered
    hb = Heartbeat(ping_interval=interval, pong_timeout=timeout, now=0)
    now = 0.0
    for _ in range(1000):
        tick = hb.poll(now)
        if tick.beat is Beat.NO_PONG:
            break
        if tick.beat is Beat.PING and now <= silent_at:
            assert hb.pong_received(tick.ping_id, now) == 0
        assert tick.wake_at > now
        now = tick.wake_at
    else:
        pytest.fail("never evicted")
    assert now > silent_at
    assert now <= silent_at + interval + timeout + 1e-9 * (1 + silent_at)
    assert math.isfinite(now)


OPS = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 15)),
    st.tuples(st.sampled_from(["frame", "message", "pong", "pause", "resume"]), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(interval=st.integers(1, 10), timeout=st.integers(1, 10),
       ops=st.lists(OPS, max_size=50))
def test_poll_always_asks_to_be_polled_again_later(
    interval: int, timeout: int, ops: list[tuple[str, int]]
) -> None:
    """Whatever happens between polls, a NOTHING or PING tick never asks for a poll
    at or before `now` (the watchdog would spin), and pings are numbered 1, 2, 3..."""
    hb = make(interval=interval, timeout=timeout)
    now, paused, last_id = 0, False, 0
    for op, amount in ops:
        if op == "advance":
            now += amount
        elif op == "frame":
            hb.frame_received()
        elif op == "message":
            hb.message_received(now)
        elif op == "pong":
            hb.pong_received(last_id, now)
        elif op == "pause":
            hb.pause()
            paused = True
        else:
            hb.resume(now)
            paused = False
        tick = hb.poll(now)
        if tick.beat is Beat.NO_PONG:
            assert not paused
            return
        assert tick.beat is not Beat.IDLE
        assert tick.wake_at > now
        assert tick.ping_id == last_id + (tick.beat is Beat.PING)
        last_id = tick.ping_id


def test_a_pause_longer_than_idle_timeout_does_not_make_the_watchdog_spin() -> None:
    hb = make(interval=30, timeout=10, idle=20)
    hb.message_received(0)
    hb.pause()  # the inbox is full: a handler is slow
    now = 25.0
    tick = hb.poll(now)
    assert tick.beat is Beat.NOTHING
    assert tick.wake_at > now


def test_the_idle_deadline_restarts_on_resume() -> None:
    hb = make(interval=100, timeout=10, idle=20)
    hb.message_received(0)
    hb.pause()
    assert hb.poll(30).beat is Beat.NOTHING
    hb.resume(40)
    assert hb.poll(40).beat is Beat.NOTHING
    assert hb.poll(60).beat is Beat.IDLE
