"""Wire contract v1: parsing client frames and encoding server frames.

Client frames are validated by pydantic at the boundary; the rest of the library sees
frozen models. Server frames are encoded once (``pydantic_core.to_json``, compact,
UTF-8) and the resulting ``str`` is shared by every recipient.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import to_json

from wsroom._core.codes import ErrorCode

__all__ = [
    "BadFrame", "ClientFrame", "Hello", "Msg", "Pong", "StreamPosition", "encode",
    "error_frame", "left_frame", "msg_frame", "msg_frame_from", "msg_payload", "parse_client_frame",
    "ping_frame", "presence_diff_frame", "presence_state_frame", "reply_frame",
    "safe_errors", "snapshot_frame", "stream_frame", "welcome_frame",
]

PROTOCOL_VERSION = 1

Ref = Annotated[str, Field(max_length=64)] | int


class _Frame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class StreamPosition(_Frame):
    """The last ``(epoch, offset)`` a client saw on a stream."""

    epoch: Annotated[str, Field(max_length=64)]
    offset: Annotated[int, Field(ge=0)]


class Hello(_Frame):
    """First client frame: protocol version, optional auth and resume state."""

    type: Literal["hello"]
    v: Literal[1]
    auth: Any = None
    resume: Annotated[str, Field(max_length=1024)] | None = None
    # Bounded by max_message_bytes: a session may be in many rooms.
    streams: dict[Annotated[str, Field(max_length=256)], StreamPosition] = {}


class Pong(_Frame):
    """Answer to a server ``ping``."""

    type: Literal["pong"]
    id: int


class Msg(_Frame):
    """An application event, optionally expecting a ``reply`` by ``ref``."""

    type: Literal["msg"]
    event: Annotated[str, Field(min_length=1, max_length=128)]
    data: Any = None
    ref: Ref | None = None


ClientFrame = Annotated[Hello | Pong | Msg, Field(discriminator="type")]
_client_frame: TypeAdapter[Hello | Pong | Msg] = TypeAdapter(ClientFrame)


class BadFrame(Exception):
    """A client frame that is not valid JSON or not a frame of the contract."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


# Messages of these error types quote the input; say what was expected instead.
_FIXED_MESSAGES = {
    "union_tag_invalid": "unknown frame type (expected hello, pong or msg)",
    "union_tag_not_found": "missing frame type",
}
# Fields whose next location part is a client-chosen dict key, never to be echoed.
_KEYED_FIELDS = frozenset({"streams"})


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    masked = False
    for part in loc:
        parts.append("<key>" if masked else str(part))
        masked = part in _KEYED_FIELDS and not masked
    return ".".join(parts) or "frame"


def safe_errors(exc: ValidationError, limit: int = 3) -> str:
    """Describe validation errors without echoing any input (it may hold secrets)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False)[
        :limit
    ]:
        message = _FIXED_MESSAGES.get(error["type"], error["msg"])
        parts.append(f"{_location(error['loc'])}: {message}")
    return "; ".join(parts)


def parse_client_frame(text: str | bytes) -> Hello | Pong | Msg:
    """Parse and validate one client frame.

    Raises:
        BadFrame: with `ErrorCode.BAD_JSON` or `ErrorCode.BAD_FRAME`.
    """
    try:
        return _client_frame.validate_json(text)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise BadFrame(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
        raise BadFrame(ErrorCode.BAD_FRAME, safe_errors(exc)) from None


def encode(frame: Any) -> str:
    """Encode a server frame (or a value) as compact JSON text (one line, never a raw
    newline)."""
    return to_json(frame).decode()


def msg_payload(event: str, data: Any) -> str:
    """Encode the part of a ``msg`` frame that does not depend on its position
    (``"event":...,"data":...``): once per message, whatever the stream assigns."""
    return encode({"event": event, "data": data})[1:-1]


def msg_frame_from(stream: str, epoch: str, offset: int, payload: str) -> str:
    """Complete a ``msg`` frame from its position and its `msg_payload`."""
    return (f'{{"type":"msg","stream":{encode(stream)},"epoch":{encode(epoch)},'
            f'"offset":{offset},{payload}}}')


def msg_frame(stream: str, epoch: str, offset: int, event: str, data: Any) -> str:
    """Encode a ``msg`` frame."""
    return msg_frame_from(stream, epoch, offset, msg_payload(event, data))


def stream_frame(stream: str, epoch: str, offset: int, *, lossy: bool = False) -> str:
    """Encode a ``stream`` frame: the client's position on `stream` is now `offset`
    (a room joined after the welcome, or a message the client was excluded from)."""
    frame: dict[str, Any] = {"type": "stream", "stream": stream, "epoch": epoch,
                             "offset": offset}
    if lossy:
        frame["lossy"] = True
    return encode(frame)


def left_frame(stream: str) -> str:
    """Encode a ``left`` frame: the session is no longer in room `stream`."""
    return encode({"type": "left", "stream": stream})


def snapshot_frame(stream: str, epoch: str, offset: int, data: Any) -> str:
    """Encode a ``snapshot`` frame: the app's state of `stream` as of `offset`."""
    return encode({"type": "snapshot", "stream": stream, "epoch": epoch, "offset": offset,
                   "data": data})


def presence_state_frame(room: str, state: list[dict[str, Any]]) -> str:
    """Encode a ``presence`` frame with a room's whole roster."""
    return encode({"type": "presence", "room": room, "state": state})


def presence_diff_frame(room: str, joins: list[dict[str, Any]], leaves: list[str]) -> str:
    """Encode a ``presence`` frame with changes (``joins`` are upserts)."""
    return encode({"type": "presence", "room": room, "joins": joins, "leaves": leaves})


def ping_frame(ping_id: int) -> str:
    """Encode a ``ping`` frame."""
    return f'{{"type":"ping","id":{ping_id}}}'


def reply_frame(ref: str | int, data: Any) -> str:
    """Encode a ``reply`` frame."""
    return encode({"type": "reply", "ref": ref, "data": data})


def error_frame(code: str, detail: str, ref: str | int | None = None) -> str:
    """Encode an ``error`` frame."""
    frame: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if ref is not None:
        frame["ref"] = ref
    return encode(frame)


def welcome_frame(
    *,
    session: str,
    resume: str | None,
    ping_interval: float,
    pong_timeout: float,
    streams: dict[str, dict[str, Any]],
) -> str:
    """Encode a ``welcome`` frame."""
    return encode(
        {"type": "welcome", "v": PROTOCOL_VERSION, "session": session, "resume": resume,
         "ping_interval": ping_interval, "pong_timeout": pong_timeout, "streams": streams}
    )
