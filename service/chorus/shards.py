"""Sharded pub/sub for Redis Cluster: each channel `SSUBSCRIBE`d on the shard that owns its slot.

The same contract as `chorus.backend.RedisPubSubBackend` (bytes payloads, `wait_live`, a
`GAP_MARK` event after every re-subscription, so the hub back-fills from the room's stream), with
one connection per shard master instead of one connection in all:

- the slot map comes from `CLUSTER SLOTS` on any reachable node (seeds first) and is
  re-read every `CHECK_SECONDS`, so a slot that moved or a replica promoted is followed even
  when the server says nothing;
- a `sunsubscribe` the server pushes (its slot moved away), an error reply (`-MOVED`) or a
  lost connection makes the affected channels homeless: the supervisor re-reads the map
  (with the capped, jittered backoff) and subscribes them where they live now.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from typing import Final

from broadcaster import Event
from redis.crc import key_slot

from .backend import CONNECTION_ERRORS, GAP_MARK, ChannelBackend, reply_batches, request
from .resp import RespError, encode_command
from .topology import Topology

log = logging.getLogger("chorus.shards")

CHECK_SECONDS: Final = 5.0
Address = tuple[str, int]


class _Shard:
    """One pub/sub connection to a shard master and the channels routed to it."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.channels: set[str] = set()
        self.outstanding: dict[str, int] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def write(self, command: bytes, channel: str) -> None:
        if self.writer is None or self.writer.is_closing():
            return  # sent when the connection is up
        self.outstanding[channel] = self.outstanding.get(channel, 0) + 1
        self.writer.write(encode_command(command, channel))


