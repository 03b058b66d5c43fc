"""A bare WebSocket client for the benchmark: asyncio protocols, no per-frame JSON.

A general client library (websockets, aiohttp) spends more CPU per received frame than the
server spends sending it, so the generator would measure itself. Here a receiver parses the
frame header by hand and reads only the message text, which carries
`<step> <publisher> <seq> <send time in us>`; publishers mask with the all-zero key (legal,
and the XOR becomes a no-op) so sending costs one `write`.

Two framings over the same WebSocket code, so one generator drives all three stacks:

- Chorus's (which the naive baseline speaks too): `/ws/{room}?username=U&history=0`, a
  `{"type":"welcome"}` frame once joined, `{"type":"message","text":...}` out, `{"type":"ack"}`
  back to the sender, messages to the others.
- Engine.IO v4 / Socket.IO v5, for the Socket.IO baseline:
  `/socket.io/?EIO=4&transport=websocket&room=R&user=U`, one Engine.IO packet per WebSocket
  frame. The server opens with `0{"sid":...,"pingInterval":...}`; the client connects to the
  `/` namespace with `40` and is joined once `40{"sid":...}` comes back (its welcome). It sends
  `42<ack id>["message",{"text":...}]` and gets `43<ack id>[...]` back (its ack); the others
  get `42["message",{...,"text":...}]`. The server pings with `2`, the client answers `3`
  (a client that does not is dropped after pingInterval + pingTimeout).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass, field
from typing import cast

TEXT_MARK = b'"text":"'
OP_TEXT, OP_CLOSE, OP_PING = 0x1, 0x8, 0x9
# Engine.IO packet types (first byte of a frame) and Socket.IO ones (the second, after `4`).
EIO_OPEN, EIO_CLOSE, EIO_PING, EIO_PONG, EIO_MESSAGE = b"0", b"1", b"2", b"3", b"4"
SIO_CONNECT, SIO_DISCONNECT, SIO_EVENT, SIO_ACK, SIO_CONNECT_ERROR = 0x30, 0x31, 0x32, 0x33, 0x34


def now_us() -> int:
    return time.perf_counter_ns() // 1000


@dataclass
class StepTally:
    """What receivers saw for one step's messages."""

    received: int = 0
    duplicates: int = 0
    latencies_us: list[int] = field(default_factory=list)


class Tally:
    """Per-step counts shared by every receiver of one run (one event loop, no locks)."""

    def __init__(self) -> None:
        self.steps: dict[int, StepTally] = {}
        self.other_frames = 0
        self.pings = 0  # keepalive pings answered (WebSocket ping frames, or Engine.IO `2`)
        self.closed: dict[int, int] = {}

    def step(self, index: int) -> StepTally:
        tally = self.steps.get(index)
        if tally is None:
            tally = self.steps[index] = StepTally()
        return tally


@dataclass(frozen=True)
class Framing:
    """How one stack's URL names a room and how its frames wrap a chat message."""

    engineio: bool

    def path(self, room: str, user: str) -> str:
        if self.engineio:
            return f"/socket.io/?EIO=4&transport=websocket&room={room}&user={user}"
        return f"/ws/{room}?username={user}&history=0"


CHORUS_FRAMING = Framing(engineio=False)  # Chorus, the naive baseline, the floor
ENGINEIO_FRAMING = Framing(engineio=True)  # Socket.IO 4.x: Engine.IO v4, Socket.IO protocol v5


def framing_for(impl: str) -> Framing:
    return ENGINEIO_FRAMING if impl == "socketio" else CHORUS_FRAMING


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + b"\x00\x00\x00\x00" + payload


