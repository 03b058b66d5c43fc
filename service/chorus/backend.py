"""A broadcaster backend for Redis pub/sub that owns its connection and survives faults.

broadcaster 0.3.1's stock Redis backend receives nothing with redis-py 8, dies silently when
the connection drops, and dies on one non-UTF-8 payload. This backend speaks RESP2 on a
connection of its own (no redis-py pub/sub state machine in the way) and:

- reconnects with capped, jittered exponential backoff and re-subscribes every wanted channel;
- after a reconnect, puts a `GAP_MARK` event on each re-subscribed channel, in order with the
  messages that follow, so the subscriber can back-fill what it missed (chorus.broker turns
  it into a typed `Gap`);
- passes payloads on as bytes: nothing here decodes them, so no payload can kill the loop;
- never awaits in `subscribe`/`unsubscribe` (broadcaster registers its queue only after
  `subscribe` returns): the command is written at once and `wait_live` says when Redis
  has confirmed it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from broadcaster import BroadcastBackend, Event

from .resp import RespError, RespParser, encode_command
from .topology import Topology

log = logging.getLogger("chorus.backend")

# Delivered as an Event's message when a channel's subscription was re-established after a
# gap. A str, where every payload from Redis is bytes: no payload can be mistaken for it.
GAP_MARK: Final = "chorus:gap"

BACKOFF_INITIAL: Final = 0.05
BACKOFF_CAP: Final = 2.0
# Errors that mean "this connection is gone": reconnect (with backoff), never crash.
CONNECTION_ERRORS: Final = (OSError, ConnectionError, RespError, asyncio.IncompleteReadError, TimeoutError)
CONNECT_TIMEOUT: Final = 2.0
# Redis sends nothing on an idle pub/sub connection; PING every so often so a dead peer
# (no RST, e.g. a network partition) is noticed.
KEEPALIVE_SECONDS: Final = 5.0


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *command: bytes | str) -> Any:
    """One command and its reply, on a connection nothing else reads yet."""
    writer.write(encode_command(*command))
    parser = RespParser()
    while True:
        data = await asyncio.wait_for(reader.read(4096), CONNECT_TIMEOUT)
        if not data:
            raise ConnectionError(f"Redis closed the connection during {command[0]!r}")
        parser.feed(data)
        replies = parser.replies()
        if replies:
            return replies[0]


async def open_authenticated(
    host: str, port: int, *, tls: ssl.SSLContext | None, username: str | None, password: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection to one Redis node, AUTHed when a password is set; ConnectionError if refused."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), CONNECT_TIMEOUT)
    if password is not None:
        auth: tuple[bytes | str, ...] = (
            (b"AUTH", password) if username is None else (b"AUTH", username, password)
        )
        reply = await request(reader, writer, *auth)
        if isinstance(reply, RespError):
            writer.close()
            raise ConnectionError(f"Redis refused AUTH: {reply}")
    return reader, writer


async def reply_batches(
    reader: asyncio.StreamReader, keepalive: Callable[[], Awaitable[None]]
) -> AsyncIterator[list[Any]]:
    """The replies of a subscribed connection, a batch per read, until Redis closes it.

    Redis sends nothing on an idle pub/sub connection, so after KEEPALIVE_SECONDS of silence
    `keepalive` runs (it writes a PING, or raises ConnectionError to give the connection up) and
    the reply must come within another KEEPALIVE_SECONDS: a dead peer without RST is noticed.
    """
    parser = RespParser()
    while True:
        try:
            # asyncio.timeout, not wait_for: wait_for wraps each read in a task of its own, and
            # under small rooms' load a read per message made that ~2.5 % of a replica (py-spy).
            async with asyncio.timeout(KEEPALIVE_SECONDS):
                data = await reader.read(262_144)
        except TimeoutError:
            await keepalive()
            data = await asyncio.wait_for(reader.read(262_144), KEEPALIVE_SECONDS)
        if not data:
            return
        parser.feed(data)
        yield parser.replies()


class Backoff:
    """Capped exponential backoff with full jitter: retry n waits `uniform(0, min(cap, base * 2**n))`.

    Full jitter spreads a fleet of replicas' reconnects over the whole window, so they do not
    come back in lockstep when Redis does (AWS Architecture Blog, "Exponential Backoff And
    Jitter"). `reset` after a success.
    """

    __slots__ = ("_attempt", "base", "cap")

    def __init__(self, base: float = BACKOFF_INITIAL, cap: float = BACKOFF_CAP) -> None:
        self.base = base
        self.cap = cap
        self._attempt = 0

    @property
    def ceiling(self) -> float:
        """The longest the next wait may be."""
        return min(self.cap, self.base * 2.0**self._attempt)

    def reset(self) -> None:
        self._attempt = 0

    async def wait(self) -> None:
        delay = random.uniform(0, self.ceiling)
        if self.ceiling < self.cap:
            self._attempt += 1
        await asyncio.sleep(delay)


class ChannelBackend(BroadcastBackend):
    """What Chorus's pub/sub backends share: the queue broadcaster reads, the channels wanted
    and per channel an event saying that Redis has confirmed the subscription, the credentials
    every connection uses, the connection task, and the dispatch of a read's replies."""

    # Reply kinds: a payload, and the confirmations of subscribe and unsubscribe.
    MESSAGE_KIND: bytes = b"message"
    CONFIRM_KINDS: tuple[bytes, bytes] = (b"subscribe", b"unsubscribe")

    def __init__(self, topology: Topology, on_connection_change: Callable[[bool], None] | None) -> None:
        # BroadcastBackend.__init__ only raises NotImplementedError: not called.
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        # Where the reader hands events: broadcaster's queue, or straight to the
        # subscriptions once `deliver_to` is called (chorus.relay).
        self._put: Callable[[Event], None] = self._queue.put_nowait
        self._live: dict[str, asyncio.Event] = {}
        self._wanted: set[str] = set()
        self._on_connection_change = on_connection_change
        self._username = topology.username
        self._password = topology.password or None
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if topology.tls else None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._backoff = Backoff()
        self.connected = False
        self.reconnects = 0

    async def _open_node(self, address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new authenticated connection to one Redis node."""
        return await open_authenticated(
            *address, tls=self._ssl, username=self._username, password=self._password
        )

    def _dispatch(self, batch: list[Any], confirmed: Callable[[str, bool], None]) -> None:
        """Hand one read's replies on: payloads to broadcaster's queue, each (un)subscribe
        confirmation to `confirmed(channel, unsubscribed)`, error replies to `_error_reply`."""
        put = self._put
        message_kind = self.MESSAGE_KIND
        subscribed, unsubscribed = self.CONFIRM_KINDS
        for reply in batch:
            if isinstance(reply, RespError):
                self._error_reply(reply)
                continue
            if not isinstance(reply, list) or len(reply) < 3:
                continue
            kind = reply[0]
            if kind == message_kind:
                put(Event(reply[1].decode(errors="replace"), reply[2]))
            elif kind in (subscribed, unsubscribed):
                confirmed(reply[1].decode(errors="replace"), kind == unsubscribed)

    def _error_reply(self, reply: RespError) -> None:
        log.error("Redis pub/sub error reply: %s", reply)

    def _set_connected(self, value: bool) -> None:
        if value != self.connected:
            self.connected = value
            if self._on_connection_change is not None:
                self._on_connection_change(value)

    def deliver_to(self, put: Callable[[Event], None]) -> None:
        """Hand events to `put` from the reader's own turn instead of broadcaster's queue."""
        self._put = put

    async def publish(self, channel: str, message: Any) -> None:
        raise NotImplementedError("Chorus publishes through its command connection (chorus.redis_broker)")

    async def next_published(self) -> Event:
        return await self._queue.get()

    async def wait_live(self, channel: str) -> None:
        """Return once Redis has confirmed the subscription to `channel`."""
        event = self._live.get(channel)
        if event is None:
            raise RuntimeError(f"channel {channel!r} is not subscribed")
        await event.wait()


class RedisPubSubBackend(ChannelBackend):
    """Redis pub/sub for broadcaster, hardened; see the module docstring."""

    def __init__(
        self,
        topology: Topology,
        *,
        on_connection_change: Callable[[bool], None] | None = None,
        resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        super().__init__(topology, on_connection_change)
        # `resolve` (Sentinel) names the master before each connect; the connection must then
        # find a master there, and a master that moves is a reconnect.
        self._host, self._port = topology.hosts[0]
        self._resolve = resolve
        self._address = (self._host, self._port)
        # Replies still outstanding per channel: a channel is live once it is wanted and
        # every SUBSCRIBE/UNSUBSCRIBE written for it has been answered.
        self._outstanding: dict[str, int] = {}
        self._resubscribing: set[str] = set()
        self._writer: asyncio.StreamWriter | None = None

    # -- BroadcastBackend -------------------------------------------------------------------

    async def connect(self) -> None:
        # Do not wait for Redis: a replica that starts while Redis is down stays up, not ready.
        self._task = asyncio.create_task(self._run(), name="chorus-pubsub")

    async def disconnect(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._close_writer()

    async def subscribe(self, channel: str) -> None:
        self._wanted.add(channel)
        self._live.setdefault(channel, asyncio.Event())
        self._write(b"SUBSCRIBE", channel)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._live.pop(channel, None)
        self._write(b"UNSUBSCRIBE", channel)

    # -- connection loop --------------------------------------------------------------------

    def _write(self, command: bytes, channel: str) -> None:
        if self._writer is None or self._writer.is_closing():
            return  # the reconnect loop subscribes every wanted channel
        self._outstanding[channel] = self._outstanding.get(channel, 0) + 1
        event = self._live.get(channel)
        if event is not None:
            event.clear()
        self._writer.write(encode_command(command, channel))

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _run(self) -> None:
        first = True
        while not self._stopping:
            try:
                reader = await self._open()
                if not first:
                    self.reconnects += 1
                    log.warning(
                        "pub/sub connection to Redis restored; re-subscribing %d rooms", len(self._wanted)
                    )
                self._resubscribing = set(self._wanted) if not first else set()
                first = False
                self._outstanding.clear()
                for channel in sorted(self._wanted):
                    self._write(b"SUBSCRIBE", channel)
                self._set_connected(True)
                self._backoff.reset()
                await self._read(reader)
                raise ConnectionError("Redis closed the pub/sub connection")
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as exc:
                self._close_writer()
                self._set_connected(False)
                for event in self._live.values():
                    event.clear()
                if not first:
                    log.warning(
                        "pub/sub connection to Redis lost: %s; retrying in <= %.1fs",
                        exc,
                        self._backoff.ceiling,
                    )
                else:
                    log.warning("cannot reach Redis for pub/sub: %s; retrying", exc)
            await self._backoff.wait()

    async def _open(self) -> asyncio.StreamReader:
        host, port = (self._host, self._port) if self._resolve is None else await self._resolve()
        reader, writer = await self._open_node((host, port))
        self._writer = writer
        if self._resolve is not None:
            # Sentinel may still name a master that has just been demoted (or not yet promoted).
            role = await request(reader, writer, b"ROLE")
            if not (isinstance(role, list) and role and role[0] == b"master"):
                raise ConnectionError(f"{host}:{port} is not a master")
            self._address = (host, port)
        return reader

    async def _master_moved(self) -> bool:
        if self._resolve is None:
            return False
        try:
            return await self._resolve() != self._address
        except ConnectionError:
            return False  # sentinels unreachable: keep the connection that works

    async def _keepalive(self) -> None:
        if self._writer is None:
            raise ConnectionError("pub/sub connection closed")
        if await self._master_moved():
            raise ConnectionError("Sentinel names another master")
        # A PING on a subscribed RESP2 connection is answered with ["pong", ""].
        self._writer.write(encode_command(b"PING"))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        async for batch in reply_batches(reader, self._keepalive):
            self._dispatch(batch, self._confirmed)

    def _confirmed(self, channel: str, unsubscribed: bool) -> None:
        left = self._outstanding.get(channel, 0) - 1
        if left > 0:
            self._outstanding[channel] = left
            return
        self._outstanding.pop(channel, None)
        if channel not in self._wanted:
            return
        if channel in self._resubscribing:
            self._resubscribing.discard(channel)
            self._put(Event(channel, GAP_MARK))
        event = self._live.get(channel)
        if event is not None:
            event.set()
