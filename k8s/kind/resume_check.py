"""Rolling-restart check: messages sent during a rollout all arrive, once, at resuming clients.

A sender and a receiver join one room through the Gateway. Both reconnect whenever their socket
closes (1012 when their pod drains) or their handshake is refused (503 from a draining replica,
502/503 from the gateway while endpoints lag), after a jittered exponential backoff that honours
Retry-After. The receiver resumes with `since=<last id>` so the server replays what it missed.
The sender sends COUNT numbered messages at one per INTERVAL seconds (0.2 s stays inside the
default rate limit, 10/s with a burst of 20), retrying any that were not acked.

Exit 0 when the receiver holds every number, in stream order, no message id twice, AND the run
proves a resume: at least one 1012 close was seen and the receiver resumed with `since=`.
A roll that missed the window (no 1012) fails: it tested nothing. Both clients stop at the
overall deadline; what is missing then is reported.

Usage: python k8s/kind/resume_check.py ws://127.0.0.1:8080 [COUNT] [INTERVAL] [--deadline S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

DRAINING = 1012
# Handshake statuses worth retrying: the replica drains or is full (503), the gateway has no
# ready endpoint yet (502, 503, 504), or the per-user connection cap (429) until a socket closes.
RETRYABLE_STATUSES = {429, 502, 503, 504}


@dataclass
class Backoff:
    """Jittered exponential backoff: base * 2**n, capped, times a random factor in [0.5, 1]."""

    base: float = 0.1
    cap: float = 5.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self, retry_after: float | None = None) -> float:
        delay = min(self.cap, self.base * 2.0**self.attempt) * self.rng.uniform(0.5, 1.0)
        self.attempt += 1
        # The server's Retry-After wins when it asks for longer (never beyond the cap).
        return max(delay, min(retry_after, self.cap)) if retry_after is not None else delay

    def reset(self) -> None:
        self.attempt = 0


def retry_after(exc: BaseException) -> float | None:
    """Seconds from a refused handshake's Retry-After header (delta-seconds form), if any."""
    if isinstance(exc, InvalidStatus):
        value = exc.response.headers.get("Retry-After")
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: fall back to our own backoff
    return None


