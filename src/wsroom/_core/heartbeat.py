"""Heartbeat and idle deadlines (sans-I/O: the caller passes ``now``).

The server sends an application-level ``ping`` every ``ping_interval`` seconds. A ping
opens a deadline of ``pong_timeout`` seconds; *any* frame that arrives closes it (a
``pong`` also yields a round-trip time). A peer that vanishes without FIN or RST is
therefore evicted at most ``ping_interval + pong_timeout`` seconds after its last frame.

While the connection's own reader is blocked because the server is slow (a handler
holds the inbox full), the deadline is paused: the silence is the server's, not the
peer's. On resume the deadline restarts from that moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

__all__ = ["Beat", "Heartbeat", "Tick"]


class Beat(Enum):
    """What the heartbeat asks the runtime to do now."""

    NOTHING = "nothing"
    PING = "ping"
    NO_PONG = "no_pong"
    IDLE = "idle"


@dataclass(frozen=True, slots=True)
class Tick:
    """Result of `Heartbeat.poll`."""

    beat: Beat
    wake_at: float
    """When to poll again at the latest."""
    ping_id: int = 0


class Heartbeat:
    """Ping schedule, pong deadline and idle deadline of one connection.

    Args:
        ping_interval: seconds between pings.
        pong_timeout: seconds after a ping within which some frame must arrive.
        idle_timeout: seconds without an application message before closing, or None.
        now: the current time.

    Raises:
        ValueError: if an interval is not positive.
    """

    __slots__ = ("_answered", "_deadline", "_idle_deadline", "_next_ping", "_paused",
                 "_ping_id",
                 "_ping_sent_at", "idle_timeout", "ping_interval", "pong_timeout", "rtt")

    def __init__(
        self,
        *,
        ping_interval: float,
        pong_timeout: float,
        idle_timeout: float | None = None,
        now: float,
    ) -> None:
        if ping_interval <= 0 or pong_timeout <= 0:
            raise ValueError("ping_interval and pong_timeout must be positive")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive or None")
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.idle_timeout = idle_timeout
        self._next_ping = now + ping_interval
        self._deadline: float | None = None
        self._idle_deadline = math.inf if idle_timeout is None else now + idle_timeout
        self._ping_id = 0
        self._answered = True
        self._ping_sent_at = 0.0
        self._paused = False
        self.rtt: float | None = None
        """Round-trip time measured by the last answered ping, in seconds."""

    def frame_received(self) -> None:
        """Any frame arrived: the peer is alive."""
        self._deadline = None

    def message_received(self, now: float) -> None:
        """An application message arrived: restart the idle deadline."""
        self._deadline = None
        if self.idle_timeout is not None:
            self._idle_deadline = now + self.idle_timeout

    def message_handled(self, now: float) -> None:
        """One of the client's messages was handled: the idle deadline restarts (a
        client whose requests wait behind a slow handler is waiting, not idle)."""
        if self.idle_timeout is not None:
            self._idle_deadline = max(self._idle_deadline, now + self.idle_timeout)

    def pong_received(self, ping_id: int, now: float) -> float | None:
        """A ``pong`` arrived; return the RTT if it is the first answer to the latest
        ping, else None (an unsolicited pong: the runtime rate-limits those)."""
        self._deadline = None
        if ping_id == self._ping_id and ping_id > 0 and not self._answered:
            self._answered = True
            self.rtt = now - self._ping_sent_at
            return self.rtt
        return None

    def pause(self) -> None:
        """The reader is blocked by the server itself: suspend the pong deadline."""
        self._paused = True

    def resume(self, now: float) -> None:
        """The reader runs again: open deadlines restart from `now`.

        The idle deadline restarts too: a reader blocked behind a full inbox means the
        client was busy sending, not idle.
        """
        self._paused = False
        if self._deadline is not None:
            self._deadline = now + self.pong_timeout
        if self.idle_timeout is not None:
            self._idle_deadline = max(self._idle_deadline, now + self.idle_timeout)

    def poll(self, now: float) -> Tick:
        """Advance to `now` and tell what to do."""
        if not self._paused:
            if self._deadline is not None and now >= self._deadline:
                return Tick(Beat.NO_PONG, now)
            if now >= self._idle_deadline:
                return Tick(Beat.IDLE, now)
        beat = Beat.NOTHING
        if now >= self._next_ping:
            self._ping_id += 1
            self._answered = False
            self._ping_sent_at = now
            self._next_ping = now + self.ping_interval
            if self._deadline is None:
                self._deadline = now + self.pong_timeout
            beat = Beat.PING
        wake_at = self._next_ping
        if not self._paused:  # while paused, only pings are due
            wake_at = min(wake_at, self._idle_deadline)
            if self._deadline is not None:
                wake_at = min(wake_at, self._deadline)
        return Tick(beat, wake_at, self._ping_id)
