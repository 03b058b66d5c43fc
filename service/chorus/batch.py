"""Commands from several layers sent to Redis in one round trip (a pipeline, not a transaction).

A layer queues its commands and keeps the index of each reply it needs; `run()` sends them
all at once through the process's one command client (`RedisCommands`: bounded in time and
in concurrency like every other call). In a Cluster redis-py splits the pipeline by shard, so
commands on different hash tags may share a batch; nothing spans shards atomically, so what
goes in a batch must be idempotent or read-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from .redis_broker import RedisCommands


class Batch:
    """Commands queued by several layers, sent as one pipeline by `run()`."""

    def __init__(self, commands: RedisCommands) -> None:
        self._commands = commands
        self._queued: list[tuple[AsyncScript | None, tuple[Any, ...]]] = []

    def command(self, *args: Any) -> int:
        """Queue a command; the index of its reply in `run()`'s list."""
        self._queued.append((None, args))
        return len(self._queued) - 1

    def script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> int:
        """Queue a registered script (EVALSHA); the index of its reply."""
        self._queued.append((script, (len(keys), *keys, *args)))
        return len(self._queued) - 1

    async def run(self) -> list[Any]:
        """Send everything at once: each reply, or the exception its command raised, in order.

        Raises BrokerUnavailable when the pipeline fails as a whole. A script Redis does not
        know (a restarted Redis forgets them) is loaded and the batch sent once more: redis-py's
        own way, SCRIPT EXISTS before every pipeline, would cost the round trip saved here.
        """
        replies: list[Any] = await self._commands.call(self._send())
        missing = {
            script
            for (script, _), reply in zip(self._queued, replies, strict=True)
            if script is not None and isinstance(reply, NoScriptError)
        }
        if not missing:
            return replies
        for script in missing:
            await self._commands.call(self._commands.client.script_load(script.script))
        resent: list[Any] = await self._commands.call(self._send())
        return resent

    async def _send(self) -> list[Any]:
        async with self._commands.client.pipeline(transaction=False) as pipe:
            for script, args in self._queued:
                if script is None:
                    pipe.execute_command(*args)
                else:
                    pipe.execute_command("EVALSHA", script.sha, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies
