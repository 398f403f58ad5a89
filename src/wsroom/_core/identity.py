"""Who a connection belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Identity"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection belongs to, as returned by the app's `authenticate` hook.

    Attributes:
        id: a stable member id (e.g. a player id). Logged; must not be a secret.
        info: public metadata about the member (e.g. a display name).
    """

    id: str
    info: Mapping[str, Any] = field(default_factory=dict)
