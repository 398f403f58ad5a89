"""The example game's dice notation (examples/fastapi_game/dice.py)."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "fastapi_game"))
try:
    import dice
finally:
    sys.path.pop(0)

Dice, DiceError, parse, roll = dice.Dice, dice.DiceError, dice.parse, dice.roll

# What a valid expression is, said independently of the parser.
S = "[ \t\n\r\f\v]*"  # ASCII whitespace
VALID = re.compile(f"{S}([0-9]+)?{S}[dD]{S}([0-9]+){S}(?:([+-]){S}([0-9]+))?{S}")


@pytest.mark.parametrize(("expr", "expected", "canonical"), [
    ("2d6+3", Dice(2, 6, 3), "2d6+3"),
    ("d20", Dice(1, 20, 0), "1d20"),
    ("4d6-1", Dice(4, 6, -1), "4d6-1"),
    ("1D2", Dice(1, 2, 0), "1d2"),
    (" 3 d 8 + 0 ", Dice(3, 8, 0), "3d8"),
    ("\t2d6 -\t2\n", Dice(2, 6, -2), "2d6-2"),
    ("100d1000+1000", Dice(100, 1000, 1000), "100d1000+1000"),
    ("1d1000-1000", Dice(1, 1000, -1000), "1d1000-1000"),
    ("007d06+01", Dice(7, 6, 1), "7d6+1"),
])
def test_valid_notation(expr: str, expected: Dice, canonical: str) -> None:
    assert parse(expr) == expected
    assert str(parse(expr)) == canonical
    assert parse(canonical) == expected


@pytest.mark.parametrize(("expr", "problem"), [
    ("", "expected dice notation"),
    ("   ", "expected dice notation"),
    ("d", "expected dice notation"),
    ("6", "expected dice notation"),
    ("2d", "expected dice notation"),
    ("2d6+", "expected dice notation"),
    ("2d6 3", "expected dice notation"),
    ("2d6+3+1", "expected dice notation"),
    ("2d6*2", "expected dice notation"),
    ("2d6++3", "expected dice notation"),
    ("+2d6", "expected dice notation"),
    ("-2d6", "expected dice notation"),
    ("2.5d6", "expected dice notation"),
    ("1 0d6", "expected dice notation"),
    ("2dd6", "expected dice notation"),
    ("2d6d6", "expected dice notation"),
    ("٣d6", "expected dice notation"),  # non-ASCII digits
    ("2d\uff16", "expected dice notation"),  # a fullwidth 6
    ("0d6", "number of dice must be 1 to 100"),
    ("101d6", "number of dice must be 1 to 100"),
    ("d0", "a die has 2 to 1000 sides"),
    ("d1", "a die has 2 to 1000 sides"),
    ("2d1001", "a die has 2 to 1000 sides"),
    ("2d6+1001", "the modifier must be between -1000 and +1000"),
    ("2d6-1001", "the modifier must be between -1000 and +1000"),
    ("9" * 5000 + "d6", "at most 32 characters"),
    ("1d6" + " " * 30, "at most 32 characters"),
])
def test_invalid_notation(expr: str, problem: str) -> None:
    with pytest.raises(DiceError, match=re.escape(problem)):
        parse(expr)


def test_dice_errors_are_value_errors() -> None:
    assert issubclass(DiceError, ValueError)


def test_roll_uses_the_random_source_for_each_die() -> None:
    assert roll(Dice(3, 6), randbelow=lambda n: n - 1) == [6, 6, 6]
    assert roll(Dice(2, 20), randbelow=lambda n: 0) == [1, 1]
    expected = random.Random(4)
    assert roll(Dice(5, 4), randbelow=random.Random(4).randrange) == [
        expected.randrange(4) + 1 for _ in range(5)]


spaces = st.text(alphabet=" \t", max_size=2)


@st.composite
def expressions(draw: st.DrawFn) -> tuple[str, Dice]:
    """A valid expression, written in any of its accepted forms, and what it means."""
    count = draw(st.integers(1, 100))
    sides = draw(st.integers(2, 1000))
    modifier = draw(st.integers(-1000, 1000))
    implicit_one = count == 1 and draw(st.booleans())
    parts = [
        draw(spaces), "" if implicit_one else str(count), draw(spaces),
        draw(st.sampled_from("dD")), draw(spaces), str(sides), draw(spaces),
    ]
    if modifier or draw(st.booleans()):
        parts += ["-" if modifier < 0 else "+", draw(spaces), str(abs(modifier))]
    return "".join(parts), Dice(count, sides, modifier)  # at most 23 characters


@given(expressions())
def test_valid_expressions_roll_within_bounds(case: tuple[str, Dice]) -> None:
    expr, expected = case
    parsed = parse(expr)
    assert parsed == expected
    assert parse(str(parsed)) == parsed
    rolls = roll(parsed)
    assert len(rolls) == parsed.count
    assert all(1 <= r <= parsed.sides for r in rolls)
    total = sum(rolls) + parsed.modifier
    assert parsed.count + parsed.modifier <= total <= parsed.count * parsed.sides + parsed.modifier


@given(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789dD+- x.\t\n", max_size=40)))
def test_anything_else_is_rejected_with_a_dice_error(expr: str) -> None:
    match = VALID.fullmatch(expr)
    try:
        parsed = parse(expr)
    except DiceError:
        return  # never another exception
    assert match is not None, expr
    assert len(expr) <= 32
    assert 1 <= parsed.count <= 100
    assert 2 <= parsed.sides <= 1000
    assert abs(parsed.modifier) <= 1000
