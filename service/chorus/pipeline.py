"""Auto-pipelining: the hot path's scripts on one Redis connection of our own, a write per loop turn.

redis-py sends each command on a pooled connection of its own and waits for its reply: a
chat message paid a pool checkout, a `send` and a wake-up for the reply, through about ten
layers of client code (`docs/perf/chorus-publish.svg`: `RedisBroker.append` 6.5 % of a
replica's samples in 100 rooms of 4, a third of that the `send`). Here every script call of
one event-loop turn is written in one `send` on one connection, and the replies, which Redis
returns in order, are matched to their callers as they arrive (one `recv` for as many as
came together). Ordering is Redis's: commands run in the order they were written.

`RedisCommands` (chorus.redis_broker) owns the one `ScriptPipeline` of a process and bounds each
call in time and in depth as it bounds every command; a Cluster has none (a room's keys live
on one shard of many: redis-py's cluster client keeps routing those). When the connection
fails, every call written or waiting on it fails with ConnectionError (BrokerUnavailable for
the caller, an `unavailable` frame for a sender): nothing is lost silently, and the next call
connects again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from .resp import RespError, RespParser
from .topology import Topology

CONNECT_TIMEOUT: Final = 2.0
# Calls written or waiting at once on the connection; more wait their turn (within the
# command timeout), as `CHORUS_REDIS_MAX_CONNECTIONS` bounds redis-py's pool.
PIPELINE_DEPTH: Final = 1024

Arg = bytes | str | int


def _encode(args: Sequence[Arg]) -> bytes:
    """A RESP2 command; ints as their decimal digits (what redis-py sends)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _error(reply: RespError) -> ResponseError:
    """An error reply as the exception redis-py raises for it (callers already handle those)."""
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith("READONLY"):
        return ReadOnlyError(text)
    return ResponseError(text)


class _Connection(asyncio.Protocol):
    """One connection: commands queued in a turn go out in one write; replies resolve, in
    order, the futures of the commands that asked."""

    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._timeout = timeout
        self._parser = RespParser()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._progress = 0.0  # loop time of the last reply, or of the first call after none waited
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is no asyncio.Transport subclass, but has what we use of one.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise ConnectionError("the pipelined Redis connection is closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        if not self._waiting:
            self._progress = self._loop.time()
            if self._watchdog is None:
                self._watchdog = self._loop.call_later(self._timeout, self._check)
        self._waiting.append(future)
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(command)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))

    def _check(self) -> None:
        """Give the connection up when Redis has answered nothing for a whole timeout while
        calls wait (a peer gone without a RST): they fail now and the next call connects again."""
        self._watchdog = None
        if not self._waiting or self.closed:
            return
        quiet = self._loop.time() - self._progress
        if quiet >= self._timeout:
            self.abort(ConnectionError(f"Redis answered nothing for {quiet:.1f}s"))
        else:
            self._watchdog = self._loop.call_later(self._timeout - quiet, self._check)

    def data_received(self, data: bytes) -> None:
        self._progress = self._loop.time()
        self._parser.feed(data)
        try:
            replies = self._parser.replies()
        except (RespError, ValueError) as exc:  # not RESP: nothing after it can be matched
            self.abort(ConnectionError(f"Redis sent an unreadable reply: {exc}"))
            return
        waiting = self._waiting
        for reply in replies:
            if not waiting:
                self.abort(ConnectionError("Redis sent a reply nobody asked for"))
                return
            future = waiting.popleft()
            if future.done():
                continue  # its caller timed out; the reply still holds its place in the order
            if isinstance(reply, RespError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"the pipelined Redis connection was lost: {exc or 'closed by Redis'}"))

    def abort(self, exc: Exception) -> None:
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out.clear()
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(exc)


class ScriptPipeline:
    """Scripts over one auto-pipelined connection to a standalone or Sentinel-managed master."""

    def __init__(
        self,
        topology: Topology,
        *,
        timeout: float,
        resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        if topology.cluster:
            raise ValueError("a Cluster spreads a room's keys over shards: use the cluster client")
        self._address = topology.hosts[0]
        self._resolve = resolve
        self._tls: ssl.SSLContext | None = ssl.create_default_context() if topology.tls else None
        self._auth: tuple[bytes | str, ...] = ()
        if topology.password is not None:
            self._auth = ("AUTH", topology.password)
            if topology.username is not None:
                self._auth = ("AUTH", topology.username, topology.password)
        self._db = topology.db
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self.slots = asyncio.Semaphore(PIPELINE_DEPTH)

    async def run(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """EVALSHA `script`; EVAL once when Redis has not loaded it (a restart, SCRIPT FLUSH)."""
        tail = (len(keys), *keys, *args)
        try:
            return await self._call(_encode(("EVALSHA", script.sha, *tail)))
        except NoScriptError:
            source = script.script
            return await self._call(
                _encode(("EVAL", bytes(source) if isinstance(source, memoryview) else source, *tail))
            )

    async def _call(self, command: bytes) -> Any:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        try:
            return await connection.send(command)
        except ReadOnlyError:
            # A master demoted under us (a Sentinel failover): the next call asks again.
            connection.abort(ConnectionError("Redis is a replica now"))
            raise

    async def _connect(self) -> _Connection:
        # One connect at a time, shared by the calls that need it; a caller that gives up
        # (its timeout) does not cancel it for the others.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
            # Its failure reaches the callers still waiting; retrieved here for when none is.
            self._connecting.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Connection:
        host, port = self._address if self._resolve is None else await self._resolve()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, connection = await loop.create_connection(
                lambda: _Connection(self._timeout), host, port, ssl=self._tls
            )
            try:
                setup = []
                if self._auth:
                    setup.append(connection.send(_encode(self._auth)))
                if self._db:
                    setup.append(connection.send(_encode(("SELECT", self._db))))
                if self._resolve is not None:
                    setup.append(connection.send(_encode(("ROLE",))))
                replies = await asyncio.gather(*setup)
                # Sentinel may still name a master that has just been demoted.
                if self._resolve is not None and not (replies and replies[-1][0] == b"master"):
                    raise ConnectionError(f"{host}:{port} is not a master")
            except BaseException:
                connection.abort(ConnectionError("setting up the pipelined connection failed"))
                raise
        self._connection = connection
        return connection

    async def aclose(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.abort(ConnectionError("the broker is stopping"))
            self._connection = None
