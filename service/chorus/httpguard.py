"""The HTTP/1.1 front door: a deadline for every request head, caps on its size and on idle sockets.

uvicorn's httptools protocol (pinned in pyproject.toml) has no deadline for a request head, no
limit on the request target or headers, and it builds the target with `bytes +=` per read, so a
long line costs time quadratic in its length (issue 16, findings 2 and 3). This subclass adds:

- a head deadline (`CHORUS_HANDSHAKE_TIMEOUT_SECONDS`) that runs whenever a connection waits
  for a request head: from the connection's first moment, and again from the end of each
  response on a keep-alive connection, until the next head is complete. Bytes that do not
  complete a head (a trickled header, CRLFs between requests) do not restart it;
- a cap on connections waiting for a head (`CHORUS_MAX_PENDING_CONNECTIONS`): a new connection
  beyond it closes the one that has waited longest, so a slow client cannot lock out fresh ones;
- caps on the request target (`CHORUS_MAX_URL_BYTES`, 414) and on the rest of the head
  (`CHORUS_MAX_HEADER_BYTES`, 431), checked as bytes arrive, so the work for an oversized head
  is linear in the bytes read and stops at the cap plus one read.

This is the one module that touches uvicorn's private protocol internals: `UVICORN_INTERNALS`
lists them and tests/test_http_guard.py fails when the installed uvicorn differs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Final

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import metrics
from .protocol import (
    REJECT_HEAD_TIMEOUT,
    REJECT_HEADERS_TOO_LARGE,
    REJECT_TOO_MANY_PENDING,
    REJECT_URL_TOO_LONG,
)

log = logging.getLogger("chorus.http")

PINNED_UVICORN: Final = "0.54.0"
# uvicorn's private names used below (attributes and methods of HttpToolsProtocol).
UVICORN_INTERNALS: Final = (
    "parser",
    "url",
    "transport",
    "loop",
    "logger",
    "timeout_keep_alive_task",
    "_unset_keepalive_if_required",
    "_should_upgrade",
    "_unsupported_upgrade_warning",
    "handle_websocket_upgrade",
    "send_400_response",
    "on_response_complete",
)

# After a 414/431 the answer is sent with a FIN and the input is read and dropped for a moment:
# closing a socket with unread input sends RST, and the client would lose the answer.
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 1 << 20
# Bytes per header line beyond name and value: ": " and CRLF.
HEADER_OVERHEAD: Final = 4


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What a connection may spend on one request head."""

    head_timeout: float = 10.0
    max_pending: int = 256
    max_url_bytes: int = 8192
    max_header_bytes: int = 16384


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


def refusal_response(status: int, detail: str) -> bytes:
    """A minimal HTTP/1.1 answer with a JSON `detail`, after which the server closes."""
    body = orjson.dumps({"detail": detail})
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """httptools protocol with a deadline and size caps for every request head."""

    limits: ClassVar[HeadLimits] = HeadLimits()
    # Connections waiting for a request head, oldest first. One dict per server class
    # (`guarded_http` makes one per process), so the cap is per process.
    waiting: ClassVar[dict[GuardedHttpProtocol, None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_open = False  # a request has begun and its head is not complete
        self._body_open = False  # a head is complete and its body is not
        self._heads_begun = 0
        self._head_bytes = 0  # bytes read for the open head, counted per read
        self._url_bytes = 0
        self._header_bytes = 0
        self._refused = False
        self._discarded = 0
        self._linger: asyncio.TimerHandle | None = None

    # -- the head deadline and the cap on waiting connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:
            # uvicorn armed its keep-alive timer: the connection is idle until the next head.
            self._await_head()

    def _await_head(self) -> None:
        if self._head_timer is not None:
            return  # already waiting: more bytes do not buy more time
        waiting = type(self).waiting
        while len(waiting) >= self.limits.max_pending:
            next(iter(waiting))._evict()
        waiting[self] = None
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        type(self).waiting.pop(self, None)

    def _evict(self) -> None:
        self._head_done()
        metrics.REJECTIONS.labels(REJECT_TOO_MANY_PENDING).inc()
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        type(self).waiting.pop(self, None)
        if not self.transport.is_closing():
            metrics.REJECTIONS.labels(REJECT_HEAD_TIMEOUT).inc()
            log.info("closing a connection with no complete request head in %.0fs", self.limits.head_timeout)
            self.transport.close()

    # -- parser callbacks: count the head as it arrives

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._heads_begun += 1
        self._head_bytes = self._url_bytes = self._header_bytes = 0
        self._await_head()  # a pipelined head that starts while a response is still running

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.limits.max_url_bytes:
            raise _Refused(
                414,
                REJECT_URL_TOO_LONG,
                f"the request target is longer than {self.limits.max_url_bytes} bytes",
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + HEADER_OVERHEAD
        if self._header_bytes > self.limits.max_header_bytes:
            raise self._headers_too_large()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._body_open = True
        self._head_done()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_open = False
        super().on_message_complete()

    def _headers_too_large(self) -> _Refused:
        return _Refused(
            431,
            REJECT_HEADERS_TOO_LARGE,
            f"the request headers are larger than {self.limits.max_header_bytes} bytes",
        )

    # -- reading: uvicorn's data_received, plus the count of head bytes per read

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._discard(len(data))
            return
        head_open_before = self._head_open
        idle_before = not self._head_open and not self._body_open
        begun_before = self._heads_begun
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(exc.__context__)
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if not self._head_open:
            return
        # A header still incomplete at the end of a read has not reached on_header yet (httptools
        # holds it), so the open head is also counted by reads: exact when the head was open
        # before this read or began at its first byte; a head that began after a body in the
        # same read is counted from the next read (at most one read late).
        began = self._heads_begun - begun_before
        if head_open_before and began == 0:
            self._head_bytes += len(data)
        elif idle_before and began == 1:
            self._head_bytes = len(data)
        if self._head_bytes - self._url_bytes > self.limits.max_header_bytes:
            self._refuse(self._headers_too_large())

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _refuse(self, refusal: _Refused) -> None:
        self._refused = True
        self._head_done()
        metrics.REJECTIONS.labels(refusal.reason).inc()
        log.info("refused a request head with %d: %s", refusal.status, refusal.detail)
        transport = self.transport
        transport.write(refusal_response(refusal.status, refusal.detail))
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = self.loop.call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def _discard(self, size: int) -> None:
        self._discarded += size
        if self._discarded > LINGER_BYTES:
            self.transport.close()


def guarded_http(limits: HeadLimits) -> type[GuardedHttpProtocol]:
    """A protocol class for one server: its own limits and its own count of waiting connections."""
    namespace: dict[str, Any] = {"limits": limits, "waiting": {}}
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), namespace)
