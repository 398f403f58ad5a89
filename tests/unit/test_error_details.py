"""`error` frame details never echo the client's input: validation errors of the app's
payload models (``wsroom._core.protocol.safe_errors`` with the route's schema names), and
the dispatcher's own details (an unknown event), over an in-memory hub."""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from support import running, wait_for
from wsroom import Hub, MessageContext
from wsroom._core.protocol import safe_errors, schema_names

MARK = "<script>alert(1)</script>"


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    meow: int


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    bark: int


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")

    either: int | str = 0
    pet: Cat | Dog = Cat(meow=1)
    tagged: Annotated[Cat | Dog, Field(discriminator="kind")] = Cat(meow=1)
    counts: dict[str, int] = {}
    id: uuid.UUID = uuid.UUID(int=0)
    at: datetime.datetime = datetime.datetime(2026, 1, 1)
    name: str = Field("x", alias="displayName", max_length=3)
    amount: decimal.Decimal = decimal.Decimal(0)
    quantity: int = Field(1, gt=0)
    items: list[Annotated[int, Field(le=5)]] = []
    color: str = "red"
    code: str = "a"

    @field_validator("color")
    @classmethod
    def _color(cls, value: str) -> str:
        if value != "red":
            raise ValueError(f"{value} is not a color")  # an app that quotes the input
        return value

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        if value != "a":
            raise PydanticCustomError("bad_code", "bad code {code}", {"code": value})
        return value


ORDER = TypeAdapter(Order)
NAMES = schema_names(ORDER)


def detail(data: Any, adapter: TypeAdapter[Any] = ORDER, limit: int = 100) -> str:
    with pytest.raises(ValidationError) as info:
        adapter.validate_python(data)
    return safe_errors(info.value, limit, names=schema_names(adapter), root="data")


def test_every_kind_of_error_names_the_field_and_the_problem_not_the_value() -> None:
    text = detail({
        "either": [MARK], "pet": {"meow": MARK}, "tagged": {"kind": MARK},
        "counts": {MARK: MARK}, "id": MARK, "at": MARK, "displayName": MARK,
        "amount": MARK, "quantity": -1, "items": [1, 9], "color": MARK, "code": MARK,
        MARK: 1,
    })
    assert MARK not in text
    assert "<" not in text.replace("<key>", "")
    assert text.split("; ") == [
        "either.int: Input should be a valid integer",
        "either.str: Input should be a valid string",
        "pet.Cat.meow: Input should be a valid integer, unable to parse string as an integer",
        "pet.Dog.bark: Field required",
        "tagged: Input tag does not match any of the expected tags: 'cat', 'dog'",
        "counts.<key>: Input should be a valid integer, unable to parse string as an integer",
        "id: Input should be a valid UUID",
        "at: Input should be a valid datetime or date",
        "displayName: String should have at most 3 characters",
        "amount: Input should be a valid decimal",
        "quantity: Input should be greater than 0",
        "items.1: Input should be less than or equal to 5",
        "color: Value error",
        "code: invalid value (bad_code)",
        "<key>: Extra inputs are not permitted",
    ]


def test_a_value_of_the_wrong_type_at_the_top_is_data() -> None:
    assert detail(MARK, TypeAdapter(int)) == (
        "data: Input should be a valid integer, unable to parse string as an integer")
    assert detail([1, 2], TypeAdapter(Annotated[list[int], Field(max_length=1)])) == (
        "data: List should have at most 1 item after validation, not 2")


def test_schema_names_hold_fields_aliases_tags_and_class_names() -> None:
    assert {"either", "displayName", "kind", "cat", "dog", "Cat", "Dog", "meow"} <= NAMES
    assert MARK not in NAMES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.just(MARK),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5) | st.just(MARK), inner, max_size=3),
    max_leaves=10,
)
FIELDS = ["either", "pet", "tagged", "counts", "id", "at", "displayName", "amount",
          "quantity", "items", "color", "code", MARK]


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5)
       | json_values)
def test_no_payload_is_echoed(data: Any) -> None:
    try:
        ORDER.validate_python(data)
    except ValidationError as exc:
        text = safe_errors(exc, 100, names=NAMES, root="data")
        assert MARK not in text
        assert "<script" not in text
        assert "alert" not in text


# -------------------------------------------------------------- through the dispatcher


@pytest.mark.anyio
async def test_an_unknown_event_and_bad_data_are_answered_without_echo() -> None:
    hub = Hub()

    @hub.on("order")
    async def order(ctx: MessageContext, data: Order) -> str:
        return "ok"

    async with running(hub) as (peer, _):
        await wait_for(lambda: any(f["type"] == "welcome" for f in peer.frames))
        await peer.transport.client_send({"type": "msg", "event": MARK, "ref": 1})
        await peer.transport.client_send({"type": "msg", "event": "order", "ref": 2,
                                          "data": {"color": MARK, "counts": {MARK: "x"},
                                                   MARK: MARK}})
        await wait_for(lambda: sum(f["type"] == "error" for f in peer.frames) == 2)
    errors = {f["ref"]: f for f in peer.frames if f["type"] == "error"}
    assert errors[1]["code"] == "unknown_event"
    assert errors[1]["detail"] == "no handler for this event"
    assert errors[2]["code"] == "invalid_data"
    assert errors[2]["detail"] == (
        "counts.<key>: Input should be a valid integer, unable to parse string as an "
        "integer; color: Value error; <key>: Extra inputs are not permitted")
    for frame in errors.values():
        assert "script" not in frame["detail"]
