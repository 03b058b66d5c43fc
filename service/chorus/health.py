"""Readiness: a self-probe that proves this replica's pub/sub path works end to end.

Every `probe_interval_seconds` the replica publishes a nonce to a channel only it subscribes
to and waits for it to come back through its own subscription. Ready means the last probe
came back in time and the replica is not draining.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from . import metrics
from .broker import Broker, BrokerUnavailable, Message, Subscription

log = logging.getLogger("chorus.health")


class Health:
    def __init__(self, broker: Broker, *, replica: str, interval: float, timeout: float) -> None:
        self._broker = broker
        self._interval = interval
        self._timeout = timeout
        self.name = f"{replica}:{secrets.token_hex(6)}"  # a probe channel only this process uses
        self.broker_ok = False
        self.reason = "starting: the broker self-probe has not succeeded yet"
        self.draining = False
        self._counter = 0

    @property
    def ready(self) -> bool:
        return self.broker_ok and not self.draining

    def why_not_ready(self) -> str:
        return "draining" if self.draining else self.reason

    def connection_changed(self, up: bool) -> None:
        """Called by the pub/sub backend: losing the connection is a verdict at once."""
        if not up:
            self._set(False, "broker: pub/sub connection lost")

    def _set(self, ok: bool, reason: str) -> None:
        if ok != self.broker_ok:
            if ok:
                log.info("broker self-probe succeeded: replica is ready")
            else:
                log.warning("replica not ready: %s", reason)
        self.broker_ok = ok
        self.reason = reason
        metrics.BROKER_UP.set(1 if ok else 0)

    async def run(self) -> None:
        metrics.BROKER_UP.set(0)
        async with self._broker.subscribe_probe(self.name) as subscription:
            while True:
                started = time.monotonic()
                ok, reason = await self._probe_once(subscription)
                self._set(ok, reason)
                await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def _probe_once(self, subscription: Subscription) -> tuple[bool, str]:
        self._counter += 1
        nonce = f"{self._counter}".encode()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                await subscription.live()
                await self._broker.publish_probe(self.name, nonce)
                while True:
                    event = await subscription.get()
                    if isinstance(event, Message) and event.payload == nonce:
                        break
        except TimeoutError:
            return False, "broker: self-probe did not come back in time"
        except BrokerUnavailable as exc:
            return False, f"broker: {exc}"
        metrics.BROKER_PROBE_LATENCY.observe(time.perf_counter() - started)
        return True, "ok"
