"""Bounded stream history and exact replay (``wsroom._core.history``).

The central property: ``since(epoch, offset, now)`` is all or nothing. It answers
``recovered=True`` with exactly the frames of offsets ``offset+1 .. last``, in order, iff
the epoch matches, ``0 <= offset <= last`` and every one of those offsets is still
retained under the limits (count, UTF-8 bytes, age at ``now``); otherwise
``recovered=False`` with no frames. A reference model decides what "retained" means
independently of the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsroom._core.history import HistoryLimits, Recovery, StreamHistory

EPOCH = "e1"

# Frames mix 1-, 2-, 3- and 4-byte UTF-8 characters, so a byte bound differs from a
# character bound.
FRAMES = st.text(alphabet=st.sampled_from("ab\u00e9\u20ac\U0001f600"), max_size=5)
# Times and ages are multiples of 0.5: exact in binary floating point, so the model's
# arithmetic and the implementation's cannot disagree by a rounding error.
HALVES = st.integers(0, 4).map(lambda n: n / 2)
LIMITS = st.builds(
    HistoryLimits,
    max_messages=st.integers(1, 8),
    max_bytes=st.integers(1, 60),
    max_age=st.integers(1, 40).map(lambda n: n / 2),
)


def utf8(frame: str) -> int:
    return len(frame.encode("utf-8"))


@dataclass
class Model:
    """What a stream history must retain, computed from first principles."""

    start: int
    limits: HistoryLimits
    frames: dict[int, tuple[float, str]] = field(default_factory=dict)

    @property
    def last(self) -> int:
        return self.start + len(self.frames)

    def retained(self, now: float) -> list[int]:
        """Offsets still retained at `now`: within the newest `max_messages`, within the
        newest `max_bytes`, and not older than `max_age` (a message whose age is exactly
        `max_age` is still there; anything older is gone)."""
        kept = []
        total = 0
        for offset in range(self.last, self.start, -1):
            sent_at, frame = self.frames[offset]
            total += utf8(frame)
            if (
                self.last - offset + 1 > self.limits.max_messages
                or total > self.limits.max_bytes
                or now - sent_at > self.limits.max_age
            ):
                break
            kept.append(offset)
        return kept[::-1]

    def expected(self, epoch: str, offset: int, now: float) -> Recovery:
        retained = set(self.retained(now))
        ok = (
            epoch == EPOCH
            and 0 <= offset <= self.last
            and all(k in retained for k in range(offset + 1, self.last + 1))
        )
        frames = tuple(self.frames[k][1] for k in range(offset + 1, self.last + 1)) if ok else ()
        return Recovery(ok, frames, EPOCH, self.last)


def contents(history: StreamHistory, now: float) -> tuple[str, ...]:
    """The retained frames, read through the public API (no pruning beyond `now`)."""
    answer = history.since(history.epoch, history.first_offset - 1, now)
    assert answer.recovered
    return answer.frames


def assert_within_bounds(history: StreamHistory, model: Model, now: float) -> None:
    limits = history.limits
    frames = contents(history, now)
    assert len(frames) == len(history) <= limits.max_messages
    assert sum(utf8(f) for f in frames) <= limits.max_bytes
    # The internal byte counter agrees with what is actually retained.
    assert history._bytes == sum(utf8(f) for f in frames)
    # Age: every retained message is at most max_age old at `now`.
    for offset in range(history.first_offset, history.offset + 1):
        assert now - model.frames[offset][0] <= limits.max_age
    # Nothing is forgotten early: exactly the model's retained set is kept.
    kept = model.retained(now)
    assert history.first_offset == (kept[0] if kept else model.last + 1)
    assert frames == tuple(model.frames[k][1] for k in kept)


# ------------------------------------------------------------------ the property


@settings(max_examples=300)
@given(
    limits=LIMITS,
    start=st.integers(0, 5),
    data=st.data(),
)
def test_since_is_exact_or_not_recovered(limits: HistoryLimits, start: int,
                                         data: st.DataObject) -> None:
    history = StreamHistory(EPOCH, limits, offset=start)
    model = Model(start, limits)
    now = data.draw(HALVES, label="t0")
    steps = data.draw(st.integers(1, 25), label="steps")
    for _ in range(steps):
        now += data.draw(HALVES, label="dt")  # time never goes backwards
        if data.draw(st.booleans(), label="append?"):
            frame = data.draw(FRAMES, label="frame")
            offset = model.last + 1
            history.append(offset, frame, now)
            model.frames[offset] = (now, frame)
            assert history.offset == offset
            assert_within_bounds(history, model, now)
        else:
            epoch = data.draw(st.sampled_from([EPOCH, EPOCH, EPOCH, "e2", "", "E1"]),
                              label="epoch")
            # Mostly near the end of the stream, where recovery can succeed.
            offset = data.draw(
                st.integers(-2, model.last + 2) | st.integers(max(0, model.last - 4), model.last),
                label="offset",
            )
            answer = history.since(epoch, offset, now)
            assert answer == model.expected(epoch, offset, now)
            # Reading prunes (age) but must never break the bounds either.
            assert_within_bounds(history, model, now)


@settings(max_examples=200)
@given(limits=LIMITS, start=st.integers(0, 5), data=st.data())
def test_append_rejects_any_non_consecutive_offset(limits: HistoryLimits, start: int,
                                                   data: st.DataObject) -> None:
    history = StreamHistory(EPOCH, limits, offset=start)
    count = data.draw(st.integers(0, 4))
    for k in range(count):
        history.append(start + k + 1, "x", 0.0)
    last = start + count
    before = (history.offset, len(history), history.first_offset, contents(history, 0.0))
    bad = data.draw(st.integers(-3, last + 5).filter(lambda n: n != last + 1))
    with pytest.raises(ValueError, match="does not follow"):
        history.append(bad, "y", 0.0)
    assert (history.offset, len(history), history.first_offset, contents(history, 0.0)) == before


# ------------------------------------------------------------------------- units


def test_limits_defaults_cover_a_busy_two_minute_outage() -> None:
    limits = HistoryLimits()
    assert limits.max_messages >= 50 * 120
    assert limits.max_age >= 120
    assert (limits.max_messages, limits.max_bytes, limits.max_age) == (10_000, 8 * 1024 * 1024,
                                                                       300.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_messages": 0}, {"max_messages": -1}, {"max_bytes": 0}, {"max_bytes": -5},
     {"max_age": 0}, {"max_age": -0.5}],
)
def test_limits_must_be_positive(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        HistoryLimits(**kwargs)  # type: ignore[arg-type]


def test_empty_history_with_a_starting_offset() -> None:
    history = StreamHistory("ep", HistoryLimits(), offset=41)
    assert len(history) == 0
    assert history.offset == 41
    assert history.first_offset == 42
    # The client is exactly up to date: recovered, nothing to replay.
    assert history.since("ep", 41, 0.0) == Recovery(True, (), "ep", 41)
    # Before the start: those messages were never retained here.
    assert history.since("ep", 40, 0.0) == Recovery(False, (), "ep", 41)
    assert history.since("ep", 0, 0.0) == Recovery(False, (), "ep", 41)
    # Beyond the stream, negative, or another epoch.
    assert history.since("ep", 42, 0.0) == Recovery(False, (), "ep", 41)
    assert history.since("ep", -1, 0.0) == Recovery(False, (), "ep", 41)
    assert history.since("other", 41, 0.0) == Recovery(False, (), "ep", 41)
    # The next append must be 42.
    with pytest.raises(ValueError, match="does not follow"):
        history.append(1, "a", 0.0)
    with pytest.raises(ValueError, match="does not follow"):
        history.append(41, "a", 0.0)
    history.append(42, "a", 0.0)
    assert history.since("ep", 41, 0.0) == Recovery(True, ("a",), "ep", 42)
    assert history.since("ep", 40, 0.0) == Recovery(False, (), "ep", 42)


def test_fresh_history_starts_at_zero() -> None:
    history = StreamHistory("ep", HistoryLimits())
    assert (history.offset, history.first_offset, len(history)) == (0, 1, 0)
    assert history.since("ep", 0, 0.0) == Recovery(True, (), "ep", 0)
    for offset, frame in enumerate("abc", start=1):
        history.append(offset, frame, 0.0)
    assert history.since("ep", 0, 0.0) == Recovery(True, ("a", "b", "c"), "ep", 3)
    assert history.since("ep", 1, 0.0) == Recovery(True, ("b", "c"), "ep", 3)
    assert history.since("ep", 3, 0.0) == Recovery(True, (), "ep", 3)


@pytest.mark.parametrize("bad", [1, 3, 100, 0, -1])
def test_append_rejects_a_gap_or_a_repeat(bad: int) -> None:
    history = StreamHistory("ep", HistoryLimits())
    history.append(1, "a", 0.0)
    with pytest.raises(ValueError, match=f"^offset {bad} does not follow 1$"):
        history.append(bad, "b", 0.0)
    assert history.offset == 1
    assert history.since("ep", 0, 0.0).frames == ("a",)


def test_count_bound_and_partial_coverage_is_not_recovered() -> None:
    history = StreamHistory("ep", HistoryLimits(max_messages=3))
    for offset in range(1, 6):
        history.append(offset, f"m{offset}", 0.0)
    assert len(history) == 3
    assert history.first_offset == 3
    assert history.since("ep", 2, 0.0) == Recovery(True, ("m3", "m4", "m5"), "ep", 5)
    # Offsets 2..5 are needed, 2 is gone: nothing at all, never the covered part.
    assert history.since("ep", 1, 0.0) == Recovery(False, (), "ep", 5)
    assert history.since("ep", 0, 0.0) == Recovery(False, (), "ep", 5)


def test_byte_bound_counts_utf8_bytes_not_characters() -> None:
    history = StreamHistory("ep", HistoryLimits(max_bytes=6))
    history.append(1, "\u20ac\u20ac", 0.0)  # 2 characters, 6 bytes: exactly the bound
    assert len(history) == 1
    history.append(2, "a", 0.0)  # 7 bytes in all: the euro frame goes
    assert len(history) == 1
    assert history.first_offset == 2
    assert history.since("ep", 1, 0.0) == Recovery(True, ("a",), "ep", 2)
    assert history.since("ep", 0, 0.0) == Recovery(False, (), "ep", 2)
    history.append(3, "\U0001f600", 0.0)  # 4 bytes: 5 in all, both kept
    assert history.since("ep", 1, 0.0) == Recovery(True, ("a", "\U0001f600"), "ep", 3)


def test_a_frame_larger_than_the_byte_bound_is_not_retained() -> None:
    history = StreamHistory("ep", HistoryLimits(max_bytes=4))
    history.append(1, "ab", 0.0)
    history.append(2, "abcde", 0.0)
    assert len(history) == 0
    assert history.offset == 2
    assert history.since("ep", 2, 0.0) == Recovery(True, (), "ep", 2)
    assert history.since("ep", 1, 0.0) == Recovery(False, (), "ep", 2)
    history.append(3, "c", 0.0)
    assert history.since("ep", 2, 0.0) == Recovery(True, ("c",), "ep", 3)


def test_age_bound_at_read_time() -> None:
    history = StreamHistory("ep", HistoryLimits(max_age=10.0))
    history.append(1, "a", 100.0)
    history.append(2, "b", 105.0)
    # Exactly max_age old is still there.
    assert history.since("ep", 0, 110.0) == Recovery(True, ("a", "b"), "ep", 2)
    # Older than max_age is gone, even without any append in between.
    assert history.since("ep", 0, 110.5) == Recovery(False, (), "ep", 2)
    assert len(history) == 1
    assert history.since("ep", 1, 115.0) == Recovery(True, ("b",), "ep", 2)
    assert history.since("ep", 1, 115.5) == Recovery(False, (), "ep", 2)
    assert len(history) == 0
    # Up to date is still recovered with nothing to replay.
    assert history.since("ep", 2, 10_000.0) == Recovery(True, (), "ep", 2)


def test_prune_alone_applies_the_age_bound() -> None:
    history = StreamHistory("ep", HistoryLimits(max_age=1.0))
    history.append(1, "a", 0.0)
    history.prune(1.0)
    assert len(history) == 1
    history.prune(1.5)
    assert len(history) == 0
    assert history.first_offset == 2


def test_recovery_reports_the_current_epoch_and_offset() -> None:
    history = StreamHistory("now", HistoryLimits(), offset=7)
    history.append(8, "x", 0.0)
    answer = history.since("before", 7, 0.0)
    assert (answer.recovered, answer.frames, answer.epoch, answer.offset) == (False, (), "now", 8)
