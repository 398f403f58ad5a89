"""Configuration of a hub and of its rooms, validated on construction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from wsroom._core.admission import TrustedProxies
from wsroom._core.history import HistoryLimits
from wsroom._core.origin import normalize_origin
from wsroom._core.queue import Policy

__all__ = ["HubConfig", "RoomConfig"]


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be positive, got {value!r}")


@dataclass(frozen=True, slots=True)
class RoomConfig:
    """Per-room settings.

    Attributes:
        policy: what happens when a member's outbound queue is full
            (see [backpressure](../topics/backpressure.md)).
        history: how much of the room's stream is kept for replay on resume (see
            [recovery](../topics/recovery.md)); the default covers a 2-minute outage
            at 50 messages/s.
        presence: send ``presence`` frames (roster and changes) to the room's members.
    """

    policy: Policy = Policy.DISCONNECT
    history: HistoryLimits = field(default_factory=HistoryLimits)
    presence: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy(self.policy))


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Settings of a `Hub`. Every limit is on by default; times are in seconds.

    Attributes:
        ping_interval: seconds between application-level pings.
        pong_timeout: seconds after a ping within which some frame must arrive,
            else the connection is closed with 3012.
        handshake_timeout: seconds from accept to the client's `hello`, else 3502.
        idle_timeout: seconds without an application message before closing with
            3511, or None (default) to keep idle clients.
        max_message_bytes: largest accepted client frame in bytes, checked before
            parsing; larger ones close the connection with 1009.
        max_queue_bytes: bound of each client's outbound queue in bytes.
        max_queue_messages: bound of each client's outbound queue in messages.
        max_batch_bytes: when several frames are queued, the writer sends up to this
            many bytes of them as one WebSocket frame (newline-separated JSON).
        batch_frames: set to False to always send one frame per message.
        error_budget: consecutive bad messages that close the connection with 3509.
        allowed_origins: the web pages allowed to connect, as exact origins
            (``"https://game.example.com"``); a browser upgrade from any other Origin is
            refused with HTTP 403 (3507 where a close frame must be used). None (the
            default): no check. Requests without an Origin header (not from a browser)
            are allowed.
        trusted_proxies: IP addresses or networks (``"10.0.0.0/8"``) of your reverse
            proxies. Only when the TCP peer is one of them is the client's address read
            from `proxy_header` (the rightmost address that is not a trusted proxy);
            None (the default): the TCP peer's address is the client's, and the header
            is ignored. See the [deploy guide](../deploy.md).
        proxy_header: ``"x-forwarded-for"`` (the default) or ``"forwarded"`` (RFC 7239).
        max_connections_per_ip: connections one client address (an IPv4 address, an
            IPv6 /64) may hold at once, or None. Beyond it the upgrade is refused with
            HTTP 429 (3504 where the server cannot answer with a status).
        connect_rate_per_ip: new connections per second one client address may open on
            average, or None; refused like `max_connections_per_ip`, with a
            ``Retry-After`` header.
        connect_burst_per_ip: new connections a client address may open at once above
            `connect_rate_per_ip` (a reconnect storm after a restart).
        rate_limit: application messages per second a client may send on average, or
            None for no limit. Beyond it (and its burst) a message is dropped and
            answered with a ``rate_limited`` error frame.
        rate_burst: messages a client may send at once above `rate_limit`.
        rate_patience: consecutive ``rate_limited`` messages after which the
            connection is closed with 3013 (the client reconnects with backoff).
        member_rate_limit: application messages per second one member may send on
            average across all of its connections, or None. Beyond it (and its
            burst) a message is refused like one over `rate_limit` (a
            ``rate_limited`` error frame; the refusals count toward `rate_patience`).
        member_rate_burst: messages a member may send at once above
            `member_rate_limit`.
        max_sessions_per_member: sessions (live and detached) one member may hold at
            once, or None. A new session beyond it ends the member's own oldest one:
            its oldest detached session, else its oldest live one, whose connection
            is closed with 3503 (replaced; the client does not reconnect).
        inbox_size: application messages read ahead of the handlers per connection;
            beyond it the reader waits (TCP backpressure to the client).
        max_connections: global cap on connections of this hub (1013 beyond it), or
            None for no cap.
        close_timeout: seconds from a close request until the connection is released:
            the flush (for closes that flush) and the close frame together; at most
            1 s after a no-pong eviction. A peer that reads nothing for that long (its
            TCP window is full) is released without a close frame. Its socket is
            closed by the kernel at most the user timeout (30 s) later under
            ``wsroom run`` or on a socket from `wsroom.runner.listen_socket` (the
            peer, if still there, sees 1006 and reconnects as it would after 3008);
            otherwise the server keeps it until TCP gives up (see the
            [deploy guide](../deploy.md)).
        hook_timeout: seconds allowed for `authenticate` plus the `on_connect` hooks
            (else 1013, try again later), and for the `on_disconnect` hooks.
        shutdown_timeout: seconds for the graceful part of a shutdown; connections
            still open then are cancelled, which takes at most
            ``close_timeout + hook_timeout + 1`` more seconds.
        shutdown_batch_size: connections told to reconnect (1012) per batch during a
            graceful shutdown; batches are spread over half of `shutdown_timeout`.
        resume_window: seconds a dropped client's session is kept (rooms held,
            presence *away*) for it to resume with its token.
        resume_secrets: secrets (at least 16 bytes each) that sign resume tokens; the
            first signs, all verify (rotation). None: a random secret per hub, which
            is right for one process; workers sharing a backplane need the same ones.
        resume_token_ttl: seconds a resume token stays valid after its welcome.
        inbox_history: how much of each session's ``@inbox`` stream is kept for replay.
        max_detached_sessions: sessions kept waiting for a resume at once, or None.
            Beyond it a session ends early (its client gets a new session and
            snapshots when it comes back): the one detached longest ago of whoever
            holds the most detached sessions, a member or a client address (then a
            network: an IPv4 /24, an IPv6 /48), so that one member, address or network
            cannot push out the sessions of others.
        max_detached_per_ip: sessions one client address (as for
            `max_connections_per_ip`) may keep waiting for a resume at once, or None;
            beyond it that address's session detached longest ago ends early.
        max_history_bytes: the most that every stream history of this process
            (rooms and inboxes) may hold together, in bytes, or None. Beyond it the
            largest histories forget their oldest messages first; a client that
            resumes behind them gets ``recovered: false`` and a snapshot. With the
            Redis backplane histories live in Redis (size it with ``maxmemory``).
        default_room: settings of rooms that `room_config` does not match.
    """

    ping_interval: float = 30.0
    pong_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float | None = None
    max_message_bytes: int = 64 * 1024
    max_queue_bytes: int = 1024 * 1024
    max_queue_messages: int = 4096
    max_batch_bytes: int = 64 * 1024
    batch_frames: bool = True
    error_budget: int = 10
    allowed_origins: Sequence[str] | None = None
    trusted_proxies: Sequence[str] | None = None
    proxy_header: str = "x-forwarded-for"
    max_connections_per_ip: int | None = 100
    connect_rate_per_ip: float | None = 10.0
    connect_burst_per_ip: int = 50
    rate_limit: float | None = 50.0
    rate_burst: int = 100
    rate_patience: int = 20
    member_rate_limit: float | None = 100.0
    member_rate_burst: int = 200
    max_sessions_per_member: int | None = 8
    inbox_size: int = 16
    max_connections: int | None = None
    close_timeout: float = 10.0
    hook_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    shutdown_batch_size: int = 200
    resume_window: float = 120.0
    resume_secrets: Sequence[str | bytes] | None = None
    resume_token_ttl: float = 24 * 3600.0
    inbox_history: HistoryLimits = field(
        default_factory=lambda: HistoryLimits(max_messages=1000, max_bytes=1024 * 1024))
    max_detached_sessions: int | None = 10_000
    max_detached_per_ip: int | None = 1_000
    max_history_bytes: int | None = 256 * 1024 * 1024
    default_room: RoomConfig = field(default_factory=RoomConfig)

    def __post_init__(self) -> None:
        _positive(self, *(f.name for f in fields(self) if f.name not in
                          ("batch_frames", "default_room", "resume_secrets",
                           "inbox_history", "allowed_origins", "trusted_proxies",
                           "proxy_header")))
        if self.allowed_origins is not None:
            if isinstance(self.allowed_origins, str):
                raise TypeError("allowed_origins is a list of origins, e.g. [origin]")
            origins = tuple(self.allowed_origins)
            for origin in origins:
                normalize_origin(origin)  # a clear error now, not a refusal later
            object.__setattr__(self, "allowed_origins", origins)
        if self.trusted_proxies is not None:
            if isinstance(self.trusted_proxies, str):
                raise TypeError("trusted_proxies is a list of addresses, e.g. [address]")
            object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        # A clear error now for a bad address, network or header name.
        TrustedProxies(self.trusted_proxies or (), self.proxy_header)
        if self.resume_secrets is not None:
            if isinstance(self.resume_secrets, (str, bytes, bytearray)):
                raise TypeError("resume_secrets is a list of secrets, e.g. [secret]")
            object.__setattr__(self, "resume_secrets", tuple(self.resume_secrets))
            if not self.resume_secrets:
                raise ValueError("resume_secrets: give at least one secret, or None")
        if self.max_message_bytes > self.max_queue_bytes:
            # Not strictly needed, but a reply as large as a request must fit.
            raise ValueError("max_queue_bytes must be at least max_message_bytes")
