"""Keepalive from chorus.keepalive's one timer per process: dead peers still go, live ones stay."""

from __future__ import annotations

import asyncio

import pytest

from chorus.config import Settings
from chorus.protocol import CLOSE_INTERNAL_ERROR
from tests import wsraw
from tests.chat import Chat
from tests.test_connection import serving

pytestmark = pytest.mark.anyio


def quick_pings() -> Settings:
    return Settings(replica_name="unit", ping_interval_seconds=0.4, ping_timeout_seconds=0.4)


async def test_a_peer_that_never_answers_pings_is_closed_with_1011() -> None:
    async with serving(quick_pings()) as address:
        port = int(address.rsplit(":", 1)[1])
        sock = await asyncio.to_thread(wsraw.handshake, port, "/ws/r?username=silent&history=0")
        try:
            # Bounded by the socket timeout: a peer that is never closed fails here.
            code, pings = await asyncio.to_thread(wsraw.read_until_close, sock, 10.0)
        finally:
            sock.close()
    assert pings >= 1, "closed before it was ever pinged"
    assert code == CLOSE_INTERNAL_ERROR  # 1011 keepalive ping timeout, as uvicorn's own keepalive


async def test_a_peer_that_answers_pings_stays_through_many_rounds() -> None:
    async with serving(quick_pings()) as address:
        live = await Chat.join(f"ws://{address}", "r", username="reader")  # websockets answers pings
        other = await Chat.join(f"ws://{address}", "r", username="writer")
        await live.drain_for(3)  # about seven ping rounds
        assert live.ws.close_code is None
        await other.send("still here", client_id="c1")
        message = await live.wait_for(lambda f: f["type"] == "message")
        assert message["text"] == "still here"
        await live.close()
        await other.close()
