"""Token expiry from one timer per process (chorus.deadlines): on time, in order, cancellable."""

from __future__ import annotations

import time

import jwt
import pytest

from chorus.config import Settings
from chorus.deadlines import COMPACT_ABOVE, Deadlines
from chorus.protocol import CLOSE_POLICY
from tests.chat import Chat, poll
from tests.test_connection import serving

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"


async def test_deadlines_run_in_time_order_and_cancelled_ones_never() -> None:
    deadlines = Deadlines()
    ran: list[str] = []
    now = time.time()
    deadlines.at(now + 0.3, lambda: ran.append("late"))
    deadlines.at(now + 0.1, lambda: ran.append("early"))
    dropped = deadlines.at(now + 0.2, lambda: ran.append("cancelled"))
    deadlines.at(now - 5, lambda: ran.append("overdue"))
    deadlines.cancel(dropped)
    await poll(lambda: len(ran) == 3, 5, "the three live deadlines")
    assert ran == ["overdue", "early", "late"] and len(deadlines) == 0
    deadlines.stop()


async def test_cancelled_deadlines_do_not_pile_up() -> None:
    deadlines = Deadlines()
    far = time.time() + 3600
    kept = [deadlines.at(far, lambda: None) for _ in range(10)]
    for _ in range(COMPACT_ABOVE * 4):
        deadlines.cancel(deadlines.at(far, lambda: None))  # sockets that closed before their token ran out
    assert len(deadlines) == len(kept)
    assert len(deadlines._heap) <= len(kept) + COMPACT_ABOVE * 2 + 1
    deadlines.stop()


def token(sub: str, ttl: float) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


async def test_a_socket_is_closed_with_1008_when_its_token_expires_and_others_stay() -> None:
    settings = Settings(replica_name="unit", auth_jwt_secret=SECRET)
    async with serving(settings) as address:
        short = await Chat.join(f"ws://{address}", "r", token=token("shorty", 2))
        long = await Chat.join(f"ws://{address}", "r", token=token("longy", 300))
        await poll(lambda: short.ws.close_code is not None, 15, "the short token's socket to close")
        assert short.ws.close_code == CLOSE_POLICY and short.ws.close_reason == "token expired"
        assert long.ws.close_code is None
        await long.close()