class WsClient(asyncio.Protocol):
    """One WebSocket: handshake, then frames; receivers tally message texts."""

    def __init__(self, tally: Tally, *, receiver: bool, request: bytes, framing: Framing) -> None:
        self.tally = tally
        self.receiver = receiver
        self.engineio = framing.engineio
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks = 0
        self._sent = 0
        self._handshaking = True
        self._buf = b""
        self._request = request
        # Per publisher, the last sequence number seen in the current step: a repeat or a step
        # backwards is a duplicate (Chorus promises per-room order, so a lower seq is one).
        self._last_step = -1
        self._last: dict[int, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost during handshake: {exc!r}"))
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("connection lost before welcome"))
            # Nobody awaits `welcomed` once `opened` failed: do not log it as never retrieved.
            self.welcomed.exception()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if self._handshaking:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status:
                self.opened.set_exception(
                    ConnectionError(f"handshake refused: {status.decode(errors='replace')}")
                )
                self.close()
                return
            self._handshaking = False
            self.opened.set_result(None)
            buf = buf[end + 4 :]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode = buf[pos] & 0x0F
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[start : start + 8], "big")
                start += 8
            end = start + length
            if end > size:
                break
            if opcode == OP_TEXT:
                self._on_text(buf, start, end)
            elif opcode == OP_PING:
                self.tally.pings += 1
                self._write(_masked_frame(0xA, buf[start:end]))
            elif opcode == OP_CLOSE:
                code = int.from_bytes(buf[start : start + 2], "big") if length >= 2 else 1005
                self.tally.closed[code] = self.tally.closed.get(code, 0) + 1
                self.close()
            pos = end
        self._buf = buf[pos:]

    def _on_engineio(self, buf: bytes, start: int, end: int) -> bool:
        """Handle an Engine.IO / Socket.IO control packet; False for an event (a chat message)."""
        kind = buf[start : start + 1]
        if kind == EIO_MESSAGE and end - start >= 2:
            sio = buf[start + 1]
            if sio == SIO_EVENT:
                return False
            if sio == SIO_ACK:
                self.acks += 1
            elif sio == SIO_CONNECT and not self.welcomed.done():
                self.welcomed.set_result(None)  # `40{"sid":...}`: joined to its room
            elif sio == SIO_CONNECT_ERROR and not self.welcomed.done():
                self.welcomed.set_exception(ConnectionError(f"refused: {buf[start:end]!r}"))
            else:
                self.tally.other_frames += 1
        elif kind == EIO_PING:
            self.tally.pings += 1
            self._write(_masked_frame(OP_TEXT, EIO_PONG))
        elif kind == EIO_OPEN:
            self._write(_masked_frame(OP_TEXT, b"40"))  # connect to the main namespace
        else:
            self.tally.other_frames += 1
        return True

    def _on_text(self, buf: bytes, start: int, end: int) -> None:
        if self.engineio and self._on_engineio(buf, start, end):
            return
        at = buf.find(TEXT_MARK, start, end)
        if at < 0 or not self.receiver:
            if buf.startswith(b'{"type":"welcome"', start) and not self.welcomed.done():
                self.welcomed.set_result(None)
            elif buf.startswith(b'{"type":"ack"', start):
                self.acks += 1
            else:
                self.tally.other_frames += 1
            return
        arrived = now_us()
        at += len(TEXT_MARK)
        step_s, pub_s, seq_s, sent_s, _ = buf[at : at + 64].split(b" ", 4)
        step, pub, seq = int(step_s), int(pub_s), int(seq_s)
        tally = self.tally.step(step)
        if step != self._last_step:
            self._last_step = step
            self._last = {}
        last = self._last.get(pub, -1)
        if seq <= last:
            tally.duplicates += 1
            return
        self._last[pub] = seq
        tally.received += 1
        tally.latencies_us.append(arrived - int(sent_s))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, text: bytes) -> None:
        self._write(_masked_frame(OP_TEXT, text))

    def send_message(self, text: bytes) -> None:
        """One chat message; `text` must need no JSON escaping (the generator's never does)."""
        if self.engineio:
            self._sent += 1  # the ack id: Socket.IO acks the sender as Chorus does
            self.send_text(b'42%d["message",{"text":"%s"}]' % (self._sent, text))
        else:
            self.send_text(b'{"type":"message","text":"%s"}' % text)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked_frame(OP_CLOSE, b"\x03\xe8"))
            self.transport.close()


async def open_socket(
    port: int,
    path: str,
    tally: Tally,
    *,
    receiver: bool,
    framing: Framing = CHORUS_FRAMING,
    within: float = 20.0,
) -> WsClient:
    """Connect, upgrade and wait for the welcome (Socket.IO: the namespace CONNECT reply);
    the room is live from then on."""
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    client = WsClient(tally, receiver=receiver, request=request, framing=framing)
    async with asyncio.timeout(within):
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        await client.opened
        await client.welcomed
    return client
