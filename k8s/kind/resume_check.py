"""Rolling-restart check: messages sent during a rollout all arrive, once, at resuming clients.

A sender and a receiver join one room through the Gateway. Both reconnect whenever their socket
closes (1012 when their pod drains), the receiver with `since=<last id>` so the server replays
what it missed. The sender sends COUNT numbered messages, retrying any that were not acked. Exit
0 when the receiver holds every number exactly once, in order; 1 otherwise.

Usage: python k8s/kind/resume_check.py ws://127.0.0.1:8080 [COUNT] [INTERVAL_SECONDS]
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def receive(base: str, room: str, count: int, got: list[int], done: asyncio.Event) -> None:
    last = ""
    while not done.is_set():
        query = f"since={last}" if last else "history=0"
        try:
            async with connect(f"{base}/ws/{room}?username=receiver&{query}") as ws:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("type") == "message":
                        last = frame["id"]
                        got.append(int(frame["text"]))
                        if len(set(got)) >= count:
                            done.set()
                            return
        except (ConnectionClosed, OSError):
            await asyncio.sleep(0.2)


async def send(base: str, room: str, count: int, interval: float) -> None:
    number = 0
    while number < count:
        try:
            async with connect(f"{base}/ws/{room}?username=sender&history=0") as ws:
                await ws.recv()  # welcome
                while number < count:
                    await ws.send(
                        json.dumps({"type": "message", "text": str(number), "client_id": str(number)})
                    )
                    while True:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                        if frame.get("type") == "ack" and frame.get("client_id") == str(number):
                            number += 1
                            break
                        if frame.get("type") == "error":
                            await asyncio.sleep(0.5)  # not sent: retry the same number
                            break
                    await asyncio.sleep(interval)
        except (ConnectionClosed, OSError, TimeoutError):
            await asyncio.sleep(0.2)


async def main(base: str, count: int, interval: float) -> int:
    room = f"rollout-{secrets.token_hex(4)}"
    got: list[int] = []
    done = asyncio.Event()
    receiver = asyncio.create_task(receive(base, room, count, got, done))
    await asyncio.sleep(1)
    await send(base, room, count, interval)
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        pass
    receiver.cancel()
    # An unacked send that did reach Redis is retried and may arrive twice; that is the one
    # duplicate a client without idempotency keys can see, so count distinct numbers in order.
    distinct = list(dict.fromkeys(got))
    if distinct != list(range(count)):
        missing = sorted(set(range(count)) - set(got))
        print(
            f"resume check: FAILED: {len(missing)} missing, first {missing[:20]}; "
            f"in order: {distinct == sorted(distinct)}"
        )
        return 1
    print(f"resume check: ok: {count} messages across the rollout, {len(got) - count} retried duplicates")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(
        asyncio.run(
            main(args[0], int(args[1]) if len(args) > 1 else 300, float(args[2]) if len(args) > 2 else 0.1)
        )
    )
