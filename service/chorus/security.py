"""Who may open which room, from where, and how fast they may talk.

Everything here runs before `accept()` or before an HTTP read of a room (the request is refused
with an HTTP status and no Redis work is done) except the rate limiter, which judges each message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import jwt
from starlette.datastructures import Headers

from .config import Settings
from .protocol import (
    MODERATOR_ROLE,
    REJECT_BAD_REQUEST,
    REJECT_FORBIDDEN_ROOM,
    REJECT_HOST,
    REJECT_ORIGIN,
    REJECT_UNAUTHORIZED,
    USERNAME_RULE,
    dm_members,
    is_private,
    is_username,
    user_key,
)

SUBPROTOCOL: Final = "chorus.v1"
BEARER_PREFIX: Final = "bearer."
HS_ALGORITHMS: Final = ["HS256"]
PUBLIC_KEY_ALGORITHMS: Final = ["RS256", "ES256"]
CLOCK_LEEWAY_SECONDS: Final = 5
# NumericDate claims beyond year 9999 are refused: 10**400 overflowed float() (HTTP 500), and
# a timer that far out is no timer.
MAX_NUMERIC_DATE: Final = 253_402_300_799
# PyJWT verifies the signature; Chorus checks the claims itself, so that a signed token with
# unusable claims (403) is told apart from a token that is missing, forged or expired (401).
_SIGNATURE_ONLY: Final = {
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


class Rejection(Exception):
    """A request refused before accept() or before any Redis work: HTTP status, metric reason, a sentence."""

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
    roles: tuple[str, ...] = ()

    @property
    def is_moderator(self) -> bool:
        return MODERATOR_ROLE in self.roles

    def may_enter(self, room: str) -> bool:
        if is_private(room):
            # A private room opens to the two users it names, whatever the rooms claim says.
            members = dm_members(room)
            return members is not None and user_key(self.user) in {user_key(m) for m in members}
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


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Django's ALLOWED_HOSTS match (exact, `.example.com` for it and its subdomains, `*`), and
    `*.example.com` for one label under it as an Ingress means it; the port is ignored."""
    host = host.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        host = host[: host.find("]") + 1] if "]" in host else host
    else:
        host = host.rpartition(":")[0] if ":" in host else host
    host = host.removesuffix(".")
    if not host:
        return False
    return any(_host_matches(host, entry) for entry in allowed)


def _host_matches(host: str, entry: str) -> bool:
    if entry in ("*", host):
        return True
    if entry.startswith("."):
        return host.endswith(entry) or host == entry[1:]
    if entry.startswith("*."):
        label = host.removesuffix(entry[1:])
        return label != host and bool(label) and "." not in label
    return False


class Gatekeeper:
    """Host and Origin checks and JWT authorization, one set of rules for WebSockets and HTTP."""

    def __init__(self, settings: Settings) -> None:
        self._allowed = set(settings.allowed_origins)
        self._hosts = list(settings.allowed_hosts)
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

    def check_host(self, headers: Headers) -> None:
        """With CHORUS_ALLOWED_HOSTS set, refuse a Host not listed: a DNS-rebound page carries its own."""
        if not self._hosts:
            return
        host = headers.get("host", "")
        if not host_allowed(host, self._hosts):
            raise Rejection(400, REJECT_HOST, f"host {host[:100]!r} is not served here")

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

    def identify(self, headers: Headers, params: Mapping[str, str], room: str) -> tuple[Identity, str | None]:
        """The user behind a WebSocket handshake, and the subprotocol to select (if any)."""
        offered = offered_subprotocols(headers)
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        bearer = next((p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)), None)
        if bearer is not None and subprotocol is None:
            raise Rejection(
                400, REJECT_BAD_REQUEST, f"a bearer.<token> subprotocol needs {SUBPROTOCOL} offered too"
            )
        if self._key is None:
            _refuse_private_without_auth(room)
            return Identity(params.get("username") or ""), subprotocol
        return self.authorize(bearer or params.get("token"), room), subprotocol

    def identify_reader(self, headers: Headers, params: Mapping[str, str], room: str) -> Identity:
        """The reader behind an HTTP read of a room: `Authorization: Bearer <jwt>` or `?token=`."""
        if self._key is None:
            _refuse_private_without_auth(room)
            return Identity("")
        return self.authorize(_bearer(headers) or params.get("token"), room)

    def identify_caller(self, headers: Headers, params: Mapping[str, str]) -> Identity:
        """Who calls a per-user read (`/api/me/...`): a token, or `username` when auth is off."""
        if self._key is None:
            user = params.get("username") or ""
            if not is_username(user):
                raise Rejection(400, REJECT_BAD_REQUEST, USERNAME_RULE)
            return Identity(user)
        return self.authorize(_bearer(headers) or params.get("token"), None)

    def authorize(self, token: str | None, room: str | None) -> Identity:
        """The identity a token proves, if it opens `room`: 401 no valid token, 403 not this room."""
        if not token:
            detail = "a token is required (Authorization: Bearer, ?token= or a bearer.<jwt> subprotocol)"
            raise Rejection(401, REJECT_UNAUTHORIZED, detail)
        assert self._key is not None
        try:
            claims = jwt.decode(token, self._key, algorithms=self._algorithms, options=_SIGNATURE_ONLY)  # type: ignore[arg-type]
        except jwt.InvalidTokenError as exc:
            raise Rejection(401, REJECT_UNAUTHORIZED, f"the token is not valid: {exc}") from None
        identity = _identity(claims)
        if room is not None and not identity.may_enter(room):
            raise Rejection(403, REJECT_FORBIDDEN_ROOM, f"the token does not open room {room!r}")
        return identity


def _bearer(headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _refuse_private_without_auth(room: str) -> None:
    if is_private(room):
        raise Rejection(
            403, REJECT_FORBIDDEN_ROOM, "private dm. rooms need authentication, which is off here"
        )


def _numeric_date(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejection(403, REJECT_UNAUTHORIZED, f"the token's {name} must be a number of seconds")
    if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= MAX_NUMERIC_DATE:
        raise Rejection(403, REJECT_UNAUTHORIZED, f"the token's {name} is out of range")
    return float(value)


def _identity(claims: Mapping[str, object]) -> Identity:
    """Check the claims of a token whose signature is valid (RFC 7519 NumericDate rules)."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not is_username(sub):
        raise Rejection(403, REJECT_UNAUTHORIZED, f"the token's sub is not a valid name: {USERNAME_RULE}")
    rooms = claims.get("rooms")
    if rooms is not None and (not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)):
        raise Rejection(403, REJECT_UNAUTHORIZED, "the token's rooms claim must be a list of strings")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Rejection(403, REJECT_UNAUTHORIZED, "the token's roles claim must be a list of strings")
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise Rejection(403, REJECT_UNAUTHORIZED, "the token must carry exp")
    nbf, iat = _numeric_date(claims, "nbf"), _numeric_date(claims, "iat")
    now = time.time()
    if exp <= now - CLOCK_LEEWAY_SECONDS:
        raise Rejection(401, REJECT_UNAUTHORIZED, "the token has expired")
    if max(nbf or 0.0, iat or 0.0) > now + CLOCK_LEEWAY_SECONDS:
        raise Rejection(401, REJECT_UNAUTHORIZED, "the token is not valid yet")
    return Identity(sub, tuple(rooms) if rooms is not None else None, exp, tuple(roles))


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
