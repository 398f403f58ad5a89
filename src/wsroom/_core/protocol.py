"""Wire contract v1: parsing client frames and encoding server frames.

Client frames are validated by pydantic at the boundary; the rest of the library sees
frozen models. Server frames are encoded once (``pydantic_core.to_json``, compact,
UTF-8) and the resulting ``str`` is shared by every recipient.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails, PydanticKnownError, to_json

from wsroom._core.codes import ErrorCode

__all__ = [
    "BadFrame", "ClientFrame", "Hello", "Msg", "Pong", "StreamPosition", "encode",
    "error_frame", "left_frame", "msg_frame", "msg_frame_from", "msg_payload", "parse_client_frame",
    "ping_frame", "presence_diff_frame", "presence_state_frame", "reply_frame",
    "safe_errors", "schema_names", "snapshot_frame", "stream_frame", "welcome_frame",
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


# Context values of pydantic's error messages that describe the schema (bounds, expected
# values, names of the app's classes), or a count: every other value (``error``: a
# parser's or a validator's own words, ``tag``, ``attribute``, ``tz_actual``...) may
# quote the input, and the message is cut before it.
_SAFE_CONTEXT = frozenset({
    "gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "actual_length",
    "expected_plural", "field_type", "pattern", "expected", "class_name", "class",
    "encoding", "max_digits", "decimal_places", "whole_digits", "expected_schemes",
    "expected_version", "tz_expected", "discriminator", "expected_tags", "method_name",
})
# The count that `{expected_plural}` agrees with, in a message that has one.
_COUNTS = ("max_length", "min_length", "max_digits", "decimal_places", "whole_digits")
# Templates whose cut would read badly, rewritten without their input.
_TEMPLATES = {
    "union_tag_invalid": "Input tag does not match any of the expected tags: {expected_tags}",
    "no_such_attribute": "Object has no such attribute",
    "iteration_error": "Error iterating over object",
    "mapping_type": "Input should be a valid mapping",
    "timezone_offset": "Timezone offset of {tz_expected} required",
}
# The client frames' own messages for their union of frame types.
_FRAME_MESSAGES = {
    "union_tag_invalid": "unknown frame type (expected hello, pong or msg)",
    "union_tag_not_found": "missing frame type",
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def schema_names(adapter: TypeAdapter[Any]) -> frozenset[str]:
    """Every string a validator's schema holds (field names and aliases, tags, literal
    values, class names...): the parts of an error's location that are the app's own,
    not the client's (the client's are dict keys and unexpected field names)."""
    names: set[str] = set()
    seen: set[int] = set()
    stack: list[Any] = [adapter.core_schema]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            names.add(node)
        elif isinstance(node, type):
            names.add(node.__name__)
        elif isinstance(node, (dict, list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            if isinstance(node, dict):
                stack.extend(node.keys())
                stack.extend(node.values())
            else:
                stack.extend(node)
    return frozenset(names)


def _location(loc: tuple[int | str, ...], names: frozenset[str], root: str) -> str:
    """The error's location, with each part not of the schema (a client's dict key or
    unexpected field name) shown as ``<key>``; list indexes are kept."""
    parts = [str(part) if isinstance(part, int) or part in names or part == "[key]"
             else "<key>"
             for part in loc]
    return ".".join(parts) or root


def _message(error: ErrorDetails, messages: dict[str, str]) -> str:
    """Pydantic's message for `error` without any value taken from the input."""
    kind = error["type"]
    fixed = messages.get(kind)
    if fixed is not None:
        return fixed
    context = error.get("ctx") or {}
    template = _TEMPLATES.get(kind)
    if template is None:
        try:
            template = PydanticKnownError(
                kind, context or None).message_template  # type: ignore[arg-type]
        except (KeyError, TypeError):  # PydanticCustomError: the app's own template
            return f"invalid value ({kind})"
    cut = next((match.start() for match in _PLACEHOLDER.finditer(template)
                if match.group(1) not in _SAFE_CONTEXT), None)
    if cut is not None:  # "Value error, {error}" -> "Value error"
        template = template[:cut].rstrip(" ,:'`\"")
        template = template.removesuffix(" got").rstrip(" ,:")
    values = {key: context[key] for key in _SAFE_CONTEXT if key in context}
    if "expected_plural" not in values:  # pydantic computes it from the count
        counts = [values[key] for key in _COUNTS if key in values]
        values["expected_plural"] = "" if counts[:1] == [1] else "s"
    try:
        return template.format_map(values)
    except (KeyError, ValueError, IndexError):  # a context value missing: no values
        return _PLACEHOLDER.split(template, maxsplit=1)[0].rstrip(" ,:'`\"") or kind


def safe_errors(exc: ValidationError, limit: int = 3, *,
                names: frozenset[str] = frozenset(),
                messages: dict[str, str] | None = None, root: str = "frame") -> str:
    """Describe validation errors without echoing any input (it may hold secrets, or
    markup meant for whoever reads the detail): each error's location, where only the
    parts found in `names` (see `schema_names`) and list indexes are spelled out, and
    the kind of problem, with the schema's bounds but never the value.

    Args:
        exc: the validation error.
        limit: at most this many errors are described.
        names: the strings of the validator's schema.
        messages: fixed messages by error type, instead of pydantic's.
        root: the location of an error in the value itself (not in a part of it).
    """
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:limit]:
        message = _message(error, messages or {})
        parts.append(f"{_location(error['loc'], names, root)}: {message}")
    return "; ".join(parts)


_FRAME_NAMES = schema_names(_client_frame)


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
        raise BadFrame(ErrorCode.BAD_FRAME, safe_errors(
            exc, names=_FRAME_NAMES, messages=_FRAME_MESSAGES)) from None


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
