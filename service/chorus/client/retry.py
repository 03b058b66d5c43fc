"""When to reconnect and how long to wait: full-jitter backoff, Retry-After, close codes."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from typing import Final

from ..protocol import CLOSE_DISCONNECTED, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED_DATA

# Close codes after which reconnecting would only repeat the mistake. The chat page
# (static/app.js, FATAL_CLOSES) stops on the same codes.
FATAL_CLOSE_CODES: Final = frozenset(
    {CLOSE_UNSUPPORTED_DATA, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_DISCONNECTED}
)

# Handshake statuses that waiting can fix besides every 5xx: a proxy that timed out waiting for
# the request line (HAProxy's own 408 when a busy client loop sends it late), a user over
# CHORUS_MAX_CONNECTIONS_PER_USER while a dead replica's leases run out (429), and 425. Every
# 5xx is a server's or proxy's state (a full or draining replica's 503, a proxy with no live
# backend answering its own 502/503/504 without Retry-After, a 500 from a replica mid-crash):
# a client of a fleet must outlast them all. Every other 4xx (400 bad name or room, 403 token)
# is final: the same request would be refused again.
RETRYABLE_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})


def retryable_status(status: int) -> bool:
    """True when waiting can fix a handshake refused with `status`: 408, 425, 429 and every 5xx."""
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How a room reconnects: full-jitter exponential backoff, bounded by the caller.

    Wait k (0-based, k failed attempts in a row) is uniform in [0, min(cap, base * 2**k)], so a
    wave of clients that lost their replica together spreads out instead of arriving at once.
    A refused handshake's `Retry-After` (at most `max_retry_after`) is waited in full, plus a
    jitter of at most `base` that does not grow: the server chose the time and already spread
    it (Chorus draws 1-5 s per refusal), and a client that a rebalancing replica sends on
    several times in a row must not wait longer for each refusal (a 2 -> 3 scale-out of 150
    sockets took over 60 s to converge when it did). `max_attempts` failed attempts in a row,
    or `give_up_after` seconds since the connection was lost, end the room with `Disconnected`;
    both None (the default): retry forever, as the chat page does. `Reconnect(max_attempts=0)`
    never reconnects.
    """

    base: float = 0.25
    cap: float = 10.0
    max_attempts: int | None = None
    give_up_after: float | None = None
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1`."""
        if retry_after is None:
            return random.uniform(0.0, min(self.cap, self.base * 2 ** min(attempt, 32)))
        return min(retry_after, self.max_retry_after) + random.uniform(0.0, self.base)

    def exhausted(self, attempts: int, lost_for: float) -> bool:
        """True when `attempts` reconnects made, or `lost_for` seconds offline, spend the budget."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return True
        return self.give_up_after is not None and lost_for >= self.give_up_after


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """A `Retry-After` header in seconds (delta-seconds or an HTTP date), None when absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
