"""Close codes (``wsroom._core.codes``): the client decides from the code alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsroom import CloseCode, ErrorCode, should_reconnect

# DESIGN.md §3: what a well-behaved client does after each code.
RECONNECT = {
    CloseCode.NORMAL: False,
    CloseCode.GOING_AWAY: True,
    CloseCode.MESSAGE_TOO_BIG: False,
    CloseCode.INTERNAL_ERROR: True,
    CloseCode.SERVICE_RESTART: True,
    CloseCode.TRY_AGAIN_LATER: True,
    CloseCode.SLOW_CONSUMER: True,
    CloseCode.INSUFFICIENT_STATE: True,
    CloseCode.NO_PONG: True,
    CloseCode.RATE_LIMITED: True,
    CloseCode.INVALID_TOKEN: False,
    CloseCode.BAD_REQUEST: False,
    CloseCode.HANDSHAKE_TIMEOUT: False,
    CloseCode.REPLACED: False,
    CloseCode.CONNECTION_LIMIT: False,
    CloseCode.FORBIDDEN_ORIGIN: False,
    CloseCode.ERROR_BUDGET: False,
    CloseCode.IDLE_TIMEOUT: False,
}


def test_every_code_is_classified() -> None:
    assert set(RECONNECT) == set(CloseCode)


@pytest.mark.parametrize(("code", "reconnect"), list(RECONNECT.items()))
def test_reconnect_property(code: CloseCode, reconnect: bool) -> None:
    assert code.reconnect is reconnect
    assert should_reconnect(int(code)) is reconnect


@pytest.mark.parametrize(
    ("code", "reconnect"),
    [
        (1000, False), (1001, True), (1002, False), (1006, True), (1008, False),
        (1009, False), (1011, True), (1012, True), (1013, True), (1015, False),
        (2999, False), (3000, True), (3499, True), (3500, False), (3999, False),
        (4000, True), (4499, True), (4500, False), (4999, False), (5000, False),
    ],
)
def test_should_reconnect_boundaries(code: int, reconnect: bool) -> None:
    assert should_reconnect(code) is reconnect


@given(st.integers(0, 6000))
def test_should_reconnect_ranges(code: int) -> None:
    expected = code in (1001, 1006, 1011, 1012, 1013) or code // 500 in (6, 8)
    assert should_reconnect(code) is expected


def test_library_codes_are_in_the_library_range() -> None:
    for code in CloseCode:
        assert 1000 <= code < 1016 or 3000 <= code < 4000


def test_error_codes_are_strings() -> None:
    assert str(ErrorCode.BAD_JSON) == "bad_json"
    assert {str(code) for code in ErrorCode} == {
        "bad_json", "bad_frame", "unknown_event", "invalid_data", "rate_limited", "internal",
    }
