"""`chorus smoke`: prove cross-replica fan-out through a load balancer, end to end.

Opens connections until it holds two on different replicas (as their welcome frames say),
sends a message on one and requires it on the other. Used by `helm test` and by hand. It
speaks through `chorus.client` with reconnecting turned off: a smoke test must not hide a
dropped socket behind a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

from .client import ChorusError, Disconnected, HandshakeRefused, Message, Reconnect, Room, connect

ONE_ATTEMPT = Reconnect(max_attempts=0)


class SmokeFailure(Exception):
    pass


async def run_smoke(url: str, *, attempts: int = 20, timeout: float = 10.0) -> str:
    """Return a one-line success report or raise SmokeFailure with the reason."""
    room = f"smoke-{secrets.token_hex(4)}"
    base = url.rstrip("/")
    async with contextlib.AsyncExitStack() as stack:
        held: dict[str, Room] = {}
        for attempt in range(attempts):
            try:
                member = await asyncio.wait_for(
                    stack.enter_async_context(
                        connect(
                            base,
                            room,
                            username=f"smoke-{attempt}",
                            history=0,
                            reconnect=ONE_ATTEMPT,
                            open_timeout=timeout,
                            send_timeout=timeout,
                        )
                    ),
                    timeout * 2,
                )
            except HandshakeRefused as exc:
                raise SmokeFailure(f"handshake with {base} refused: {exc.status} {exc.detail}") from exc
            except (Disconnected, TimeoutError) as exc:
                raise SmokeFailure(f"cannot open a WebSocket to {base}: {exc}") from exc
            held.setdefault(str(member.replica), member)
            if len(held) >= 2:
                break
        if len(held) < 2:
            raise SmokeFailure(
                f"{attempts} connections all landed on {sorted(held)}: need two replicas behind {base}"
            )
        (sender_replica, sender), (receiver_replica, receiver) = list(held.items())[:2]
        token = f"smoke {secrets.token_hex(8)}"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await sender.send(token, client_id="smoke")
                async for event in receiver:
                    if isinstance(event, Message) and event.text == token:
                        elapsed = (time.perf_counter() - started) * 1000
                        return f"ok: {sender_replica} -> {receiver_replica} in {elapsed:.1f} ms"
        except TimeoutError as exc:
            raise SmokeFailure(f"no answer within {timeout}s") from exc
        except ChorusError as exc:
            raise SmokeFailure(f"{sender_replica} -> {receiver_replica}: {exc}") from exc
        raise SmokeFailure(f"message sent on {sender_replica} never reached {receiver_replica}")
