"""Sessions: what outlives a connection for the resume window (sans-I/O).

A session is created by a successful ``hello`` without a usable resume token. It holds
the member's identity, its rooms (the hub's room registry is keyed by session) and its
personal inbox stream. While a connection is attached, the session is *live*; when the
connection drops for a reason the client recovers from, the session is *detached* and
kept for ``resume_window`` seconds; a resume within the window attaches the new
connection to it, and a window that passes expires it (it leaves its rooms: exactly
one presence leave). A connection that ends for good (the client said goodbye, or a
terminal close code) removes its session at once.

Resume tokens are rotated on every welcome: each carries the session's *generation*.
The registry accepts the newest generation, and the one the client resumed with until
the client proves (by sending any frame after its welcome) that it received the newer
one: a client whose connection died between the server's welcome and its own reading
of it still holds the older token and must not be locked out.
"""

from __future__ import annotations

import secrets
from typing import Generic, TypeVar

from wsroom._core.tally import Tally

__all__ = ["INBOX", "Session", "SessionRegistry", "inbox_key", "inbox_owner"]

INBOX = "@inbox"
"""Wire name of every session's personal stream (room names may not start with '@')."""

_INBOX_PREFIX = INBOX + "/"


def inbox_key(session_id: str) -> str:
    """The backplane key of a session's inbox stream."""
    return _INBOX_PREFIX + session_id


def inbox_owner(stream: str) -> str | None:
    """The session id whose inbox `stream` is, or None for a room."""
    return stream[len(_INBOX_PREFIX):] if stream.startswith(_INBOX_PREFIX) else None

IdentityT = TypeVar("IdentityT")  # the identity type (kept opaque here)
ConnT = TypeVar("ConnT")  # the connection type (kept opaque here)


class Session(Generic[IdentityT, ConnT]):
    """One member's session; see the module docstring.

    Attributes:
        id: random, unique, stable across resumes (it is named in resume tokens).
        member: the member id the session belongs to.
        identity: the app's identity object, as the last authentication returned it.
        connection: the attached connection, or None while detached.
        detached_at: when the last connection dropped (None while live).
        generation: the generation of the newest resume token.
    """

    __slots__ = ("_accepted", "address", "connection", "detached_at", "generation", "id",
                 "identity", "member", "network", "welcomed")

    def __init__(self, session_id: str, member: str, identity: IdentityT) -> None:
        self.id = session_id
        self.member = member
        self.identity = identity
        self.connection: ConnT | None = None
        self.detached_at: float | None = None
        self.address: str | None = None
        """The client address (its per-address key) it was detached from, if known."""
        self.network: str | None = None
        """That address's network (IPv4 /24, IPv6 /48), if known."""
        self.generation = 0
        self.welcomed = False
        """True once a welcome was issued for it (before that there is nothing to
        resume: a connection that drops during its handshake ends its session)."""
        self._accepted: tuple[int, ...] = ()  # sorted; one or two (a tuple: small)

    def __repr__(self) -> str:
        state = "live" if self.connection is not None else "detached"
        return f"<Session {self.id} member={self.member} {state}>"

    def rotate(self, presented: int | None = None) -> int:
        """Start a new token generation (on every welcome); return it.

        Args:
            presented: the generation of the token the client resumed with: until
                the client confirms the new token, the one it holds stays valid.
        """
        self.generation += 1
        self.welcomed = True
        self._accepted = ((self.generation,) if presented is None
                          else tuple(sorted({presented, self.generation})))
        return self.generation

    def confirm(self) -> bool:
        """The client received its newest token: older ones are useless from now.
        Returns True if that changed anything."""
        if len(self._accepted) > 1:
            self._accepted = (self.generation,)
            return True
        return False

    @property
    def accepted(self) -> tuple[int, ...]:
        """The generations a resume may present, in order."""
        return self._accepted

    def restore(self, generation: int, accepted: tuple[int, ...]) -> None:
        """Take over the token state of a session held by another worker until now."""
        self.generation = generation
        self.welcomed = True
        self._accepted = tuple(sorted(set(accepted)))

    def accepts(self, generation: int) -> bool:
        """True if a token of `generation` may resume this session."""
        return generation in self._accepted


