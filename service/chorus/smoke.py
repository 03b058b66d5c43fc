"""`chorus smoke`: prove cross-replica fan-out through a load balancer, end to end.

Opens connections until it holds two on different replicas (as their welcome frames say),
sends a message on one and requires it on the other. Used by `helm test` and by hand.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


class SmokeFailure(Exception):
    pass


async def _recv_json(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    data: dict[str, Any] = json.loads(raw)
    return data


async def run_smoke(url: str, *, attempts: int = 20, timeout: float = 10.0) -> str:
    """Return a one-line success report or raise SmokeFailure with the reason."""
    room = f"smoke-{secrets.token_hex(4)}"
    base = url.rstrip("/")
    held: dict[str, ClientConnection] = {}
    opened: list[ClientConnection] = []
    try:
        for attempt in range(attempts):
            try:
                ws = await asyncio.wait_for(
                    connect(f"{base}/ws/{room}?username=smoke-{attempt}&history=0", open_timeout=timeout),
                    timeout,
                )
            except (OSError, TimeoutError) as exc:
                raise SmokeFailure(f"cannot open a WebSocket to {base}: {exc}") from exc
            except Exception as exc:
                raise SmokeFailure(f"handshake with {base} refused: {exc}") from exc
            opened.append(ws)
            welcome = await _recv_json(ws, timeout)
            if welcome.get("type") != "welcome":
                raise SmokeFailure(f"first frame was not a welcome: {welcome}")
            held.setdefault(str(welcome.get("replica")), ws)
            if len(held) >= 2:
                break
        if len(held) < 2:
            raise SmokeFailure(
                f"{attempts} connections all landed on {sorted(held)}: need two replicas behind {base}"
            )
        (sender_replica, sender), (receiver_replica, receiver) = list(held.items())[:2]
        token = f"smoke {secrets.token_hex(8)}"
        started = time.perf_counter()
        await sender.send(json.dumps({"type": "message", "text": token, "client_id": "smoke"}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = await _recv_json(receiver, max(0.01, deadline - time.monotonic()))
            if frame.get("type") == "message" and frame.get("text") == token:
                elapsed = (time.perf_counter() - started) * 1000
                return f"ok: {sender_replica} -> {receiver_replica} in {elapsed:.1f} ms"
        raise SmokeFailure(f"message sent on {sender_replica} never reached {receiver_replica}")
    except TimeoutError as exc:
        raise SmokeFailure(f"no answer within {timeout}s") from exc
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
