"""Rolling-restart check: messages sent during a rollout all arrive, once, at resuming clients.

A sender and a receiver join one room through the Gateway with `chorus.client`, which
reconnects whenever their socket closes (1012 when their pod drains, or when `rebalance` moves
it after the roll) with jittered backoff, honours `Retry-After` on refused handshakes (a
draining or busy pod's 503, a gateway's 502/503 while endpoints lag), and resumes with `since=<last id>` so the server replays what it missed and
the client drops what it already saw. The sender sends COUNT numbered messages at INTERVAL
(within the default rate limit of 10/s), resending any refused as retryable or left
unconfirmed by a closing socket.

Exit 0 only when the receiver holds every number, in order, AND the roll was seen: at least
one 1012 close and one resume with `since=` (a roll that missed the window proved nothing).
Everything runs under one overall deadline.

Usage: python k8s/kind/resume_check.py ws://127.0.0.1:8080 [COUNT] [INTERVAL] [--deadline S]
"""

from __future__ import annotations

import argparse
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

DRAINING = 1012
# A rollout replaces every pod in turn; give each move up to two minutes before failing.
PATIENT = Reconnect(give_up_after=120)


async def receive(
    base: str, room: str, count: int, got: list[int], ready: asyncio.Event, stats: list[Stats]
) -> None:
    async with connect(base, room, username="receiver", history=0, reconnect=PATIENT) as member:
        stats.append(member.stats)
        ready.set()
        async for event in member:
            if isinstance(event, Message):
                got.append(int(event.text))
                if len(set(got)) >= count:
                    return


async def send(base: str, room: str, count: int, interval: float, stats: list[Stats]) -> int:
    """Send 0..count-1; return how many were resent after an unconfirmed send."""
    resent = 0
    async with connect(base, room, username="sender", history=0, reconnect=PATIENT, receive=False) as member:
        stats.append(member.stats)
        number = 0
        while number < count:
            try:
                await member.send(str(number), client_id=str(number))
            except SendRejected as exc:
                if not exc.retryable:
                    raise
                await asyncio.sleep(max(interval, 0.5))  # not sent: retry the same number
                continue
            except (SendUnconfirmed, NotConnected):
                resent += 1  # maybe stored: resending may double it; the receiver counts distinct
                continue
            number += 1
            await asyncio.sleep(interval)
        return resent


def describe(stats: Stats) -> str:
    codes = ",".join(f"{code}x{n}" for code, n in sorted(stats.close_codes.items())) or "none"
    refused = ",".join(f"{status}x{n}" for status, n in sorted(stats.refused.items())) or "none"
    return (
        f"{stats.reconnects} reconnects, {stats.resumes} resumes, {stats.replayed} replayed, "
        f"{stats.duplicates_dropped} duplicates dropped, closes {codes}, refused {refused}"
    )


def verdict(count: int, got: list[int], sender: Stats | None, receiver: Stats | None) -> tuple[bool, str]:
    """The check's judgement, and one line saying why."""
    distinct = list(dict.fromkeys(got))
    problems = []
    missing = sorted(set(range(count)) - set(got))
    if missing:
        problems.append(f"{len(missing)} missing, first {missing[:20]}")
    if distinct != sorted(distinct):
        problems.append("out of order")
    closes = sum(stats.close_codes[DRAINING] for stats in (sender, receiver) if stats is not None)
    if closes == 0:
        problems.append("no 1012 close seen: the roll missed the window, nothing was tested")
    elif receiver is None or receiver.resumes == 0:
        problems.append("the receiver never resumed with since=: its pod was not drained")
    retried = len(got) - len(distinct)
    summary = f"{len(distinct)}/{count} messages, {closes} 1012 closes, {retried} retried duplicates"
    if problems:
        return False, f"resume check: FAILED: {'; '.join(problems)}. {summary}"
    return True, f"resume check: ok: {summary}"


async def main(base: str, count: int, interval: float, deadline: float) -> int:
    room = f"rollout-{secrets.token_hex(4)}"
    got: list[int] = []
    senders: list[Stats] = []
    receivers: list[Stats] = []
    ready = asyncio.Event()
    resent = 0
    receiver = asyncio.create_task(receive(base, room, count, got, ready, receivers))
    try:
        async with asyncio.timeout(deadline):
            await ready.wait()
            resent = await send(base, room, count, interval, senders)
            await receiver
    except TimeoutError:
        print(f"resume check: the {deadline:.0f}s deadline passed")
    except ChorusError as exc:
        print(f"resume check: a client stopped: {exc!r}")
    finally:
        receiver.cancel()
    sender_stats = senders[0] if senders else None
    receiver_stats = receivers[0] if receivers else None
    ok, line = verdict(count, got, sender_stats, receiver_stats)
    print(line)
    if sender_stats is not None:
        print(f"  sender: {describe(sender_stats)}, {resent} resends")
    if receiver_stats is not None:
        print(f"  receiver: {describe(receiver_stats)}")
    return 0 if ok else 1


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("url", help="Gateway base URL, e.g. ws://127.0.0.1:8080")
    parser.add_argument("count", nargs="?", type=int, default=300, help="messages to send")
    parser.add_argument("interval", nargs="?", type=float, default=0.2, help="seconds between sends")
    parser.add_argument("--deadline", type=float, default=300.0, help="overall seconds for the whole check")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _args(sys.argv[1:])
    sys.exit(asyncio.run(main(args.url, args.count, args.interval, args.deadline)))
