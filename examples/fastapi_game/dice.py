"""Dice notation: ``NdM+K`` (``2d6+3``, ``d20``, ``4d6-1``), rolled on the server."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

MAX_DICE = 100
MAX_SIDES = 1000
MAX_MODIFIER = 1000
MAX_LENGTH = 32

# Digits are ASCII only (no "٣d6"); spaces are allowed between the parts, not inside a number.
_NOTATION = re.compile(r"\s*(\d+)?\s*d\s*(\d+)\s*(?:([+-])\s*(\d+))?\s*", re.ASCII | re.IGNORECASE)


class DiceError(ValueError):
    """Not valid dice notation; the message says what is wrong."""


@dataclass(frozen=True)
class Dice:
    count: int
    sides: int
    modifier: int = 0

    def __str__(self) -> str:  # the canonical notation: "2d6+3", "1d20", "4d6-1"
        if self.modifier:
            return f"{self.count}d{self.sides}{self.modifier:+d}"
        return f"{self.count}d{self.sides}"


def parse(expr: str) -> Dice:
    """Parse dice notation (case-insensitive, spaces allowed).

    Raises:
        DiceError: if `expr` is not valid notation or a number is out of range.
    """
    if len(expr) > MAX_LENGTH:
        raise DiceError(f"at most {MAX_LENGTH} characters")
    match = _NOTATION.fullmatch(expr)
    if match is None:
        raise DiceError("expected dice notation like 2d6+3, d20 or 4d6-1")
    count, sides, sign, modifier = match.groups()
    dice = Dice(
        count=1 if count is None else int(count),
        sides=int(sides),
        modifier=0 if modifier is None else int(sign + modifier),
    )
    if not 1 <= dice.count <= MAX_DICE:
        raise DiceError(f"the number of dice must be 1 to {MAX_DICE}")
    if not 2 <= dice.sides <= MAX_SIDES:
        raise DiceError(f"a die has 2 to {MAX_SIDES} sides")
    if abs(dice.modifier) > MAX_MODIFIER:
        raise DiceError(f"the modifier must be between -{MAX_MODIFIER} and +{MAX_MODIFIER}")
    return dice


def roll(dice: Dice, randbelow: Callable[[int], int] = secrets.randbelow) -> list[int]:
    """Roll each die; the total is ``sum(rolls) + dice.modifier``."""
    return [randbelow(dice.sides) + 1 for _ in range(dice.count)]
