"""The connection state machine and close dispositions (``wsroom._core.state``)."""

from __future__ import annotations

import logging
import re

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from wsroom._core.codes import CloseCode
from wsroom._core.state import (
    CloseReason,
    ConnectionStateMachine,
    ConnState,
    IllegalTransition,
    disposition,
)

# --------------------------------------------------------------------- dispositions


@pytest.mark.parametrize(
    ("reason", "code", "flush"),
    [
        (CloseReason.CLIENT_CLOSED, None, False),
        (CloseReason.SEND_FAILED, None, False),
        (CloseReason.RECEIVE_FAILED, None, False),
        (CloseReason.CANCELLED, CloseCode.GOING_AWAY, False),
        (CloseReason.NO_PONG, 3012, False),
        (CloseReason.SLOW_CONSUMER, 3008, False),
        (CloseReason.MESSAGE_TOO_BIG, 1009, False),
        (CloseReason.ERROR_BUDGET, 3509, True),
        (CloseReason.HANDSHAKE_TIMEOUT, 3502, False),
        (CloseReason.BAD_HANDSHAKE, 3501, True),
        (CloseReason.AUTH_FAILED, 3500, True),
        (CloseReason.IDLE_TIMEOUT, CloseCode.IDLE_TIMEOUT, True),
        (CloseReason.SHUTDOWN, 1012, True),
        (CloseReason.OVER_CAPACITY, 1013, True),
        (CloseReason.INTERNAL_ERROR, 1011, True),
        (CloseReason.APP, 1000, True),
    ],
)
def test_disposition_matches_the_wire_contract(
    reason: CloseReason, code: int | None, flush: bool
) -> None:
    assert disposition(reason).code == code
    assert disposition(reason).flush is flush


@pytest.mark.parametrize("reason", list(CloseReason))
def test_every_reason_has_a_disposition(reason: CloseReason) -> None:
    result = disposition(reason)
    assert result.code is None or result.code in set(CloseCode)
    assert result.log_level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
    assert str(reason) == reason.value


def test_only_bugs_log_as_errors() -> None:
    errors = [r for r in CloseReason if disposition(r).log_level >= logging.ERROR]
    assert errors == [CloseReason.INTERNAL_ERROR]


# ------------------------------------------------------------------------ sequences


def test_happy_path() -> None:
    sm = ConnectionStateMachine()
    assert sm.state is ConnState.CONNECTING
    assert not sm.closing
    sm.accept()
    assert sm.state is ConnState.HANDSHAKING
    sm.welcome()
    assert sm.state is ConnState.OPEN
    assert not sm.closing
    assert not sm.flush
    assert sm.close(CloseReason.SHUTDOWN) is True
    assert sm.state is ConnState.CLOSING
    assert sm.closing
    assert (sm.reason, sm.close_code, sm.flush) == (CloseReason.SHUTDOWN, 1012, True)
    sm.finish(CloseReason.CLIENT_CLOSED)
    assert sm.state is ConnState.CLOSED
    assert (sm.reason, sm.close_code) == (CloseReason.SHUTDOWN, 1012)


def test_first_close_reason_wins() -> None:
    sm = ConnectionStateMachine()
    sm.accept()
    sm.welcome()
    assert sm.close(CloseReason.SLOW_CONSUMER) is True
    assert sm.close(CloseReason.NO_PONG) is False  # the heartbeat fires meanwhile
    sm.finish(CloseReason.SEND_FAILED)
    assert (sm.reason, sm.close_code, sm.flush) == (CloseReason.SLOW_CONSUMER, 3008, False)


def test_a_finished_connection_keeps_its_reason_and_sends_no_code() -> None:
    sm = ConnectionStateMachine()
    sm.accept()
    sm.finish(CloseReason.CLIENT_CLOSED)
    assert sm.close(CloseReason.SHUTDOWN) is False
    sm.finish(CloseReason.INTERNAL_ERROR)
    assert sm.state is ConnState.CLOSED
    assert (sm.reason, sm.close_code, sm.flush) == (CloseReason.CLIENT_CLOSED, None, False)


