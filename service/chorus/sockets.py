"""Closing a WebSocket whose peer has stopped reading.

uvicorn's ASGI `send` waits until the transport's write buffer drains below its low-water
mark, and that includes `websocket.close`. A slow consumer's buffer never drains, so an ASGI
close would wait forever and the keepalive timeout would end the socket with 1011 instead of
1013. Chorus writes the close frame straight into the transport (it is queued after what the
peer has not read yet, so the peer sees 1013 if it ever reads again). This relies on the
websockets-sansio protocol of the uvicorn version pinned in pyproject.toml; with any other
server it returns False and the caller falls back to the ASGI close.

Once a socket is accepted, `lighten` drops what uvicorn keeps of the handshake and swaps its
receive queue and writable event for lean ones: about 7 KiB of an idle socket's 24
(tracemalloc, docs/perf/idle.md).

This is the one module that reads uvicorn's WebSocket protocol internals: `UVICORN_INTERNALS`
lists them, and tests/test_uvicorn_contract.py fails when the installed uvicorn differs from
`PINNED_UVICORN` or the fast path (`FrameWriter.for_send`, `close_now`, `lighten`) is lost
under it.
"""

from __future__ import annotations

import asyncio
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
    "request",
    "response",
    "handshake_complete",
    "stop_keepalive",
    "pending_ping_payload",
    "ping_sent_at",
)


def close_now(scope: Scope, code: int, reason: str) -> bool:
    """Put a close frame on the wire even while writing is paused; False if not possible."""
    protocol = _protocol_of(scope)
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


def _protocol_of(scope: Scope) -> Any:
    return getattr(scope.get(RAW_SEND), "__self__", None)


def lighten(scope: Scope) -> Any:
    """After `websocket.accept`: free what an established socket no longer needs.

    Returns the socket's handle for `chorus.keepalive` (None when the server is not the pinned
    uvicorn; its own keepalive then stays on).

    uvicorn and websockets keep the handshake's request and response (two `Headers`, about
    3 KiB) for the socket's lifetime, and an `asyncio.Queue` plus an `asyncio.Event` that
    allocate four deques (about 3.4 KiB) to hold, idle, nothing. The request headers in the
    scope go too: every check that reads them ran before the accept.
    """
    protocol = _protocol_of(scope)
    needed = ("request", "response", "queue", "writable", "handshake_complete", *_KEEPALIVE)
    if not all(hasattr(protocol, name) for name in needed) or not protocol.handshake_complete:
        return None
    queue = protocol.queue
    if not isinstance(queue, asyncio.Queue) or not isinstance(protocol.writable, asyncio.Event):
        return None
    # Only the caller (the socket's one task, between its awaits) reads the queue: no getter
    # waits on it now, and what is queued moves over in order.
    inbox = Inbox()
    while not queue.empty():
        inbox.put_nowait(queue.get_nowait())
    protocol.queue = inbox
    writable = Flag()
    if protocol.writable.is_set():
        writable.set()
    protocol.writable = writable
    for message in (protocol.request, protocol.response):
        # In place: websockets' parser generator keeps the request in a local for good.
        getattr(getattr(message, "headers", None), "clear", lambda: None)()
    protocol.request = protocol.response = None
    headers = scope.get("headers")
    if isinstance(headers, list):
        headers.clear()  # in place: Starlette's cached `Headers` wraps this same list
    # Read only up to the accept (uvicorn's handshake, Starlette's accept, Chorus's _admit);
    # `path`, `client` and `state` stay for logs and the session.
    for key in ("extensions", "asgi", "raw_path", "query_string", "subprotocols"):
        scope.pop(key, None)
    return protocol


# -- keepalive: chorus.keepalive pings from one timer per process instead of uvicorn's two
# timers per socket; these are the parts that touch uvicorn's protocol.

_KEEPALIVE: Final = ("stop_keepalive", "pending_ping_payload", "ping_sent_at", "close_sent", "disconnected")


def stop_server_keepalive(protocol: Any) -> None:
    """Cancel uvicorn's own ping timer for this socket (chorus.keepalive pings it from now on)."""
    protocol.stop_keepalive()


def is_closed(protocol: Any) -> bool:
    return bool(protocol.disconnected or protocol.close_sent or protocol.transport.is_closing())


def ping_frame(payload: bytes) -> bytes:
    """An unmasked RFC 6455 ping frame (a server's), built once per round for every socket."""
    return bytes((0x89, len(payload))) + payload


def send_ping(protocol: Any, frame: bytes, payload: bytes) -> bool:
    """Write a ping; uvicorn's pong handler clears `pending_ping_payload` when it is answered."""
    if is_closed(protocol) or protocol.conn.state is not State.OPEN:
        return False
    protocol.pending_ping_payload = payload
    protocol.ping_sent_at = protocol.loop.time()
    protocol.transport.write(frame)
    return True


def answered(protocol: Any) -> bool:
    return protocol.pending_ping_payload is None


def expire(protocol: Any) -> None:
    """The peer did not answer in time: close with 1011, as uvicorn's own keepalive does."""
    protocol.pending_ping_payload = None
    if is_closed(protocol):
        return
    protocol.conn.fail(1011, "keepalive ping timeout")
    protocol.transport.write(b"".join(protocol.conn.data_to_send()))
    protocol.close_sent = True
    protocol.transport.close()


class Inbox:
    """uvicorn's receive queue for one socket, with one reader: a list only while items wait.

    uvicorn pauses reading while a message waits, so it rarely holds more than two.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = self._items.pop(0)
        if not self._items:
            self._items = None
        return item


class Flag:
    """An `asyncio.Event` that keeps no waiter list while nobody waits (most sockets, always)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
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
