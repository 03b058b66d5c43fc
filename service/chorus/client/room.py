"""A room over one WebSocket at a time: sends that wait for their ack, events, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus
from websockets.protocol import State
from websockets.typing import Subprotocol

from ..protocol import CLIENT_ID_MAX, MAX_HISTORY, ROOM_RE, USERNAME_RE, StreamId
from .errors import Disconnected, HandshakeRefused, NotConnected, SendRejected, SendUnconfirmed
from .events import Ack, Error, Event, Resync, Welcome, parse_frame, stream_id
from .retry import FATAL_CLOSE_CODES, Reconnect, parse_retry_after, retryable_status
from .stats import Stats

CLOSE_ABNORMAL: Final = 1006  # RFC 6455: the TCP connection ended without a close frame

# The handshake's subprotocols, as security.py accepts them. Repeated here, not imported:
# security.py loads the server's settings (pydantic) and PyJWT, half a second a client never
# needs; tests/test_client.py checks the two stay equal. They belong in protocol.py.
SUBPROTOCOL: Final = "chorus.v1"
BEARER_PREFIX: Final = "bearer."

Token = str | Callable[[], Awaitable[str]]


class Room:
    """One member of a room; build it with `connect()`. Iterate it for events, `send()` to post.

    The room reconnects by itself on close codes reconnecting can fix (1006 network, 1011 broker,
    1012 draining replica, 1013 slow consumer, ...), resumes with `since=<last_id>` and drops
    messages it has already seen, so iteration yields each message once, in order. On 1003,
    1008, 1009 or 4001, a handshake refused with a 4xx other than 408/425/429 (a 5xx is always
    retried), or when the `Reconnect` budget is spent, the room ends: iteration and `send()`
    raise `Disconnected`.
    """

    def __init__(
        self,
        url: str,
        room: str,
        *,
        username: str | None = None,
        token: Token | None = None,
        history: int | None = None,
        since: str | None = None,
        reconnect: Reconnect | None = None,
        open_timeout: float = 10.0,
        send_timeout: float = 10.0,
        receive: bool = True,
        max_queue: int = 10_000,
        local_addr: tuple[str, int] | None = None,
    ) -> None:
        if not ROOM_RE.match(room):
            raise ValueError(f"room must match {ROOM_RE.pattern}")
        if username is not None and not USERNAME_RE.match(username):
            raise ValueError(f"username must match {USERNAME_RE.pattern}")
        if history is not None and not 0 <= history <= MAX_HISTORY:
            raise ValueError(f"history must be from 0 to {MAX_HISTORY}")
        base = url.rstrip("/")
        if base.startswith(("http://", "https://")):
            base = "ws" + base[4:]
        if not base.startswith(("ws://", "wss://")):
            raise ValueError(f"url must start with ws://, wss://, http:// or https://: {url!r}")
        self.name = room
        self.user: str | None = username  # the server's name for us once welcomed (anon-XXXX)
        self.replica: str | None = None  # the replica serving the current socket
        self.stats = Stats()
        self._endpoint = f"{base}/ws/{room}"
        self._username = username
        self._token = token
        self._history = history
        self._last: StreamId | None = StreamId.parse(since) if since is not None else None
        # Where a fresh (not resumed) connection's live stream began (the welcome's `last_id`):
        # a member that has seen no message since resumes from it, so what is posted while it
        # reconnects is not lost (a history=0 bot in a quiet room lost it before).
        self._origin: StreamId | None = None
        self._policy = reconnect or Reconnect()
        self._open_timeout = open_timeout
        self._send_timeout = send_timeout
        self._receive = receive
        self._max_queue = max_queue
        self._local_addr = local_addr
        self._ws: ClientConnection | None = None
        self._live = asyncio.Event()
        self._finished = asyncio.Event()
        self._done: Disconnected | None = None
        self._closed_by_caller = False
        self._pending: dict[str, asyncio.Future[Ack]] = {}
        self._acked: set[StreamId] = set()  # ids of our own messages, dropped if replayed to us
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._drained = asyncio.Event()
        self._client_ids = f"{secrets.token_hex(4)}-"
        self._sequence = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def last_id(self) -> str | None:
        """The id of the newest message seen (None before the first); a reconnect resumes after
        it, or after the welcome's `last_id` while there is none."""
        return None if self._last is None else str(self._last)

    @property
    def connected(self) -> bool:
        """True while a socket is open and welcomed (False while reconnecting)."""
        return self._live.is_set()

    @property
    def ended(self) -> bool:
        """True once the room has ended: it will not reconnect, and iteration and sends raise."""
        return self._done is not None

    # -- the caller's side ------------------------------------------------------------------

    async def send(self, text: str, client_id: str | None = None) -> Ack:
        """Post `text` and wait for the server's ack; return it (its `id` is the message's).

        While the room is reconnecting the send waits for it (up to `send_timeout`, else
        `NotConnected`: not sent). Raises `SendRejected` (with the error `code`) when the server
        refused it, and `SendUnconfirmed` when the socket closed, or no ack came within
        `send_timeout`, after it was written: it may or may not be stored. The server does not
        deduplicate by `client_id`, so resending an unconfirmed message may store it twice.
        """
        return await self._request({"type": "message", "text": text}, client_id)

    async def edit(self, message_id: str, text: str, client_id: str | None = None) -> Ack:
        """Replace the text of one of our messages (any, as a moderator); the ack's `id` is the edit's.

        `SendRejected` with `not_found` (no such message in the room's history, or deleted),
        `forbidden` (not ours) or `invalid`; otherwise as `send`.
        """
        return await self._request({"type": "edit", "id": message_id, "text": text}, client_id)

    async def delete(self, message_id: str, client_id: str | None = None) -> Ack:
        """Delete one of our messages (any, as a moderator); errors as `edit`."""
        return await self._request({"type": "delete", "id": message_id}, client_id)

    async def react(
        self, message_id: str, emoji: str, *, on: bool = True, client_id: str | None = None
    ) -> Ack:
        """Add (or with `on=False` take back) a reaction: one emoji; idempotent per user and emoji."""
        return await self._request(
            {"type": "react", "target": message_id, "emoji": emoji, "on": on}, client_id
        )

    async def typing(self) -> None:
        """Tell the room we are typing (the server drops more than one per 2 s); a no-op offline."""
        await self._fire({"type": "typing"})

    async def read(self, message_id: str) -> None:
        """Move our read marker in this room forward to `message_id`; a no-op offline."""
        await self._fire({"type": "read", "id": message_id})

    async def _fire(self, body: dict[str, Any]) -> None:
        """Write a frame that gets no answer, if a socket is open; never waits for one."""
        ws = self._ws
        if ws is None or ws.state is not State.OPEN or not self._live.is_set():
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(body))

    async def _request(self, body: dict[str, Any], client_id: str | None) -> Ack:
        if client_id is None:
            self._sequence += 1
            client_id = f"{self._client_ids}{self._sequence}"
        if len(client_id) > CLIENT_ID_MAX:
            raise ValueError(f"client_id must be at most {CLIENT_ID_MAX} chars")
        if client_id in self._pending:
            raise ValueError(f"a send with client_id {client_id!r} is already waiting for its ack")
        frame = json.dumps({**body, "client_id": client_id})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._send_timeout
        while True:
            try:
                await self._wait_live(deadline - loop.time())
            except TimeoutError:
                raise NotConnected(f"not connected within {self._send_timeout}s: not sent") from None
            ws = self._ws
            if ws is None or ws.state is not State.OPEN:
                # Closing before anything was written: not sent. Wait for the next socket (the
                # reader may not have seen this close yet, so do not wait on this one).
                if ws is not None and self._ws is ws:
                    self._live.clear()
                continue
            future: asyncio.Future[Ack] = loop.create_future()
            self._pending[client_id] = future
            try:
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    # The frame may have reached the transport before the connection was lost.
                    raise SendUnconfirmed(client_id, "the socket closed while sending") from None
                try:
                    return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise SendUnconfirmed(client_id, f"no ack within {self._send_timeout}s") from None
            finally:
                if self._pending.get(client_id) is future:
                    del self._pending[client_id]
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: a failed send the caller gave up on is not an error
                else:
                    future.cancel()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        """The next event; StopAsyncIteration after `close()`, `Disconnected` when the room ended."""
        event = await self._events.get()
        self._drained.set()
        if event is None:
            self._events.put_nowait(None)  # every later call ends the same way
            if self._closed_by_caller or self._done is None:
                raise StopAsyncIteration
            raise self._done
        return event

    async def close(self) -> None:
        """Leave the room: close the socket, end iteration, fail sends still waiting."""
        self._closed_by_caller = self._done is None
        self._finish(Disconnected("closed by the caller"))
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- connecting -------------------------------------------------------------------------

    async def _start(self) -> None:
        """Open the first socket; raise `Disconnected` when the room ends before any welcome."""
        self._task = asyncio.create_task(self._run(), name=f"chorus-client:{self.name}")
        await self._wait_live(None)

    async def _wait_live(self, timeout: float | None) -> None:
        if self._done is not None:
            raise self._done
        if self._live.is_set():
            return
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        live = asyncio.ensure_future(self._live.wait())
        finished = asyncio.ensure_future(self._finished.wait())
        try:
            await asyncio.wait({live, finished}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            live.cancel()
            finished.cancel()
        if live.done() and not live.cancelled():
            return  # welcomed; a close right after it is the next event's business
        if self._done is not None:
            raise self._done
        if not self._live.is_set():
            raise TimeoutError

    async def _run(self) -> None:
        try:
            await self._reconnect_loop()
        except Exception as exc:  # a bug or a bad URL: end the room, never leave a caller waiting
            error = Disconnected(f"the client failed: {exc!r}")
            error.__cause__ = exc
            self._finish(error)

    async def _reconnect_loop(self) -> None:
        attempts = 0  # reconnect attempts since the last welcome (the outage)
        lost_at = time.monotonic()
        retry_after: float | None = None
        last_failure: Disconnected | None = None
        first = True
        while True:
            if not first:
                if self._policy.exhausted(attempts, time.monotonic() - lost_at):
                    why = f"gave up after {attempts} reconnect attempts in {time.monotonic() - lost_at:.1f}s"
                    self._finish(last_failure or Disconnected(why))
                    return
                await asyncio.sleep(self._policy.delay(attempts, retry_after))
                attempts += 1
            first = False
            retry_after = None
            try:
                ws = await self._handshake()
            except InvalidStatus as exc:
                status = exc.response.status_code
                self.stats.refused[status] += 1
                retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
                refused = HandshakeRefused(status, _detail(exc.response.body), retry_after)
                if not retryable_status(status):
                    self._finish(refused)
                    return
                last_failure = refused
                continue
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                # websockets raises ConnectionClosed when the connection is lost before its
                # opening request goes out (a busy client loop): transient like the others.
                # Uncaught, it ended the room; a suspect for the clients that never came back
                # after a crash at 10,000 sockets (README Performance, "At 10,000 sockets").
                self.stats.unreachable += 1
                last_failure = Disconnected(f"cannot open a WebSocket to {self._endpoint}: {exc}")
                continue
            welcomed, code, reason = await self._session(ws)
            self.stats.close_codes[code] += 1
            if welcomed:
                attempts, lost_at = 0, time.monotonic()
            last_failure = Disconnected(f"closed with {code} {reason}".rstrip(), code)
            if code in FATAL_CLOSE_CODES:
                self._finish(last_failure)
                return

    async def _handshake(self) -> ClientConnection:
        params: dict[str, str] = {}
        if self._username is not None:
            params["username"] = self._username
        position = self._position()
        if position is not None:
            params["since"] = str(position)
        elif self._history is not None:
            params["history"] = str(self._history)
        subprotocols: list[Subprotocol] | None = None
        if self._token is not None:
            token = self._token if isinstance(self._token, str) else await self._token()
            # Offered as a subprotocol, not `?token=`, so it stays out of proxies' access logs.
            subprotocols = [Subprotocol(SUBPROTOCOL), Subprotocol(BEARER_PREFIX + token)]
        uri = f"{self._endpoint}?{urlencode(params)}" if params else self._endpoint
        # websockets hands extra keywords to loop.create_connection.
        extra: dict[str, Any] = {} if self._local_addr is None else {"local_addr": self._local_addr}
        try:
            return await ws_connect(
                uri, subprotocols=subprotocols, open_timeout=self._open_timeout, close_timeout=2, **extra
            )
        except AssertionError as exc:
            # Under uvloop, when a proxy's answer (HAProxy's 408 after its `timeout
            # http-request`) arrives before a stalled loop sent the request, websockets 17.4
            # fails its own `close_deadline is None` assertion instead of raising InvalidStatus:
            # 107 of 3,300 rooms ended that way in a 10,000-socket roll. A failed handshake.
            raise InvalidMessage(f"websockets could not finish the opening handshake ({exc!r})") from exc

    async def _session(self, ws: ClientConnection) -> tuple[bool, int, str]:
        """Serve one socket until it closes: (welcomed, close code, close reason)."""
        resumed = self._position() is not None
        welcomed = False
        try:
            first = parse_frame(await asyncio.wait_for(ws.recv(), self._open_timeout))
            if not isinstance(first, Welcome):
                await ws.close(1002, "expected a welcome frame")
                return False, 1002, f"first frame was {first.type!r}"
            welcomed = True
            self._on_welcome(first, ws, resumed)
            await self._emit(first)
            resumed_at_ms = time.time() * 1000 if resumed else None
            while True:
                await self._on_frame(parse_frame(await ws.recv()), resumed_at_ms)
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return welcomed, CLOSE_ABNORMAL, ""
            return welcomed, exc.rcvd.code, exc.rcvd.reason
        except TimeoutError:
            await ws.close(1002, "no welcome frame")
            return False, CLOSE_ABNORMAL, "no welcome frame in time"
        except asyncio.CancelledError:
            await asyncio.shield(ws.close())
            raise
        finally:
            self._ws = None
            self._live.clear()
            self._fail_pending(lambda cid: SendUnconfirmed(cid, "the socket closed before the ack"))

    def _on_welcome(self, welcome: Welcome, ws: ClientConnection, resumed: bool) -> None:
        self.stats.connects += 1
        if self.replica is not None:
            self.stats.reconnects += 1
        if resumed:
            self.stats.resumes += 1
        self.user, self.replica = welcome.user, welcome.replica
        if not resumed and welcome.last_id is not None:
            with contextlib.suppress(ValueError):
                self._origin = StreamId.parse(welcome.last_id)
        self._ws = ws
        self._live.set()

    async def _on_frame(self, event: Event, resumed_at_ms: float | None) -> None:
        entry_id = stream_id(event)
        if entry_id is not None:
            if (self._last is not None and entry_id <= self._last) or entry_id in self._acked:
                self.stats.duplicates_dropped += 1
                self._advance(entry_id)
                return
            self._advance(entry_id)
            if resumed_at_ms is not None and entry_id[0] < resumed_at_ms:
                self.stats.replayed += 1
        elif isinstance(event, Ack):
            with contextlib.suppress(ValueError):
                self._acked.add(StreamId.parse(event.id))
            self._resolve(event.client_id, event)
        elif isinstance(event, Error):
            if event.client_id is not None:
                self._resolve(event.client_id, SendRejected(event.code, event.detail, event.client_id))
        elif isinstance(event, Resync):
            # The server cannot resume from our id (trimmed, or Redis lost the stream): start over.
            self.stats.resyncs += 1
            self._last = self._origin = None
            self._acked.clear()
        await self._emit(event)

    def _position(self) -> StreamId | None:
        """What a reconnect resumes after: the newest id seen, or where the live stream began
        when that is newer (a replay of history cut short needs no more of it); None: fresh."""
        if self._last is None or (self._origin is not None and self._origin > self._last):
            return self._origin
        return self._last

    def _advance(self, msg_id: StreamId) -> None:
        if self._last is None or msg_id > self._last:
            self._last = msg_id
        if len(self._acked) > 1000:
            self._acked = {acked for acked in self._acked if acked > msg_id}

    def _resolve(self, client_id: str | None, outcome: Ack | SendRejected) -> None:
        future = self._pending.get(client_id) if client_id is not None else None
        if future is None or future.done():
            return
        if isinstance(outcome, Ack):
            future.set_result(outcome)
        else:
            future.set_exception(outcome)

    async def _emit(self, event: Event) -> None:
        if not self._receive:
            return
        # Back-pressure: a caller that stops iterating stops our reads, and the server's
        # slow-consumer close (1013) plus a resume catch up later without loss.
        while self._events.qsize() >= self._max_queue:
            self._drained.clear()
            await self._drained.wait()
        self._events.put_nowait(event)

    def _fail_pending(self, error: Callable[[str], Exception]) -> None:
        for client_id, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(error(client_id))

    def _finish(self, error: Disconnected) -> None:
        if self._done is not None:
            return
        self._done = error
        self._finished.set()
        self._live.clear()
        self._fail_pending(lambda _cid: error)
        self._events.put_nowait(None)


@contextlib.asynccontextmanager
async def connect(
    url: str,
    room: str,
    *,
    username: str | None = None,
    token: Token | None = None,
    history: int | None = None,
    since: str | None = None,
    reconnect: Reconnect | None = None,
    open_timeout: float = 10.0,
    send_timeout: float = 10.0,
    receive: bool = True,
    local_addr: tuple[str, int] | None = None,
) -> AsyncIterator[Room]:
    """Join `room` on the Chorus at `url` (`ws://host:port`, `wss://...` or `http(s)://...`).

    `username` (auth off) or `token` (a JWT, or an async callable returning a fresh one for
    each handshake); `history` messages replayed on a fresh join (server default 20), or
    `since=<id>` to resume after that message. `reconnect` bounds retries (default: forever,
    with full-jitter backoff; the first connect follows the same policy). `receive=False` for a
    room that only sends (events are not kept). `local_addr=(host, port)` binds the socket's
    source (a load generator on loopback spreads over 127.0.0.x so ephemeral ports do not cap
    it). Raises `Disconnected` (or its subclass `HandshakeRefused`) when the room cannot be joined.
    """
    member = Room(
        url,
        room,
        username=username,
        token=token,
        history=history,
        since=since,
        reconnect=reconnect,
        open_timeout=open_timeout,
        send_timeout=send_timeout,
        receive=receive,
        local_addr=local_addr,
    )
    try:
        await member._start()
        yield member
    finally:
        await member.close()


def _detail(body: bytes | bytearray | None) -> str:
    """The one sentence in a refusal's `{"detail": ...}` body, or the body itself."""
    if not body:
        return "no detail"
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else bytes(body[:200]).decode(errors="replace")
