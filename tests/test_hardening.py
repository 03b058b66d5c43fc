"""Issue 16's findings from attacking a running Chorus, each replayed against real replicas.

One test per finding (numbered as in the issue and in docs/security.md's table); each failed
before its fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chat import Chat
from chorus.devcluster import LocalCluster, RedisServer

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"
AUTH = {"CHORUS_AUTH_JWT_SECRET": SECRET}


def token(sub: str = "alice", *, ttl: float = 300, **claims: object) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256")


async def refused(url: str, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):  # type: ignore[arg-type]
            pass
    return info.value.response.status_code


async def http_get(url: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(url, **kwargs)  # type: ignore[arg-type]


def redis_commands(redis: RedisServer) -> int:
    return int(redis.cli("INFO", "stats").split("total_commands_processed:")[1].split()[0])


def detail_of(response: httpx.Response) -> str:
    body = response.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str), body
    return str(body["detail"])


async def test_6_out_of_range_since_gets_resync_not_1011(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1)
    base = cluster.replica_ws_url(0)
    for since in ("99999999999999999999999-0", "1-99999999999999999999999", "18446744073709551616"):
        chat = await Chat.join(base, "cursor", since=since, username="resumer")
        assert (await chat.wait_for(lambda f: f.get("type") == "resync"))["room"] == "cursor"
        await chat.send("still here", client_id="s")
        assert (await chat.wait_for(lambda f: f.get("type") == "ack"))["client_id"] == "s"
        assert chat.ws.close_code is None
        await chat.close()
    log = cluster.replicas[0].output()
    assert "WARNING" not in log and "cannot join" not in log, log[-2000:]