Holder = tuple[str, str]
"""Who holds a detached session, for the quotas: ``("member", id)``, ``("address",
key)`` or ``("network", key)``."""


class SessionRegistry(Generic[IdentityT, ConnT]):
    """All sessions of a hub, with the detached ones in order of their expiry, and who
    holds them (each member, each client address) for the quotas.

    The quotas answer three questions, each with a session to end (the caller ends it
    and asks again): which of a member's sessions makes room for its new one
    (`member_victim`), which of an address's detached sessions is over its quota
    (`address_victim`), and which detached session goes when there are too many
    (`cap_victim`: the oldest of the *largest holder*, so that one member or one
    address cannot push anybody else's session out; when every member and address holds
    one, the largest network's oldest, so that many identities on one network cannot
    either).

    Args:
        window: seconds a detached session is kept for a resume.
    """

    __slots__ = ("_by_holder", "_by_member", "_detached", "_holders", "_networks",
                 "_sessions", "window")

    def __init__(self, window: float) -> None:
        if not window > 0:
            raise ValueError(f"the resume window must be positive, got {window!r}")
        self.window = window
        self._sessions: dict[str, Session[IdentityT, ConnT]] = {}
        self._by_member: dict[str, dict[str, Session[IdentityT, ConnT]]] = {}
        # Insertion order is detach order, and every session has the same window, so
        # the first entry is always the next to expire.
        self._detached: dict[str, Session[IdentityT, ConnT]] = {}
        # The detached sessions of each holder, in detach order, and how many.
        self._by_holder: dict[Holder, dict[str, Session[IdentityT, ConnT]]] = {}
        self._holders: Tally[Holder] = Tally()  # members and addresses
        self._networks: Tally[Holder] = Tally()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    @property
    def detached(self) -> int:
        """Number of sessions waiting for a resume."""
        return len(self._detached)

    def get(self, session_id: str) -> Session[IdentityT, ConnT] | None:
        """The session called `session_id`, if it exists."""
        return self._sessions.get(session_id)

    def all(self) -> list[Session[IdentityT, ConnT]]:
        """Every session, live and detached."""
        return list(self._sessions.values())

    def of_member(self, member: str) -> list[Session[IdentityT, ConnT]]:
        """The sessions of `member` (live and detached)."""
        return list(self._by_member.get(member, {}).values())

    def create(self, member: str, identity: IdentityT, connection: ConnT, *,
               session_id: str | None = None) -> Session[IdentityT, ConnT]:
        """Register a new live session for `connection` (with `session_id`: one taken
        over from another worker)."""
        if session_id is None:
            session_id = secrets.token_urlsafe(12)
            while session_id in self._sessions:  # pragma: no cover - 96 random bits
                session_id = secrets.token_urlsafe(12)
        elif session_id in self._sessions:
            raise ValueError(f"session {session_id!r} exists already")
        session: Session[IdentityT, ConnT] = Session(session_id, member, identity)
        session.connection = connection
        self._sessions[session_id] = session
        self._by_member.setdefault(member, {})[session_id] = session
        return session

    def attach(self, session: Session[IdentityT, ConnT], connection: ConnT) -> ConnT | None:
        """Attach `connection` to `session`; return the connection it replaces (a
        ghost, or another tab), if one was attached."""
        previous = session.connection
        session.connection = connection
        session.detached_at = None
        self._undetach(session)
        return previous

    def detach(self, session: Session[IdentityT, ConnT], now: float,
               address: str | None = None, network: str | None = None) -> None:
        """The session's connection dropped; keep it for the window from `now`.

        Args:
            address: the client's per-address key (None: unknown, no address quota).
            network: the network of that address (None: unknown).
        """
        if session.id not in self._sessions:
            return  # ended already: nothing to keep
        self._undetach(session)
        session.connection = None
        session.detached_at = now
        session.address = address
        session.network = network
        self._detached[session.id] = session
        for holder in self._holders_of(session):
            self._by_holder.setdefault(holder, {})[session.id] = session
            self._tally(holder).add(holder)

    def _holders_of(self, session: Session[IdentityT, ConnT]) -> list[Holder]:
        holders = [("member", session.member)]
        if session.address is not None:
            holders.append(("address", session.address))
        if session.network is not None:
            holders.append(("network", session.network))
        return holders

    def _tally(self, holder: Holder) -> Tally[Holder]:
        return self._networks if holder[0] == "network" else self._holders

    def _undetach(self, session: Session[IdentityT, ConnT]) -> None:
        if self._detached.pop(session.id, None) is None:
            return
        for holder in self._holders_of(session):
            mine = self._by_holder[holder]
            del mine[session.id]
            if not mine:
                del self._by_holder[holder]
            self._tally(holder).discard(holder)

    def detached_of(self, holder: Holder) -> int:
        """How many detached sessions `holder` holds."""
        return self._tally(holder)[holder]

    def member_victim(self, member: str, limit: int | None
                      ) -> Session[IdentityT, ConnT] | None:
        """The session of `member` to end before it gets a new one, if it holds
        `limit` already: its oldest detached session, else its oldest live one."""
        if limit is None:
            return None
        mine = self._by_member.get(member)
        if mine is None or len(mine) < limit:
            return None
        detached = self._by_holder.get(("member", member))
        if detached:
            return next(iter(detached.values()))
        return next(iter(mine.values()))

    def address_victim(self, address: str | None, quota: int | None
                       ) -> Session[IdentityT, ConnT] | None:
        """The oldest detached session of `address` if it holds more than `quota`."""
        if address is None or quota is None:
            return None
        detached = self._by_holder.get(("address", address))
        if detached is None or len(detached) <= quota:
            return None
        return next(iter(detached.values()))

    def cap_victim(self, cap: int | None) -> Session[IdentityT, ConnT] | None:
        """The detached session to end while more than `cap` are detached: the oldest
        of whoever holds the most (a member or an address); when each holds one, the
        oldest of the network holding the most; the oldest of all when no network
        holds more than one either."""
        if cap is None or len(self._detached) <= cap:
            return None
        for tally in (self._holders, self._networks):
            largest = tally.largest()
            if largest is not None and largest[1] > 1:
                return next(iter(self._by_holder[largest[0]].values()))
        return self.oldest_detached()

    def remove(self, session: Session[IdentityT, ConnT]) -> bool:
        """Forget `session` (it ended, or expired); False if it was not registered."""
        self._undetach(session)
        if self._sessions.pop(session.id, None) is None:
            return False
        mine = self._by_member[session.member]
        del mine[session.id]
        if not mine:
            del self._by_member[session.member]
        return True

    def expiry(self, session: Session[IdentityT, ConnT]) -> float | None:
        """When a detached session expires (None while live)."""
        return None if session.detached_at is None else session.detached_at + self.window

    def oldest_detached(self) -> Session[IdentityT, ConnT] | None:
        """The session detached longest ago (the next to expire), if any."""
        for session in self._detached.values():
            return session
        return None

    def next_expiry(self) -> float | None:
        """When the next detached session expires, if any is detached."""
        for session in self._detached.values():
            return self.expiry(session)
        return None

    def expire(self, now: float) -> list[Session[IdentityT, ConnT]]:
        """Remove and return the sessions whose window has passed at `now`."""
        gone: list[Session[IdentityT, ConnT]] = []
        window = self.window
        for session in self._detached.values():
            assert session.detached_at is not None
            # The same expression as expiry(): expire(next_expiry()) always removes.
            if now < session.detached_at + window:
                break
            gone.append(session)
        for session in gone:
            self.remove(session)
        return gone
