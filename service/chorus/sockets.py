"""Closing a WebSocket whose peer has stopped reading.

uvicorn's ASGI `send` waits until the transport's write buffer drains below its low-water
mark, and that includes `websocket.close`. A slow consumer's buffer never drains, so an ASGI
close would wait forever and the keepalive timeout would end the socket with 1011 instead of
1013. Chorus writes the close frame straight into the transport (it is queued after what the
peer has not read yet, so the peer sees 1013 if it ever reads again). This relies on the
websockets-sansio protocol of the uvicorn version pinned in pyproject.toml; with any other
server it returns False and the caller falls back to the ASGI close.

This is the one module that reads uvicorn's WebSocket protocol internals: `UVICORN_INTERNALS`
lists them, and tests/test_uvicorn_contract.py fails when the installed uvicorn differs from
`PINNED_UVICORN` or the fast path (`FrameWriter.for_send`, `close_now`) is lost under it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from starlette.types import Scope
from websockets.protocol import State

RAW_SEND: Final = "chorus.raw_send"

PINNED_UVICORN: Final = "0.54.0"
# uvicorn's private names used below (attributes of its websockets-sansio protocol).
UVICORN_INTERNALS: Final = (
    "conn",
    "transport",
    "writable",
    "close_sent",
    "disconnected",
    "close_timer",
    "close_timeout",
    "queue",
    "loop",
)


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
    """Writes text frames straight to a WebSocket's transport, several in one write.

    uvicorn's ASGI `send` costs a trip through the middleware stack, a websockets framing
    pass and a `write` syscall per frame. A fan-out hands the same frame string to every
    member, so its bytes on the wire (server frames are not masked) are built once and
    reused, and a sender that finds a backlog writes it in one go. Flow control stays
    uvicorn's: `writable` is the protocol's own event, cleared while the transport buffer is
    over its high-water mark, so a reader that stops reading still fills its bounded queue and
    is closed with 1013. Same uvicorn dependency as `close_now`; `for_send` returns None
    elsewhere (or with a compression extension) and the caller keeps the ASGI send.
    """

    __slots__ = ("_conn", "_protocol", "_transport")

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._conn = protocol.conn
        self._transport = protocol.transport

    @classmethod
    def for_send(cls, send: Any) -> FrameWriter | None:
        """The writer behind a Starlette `websocket.send_text`, or None when there is none."""
        scope = getattr(getattr(send, "__self__", None), "scope", None)
        protocol: Any = getattr(scope.get(RAW_SEND), "__self__", None) if isinstance(scope, dict) else None
        needed = ("conn", "transport", "writable", "close_sent", "disconnected")
        if not all(hasattr(protocol, name) for name in needed) or getattr(protocol.conn, "extensions", True):
            return None
        return cls(protocol)

    def writable(self) -> bool:
        return bool(self._protocol.writable.is_set())

    async def wait_writable(self) -> None:
        await self._protocol.writable.wait()

    def write(self, frames: Iterable[str]) -> None:
        """Write `frames` now, in order; ConnectionError once the socket is closing."""
        protocol = self._protocol
        if (
            protocol.disconnected
            or protocol.close_sent
            or self._conn.state is not State.OPEN
            or self._transport.is_closing()
        ):
            raise ConnectionError("the WebSocket is closed")
        self._transport.write(b"".join(map(_text_frame, frames)))


# Frames built lately: a fan-out writes the same string object to every member, and a
# coalesced write joins a few of them. Small, and emptied whenever it fills.
_frames: dict[str, bytes] = {}
FRAME_CACHE_SIZE = 64


def _text_frame(text: str) -> bytes:
    """An unmasked, unfragmented RFC 6455 text frame (what websockets sends for a server)."""
    frame = _frames.get(text)
    if frame is not None:
        return frame
    data = text.encode()
    size = len(data)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + size.to_bytes(8, "big")
    frame = head + data
    if len(_frames) >= FRAME_CACHE_SIZE:
        _frames.clear()
    _frames[text] = frame
    return frame
