"""Connections per user across the cluster, counted in Redis and released even by dead replicas.

Each connection is a member of `chorus:conns:{user}` (a sorted set) scored with its lease
expiry. The replica renews its connections' leases every third of the lease
(CHORUS_CONNECTION_LEASE_SECONDS); a replica that dies stops renewing, and its entries stop
counting once their lease runs out. The count and
the insert are one Lua script, so concurrent handshakes cannot both take the last place.

A renewal is one script call per `RENEW_BATCH` users (`RENEW`), not a ZADD and a PEXPIRE per
user in a pipeline: redis-py packs and parses each pipelined command in Python, which made the
renewal of idle sockets' leases cost the replica CPU in proportion to its users. In a Cluster a
script cannot span slots, so there it stays a pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Final

from . import keys
from .broker import Broker, BrokerUnavailable
from .config import Settings
from .redis_broker import RedisCommands

log = logging.getLogger("chorus.limits")

ACQUIRE: Final = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if tonumber(ARGV[3]) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[4]) * 1000))
return 1
"""


# KEYS: the users' connection sets. ARGV: expiry, lease in ms, then per key: n, and its n tags.
RENEW: Final = """
local expiry, ms, at = ARGV[1], ARGV[2], 3
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  for i = at + 1, at + n do
    redis.call('ZADD', key, expiry, ARGV[i])
  end
  at = at + n + 1
  redis.call('PEXPIRE', key, ms)
end
return #KEYS
"""
# Users per RENEW call: Redis runs a script to its end, so a call stays short (about a
# millisecond of Redis time) and other clients' commands go between calls.
RENEW_BATCH: Final = 500


class UserLimiter:
    """In-process count; `RedisUserLimiter` shares it across replicas."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, set[str]] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def acquire(self, user: str, tag: str) -> bool:
        if not self.limit:
            return True  # no cap (CHORUS_MAX_CONNECTIONS_PER_USER=0): nothing to count or keep
        held = self._held.setdefault(user, set())
        if len(held) >= self.limit:
            return False
        held.add(tag)
        return True

    async def release(self, user: str, tag: str) -> None:
        held = self._held.get(user)
        if held is not None:
            held.discard(tag)
            if not held:
                del self._held[user]


class RedisUserLimiter(UserLimiter):
    def __init__(self, settings: Settings, commands: RedisCommands) -> None:
        super().__init__(settings.max_connections_per_user)
        self._lease = settings.connection_lease_seconds
        self._commands = commands
        self._redis = commands.client
        self._acquire = commands.register_script(ACQUIRE)
        self._renew = commands.register_script(RENEW)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._renew_forever(), name="chorus-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _call(self, coro: Awaitable[Any]) -> Any:
        return await self._commands.call(coro)

    async def acquire(self, user: str, tag: str) -> bool:
        if not await super().acquire(user, tag):
            return False
        try:
            args: list[str | float] = [time.time(), tag, self.limit, self._lease]
            if await self._call(self._acquire(keys=[keys.connections(user)], args=args)):
                return True
        except BrokerUnavailable as exc:
            # Fail open: the per-replica cap still bounds the damage, and chat keeps working.
            log.warning("per-user connection count unavailable (%s); admitting %s", exc, user)
            return True
        await super().release(user, tag)
        return False

    async def release(self, user: str, tag: str) -> None:
        await super().release(user, tag)
        try:
            await self._call(self._redis.zrem(keys.connections(user), tag))
        except BrokerUnavailable as exc:
            log.warning("could not release a connection of %s now (%s); its lease expires", user, exc)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await self.renew()
            except BrokerUnavailable as exc:
                log.warning("could not renew connection leases: %s", exc)

    async def renew(self) -> None:
        """Push the lease of every connection this process holds one lease further."""
        expiry = time.time() + self._lease
        lease_ms = int(self._lease * 1000)
        # Copied now: handshakes and goodbyes change the sets while a call is in flight.
        held = [(user, list(tags)) for user, tags in self._held.items() if tags]
        if self._commands.cluster:
            async with self._redis.pipeline(transaction=False) as pipe:
                for user, tags in held:
                    pipe.zadd(keys.connections(user), dict.fromkeys(tags, expiry))
                    pipe.pexpire(keys.connections(user), lease_ms)
                await self._call(pipe.execute())
            return
        for start in range(0, len(held), RENEW_BATCH):
            batch = held[start : start + RENEW_BATCH]
            args: list[str | float | int] = [expiry, lease_ms]
            for _, tags in batch:
                args += [len(tags), *tags]
            await self._call(self._renew(keys=[keys.connections(user) for user, _ in batch], args=args))


def create_user_limiter(settings: Settings, broker: Broker) -> UserLimiter:
    commands = broker.commands
    if commands is not None and settings.max_connections_per_user:
        return RedisUserLimiter(settings, commands)
    return UserLimiter(settings.max_connections_per_user)
