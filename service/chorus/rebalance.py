"""Rebalancing: after a scale-out, move sockets from loaded replicas to the fleet's mean.

Long-lived sockets stay where they landed, so a new replica sits idle while the old ones stay
full (socket.io#5413, centrifugo#982). Every process reports its socket count and readiness
through the broker each presence heartbeat and reads everyone's. While a process holds more
than `(1 + CHORUS_REBALANCE_TOLERANCE)` x the mean, or one holds less than `(1 - tolerance)` x
it, each process above the mean closes sockets with 1012 `rebalance` (clients resume with
`since` elsewhere: nothing lost) down to the mean, at most
`CHORUS_REBALANCE_RATE` per second with jitter, and re-reads the fleet every beat. It holds
off while the fleet is changing: while any process is not ready or has been ready for less
than `CHORUS_REBALANCE_SETTLE_SECONDS` (a rollout's surge pod must not be filled and then
killed), for the settle time after a process left the fleet (a rollout between two steps: the
old pod exited, the next one is not started yet) and after a reconnect wave landed (the
fleet's total grew by more in one beat than rebalancing itself moves back: a drained or
crashed pod's sockets still coming back), and while it drains itself.

The balancer picks where each reconnect lands. With round robin a shed socket lands on any
process, so most land on another full one and are shed again: 2.7-2.8x the minimum number of
moves measured in a 2 -> 3 scale-out of 600 sockets. So while the fleet is out of balance,
every process above the mean refuses new handshakes (503 `rebalance`, `Retry-After` 1-2 s,
in chorus.session), and the reconnects land on the under-full process. It refuses only when
refusing leaves a client somewhere to go: a ready process below the mean, in a fleet report
at most two beats old (a process that cannot report stops refusing on its own), never in a
fleet of one, never while draining (draining's own refusal comes first), and not once the
fleet's total has fallen by more than `missing_allowed` since the refusing began: if the
under-full process is ready but the balancer sends it no one, refusing would shed the fleet
down to nothing, while without the refusal the shed sockets come back as before. Nor once, for
`REFUSE_AFTER_MOVES_SECONDS`, no process has had anything to shed and no shed socket has come
back: a fleet can stay just out of tolerance with every process under `MIN_EXCESS` above the
mean, and a client that reaches one replica only (a bot given a pod's address) was refused
for as long as that lasted. A process aims at the mean, counting the sockets shed moments ago
and not yet back, and checks the fleet again each beat.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Final

from . import metrics
from .broker import Broker, BrokerUnavailable, Load
from .health import Health
from .hub import Hub
from .protocol import CLOSE_SERVICE_RESTART

log = logging.getLogger("chorus.rebalance")

REASON: Final = "rebalance"
HEARTBEATS_TO_EXPIRE: Final = 3
# A refusal decided at one beat lapses after this many beats unless the next beat renews it:
# a report that goes stale (Redis unreachable, the loop starved) must not keep refusing.
REFUSE_BEATS: Final = 2
# Sockets a fleet may miss (shed, not yet back) while its processes refuse: a tenth of it, or
# what every process could shed in this many seconds, whichever is more (a shed socket
# reconnects within its backoff plus a 1-2 s Retry-After per refusal: 5-6 s measured with 600).
REFUSE_MISSING_SECONDS: Final = 10.0
# Refusals steer the sockets shed moments ago to the under-full process. They lapse this long
# after the last beat in which a process had something to shed or shed sockets were still
# coming back (a lapse 10 s after the last shed alone cut them off while 700 of 3,334 moved
# sockets were still on their way at 10,000 on a starved machine, and those landed anywhere).
REFUSE_AFTER_MOVES_SECONDS: Final = 10.0
# A handful of sockets over the mean costs nothing; moving them costs each a reconnect (and
# would close sockets of small test fleets where round robin cannot split evenly).
MIN_EXCESS: Final = 10


def _mean(fleet: list[Load], missing: int) -> float:
    return (sum(load.sockets for load in fleet) + missing) / len(fleet)


def _balanced(fleet: list[Load], mean: float, tolerance: float) -> bool:
    counts = [load.sockets for load in fleet]
    return max(counts) <= (1 + tolerance) * mean and min(counts) >= (1 - tolerance) * mean


def excess(mine: int, fleet: list[Load], tolerance: float, *, missing: int = 0) -> int:
    """How many sockets this process should give up: 0 when the fleet is within tolerance.

    The fleet is out of balance when a process is above (1 + tolerance) x the mean, or one is
    below (1 - tolerance) x it (a new replica two loaded ones each just under the upper bound
    would leave short); then each process above the mean sheds down to it. `missing` sockets
    (shed moments ago, not back yet) count in the mean: leaving them out lowers the mean and
    the fleet sheds past it, then back (1.35x the minimum moves in a 2 -> 3 scale-out of 600).
    """
    if len(fleet) < 2:
        return 0
    mean = _mean(fleet, missing)
    if _balanced(fleet, mean, tolerance) or mine - mean < MIN_EXCESS:
        return 0
    return int(mine - mean)


def sheds_somewhere(fleet: list[Load], tolerance: float, *, missing: int = 0) -> bool:
    """True when some process in the fleet has sockets to shed (see `excess`)."""
    return any(excess(load.sockets, fleet, tolerance, missing=missing) > 0 for load in fleet)


def settled(fleet: list[Load], settle: float) -> bool:
    """True when every process is ready and has been for `settle` seconds."""
    return all(load.ready and load.ready_for >= settle for load in fleet)


def refuses(mine: Load, fleet: list[Load], tolerance: float, settle: float, *, missing: int = 0) -> bool:
    """True when the fleet is out of balance, `mine` is above its mean and a ready process below it
    can take the reconnects.

    Not only while `mine` sheds: a process that has shed down to the mean keeps refusing until
    the fleet is balanced, or the other processes' shed sockets land on it and it sheds again.
    """
    if len(fleet) < 2 or not mine.ready or not settled(fleet, settle):
        return False
    mean = _mean(fleet, missing)
    # A process takes a socket while one more keeps it at or below the mean: one that stopped
    # at the mean and took the sockets still on their way cost 1.27x the minimum moves.
    if _balanced(fleet, mean, tolerance) or mine.sockets + 1 <= mean:
        return False
    return any(load.process != mine.process and load.ready and load.sockets + 1 <= mean for load in fleet)


def missing_allowed(peak: int, processes: int, rate: float) -> float:
    """Sockets the fleet may lack against its `peak` total while refusing (see REFUSE_MISSING_SECONDS)."""
    return max(0.1 * peak, rate * REFUSE_MISSING_SECONDS * processes)


class Rebalancer:
    """Reports this process's load each beat and sheds its excess, gradually."""

    def __init__(
        self,
        broker: Broker,
        hub: Hub,
        health: Health,
        *,
        process: str,
        interval: float,
        tolerance: float,
        rate: float,
        settle: float,
        refuse: bool = True,
    ) -> None:
        self._broker = broker
        self._hub = hub
        self._health = health
        self.process = process
        self.interval = interval
        self.tolerance = tolerance
        self.rate = rate
        self.settle = settle
        self.refuse = refuse
        self._ready_since: float | None = None
        self._refuse_until = 0.0  # time.monotonic() until which handshakes are refused
        self._peak = 0  # the fleet's largest total since it went out of balance
        self._gave_up = False  # too many shed sockets stayed away: no refusals until balanced
        self._members: set[str] = set()  # the processes in the last fleet report
        self._left_at = -float("inf")  # time.monotonic() when one of them last left
        self._total: int | None = None  # the fleet's sockets in the last report
        self._wave_at = -float("inf")  # time.monotonic() when a reconnect wave last landed
        self._moving_at = -float("inf")  # time.monotonic() when sockets last had to move or came back
        self._missing = 0  # shed sockets not back at the last beat
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chorus-rebalance")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._broker.forget_load(self.process)
        except BrokerUnavailable as exc:
            log.warning("could not leave the load table (%s); it expires", exc)

    @property
    def refusing(self) -> bool:
        """True while this process is above an unbalanced fleet's mean: handshakes go elsewhere."""
        return time.monotonic() < self._refuse_until and not self._health.draining

    def _load(self, now: float) -> Load:
        ready = self._health.ready and not self._health.draining
        if not ready:
            self._ready_since = None
        elif self._ready_since is None:
            self._ready_since = time.monotonic()
        ready_for = 0.0 if self._ready_since is None else time.monotonic() - self._ready_since
        return Load(self.process, len(self._hub.connections), ready, ready_for, now)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.beat()
            except BrokerUnavailable as exc:
                log.warning("rebalance: load report failed: %s", exc)
            # A beat that shed took up to one interval already: keep the period one interval.
            await asyncio.sleep(max(0.1, self.interval - (time.monotonic() - started)))

    def _in_flight(self, fleet: list[Load]) -> int | None:
        """Sockets the fleet held since it went out of balance and lacks now: shed and on their way
        back (a refused client waits 1-2 s per refusal, several seconds in all). 0 once the fleet
        is balanced again; None, until then, once more were missing than `missing_allowed`."""
        total = sum(entry.sockets for entry in fleet)
        self._peak = max(self._peak, total)
        missing = self._peak - total
        if self._gave_up or missing > missing_allowed(self._peak, len(fleet), self.rate):
            if not self._gave_up:
                log.warning("rebalance: %d sockets have not come back; not refusing until balanced", missing)
            self._gave_up = True
            missing = 0
        if len(fleet) < 2 or _balanced(fleet, _mean(fleet, missing), self.tolerance):
            self._peak, self._gave_up = 0, False
        return None if self._gave_up else missing

    def _steady(self, fleet: list[Load]) -> bool:
        """False for `settle` seconds after a process left the fleet (drained, crashed, scaled in)
        or a reconnect wave landed on it.

        Readiness alone saw a rollout as settled between steps: at 10,000 sockets a roll step
        (surge ready, old drained and gone) outlasted the 30 s settle, and rebalancing moved
        sockets onto replicas the next step drained: 17,974 closes, 1.8 per socket. And on a
        busy machine a drained replica's sockets came back over 30 s after it exited:
        rebalancing began while they did and moved others (3,458 more closes), so the step's
        sockets were all back 67 s after the exit instead of 15-20.
        """
        now = time.monotonic()
        names = {load.process for load in fleet}
        if self._members - names:
            self._left_at = now
        self._members = names
        total = sum(load.sockets for load in fleet)
        if self._total is not None and total - self._total > self._wave(len(fleet)):
            self._wave_at = now
        self._total = total
        return now - max(self._left_at, self._wave_at) >= self.settle

    def _wave(self, processes: int) -> float:
        """More sockets arriving in one beat than this is a reconnect wave, not rebalancing's own
        moves coming back (at most `rate` per process per second, twice that for margin)."""
        return max(MIN_EXCESS, 2 * self.rate * self.interval * processes)

    async def beat(self) -> None:
        """Report, read the fleet, and shed for up to one interval when above the tolerance."""
        load = self._load(time.time())
        fleet = await self._broker.report_load(self.process, load, ttl=self.interval * HEARTBEATS_TO_EXPIRE)
        steady = self._steady(fleet)
        in_flight = self._in_flight(fleet)
        missing = in_flight or 0
        if missing < self._missing or sheds_somewhere(fleet, self.tolerance, missing=missing):
            self._moving_at = time.monotonic()
        self._missing = missing
        if (
            not self.refuse
            or not steady
            or in_flight is None
            or time.monotonic() - self._moving_at >= REFUSE_AFTER_MOVES_SECONDS
            or self.rate <= 0
            or not refuses(load, fleet, self.tolerance, self.settle, missing=missing)
        ):
            self._refuse_until = 0.0
        else:
            self._refuse_until = time.monotonic() + self.interval * REFUSE_BEATS
        if self.rate <= 0 or not steady or not load.ready or not settled(fleet, self.settle):
            return
        extra = excess(load.sockets, fleet, self.tolerance, missing=missing)
        extra = min(extra, int(self.rate * self.interval) or 1)
        if extra <= 0:
            return
        mean = _mean(fleet, missing)
        log.info("rebalance: %d sockets against a mean of %.0f; moving %d", load.sockets, mean, extra)
        conns = random.sample(sorted(self._hub.connections, key=id), min(extra, len(self._hub.connections)))
        # Spread over the interval, each at a uniformly drawn moment: at most `rate` per second
        # on average, and no burst for the balancer to hand to one replica.
        delays = sorted(random.uniform(0, self.interval) for _ in conns)
        started = time.monotonic()
        for conn, delay in zip(conns, delays, strict=True):
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
            if self._health.draining or conn.closing:
                continue
            conn.close_after_flush(CLOSE_SERVICE_RESTART, REASON)
            metrics.REBALANCE_CLOSES.inc()
