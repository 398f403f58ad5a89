"""Wire contract v1 (``wsroom._core.protocol``): parsing client frames, encoding server frames."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from wsroom._core.codes import ErrorCode
from wsroom._core.protocol import (
    BadFrame,
    Hello,
    Msg,
    Pong,
    StreamPosition,
    encode,
    error_frame,
    msg_frame,
    parse_client_frame,
    ping_frame,
    reply_frame,
    welcome_frame,
)
from wsroom._core.queue import frame_size

SECRET = "sk_live_7Hq2SECRETxZ"


def dumps(frame: Any) -> str:
    return json.dumps(frame, ensure_ascii=False)


def bad(text: str | bytes) -> BadFrame:
    with pytest.raises(BadFrame) as info:
        parse_client_frame(text)
    return info.value


# ------------------------------------------------------------------------- parsing


def test_minimal_hello() -> None:
    frame = parse_client_frame('{"type":"hello","v":1}')
    assert frame == Hello(type="hello", v=1)
    assert (frame.auth, frame.resume, frame.streams) == (None, None, {})


def test_full_hello() -> None:
    frame = parse_client_frame(dumps({
        "type": "hello", "v": 1, "auth": {"token": "t", "n": [1, 2]}, "resume": "r" * 1024,
        "streams": {"lobby": {"epoch": "e1", "offset": 7}, "@inbox": {"epoch": "e", "offset": 0}},
    }))
    assert isinstance(frame, Hello)
    assert frame.auth == {"token": "t", "n": [1, 2]}
    assert frame.resume == "r" * 1024
    assert frame.streams["lobby"] == StreamPosition(epoch="e1", offset=7)
    assert frame.streams["@inbox"].offset == 0


def test_pong_and_msg() -> None:
    assert parse_client_frame('{"type":"pong","id":3}') == Pong(type="pong", id=3)
    msg = parse_client_frame(b'{"type":"msg","event":"chat","data":{"text":"\xc3\xa9"},"ref":"r1"}')
    assert msg == Msg(type="msg", event="chat", data={"text": "é"}, ref="r1")
    numbered = parse_client_frame('{"type":"msg","event":"e","ref":7}')
    assert isinstance(numbered, Msg)
    assert numbered.ref == 7
    plain = parse_client_frame('{"type":"msg","event":"e"}')
    assert isinstance(plain, Msg)
    assert (plain.data, plain.ref) == (None, None)


def test_unknown_fields_are_ignored() -> None:
    frame = parse_client_frame('{"type":"pong","id":1,"extra":{"x":1}}')
    assert frame == Pong(type="pong", id=1)


def test_frames_are_frozen() -> None:
    frame = parse_client_frame('{"type":"msg","event":"e"}')
    with pytest.raises(ValidationError):
        frame.event = "other"  # type: ignore[misc,union-attr]


@pytest.mark.parametrize("text", ["", "{", "nope", '{"type":"msg",}', b"\xff\xfe", "{'a': 1}",
                                  '{"type":"msg","event":"e","data":"\\ud800"}'])
def test_not_json(text: str | bytes) -> None:
    error = bad(text)
    assert error.code is ErrorCode.BAD_JSON
    assert error.detail == "frame is not valid JSON"


@pytest.mark.parametrize(
    ("frame", "where"),
    [
        ([], "frame"),
        ("hello", "frame"),
        ({}, "frame"),
        ({"type": "hello"}, "hello.v"),
        ({"type": "hello", "v": 2}, "hello.v"),
        ({"type": "hello", "v": 1, "resume": "r" * 1025}, "hello.resume"),
        ({"type": "hello", "v": 1, "streams": []}, "hello.streams"),
        ({"type": "hello", "v": 1, "streams": {"s" * 257: {"epoch": "e", "offset": 0}}},
         "hello.streams"),
        ({"type": "hello", "v": 1, "streams": {"a": {"epoch": "e", "offset": -1}}}, "offset"),
        ({"type": "hello", "v": 1, "streams": {"a": {"epoch": "e" * 65, "offset": 0}}}, "epoch"),
        ({"type": "pong"}, "pong.id"),
        ({"type": "pong", "id": "x"}, "pong.id"),
        ({"type": "msg"}, "msg.event"),
        ({"type": "msg", "event": ""}, "msg.event"),
        ({"type": "msg", "event": "e" * 129}, "msg.event"),
        ({"type": "msg", "event": "e", "ref": "r" * 65}, "msg.ref"),
        ({"type": "msg", "event": "e", "ref": [1]}, "msg.ref"),
    ],
)
def test_not_a_frame_of_the_contract(frame: Any, where: str) -> None:
    error = bad(dumps(frame))
    assert error.code is ErrorCode.BAD_FRAME
    assert where in error.detail  # the client can see what to fix
    assert str(error) == error.detail


def test_limits_are_inclusive() -> None:
    ok = [
        {"type": "msg", "event": "e" * 128, "ref": "r" * 64},
        {"type": "hello", "v": 1, "resume": "r" * 1024,
         "streams": {f"s{i}": {"epoch": "e" * 64, "offset": 0} for i in range(256)}},
    ]
    for frame in ok:
        parse_client_frame(dumps(frame))


def test_detail_lists_at_most_three_errors() -> None:
    error = bad(dumps({"type": "hello", "v": 1, "streams": {
        f"s{i}": {"epoch": 1, "offset": -1} for i in range(10)}}))
    assert error.detail.count(";") == 2


# ---------------------------------------------------------- error details leak nothing


def _secret_values() -> st.SearchStrategy[Any]:
    """JSON values that carry the secret and fail (or pass) validation in many ways."""
    return st.one_of(
        st.just(SECRET),
        st.just(SECRET * 40),  # too long for any bounded string field
        st.builds(lambda n: f"{SECRET}-{n}", st.integers()),
        st.lists(st.just(SECRET), min_size=1, max_size=2),
        st.fixed_dictionaries({"token": st.just(SECRET)}),
        st.fixed_dictionaries({"epoch": st.just(SECRET), "offset": st.just(SECRET)}),
    )


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, _secret_values())


@st.composite
def frames_carrying_a_secret(draw: st.DrawFn) -> dict[str, Any]:
    # `type` and the keys of `streams` have dedicated tests below.
    kind = draw(st.sampled_from(["hello", "pong", "msg"]))
    frame: dict[str, Any] = {"type": kind}
    candidates: dict[str, st.SearchStrategy[Any]]
    if kind == "hello":
        candidates = {
            "v": _field(st.just(1)),
            "auth": _secret_values(),
            "resume": _field(st.text(max_size=5)),
            "streams": _field(st.dictionaries(
                st.sampled_from(["lobby", "t1"]),
                _field(st.fixed_dictionaries({"epoch": _field(st.just("e")),
                                              "offset": _field(st.integers(-2, 5))})),
                max_size=2)),
        }
    elif kind == "pong":
        candidates = {"id": _field(st.integers())}
    else:
        candidates = {
            "event": _field(st.text(max_size=3)),
            "data": _secret_values(),
            "ref": _field(st.integers() | st.text(max_size=3)),
        }
    candidates["extra"] = _secret_values()
    for name, strategy in candidates.items():
        if draw(st.booleans()):
            frame[name] = draw(strategy)
    return frame


@settings(max_examples=300, deadline=None)
@given(frames_carrying_a_secret(), st.booleans())
def test_error_details_never_echo_input_values(frame: dict[str, Any], as_bytes: bool) -> None:
    text = dumps(frame)
    error: BadFrame | None = None
    try:
        parse_client_frame(text.encode() if as_bytes else text)
    except BadFrame as exc:
        error = exc
    if error is not None:
        assert "SECRET" not in error.detail
        assert "SECRET" not in str(error)
        assert error.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("cut", [10, 25, 40])
def test_truncated_frames_do_not_echo_either(cut: int) -> None:
    text = dumps({"type": "hello", "v": 1, "auth": SECRET, "resume": SECRET})[:cut]
    assert "SECRET" not in bad(text).detail


def test_a_secret_auth_token_is_never_echoed() -> None:
    for frame in (
        {"type": "hello", "v": 2, "auth": SECRET},
        {"type": "hello", "v": 1, "auth": SECRET, "resume": [SECRET]},
        {"type": "hello", "v": 1, "auth": SECRET, "resume": SECRET * 100},
        {"type": "hello", "v": SECRET, "auth": {"password": SECRET}},
    ):
        assert "SECRET" not in bad(dumps(frame)).detail


def test_an_unknown_type_is_not_echoed() -> None:
    assert "SECRET" not in bad(dumps({"type": SECRET, "auth": SECRET})).detail


def test_stream_names_are_not_echoed() -> None:
    frame = {"type": "hello", "v": 1, "streams": {SECRET: {"epoch": "e", "offset": -1}}}
    assert "SECRET" not in bad(dumps(frame)).detail


# -------------------------------------------------------------------------- encoding


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)
nasty_text = st.text() | st.sampled_from(["\n", "a\nb", "\r\n", "\u2028", "\x00", '"\\n"'])


@given(json_values)
def test_encode_is_one_line_of_json(data: Any) -> None:
    frame = encode({"data": data})
    assert "\n" not in frame
    assert "\r" not in frame
    assert json.loads(frame) == {"data": data}
    assert frame_size(frame) == len(frame.encode())


@given(stream=nasty_text, epoch=nasty_text, offset=st.integers(0, 2**53), event=nasty_text,
       data=json_values)
def test_msg_frame(stream: str, epoch: str, offset: int, event: str, data: Any) -> None:
    frame = msg_frame(stream, epoch, offset, event, data)
    assert "\n" not in frame
    assert json.loads(frame) == {"type": "msg", "stream": stream, "epoch": epoch,
                                 "offset": offset, "event": event, "data": data}


@given(ref=nasty_text | st.integers(), data=json_values)
def test_reply_frame(ref: str | int, data: Any) -> None:
    frame = reply_frame(ref, data)
    assert "\n" not in frame
    assert json.loads(frame) == {"type": "reply", "ref": ref, "data": data}


@given(code=nasty_text, detail=nasty_text, ref=st.none() | nasty_text | st.integers())
def test_error_frame(code: str, detail: str, ref: str | int | None) -> None:
    frame = error_frame(code, detail, ref)
    assert "\n" not in frame
    expected: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if ref is not None:
        expected["ref"] = ref
    assert json.loads(frame) == expected


def test_error_frame_keeps_a_falsy_ref() -> None:
    assert json.loads(error_frame("bad_frame", "x", 0))["ref"] == 0
    assert json.loads(error_frame("bad_frame", "x", ""))["ref"] == ""
    assert "ref" not in json.loads(error_frame("bad_frame", "x"))


@given(st.integers(0, 2**63))
def test_ping_frame(ping_id: int) -> None:
    frame = ping_frame(ping_id)
    assert "\n" not in frame
    assert json.loads(frame) == {"type": "ping", "id": ping_id}


@given(
    session=nasty_text, resume=st.none() | nasty_text,
    ping_interval=st.floats(0.001, 1e6), pong_timeout=st.floats(0.001, 1e6),
    streams=st.dictionaries(nasty_text, st.fixed_dictionaries(
        {"epoch": nasty_text, "offset": st.integers(0, 10**9), "recovered": st.booleans()}),
        max_size=3),
)
def test_welcome_frame(session: str, resume: str | None, ping_interval: float,
                       pong_timeout: float, streams: dict[str, dict[str, Any]]) -> None:
    frame = welcome_frame(session=session, resume=resume, ping_interval=ping_interval,
                          pong_timeout=pong_timeout, streams=streams)
    assert "\n" not in frame
    assert json.loads(frame) == {
        "type": "welcome", "v": 1, "session": session, "resume": resume,
        "ping_interval": ping_interval, "pong_timeout": pong_timeout, "streams": streams,
    }


@given(st.lists(st.tuples(nasty_text, json_values), min_size=1, max_size=6))
def test_a_batch_splits_back_into_its_frames(items: list[tuple[str, Any]]) -> None:
    """The writer joins queued frames with newlines; clients split on them."""
    frames = [msg_frame("lobby", "e", i, event, data) for i, (event, data) in enumerate(items)]
    batch = "\n".join(frames)
    assert batch.split("\n") == frames
    assert [json.loads(line) for line in batch.split("\n")] == [json.loads(f) for f in frames]


def test_a_hello_may_name_many_streams() -> None:
    """A session may be in many rooms: the number of positions is bounded only by
    ``max_message_bytes``, which is checked before parsing."""
    streams = {f"room-{i}": {"epoch": "e", "offset": i} for i in range(1000)}
    hello = parse_client_frame(json.dumps({"type": "hello", "v": 1, "streams": streams}))
    assert isinstance(hello, Hello)
    assert len(hello.streams) == 1000
