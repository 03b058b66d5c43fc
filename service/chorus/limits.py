"""Connections per user across the cluster, counted in Redis and released even by dead replicas.

Each connection is a member of `chorus:conns:{user}` (a sorted set) scored with its lease
expiry. The replica renews its connections' leases every third of the lease
(CHORUS_CONNECTION_LEASE_SECONDS); a replica that dies stops renewing, and its entries stop
counting once their lease runs out. The count and
the insert are one Lua script, so concurrent handshakes cannot both take the last place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Final

from . import keys
from .broker import Broker, BrokerUnavailable, RedisCommands
from .config import Settings

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
        held = self._held.setdefault(user, set())
        if self.limit and len(held) >= self.limit:
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
            expiry = time.time() + self._lease
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for user, tags in list(self._held.items()):
                        pipe.zadd(keys.connections(user), {tag: expiry for tag in tags})
                        pipe.pexpire(keys.connections(user), int(self._lease * 1000))
                    await self._call(pipe.execute())
            except BrokerUnavailable as exc:
                log.warning("could not renew connection leases: %s", exc)


def create_user_limiter(settings: Settings, broker: Broker) -> UserLimiter:
    commands = broker.commands
    if commands is not None and settings.max_connections_per_user:
        return RedisUserLimiter(settings, commands)
    return UserLimiter(settings.max_connections_per_user)
