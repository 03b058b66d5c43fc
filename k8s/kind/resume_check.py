"""Rolling-restart check: messages sent during a rollout all arrive, once, at resuming clients.

A sender and a receiver join one room through the Gateway with `chorus.client`, which
reconnects whenever their socket closes (1012 when their pod drains) with jittered backoff,
the receiver resuming with `since=<last id>` so the server replays what it missed and the
client drops what it already saw. The sender sends COUNT numbered messages, resending any
that were refused as retryable or left unconfirmed by a closing socket. Exit 0 when the
receiver holds every number in order (a resent unconfirmed message may appear twice: the
server does not deduplicate client ids); 1 otherwise.

Usage: python k8s/kind/resume_check.py ws://127.0.0.1:8080 [COUNT] [INTERVAL_SECONDS]
"""

from __future__ import annotations

import asyncio
import secrets
import sys

from chorus.client import (
    ChorusError,
    Message,
    NotConnected,
    Reconnect,
    SendRejected,
    SendUnconfirmed,
    Stats,
    connect,
)

# A rollout replaces every pod in turn; give each move up to two minutes before failing.
PATIENT = Reconnect(give_up_after=120)


async def receive(base: str, room: str, count: int, got: list[int], ready: asyncio.Event) -> Stats:
    async with connect(base, room, username="receiver", history=0, reconnect=PATIENT) as member:
        ready.set()
        async for event in member:
            if isinstance(event, Message):
                got.append(int(event.text))
                if len(set(got)) >= count:
                    break
        return member.stats


async def send(base: str, room: str, count: int, interval: float) -> tuple[int, Stats]:
    resent = 0
    async with connect(base, room, username="sender", history=0, reconnect=PATIENT, receive=False) as member:
        number = 0
        while number < count:
            try:
                await member.send(str(number), client_id=str(number))
            except SendRejected as exc:
                if not exc.retryable:
                    raise
                await asyncio.sleep(0.5)  # not sent: retry the same number
                continue
            except (SendUnconfirmed, NotConnected):
                resent += 1  # maybe stored: resending may double it, the receiver counts distinct
                continue
            number += 1
            await asyncio.sleep(interval)
        return resent, member.stats


def describe(stats: Stats) -> str:
    codes = ",".join(f"{code}x{n}" for code, n in sorted(stats.close_codes.items())) or "none"
    refused = ",".join(f"{status}x{n}" for status, n in sorted(stats.refused.items())) or "none"
    return (
        f"{stats.reconnects} reconnects, {stats.resumes} resumes, {stats.replayed} replayed, "
        f"{stats.duplicates_dropped} duplicates dropped, closes {codes}, refused {refused}"
    )


async def main(base: str, count: int, interval: float) -> int:
    room = f"rollout-{secrets.token_hex(4)}"
    got: list[int] = []
    ready = asyncio.Event()
    receiver = asyncio.create_task(receive(base, room, count, got, ready))
    await asyncio.wait_for(ready.wait(), 60)
    try:
        resent, sender_stats = await send(base, room, count, interval)
    except ChorusError as exc:
        receiver.cancel()
        print(f"resume check: FAILED: the sender stopped: {exc}")
        return 1
    try:
        receiver_stats: Stats | None = await asyncio.wait_for(receiver, 60)
    except (TimeoutError, ChorusError) as exc:
        print(f"resume check: the receiver stopped: {exc!r}")
        receiver_stats = None
    distinct = list(dict.fromkeys(got))
    if distinct != list(range(count)):
        missing = sorted(set(range(count)) - set(got))
        print(
            f"resume check: FAILED: {len(missing)} missing, first {missing[:20]}; "
            f"in order: {distinct == sorted(distinct)}"
        )
        return 1
    print(f"resume check: ok: {count} messages across the rollout, {len(got) - count} retried duplicates")
    print(f"  sender: {describe(sender_stats)}, {resent} resends")
    if receiver_stats is not None:
        print(f"  receiver: {describe(receiver_stats)}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(
        asyncio.run(
            main(args[0], int(args[1]) if len(args) > 1 else 300, float(args[2]) if len(args) > 2 else 0.1)
        )
    )
