"""Closing a WebSocket whose peer has stopped reading.

uvicorn's ASGI `send` waits until the transport's write buffer drains below its low-water
mark, and that includes `websocket.close`. A slow consumer's buffer never drains, so an ASGI
close would wait forever and the keepalive timeout would end the socket with 1011 instead of
1013. Chorus writes the close frame straight into the transport (it is queued after what the
peer has not read yet, so the peer sees 1013 if it ever reads again). This relies on the
websockets-sansio protocol of the uvicorn version pinned in pyproject.toml; with any other
server it returns False and the caller falls back to the ASGI close.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from starlette.types import ASGIApp, Receive, Scope, Send

RAW_SEND: Final = "chorus.raw_send"


class CaptureRawSend:
    """ASGI middleware keeping the server's own `send` in the WebSocket scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


def close_now(scope: Scope, code: int, reason: str) -> bool:
    """Put a close frame on the wire even while writing is paused; False if not possible."""
    protocol: Any = getattr(scope.get(RAW_SEND), "__self__", None)
    conn = getattr(protocol, "conn", None)
    transport = getattr(protocol, "transport", None)
    if conn is None or transport is None or not hasattr(protocol, "close_timer"):
        return False
    if protocol.close_sent or transport.is_closing():
        return True  # already closing: nothing more to say
    try:
        conn.send_close(code, reason)
        transport.write(b"".join(conn.data_to_send()))
    except Exception:
        return False
    protocol.close_sent = True
    protocol.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
    # As uvicorn does after its own close: wait for the peer's reply, then drop the transport.
    protocol.close_timer = protocol.loop.call_later(protocol.close_timeout, transport.close)
    return True


class FrameWriter:
    """Writes a WebSocket's whole send backlog as one transport write.

    uvicorn's ASGI `send` costs a trip through the middleware stack and a `write` syscall per
    frame; a fan-out sender that finds several frames queued writes them in one go. Flow
    control stays uvicorn's: `wait_writable` waits on the protocol's own `writable` event
    (cleared while the transport buffer is over its high-water mark), so a reader that stops
    reading still fills its bounded queue and is closed with 1013. Same uvicorn dependency as
    `close_now`; `for_send` returns None elsewhere and the caller keeps the ASGI send.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    @classmethod
    def for_send(cls, send: Any) -> FrameWriter | None:
        """The writer behind a Starlette `websocket.send_text`, or None when there is none."""
        scope = getattr(getattr(send, "__self__", None), "scope", None)
        protocol: Any = getattr(scope.get(RAW_SEND), "__self__", None) if isinstance(scope, dict) else None
        needed = ("conn", "transport", "writable", "close_sent", "disconnected")
        return cls(protocol) if all(hasattr(protocol, name) for name in needed) else None

    async def wait_writable(self) -> None:
        await self._protocol.writable.wait()

    def write(self, frames: Iterable[str]) -> None:
        """Frame and write `frames` now; ConnectionError once the socket is closing."""
        protocol = self._protocol
        if protocol.disconnected or protocol.close_sent or protocol.transport.is_closing():
            raise ConnectionError("the WebSocket is closed")
        conn = protocol.conn
        for frame in frames:
            conn.send_text(frame.encode())
        protocol.transport.write(b"".join(conn.data_to_send()))
