"""Event handlers: registration and payload validation (the per-message context,
`MessageContext`, is the hub's)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from wsroom._core.protocol import schema_names

__all__ = ["Handler", "Handlers", "Route"]


Handler = Callable[[Any, Any], Awaitable[Any]]
"""``async (ctx: MessageContext, data) -> reply``."""


@dataclass(frozen=True, slots=True)
class Route:
    """A registered handler and the validator of its payload."""

    event: str
    handler: Handler
    adapter: TypeAdapter[Any] | None
    names: frozenset[str] = frozenset()
    """The strings of the validator's schema: the parts of an error's location that
    may be shown to the client (see `wsroom._core.protocol.safe_errors`)."""


def _payload_type(handler: Handler, localns: Mapping[str, Any] | None) -> Any:
    """The annotation of the handler's second parameter (the payload), if any.

    `localns` is the namespace the handler was defined in, so that a model class local
    to a function resolves even under ``from __future__ import annotations``.
    """
    params = list(inspect.signature(handler).parameters.values())
    if len(params) != 2:
        raise TypeError(
            f"handler {handler.__qualname__} must take two parameters (ctx, data), "
            f"it takes {len(params)}"
        )
    try:
        hints = typing.get_type_hints(handler, localns=dict(localns or {}))
    except Exception as exc:  # unresolvable forward references
        raise TypeError(
            f"cannot resolve the annotations of handler {handler.__qualname__}: {exc}; "
            "pass the payload type explicitly with model="
        ) from exc
    return hints.get(params[1].name, Any)


class Handlers:
    """Handlers registered per event name."""

    __slots__ = ("_routes",)

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def add(
        self,
        event: str,
        handler: Handler,
        model: Any = None,
        localns: Mapping[str, Any] | None = None,
    ) -> None:
        """Register `handler` for `event`.

        The payload is validated against `model`, or else against the annotation of
        the handler's second parameter; without either it is passed as parsed JSON.

        Raises:
            ValueError: if `event` is empty or already has a handler.
            TypeError: if `handler` is not an async function of two parameters.
        """
        if not event or len(event) > 128:
            raise ValueError("an event name is 1 to 128 characters")
        if event in self._routes:
            raise ValueError(f"event {event!r} already has a handler")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler for {event!r} must be an async function")
        payload = _payload_type(handler, localns) if model is None else model
        adapter = None if payload is Any else TypeAdapter(payload)
        names = frozenset() if adapter is None else schema_names(adapter)
        self._routes[event] = Route(event, handler, adapter, names)

    def get(self, event: str) -> Route | None:
        """Return the route of `event`, if any."""
        return self._routes.get(event)

    def events(self) -> list[str]:
        """Registered event names."""
        return list(self._routes)
