"""WebSocket keepalive from one timer per process: every socket pinged once per interval.

uvicorn pings each socket from a timer of its own and arms a second one per ping for the pong
deadline: two `TimerHandle`s and a framing pass per socket per interval. Here the sockets sit
in a wheel of one-tick slots; each tick (at most 1 s) pings the sockets due in its slot with
one ping frame built for the round, and closes with 1011 the ones whose previous ping is still
unanswered after `CHORUS_PING_TIMEOUT_SECONDS`. A dead peer is still found within interval +
timeout (plus a tick), as before. The timer runs only while sockets are open. The parts that
touch uvicorn's protocol are in chorus.sockets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Any, Final

from . import sockets

log = logging.getLogger("chorus.keepalive")

MAX_TICK_SECONDS: Final = 1.0
_DUE: Final = -1  # the value of a socket whose next ping is due (else: the tick its ping went out)


class Keepalive:
    """The process's sockets in a timer wheel: a ping per interval, a deadline per ping."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        # Four ticks per interval at least: a 1 s interval (tests) still pings about on time.
        self.tick = min(MAX_TICK_SECONDS, interval / 4, timeout / 4)
        self._every = max(1, round(interval / self.tick))
        self._wait = max(1, math.ceil(timeout / self.tick))
        self._wheel: list[dict[Any, int]] = [{} for _ in range(self._every + self._wait + 1)]
        self._where: dict[Any, int] = {}  # socket -> its slot, for `forget`
        self._now = 0
        self._started = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._where)

    def watch(self, protocol: Any) -> None:
        """Take over the keepalive of an established socket (a `sockets.lighten` handle)."""
        if protocol is None or protocol in self._where:
            return
        sockets.stop_server_keepalive(protocol)
        self._put(protocol, self._now + self._every, _DUE)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._started = loop.time() - self._now * self.tick
            self._handle = loop.call_at(self._started + (self._now + 1) * self.tick, self._turn)

    def forget(self, protocol: Any) -> None:
        slot = self._where.pop(protocol, None)
        if slot is not None:
            self._wheel[slot].pop(protocol, None)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _put(self, protocol: Any, at: int, value: int) -> None:
        slot = at % len(self._wheel)
        self._wheel[slot][protocol] = value
        self._where[protocol] = slot

    def _turn(self) -> None:
        self._now += 1
        now = self._now
        index = now % len(self._wheel)
        due, self._wheel[index] = self._wheel[index], {}
        if due:
            payload = os.urandom(4)  # one per round: a stale pong from an earlier round does not count
            frame = sockets.ping_frame(payload)
            for protocol, sent in due.items():
                self._visit(protocol, sent, now, frame, payload)
        if not self._where:
            self._handle = None  # no sockets: no timer, until the next `watch`
            return
        self._handle = asyncio.get_running_loop().call_at(self._started + (now + 1) * self.tick, self._turn)

    def _visit(self, protocol: Any, sent: int, now: int, frame: bytes, payload: bytes) -> None:
        try:
            if sockets.is_closed(protocol):
                del self._where[protocol]
            elif sent != _DUE and not sockets.answered(protocol):
                del self._where[protocol]
                sockets.expire(protocol)
            elif sent != _DUE and sent + self._every > now:
                self._put(protocol, sent + self._every, _DUE)  # answered; the next ping is later
            elif sockets.send_ping(protocol, frame, payload):
                # Due now (or answered with the next ping due now: the period stays the
                # interval, not the interval plus a tick).
                self._put(protocol, now + self._wait, now)
            else:
                del self._where[protocol]
        except Exception:  # one broken socket must not stop the wheel for the others
            log.exception("keepalive: giving up on a socket")
            self._where.pop(protocol, None)
