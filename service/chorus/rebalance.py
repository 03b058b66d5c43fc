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
killed), and while it drains itself.

The balancer picks where each reconnect lands (round robin: it may land here again, 1 in N),
so a process aims at the mean, not past it, and checks the fleet again each beat.
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
# A handful of sockets over the mean costs nothing; moving them costs each a reconnect (and
# would close sockets of small test fleets where round robin cannot split evenly).
MIN_EXCESS: Final = 10


def excess(mine: int, fleet: list[Load], tolerance: float) -> int:
    """How many sockets this process should give up: 0 when the fleet is within tolerance.

    The fleet is out of balance when a process is above (1 + tolerance) x the mean, or one is
    below (1 - tolerance) x it (a new replica two loaded ones each just under the upper bound
    would leave short); then each process above the mean sheds down to it.
    """
    if len(fleet) < 2:
        return 0
    mean = sum(load.sockets for load in fleet) / len(fleet)
    counts = [load.sockets for load in fleet]
    balanced = max(counts) <= (1 + tolerance) * mean and min(counts) >= (1 - tolerance) * mean
    if balanced or mine - mean < MIN_EXCESS:
        return 0
    return int(mine - mean)


def settled(fleet: list[Load], settle: float) -> bool:
    """True when every process is ready and has been for `settle` seconds."""
    return all(load.ready and load.ready_for >= settle for load in fleet)


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
    ) -> None:
        self._broker = broker
        self._hub = hub
        self._health = health
        self.process = process
        self.interval = interval
        self.tolerance = tolerance
        self.rate = rate
        self.settle = settle
        self._ready_since: float | None = None
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

    async def beat(self) -> None:
        """Report, read the fleet, and shed for up to one interval when above the tolerance."""
        load = self._load(time.time())
        fleet = await self._broker.report_load(self.process, load, ttl=self.interval * HEARTBEATS_TO_EXPIRE)
        if self.rate <= 0 or not load.ready or not settled(fleet, self.settle):
            return
        extra = min(excess(load.sockets, fleet, self.tolerance), int(self.rate * self.interval) or 1)
        if extra <= 0:
            return
        mean = sum(entry.sockets for entry in fleet) / len(fleet)
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
