"""Resume tokens: signed, expiring, bound to a session and a member (sans-I/O).

Format: ``v1.<payload>.<signature>``, both parts base64url without padding. The
payload is compact JSON ``{"s": session, "m": member, "g": generation, "x": expiry}``;
the signature is HMAC-SHA256 over ``"wsroom-resume.v1." + payload`` and is compared in
constant time. The generation lets the server accept only the token of the latest
``welcome`` (tokens are rotated on every welcome). Expiry is wall-clock seconds
(tokens outlive a process, and may be checked by another worker), passed in as
``now``. Several secrets may be configured: the first signs, all verify (rotation).

A token carries no secret of its own and is not encrypted: it names a session and a
member id, which are not secrets either. It must never be logged all the same.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = ["MAX_TOKEN_LENGTH", "ResumeClaims", "TokenError", "TokenProblem", "TokenSigner"]

MAX_TOKEN_LENGTH = 1024
"""Longest token accepted (the ``hello`` frame's ``resume`` field has the same bound)."""

_PREFIX = b"wsroom-resume.v1."
_MIN_SECRET_BYTES = 16
_SIGNATURE_LENGTH = 43  # base64url of 32 bytes, unpadded
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class TokenProblem(str, Enum):
    """Why a resume token was refused (for logs and metrics; never the token)."""

    MALFORMED = "malformed"
    SIGNATURE = "signature"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


class TokenError(Exception):
    """A resume token was refused."""

    def __init__(self, problem: TokenProblem) -> None:
        super().__init__(f"resume token refused: {problem}")
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ResumeClaims:
    """What a valid token says."""

    session: str
    member: str
    generation: int
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and verifies resume tokens.

    Args:
        secrets: one or more secrets of at least 16 bytes; the first signs, every one
            verifies (so a secret can be rotated without logging everybody out).

    Raises:
        TypeError: if `secrets` is a single str or bytes instead of a list.
        ValueError: if no secret is given or one is too short.
    """

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[str | bytes]) -> None:
        if isinstance(secrets, (str, bytes, bytearray)):
            # A bare bytes would iterate as ints (bytes(n) is n zero bytes: a public key).
            raise TypeError("pass a list of secrets, e.g. TokenSigner([secret])")
        keys = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
        if not keys:
            raise ValueError("at least one resume secret is needed")
        if any(len(key) < _MIN_SECRET_BYTES for key in keys):
            raise ValueError(f"resume secrets must be at least {_MIN_SECRET_BYTES} bytes")
        self._keys = keys

    @staticmethod
    def _sign(key: bytes, payload: str) -> bytes:
        return hmac.new(key, _PREFIX + payload.encode("ascii"), hashlib.sha256).digest()

    def issue(self, claims: ResumeClaims) -> str:
        """Sign `claims` into a token.

        Raises:
            ValueError: if the expiry is not finite, or the token would exceed
                `MAX_TOKEN_LENGTH` (a very long session or member id).
        """
        if not math.isfinite(claims.expires_at):
            raise ValueError("a resume token's expiry must be finite")
        body = json.dumps(
            {"s": claims.session, "m": claims.member, "g": claims.generation,
             "x": claims.expires_at},
            separators=(",", ":"),
        )
        payload = _b64(body.encode())
        token = f"v1.{payload}.{_b64(self._sign(self._keys[0], payload))}"
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(
                f"a resume token for these claims would be {len(token)} characters, over "
                f"{MAX_TOKEN_LENGTH}: shorten the member id"
            )
        return token

    def verify(self, token: str, now: float) -> ResumeClaims:
        """Check a token's signature and expiry; return its claims.

        Raises:
            TokenError: malformed, bad signature (tampered, or another server's
                secret), or expired.
        """
        ok = isinstance(token, str) and len(token) <= MAX_TOKEN_LENGTH and token.isascii()
        parts = token.split(".") if ok else []
        if len(parts) != 3 or parts[0] != "v1":
            raise TokenError(TokenProblem.MALFORMED)
        payload, signature = parts[1], parts[2]
        if len(signature) != _SIGNATURE_LENGTH or not _B64URL.issuperset(signature):
            raise TokenError(TokenProblem.MALFORMED)
        # Compare the canonical encoding, not the decoded bytes: base64 decoding is
        # lenient (padding, alphabet, unused bits), and a token must be one string.
        if not any(hmac.compare_digest(_b64(self._sign(key, payload)), signature)
                   for key in self._keys):
            raise TokenError(TokenProblem.SIGNATURE)
        try:
            data = json.loads(_unb64(payload))
            claims = ResumeClaims(str(data["s"]), str(data["m"]), int(data["g"]),
                                  float(data["x"]))
        except (ValueError, KeyError, TypeError, OverflowError):
            raise TokenError(TokenProblem.MALFORMED) from None
        if now >= claims.expires_at:
            raise TokenError(TokenProblem.EXPIRED)
        return claims