def test_close_before_the_handshake() -> None:
    sm = ConnectionStateMachine()
    assert sm.close(CloseReason.OVER_CAPACITY) is True
    assert (sm.state, sm.close_code) == (ConnState.CLOSING, 1013)


def test_app_close_code_overrides_the_default() -> None:
    sm = ConnectionStateMachine()
    sm.accept()
    assert sm.close(CloseReason.APP, 4501) is True
    assert sm.close_code == 4501
    other = ConnectionStateMachine()
    other.close(CloseReason.APP)
    assert other.close_code == CloseCode.NORMAL


@pytest.mark.parametrize(
    ("steps", "event", "state"),
    [
        ([], "welcome", "connecting"),
        (["accept"], "accept", "handshaking"),
        (["accept", "welcome"], "accept", "open"),
        (["accept", "welcome"], "welcome", "open"),
        (["close"], "accept", "closing"),
        (["close"], "welcome", "closing"),
        (["finish"], "accept", "closed"),
        (["accept", "finish"], "welcome", "closed"),
    ],
)
def test_illegal_transitions_name_the_state(steps: list[str], event: str, state: str) -> None:
    sm = ConnectionStateMachine()
    for step in steps:
        if step == "close":
            sm.close(CloseReason.SHUTDOWN)
        elif step == "finish":
            sm.finish(CloseReason.CLIENT_CLOSED)
        else:
            getattr(sm, step)()
    before = (sm.state, sm.reason, sm.close_code)
    with pytest.raises(IllegalTransition, match=rf"cannot {event} .*\b{state}\b"):
        getattr(sm, event)()
    assert (sm.state, sm.reason, sm.close_code) == before
    assert issubclass(IllegalTransition, RuntimeError)


# ------------------------------------------------------------------ stateful machine


REASONS = st.sampled_from(CloseReason)
_NEXT = {
    ("accept", ConnState.CONNECTING): ConnState.HANDSHAKING,
    ("welcome", ConnState.HANDSHAKING): ConnState.OPEN,
}


class ConnectionMachine(RuleBasedStateMachine):
    """Random accept / welcome / close(reason, code?) / finish(reason) sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.sm = ConnectionStateMachine()
        self.state = ConnState.CONNECTING
        self.reason: CloseReason | None = None
        self.code: int | None = None
        self.closed_seen = False

    def _step(self, event: str) -> None:
        target = _NEXT.get((event, self.state))
        if target is not None:
            getattr(self.sm, event)()
            self.state = target
            return
        with pytest.raises(IllegalTransition) as info:
            getattr(self.sm, event)()
        message = str(info.value)
        assert re.search(rf"\b{self.state.value}\b", message), message
        assert event in message

    @rule()
    def accept(self) -> None:
        self._step("accept")

    @rule()
    def welcome(self) -> None:
        self._step("welcome")

    @rule(reason=REASONS, code=st.none() | st.integers(4000, 4999))
    def close(self, reason: CloseReason, code: int | None) -> None:
        first = self.reason is None
        assert self.sm.close(reason, code) is first
        if first:
            self.reason = reason
            self.code = disposition(reason).code if code is None else code
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.CLOSING

    @rule(reason=REASONS)
    def finish(self, reason: CloseReason) -> None:
        self.sm.finish(reason)
        if self.reason is None:
            self.reason, self.code = reason, None
        self.state = ConnState.CLOSED

    @invariant()
    def matches_the_model(self) -> None:
        assert self.sm.state is self.state
        assert self.sm.reason is self.reason
        assert self.sm.close_code == self.code
        assert self.sm.closing is (self.state in (ConnState.CLOSING, ConnState.CLOSED))
        assert self.sm.flush is (self.reason is not None and disposition(self.reason).flush)

    @invariant()
    def a_reason_is_known_once_closing(self) -> None:
        assert (self.sm.reason is not None) is self.sm.closing

    @invariant()
    def closed_is_final(self) -> None:
        if self.closed_seen:
            assert self.sm.state is ConnState.CLOSED
        self.closed_seen = self.sm.state is ConnState.CLOSED


TestConnectionMachine = ConnectionMachine.TestCase
TestConnectionMachine.settings = settings(max_examples=150, stateful_step_count=30,
                                          deadline=None)