class ShardedPubSubBackend(ChannelBackend):
    """Redis Cluster sharded pub/sub for broadcaster; see the module docstring."""

    MESSAGE_KIND = b"smessage"
    CONFIRM_KINDS = (b"ssubscribe", b"sunsubscribe")

    def __init__(
        self, topology: Topology, *, on_connection_change: Callable[[bool], None] | None = None
    ) -> None:
        super().__init__(topology, on_connection_change)
        self._seeds: list[Address] = list(topology.hosts)
        self._confirmed_once: set[str] = set()
        self._owner: dict[str, _Shard] = {}
        self._homeless: set[str] = set()
        self._shards: dict[Address, _Shard] = {}
        # Slot ranges from CLUSTER SLOTS: starts (sorted), ends and owners, for bisect.
        self._starts: list[int] = []
        self._ranges: list[tuple[int, Address]] = []
        self._kick = asyncio.Event()
        self._failed = False

    # -- BroadcastBackend -------------------------------------------------------------------

    async def connect(self) -> None:
        self._kick.set()
        self._task = asyncio.create_task(self._supervise(), name="chorus-shards")

    async def disconnect(self) -> None:
        self._stopping = True
        tasks = [t for t in [self._task, *(s.task for s in self._shards.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for shard in self._shards.values():
            if shard.writer is not None:
                shard.writer.close()

    async def subscribe(self, channel: str) -> None:
        self._wanted.add(channel)
        self._live.setdefault(channel, asyncio.Event())
        self._route(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._live.pop(channel, None)
        self._confirmed_once.discard(channel)
        self._homeless.discard(channel)
        shard = self._owner.pop(channel, None)
        if shard is not None:
            shard.channels.discard(channel)
            shard.write(b"SUNSUBSCRIBE", channel)

    # -- routing ----------------------------------------------------------------------------

    def _owner_of(self, channel: str) -> Address | None:
        slot = key_slot(channel.encode())
        index = bisect.bisect_right(self._starts, slot) - 1
        if index < 0:
            return None
        end, address = self._ranges[index]
        return address if slot <= end else None

    def _route(self, channel: str) -> None:
        address = self._owner_of(channel)
        if address is None:
            self._homeless.add(channel)
            self._kick.set()
            return
        shard = self._shards.get(address)
        if shard is None:
            shard = self._shards[address] = _Shard(address)
            shard.task = asyncio.create_task(self._run_shard(shard), name=f"chorus-shard:{address[1]}")
        self._homeless.discard(channel)
        self._owner[channel] = shard
        shard.channels.add(channel)
        event = self._live.get(channel)
        if event is not None:
            event.clear()
        shard.write(b"SSUBSCRIBE", channel)

    def _evict(self, shard: _Shard, channel: str) -> None:
        """`channel` no longer lives on `shard`: subscribe it again wherever it lives now."""
        shard.channels.discard(channel)
        if self._owner.get(channel) is shard:
            del self._owner[channel]
        if channel in self._wanted:
            self._homeless.add(channel)
            event = self._live.get(channel)
            if event is not None:
                event.clear()
            self._kick.set()

    async def _supervise(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._kick.wait(), CHECK_SECONDS)
            except TimeoutError:
                pass
            self._kick.clear()
            if self._failed:
                self._failed = False
                await self._backoff.wait()
            else:
                self._backoff.reset()
            try:
                await self._refresh_slots()
            except CONNECTION_ERRORS as exc:
                log.warning("cannot read the Redis Cluster slot map: %s; retrying", exc)
                self._failed = True
                self._set_connected(False)
                self._kick.set()
                continue
            for channel, shard in list(self._owner.items()):
                if self._owner_of(channel) != shard.address:
                    log.info("channel %s moved away from %s:%d", channel, *shard.address)
                    shard.channels.discard(channel)
                    shard.write(b"SUNSUBSCRIBE", channel)
                    self._evict(shard, channel)
            for channel in sorted(self._homeless):
                self._route(channel)
            if self._homeless:
                self._failed = True
                self._kick.set()
            for address, shard in list(self._shards.items()):
                if not shard.channels and shard.task is not None:
                    shard.task.cancel()  # nothing left to listen to there
                    del self._shards[address]
            self._set_connected(not self._homeless and all(s.up for s in self._shards.values()))

    async def _refresh_slots(self) -> None:
        candidates = list(dict.fromkeys([*self._seeds, *(a for _, a in self._ranges)]))
        errors: list[str] = []
        for address in candidates:
            try:
                reader, writer = await self._open_node(address)
            except (OSError, ConnectionError, TimeoutError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            try:
                reply = await request(reader, writer, b"CLUSTER", b"SLOTS")
            finally:
                writer.close()
            if isinstance(reply, RespError) or not reply:
                errors.append(f"{address[0]}:{address[1]}: {reply or 'no slots'}")
                continue
            rows = sorted(
                (int(row[0]), int(row[1]), ((row[2][0] or b"").decode() or address[0], int(row[2][1])))
                for row in reply
            )
            self._starts = [start for start, _, _ in rows]
            self._ranges = [(end, owner) for _, end, owner in rows]
            return
        raise ConnectionError("; ".join(errors) or "no seed nodes")

    # -- one shard's connection -------------------------------------------------------------

    async def _run_shard(self, shard: _Shard) -> None:
        try:
            reader, shard.writer = await self._open_node(shard.address)
            shard.outstanding.clear()
            for channel in sorted(shard.channels):
                shard.write(b"SSUBSCRIBE", channel)
            await self._read(shard, reader)
            raise ConnectionError("Redis closed the pub/sub connection")
        except asyncio.CancelledError:
            raise
        except CONNECTION_ERRORS as exc:
            if not self._stopping:
                log.warning("sharded pub/sub connection to %s:%d lost: %s", *shard.address, exc)
        finally:
            if shard.writer is not None:
                shard.writer.close()
                shard.writer = None
        if self._stopping:
            return
        if self._shards.get(shard.address) is shard:
            del self._shards[shard.address]
        self.reconnects += 1
        self._failed = True
        self._set_connected(False)
        for channel in list(shard.channels):
            self._evict(shard, channel)
        self._kick.set()

    async def _read(self, shard: _Shard, reader: asyncio.StreamReader) -> None:
        async def keepalive() -> None:
            if shard.writer is None:
                raise ConnectionError("pub/sub connection closed")
            shard.writer.write(encode_command(b"PING"))

        def answered(channel: str, unsubscribed: bool) -> None:
            self._answered(shard, channel, unsubscribed)

        async for batch in reply_batches(reader, keepalive):
            self._dispatch(batch, answered)

    def _error_reply(self, reply: RespError) -> None:
        # -MOVED/-CLUSTERDOWN to an SSUBSCRIBE: our map is stale; start over.
        raise reply

    def _answered(self, shard: _Shard, channel: str, unsubscribed: bool) -> None:
        left = shard.outstanding.get(channel, 0)
        if unsubscribed and left <= 0:
            # Unasked: the server dropped the channel because its slot moved elsewhere.
            log.info("shard %s:%d handed over %s", *shard.address, channel)
            self._evict(shard, channel)
            return
        if left > 1:
            shard.outstanding[channel] = left - 1
            return
        shard.outstanding.pop(channel, None)
        if channel not in self._wanted or self._owner.get(channel) is not shard:
            return
        if channel in self._confirmed_once:
            self._put(Event(channel, GAP_MARK))
        self._confirmed_once.add(channel)
        event = self._live.get(channel)
        if event is not None:
            event.set()
