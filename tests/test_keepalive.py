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


def _pings_then_close(sock: object, timeout: float) -> tuple[int, int | None]:
    """Read frames (answering nothing) until a close frame: (pings seen, its code)."""
    import socket
    import struct

    assert isinstance(sock, socket.socket)
    sock.settimeout(timeout)
    buf = b""
    pings = 0

    def need(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed without a close frame")
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    while True:
        b0, b1 = need(2)
        payload = need(b1 & 0x7F)
        if b0 & 0x0F == 0x9:
            pings += 1
        elif b0 & 0x0F == 0x8:
            return pings, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


async def test_a_peer_that_never_answers_pings_is_closed_with_1011() -> None:
    async with serving(quick_pings()) as address:
        port = int(address.rsplit(":", 1)[1])
        sock = await asyncio.to_thread(wsraw.handshake, port, "/ws/r?username=silent&history=0")
        try:
            # Bounded by the socket timeout: a peer that is never closed fails here.
            pings, code = await asyncio.to_thread(_pings_then_close, sock, 10.0)
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
