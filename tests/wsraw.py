"""A raw WebSocket client for frames a well-behaved library refuses to send."""

from __future__ import annotations

import base64
import os
import socket
import struct


def handshake(port: int, path: str, *, rcvbuf: int | None = None, headers: str = "") -> socket.socket:
    """Open a socket, complete the WebSocket handshake, return the socket (nothing read after)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    header = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        header += bytes([0x80 | length])
    elif length < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_close_code(sock: socket.socket, timeout: float) -> int | None:
    """Read frames until a close frame; return its code (None when it has none)."""
    return read_until_close(sock, timeout)[0]


def read_until_close(sock: socket.socket, timeout: float) -> tuple[int | None, int]:
    """Read frames (answering none) until a close frame: (its code or None, pings seen)."""
    sock.settimeout(timeout)
    pings = 0
    buf = b""

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
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", need(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", need(8))
        payload = need(length)
        if b0 & 0x0F == 0x9:
            pings += 1
        elif b0 & 0x0F == 0x8:
            return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None), pings
