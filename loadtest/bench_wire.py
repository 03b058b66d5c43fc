"""A bare WebSocket client for the benchmark: asyncio protocols, no per-frame JSON.

A general client library (websockets, aiohttp) spends more CPU per received frame than the
server spends sending it, so the generator would measure itself. Here a receiver parses the
frame header by hand and reads only the message text, which carries
`<step> <publisher> <seq> <send time in us>`; publishers mask with the all-zero key (legal,
and the XOR becomes a no-op) so sending costs one `write`.
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
        self.closed: dict[int, int] = {}

    def step(self, index: int) -> StepTally:
        tally = self.steps.get(index)
        if tally is None:
            tally = self.steps[index] = StepTally()
        return tally


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

    def __init__(self, tally: Tally, *, receiver: bool, request: bytes) -> None:
        self.tally = tally
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks = 0
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
                self._write(_masked_frame(0xA, buf[start:end]))
            elif opcode == OP_CLOSE:
                code = int.from_bytes(buf[start : start + 2], "big") if length >= 2 else 1005
                self.tally.closed[code] = self.tally.closed.get(code, 0) + 1
                self.close()
            pos = end
        self._buf = buf[pos:]

    def _on_text(self, buf: bytes, start: int, end: int) -> None:
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

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked_frame(OP_CLOSE, b"\x03\xe8"))
            self.transport.close()


async def open_socket(
    port: int, path: str, tally: Tally, *, receiver: bool, within: float = 20.0
) -> WsClient:
    """Connect, upgrade and wait for the welcome frame (the room is live from then on)."""
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    client = WsClient(tally, receiver=receiver, request=request)
    async with asyncio.timeout(within):
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        await client.opened
        await client.welcomed
    return client
