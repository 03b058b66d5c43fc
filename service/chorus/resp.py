"""The RESP2 codec Chorus's pub/sub connections speak: commands out, replies in, no I/O."""

from __future__ import annotations

from typing import Any


class RespError(Exception):
    """An error reply (`-ERR ...`), or bytes that are not RESP2."""


def encode_command(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespParser:
    """Incremental RESP2 parser for the replies a pub/sub connection sees."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def replies(self) -> list[Any]:
        out: list[Any] = []
        while True:
            start = self._pos
            try:
                item = self._parse()
            except _Incomplete:
                self._pos = start
                return out
            out.append(item)

    def _line(self) -> bytes:
        end = self._buf.find(b"\r\n", self._pos)
        if end < 0:
            raise _Incomplete
        line = bytes(self._buf[self._pos : end])
        self._pos = end + 2
        return line

    def _parse(self) -> Any:
        line = self._line()
        if not line:
            raise RespError("empty RESP line")
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            end = self._pos + size
            if len(self._buf) < end + 2:
                raise _Incomplete
            data = bytes(self._buf[self._pos : end])
            self._pos = end + 2
            return data
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._parse() for _ in range(count)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        raise RespError(f"unexpected RESP type {kind!r}")


class _Incomplete(Exception):
    pass
