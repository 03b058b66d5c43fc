"""Per-user connection leases in a real Redis: renewed in batches, every one of them."""

from __future__ import annotations

import time
from typing import Any

import pytest

from chorus import keys
from chorus.broker import create_broker
from chorus.config import Settings
from chorus.devcluster import RedisServer
from chorus.limits import RENEW_BATCH, RedisUserLimiter, create_user_limiter

pytestmark = pytest.mark.anyio


async def test_a_renewal_pushes_every_held_lease_forward(redis: RedisServer) -> None:
    lease = 30.0
    settings = Settings(redis_url=redis.url, connection_lease_seconds=lease, max_connections_per_user=5)
    broker = create_broker(settings)
    await broker.start()
    try:
        limiter = create_user_limiter(settings, broker)
        assert isinstance(limiter, RedisUserLimiter)
        users = [f"user{index}" for index in range(RENEW_BATCH + 3)]  # more than one script call
        for user in users:
            assert await limiter.acquire(user, f"p.{user}")
        assert await limiter.acquire(users[0], "p.second-tab")
        await limiter.release(users[1], f"p.{users[1]}")  # gone: not renewed back into the set
        commands = broker.commands
        assert commands is not None
        client = commands.client
        started = time.time()
        await limiter.renew()
        for user in users:
            pairs: Any = await client.zrange(keys.connections(user), 0, -1, withscores=True)
            scores: dict[bytes, float] = dict(pairs)
            expected = {b"p.second-tab", b"p.user0"} if user == users[0] else {f"p.{user}".encode()}
            if user == users[1]:
                expected = set()
            assert set(scores) == expected, user
            assert all(score >= started + lease for score in scores.values()), user
            if expected:
                assert await client.pttl(keys.connections(user)) > (lease - 5) * 1000, user
    finally:
        await broker.stop()