def retryable(exc: BaseException) -> bool:
    """Whether a failed connect or a lost socket is worth another attempt."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code in RETRYABLE_STATUSES
    return isinstance(exc, (InvalidHandshake, ConnectionClosed, OSError, TimeoutError))


def _id_key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Tally:
    """What the receiver got, deduplicated by message id, and the proof that it resumed."""

    count: int
    ids: dict[str, int] = field(default_factory=dict)  # message id -> number, arrival order
    duplicate_ids: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    closes_1012: int = 0
    since_resumes: int = 0
    replayed: int = 0
    refused_handshakes: int = 0

    def add(self, message_id: str, number: int, *, replayed: bool = False) -> None:
        if message_id in self.ids:
            self.duplicate_ids.append(message_id)
            return
        if self.ids and _id_key(message_id) < _id_key(next(reversed(self.ids))):
            self.out_of_order.append(message_id)
        self.ids[message_id] = number
        self.replayed += replayed

    @property
    def last_id(self) -> str:
        return next(reversed(self.ids)) if self.ids else ""

    def numbers(self) -> list[int]:
        return list(self.ids.values())

    def missing(self) -> list[int]:
        return sorted(set(range(self.count)) - set(self.ids.values()))

    def retried(self) -> int:
        """Numbers that arrived under two ids: an unacked send that reached Redis, then a retry."""
        return len(self.ids) - len(set(self.ids.values()))

    def complete(self) -> bool:
        return not self.missing()

    def verdict(self, sender_1012: int = 0) -> tuple[bool, str]:
        closes = self.closes_1012 + sender_1012
        problems = []
        if self.missing():
            problems.append(f"{len(self.missing())} missing, first {self.missing()[:20]}")
        if self.duplicate_ids:
            problems.append(
                f"{len(self.duplicate_ids)} message ids delivered twice, first {self.duplicate_ids[:5]}"
            )
        if self.out_of_order:
            problems.append(f"{len(self.out_of_order)} out of stream order, first {self.out_of_order[:5]}")
        if closes == 0:
            problems.append("no 1012 close seen: the roll missed the window, nothing was tested")
        elif self.since_resumes == 0:
            problems.append("the receiver never resumed with since=: its pod was not drained")
        summary = (
            f"{len(set(self.numbers()))}/{self.count} messages, {closes} 1012 closes "
            f"(receiver {self.closes_1012}, sender {sender_1012}), {self.since_resumes} since= resumes, "
            f"{self.replayed} replayed, {self.refused_handshakes} refused handshakes retried, "
            f"{self.retried()} retried duplicates"
        )
        if problems:
            return False, f"resume check: FAILED: {'; '.join(problems)}. {summary}"
        return True, f"resume check: ok: {summary}"


@dataclass
class SenderState:
    acked_at: dict[str, float] = field(default_factory=dict)  # message id -> monotonic ack time
    closes_1012: int = 0
    refused_handshakes: int = 0
    done: bool = False


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


async def _pause(backoff: Backoff, exc: BaseException, deadline: float) -> None:
    await asyncio.sleep(max(0.0, min(backoff.next_delay(retry_after(exc)), _remaining(deadline))))


async def receive(base: str, room: str, tally: Tally, sender: SenderState, deadline: float) -> None:
    backoff = Backoff()
    while not tally.complete() and _remaining(deadline) > 0:
        resuming = bool(tally.last_id)
        query = f"since={tally.last_id}" if resuming else "history=0"
        opened = time.monotonic()
        try:
            async with connect(f"{base}/ws/{room}?username=receiver&{query}", open_timeout=10) as ws:
                backoff.reset()
                tally.since_resumes += resuming
                while not tally.complete():
                    frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, _remaining(deadline))))
                    if frame.get("type") == "message":
                        # Acked before this socket opened: it can only have come from the replay.
                        replayed = resuming and sender.acked_at.get(frame["id"], opened) < opened
                        tally.add(frame["id"], int(frame["text"]), replayed=replayed)
                    elif frame.get("type") == "resync":
                        print(f"receiver: resync after {tally.last_id}: the replay could not cover the gap")
                        return
        except ConnectionClosed as exc:
            tally.closes_1012 += exc.rcvd is not None and exc.rcvd.code == DRAINING
            await _pause(backoff, exc, deadline)
        except Exception as exc:
            if not retryable(exc):
                raise
            tally.refused_handshakes += isinstance(exc, InvalidHandshake)
            await _pause(backoff, exc, deadline)


async def send(
    base: str, room: str, count: int, interval: float, state: SenderState, deadline: float
) -> None:
    backoff = Backoff()
    number = 0
    while number < count and _remaining(deadline) > 0:
        try:
            async with connect(f"{base}/ws/{room}?username=sender&history=0", open_timeout=10) as ws:
                await asyncio.wait_for(ws.recv(), 10)  # welcome
                backoff.reset()
                while number < count and _remaining(deadline) > 0:
                    client_id = str(number)
                    await ws.send(json.dumps({"type": "message", "text": client_id, "client_id": client_id}))
                    while True:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                        if frame.get("type") == "ack" and frame.get("client_id") == client_id:
                            state.acked_at[frame["id"]] = time.monotonic()
                            number += 1
                            break
                        if frame.get("type") == "error" and frame.get("client_id") in (client_id, None):
                            # Not sent (rate_limited, unavailable): the same number again, later.
                            await asyncio.sleep(backoff.next_delay())
                            break
                    await asyncio.sleep(interval)
        except ConnectionClosed as exc:
            state.closes_1012 += exc.rcvd is not None and exc.rcvd.code == DRAINING
            await _pause(backoff, exc, deadline)
        except Exception as exc:
            if not retryable(exc):
                raise
            state.refused_handshakes += isinstance(exc, InvalidHandshake)
            await _pause(backoff, exc, deadline)
    state.done = number >= count


async def main(base: str, count: int, interval: float, deadline_seconds: float) -> int:
    room = f"rollout-{secrets.token_hex(4)}"
    deadline = time.monotonic() + deadline_seconds
    tally = Tally(count)
    state = SenderState()
    receiver = asyncio.create_task(receive(base, room, tally, state, deadline))
    await asyncio.sleep(1)  # the receiver joins first, so it is live for message 0
    await send(base, room, count, interval, state, deadline)
    if not state.done:
        print(f"sender: stopped at the deadline ({deadline_seconds:.0f} s) before sending all {count}")
    # The receiver gets a little longer than the sender, to drain what is in flight.
    try:
        await asyncio.wait_for(receiver, max(5.0, _remaining(deadline)))
    except TimeoutError:
        pass
    tally.refused_handshakes += state.refused_handshakes
    ok, report = tally.verdict(sender_1012=state.closes_1012)
    print(report)
    return 0 if ok and state.done else 1


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="Gateway base URL, e.g. ws://127.0.0.1:8080")
    parser.add_argument("count", nargs="?", type=int, default=300, help="messages to send")
    parser.add_argument("interval", nargs="?", type=float, default=0.2, help="seconds between sends")
    parser.add_argument("--deadline", type=float, default=300.0, help="overall seconds for the whole check")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _args(sys.argv[1:])
    sys.exit(asyncio.run(main(args.url, args.count, args.interval, args.deadline)))
