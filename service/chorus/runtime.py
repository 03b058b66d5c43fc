"""The replica's long-lived parts, shared by the HTTP routes and the WebSocket sessions."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypedDict

from fastapi import Request, WebSocket

from .broker import Broker
from .config import Settings
from .deadlines import Deadlines
from .health import Health
from .hub import Hub
from .keepalive import Keepalive
from .limits import UserLimiter
from .presence import Presence
from .protocol import CLOSE_SERVICE_RESTART
from .rebalance import Rebalancer
from .security import Gatekeeper

log = logging.getLogger("chorus.runtime")


@dataclass
class Runtime:
    """The replica's long-lived parts, built in the lifespan."""

    settings: Settings
    broker: Broker
    hub: Hub
    health: Health
    presence: Presence
    gatekeeper: Gatekeeper
    limiter: UserLimiter
    keepalive: Keepalive  # pings the established sockets (chorus.keepalive)
    deadlines: Deadlines  # closes sockets whose token expires (chorus.deadlines)
    # Every connection tag starts with it (`next_tag`); presence names this process's entries by it.
    tag_prefix: bytes
    # Sockets accepted or being accepted on this replica (the CHORUS_MAX_CONNECTIONS count).
    sockets: int = 0
    handshakes: int = 0  # sockets between the upgrade and the welcome (doing Redis work)
    # Says when this replica sheds after a scale-out and sends handshakes elsewhere (chorus.session).
    rebalancer: Rebalancer | None = None
    _tags: itertools.count[int] = field(default_factory=itertools.count)
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def next_tag(self) -> bytes:
        return b"%s.%d" % (self.tag_prefix, next(self._tags))

    async def drain(self) -> None:
        """Stop taking sockets, close open ones with 1012 spread over the drain window."""
        if self.health.draining:
            await self._drained.wait()
            return
        self.health.draining = True
        window = self.settings.drain_seconds
        conns = list(self.hub.connections)
        log.info("draining: closing %d WebSockets over %.1fs", len(conns), window)
        # Spread the closes so the clients' reconnects do not land on the other replicas at once.
        delays = sorted(random.uniform(0, window) for _ in conns)
        started = time.monotonic()
        random.shuffle(conns)
        for conn, delay in zip(conns, delays, strict=True):
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
            conn.close_after_flush(CLOSE_SERVICE_RESTART, "replica draining")
        deadline = time.monotonic() + 5.0
        while self.hub.connections and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.05)
        for conn in list(self.hub.connections):
            conn.close(CLOSE_SERVICE_RESTART, "replica draining")
        log.info("drain complete")
        self._drained.set()


# The lifespan state's one key; `State` spells it for the type checker (a test keeps them equal).
STATE_KEY: Final = "chorus"


class State(TypedDict):
    """The lifespan state: the app's Runtime under STATE_KEY."""

    chorus: Runtime


def lifespan_state(runtime: Runtime) -> State:
    """What the lifespan yields: starlette copies it into every request's `state`."""
    return State(chorus=runtime)


def runtime_in(state: Mapping[str, Any]) -> Runtime | None:
    """The Runtime in a lifespan state (uvicorn's `lifespan.state`); None before startup."""
    runtime = state.get(STATE_KEY)
    return runtime if isinstance(runtime, Runtime) else None


def runtime_of(conn: Request | WebSocket) -> Runtime:
    runtime: Runtime = conn.state.chorus
    return runtime
