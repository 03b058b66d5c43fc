"""Who may open which room, from where, and how fast they may talk.

Everything here runs before `accept()` (the handshake is refused with an HTTP status and no
Redis work is done) except the rate limiter, which judges each message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import jwt
from starlette.datastructures import Headers

from .config import Settings
from .metrics import REJECT_BAD_REQUEST, REJECT_FORBIDDEN_ROOM, REJECT_ORIGIN, REJECT_UNAUTHORIZED
from .protocol import USERNAME_RULE, is_username

SUBPROTOCOL: Final = "chorus.v1"
BEARER_PREFIX: Final = "bearer."
HS_ALGORITHMS: Final = ["HS256"]
PUBLIC_KEY_ALGORITHMS: Final = ["RS256", "ES256"]
CLOCK_LEEWAY_SECONDS: Final = 5


class Rejection(Exception):
    """A handshake refused before accept(): HTTP status, metric reason, and a sentence for the client."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    rooms: tuple[str, ...] | None = None  # None: every room
    expires_at: float | None = None

    def may_enter(self, room: str) -> bool:
        if self.rooms is None:
            return True
        return any(
            room.startswith(pattern[:-1]) if pattern.endswith("*") else room == pattern
            for pattern in self.rooms
        )


def offered_subprotocols(headers: Headers) -> list[str]:
    return [
        part.strip()
        for value in headers.getlist("sec-websocket-protocol")
        for part in value.split(",")
        if part.strip()
    ]


class Gatekeeper:
    """Origin check and JWT authentication for WebSocket handshakes."""

    def __init__(self, settings: Settings) -> None:
        self._allowed = set(settings.allowed_origins)
        self._key: str | bytes | None = None
        self._algorithms: list[str] = []
        if settings.auth_jwt_secret is not None:
            self._key = settings.auth_jwt_secret.get_secret_value()
            self._algorithms = HS_ALGORITHMS
        elif settings.auth_jwt_public_key is not None:
            self._key = settings.auth_jwt_public_key.read_bytes()
            self._algorithms = PUBLIC_KEY_ALGORITHMS

    @property
    def auth_required(self) -> bool:
        return self._key is not None

    def check_origin(self, headers: Headers) -> None:
        """Refuse cross-site WebSocket hijacking: a browser's Origin must be allowed."""
        origin = headers.get("origin")
        if origin is None:
            return  # not a browser: no ambient credentials to abuse
        origin = origin.rstrip("/").lower()
        if "*" in self._allowed or origin in self._allowed:
            return
        # Default: the page's own origin only, whatever port or scheme the proxy in front uses.
        if not self._allowed and urlsplit(origin).netloc == headers.get("host", "").lower():
            return
        raise Rejection(403, REJECT_ORIGIN, f"origin {origin[:100]!r} may not open WebSockets here")

    def identify(self, headers: Headers, params: dict[str, str], room: str) -> tuple[Identity, str | None]:
        """The user behind a handshake, and the subprotocol to select (if any)."""
        offered = offered_subprotocols(headers)
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        bearer = next((p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)), None)
        if bearer is not None and subprotocol is None:
            raise Rejection(
                400, REJECT_BAD_REQUEST, f"a bearer.<token> subprotocol needs {SUBPROTOCOL} offered too"
            )
        if self._key is None:
            user = params.get("username") or ""
            return Identity(user), subprotocol
        token = bearer or params.get("token")
        if not token:
            raise Rejection(
                403, REJECT_UNAUTHORIZED, "a token is required (?token= or the bearer.<jwt> subprotocol)"
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["exp", "sub"]},
                leeway=CLOCK_LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise Rejection(403, REJECT_UNAUTHORIZED, "the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Rejection(403, REJECT_UNAUTHORIZED, f"the token is not valid: {exc}") from None
        identity = _identity(claims)
        if not identity.may_enter(room):
            raise Rejection(403, REJECT_FORBIDDEN_ROOM, f"the token does not open room {room!r}")
        return identity, subprotocol


def _identity(claims: dict[str, object]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not is_username(sub):
        raise Rejection(403, REJECT_UNAUTHORIZED, f"the token's sub is not a valid name: {USERNAME_RULE}")
    rooms = claims.get("rooms")
    if rooms is not None and (not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)):
        raise Rejection(403, REJECT_UNAUTHORIZED, "the token's rooms claim must be a list of strings")
    exp = claims.get("exp")
    return Identity(sub, tuple(rooms) if rooms is not None else None, float(exp) if exp is not None else None)  # type: ignore[arg-type]


class TokenBucket:
    """Per-connection rate limit; also says how long the client has been over it."""

    __slots__ = ("_burst", "_last_reject", "_over_since", "_rate", "_stamp", "_tokens")

    # A full second with no rejection ends a flood streak; a client above the limit is refused
    # more often than that, however fast the bucket refills in between.
    QUIET_SECONDS: Final = 1.0

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._over_since: float | None = None
        self._last_reject = 0.0

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._over_since is not None and now - self._last_reject > self.QUIET_SECONDS:
            self._over_since = None
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._last_reject = now
        if self._over_since is None:
            self._over_since = now
        return False

    def flooding_for(self) -> float:
        """Seconds the client has kept sending over the limit without a pause (0 when it is not)."""
        return 0.0 if self._over_since is None else time.monotonic() - self._over_since
