"""The pinned uvicorn still has what chorus.sockets reaches into: the fast path must not go quietly.

`FrameWriter.for_send` and `close_now` fall back to the ASGI path on any other server, by
design. That fallback is correct but slow (a middleware trip and a syscall per frame) and
lets a slow consumer's close wait forever, so under the pinned uvicorn both must take the
fast path, and an upgrade that loses it fails here, loudly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect

from chorus.devcluster import free_port
from chorus.keepalive import Keepalive
from chorus.server import UVICORN_OPTIONS
from chorus.sockets import PINNED_UVICORN, RAW_SEND, UVICORN_INTERNALS, FrameWriter, close_now, lighten

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _served(app: Any, **config: Any) -> AsyncIterator[int]:
    """The pinned uvicorn serving `app` on a free port with Chorus's options, for the block."""
    port = free_port()
    options = {key: value for key, value in UVICORN_OPTIONS.items() if key != "loop"}
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, **{**options, **config})
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        await task


def test_the_installed_uvicorn_is_the_pinned_one() -> None:
    assert uvicorn.__version__ == PINNED_UVICORN, (
        f"uvicorn {uvicorn.__version__} is installed but chorus.sockets was checked against "
        f"{PINNED_UVICORN}: re-check UVICORN_INTERNALS, then update PINNED_UVICORN"
    )


async def test_frame_writer_and_close_now_take_the_fast_path_under_the_pinned_server() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        scope[RAW_SEND] = send  # as chorus.session.serve_chat_socket does
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        protocol = getattr(send, "__self__", None)
        seen["missing"] = [name for name in UVICORN_INTERNALS if not hasattr(protocol, name)]
        writer = FrameWriter.for_send(websocket.send_text)
        seen["writer"] = writer
        if writer is not None:
            writer.write(["fast"])
        seen["closed"] = close_now(scope, 1013, "slow consumer")

    async with _served(app) as port, asyncio.timeout(10), connect(f"ws://127.0.0.1:{port}/") as ws:
        assert await ws.recv() == "fast", "FrameWriter's frame did not arrive as a text frame"
        await ws.wait_closed()
        assert ws.close_code == 1013, "close_now's close frame did not arrive"
    assert seen["missing"] == [], f"uvicorn's protocol lost {seen['missing']} (chorus.sockets reads them)"
    assert seen["writer"] is not None, "FrameWriter.for_send returned None: the fast path is gone"
    assert seen["closed"] is True, "close_now returned False: a slow consumer's close would wait forever"


async def test_lighten_and_keepalive_take_over_an_established_socket_under_the_pinned_server() -> None:
    """`lighten` swaps uvicorn's queue and event for lean ones and chorus.keepalive replaces its
    per-socket ping timers; frames still flow both ways and pings are still answered."""
    seen: dict[str, Any] = {}
    keepalive = Keepalive(0.2, 5.0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        scope[RAW_SEND] = send
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        handle = lighten(scope)
        seen["handle"] = handle
        keepalive.watch(handle)
        protocol = getattr(send, "__self__", None)
        seen["uvicorn timer"] = getattr(protocol, "ping_timer", "missing")
        seen["headers"] = list(scope["headers"])
        seen["watched"] = len(keepalive)
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"echo {text}")
        except WebSocketDisconnect:
            pass
        finally:
            keepalive.forget(handle)
            seen["after"] = len(keepalive)

    try:
        async with _served(app, ws_ping_interval=20) as port, asyncio.timeout(10):
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                for word in ("one", "two"):
                    await ws.send(word)
                    assert await ws.recv() == f"echo {word}"
                await asyncio.sleep(1.0)  # about five keepalive rounds, each answered by the client
                await ws.send("three")
                assert await ws.recv() == "echo three"
            while "after" not in seen:
                await asyncio.sleep(0.02)
    finally:
        keepalive.stop()
    assert seen["handle"] is not None, "lighten returned None: the lean path is gone"
    assert seen["uvicorn timer"] is None, "uvicorn's own ping timer still runs beside chorus.keepalive"
    assert seen["headers"] == [], "the handshake's headers are still held"
    assert (seen["watched"], seen["after"]) == (1, 0)
