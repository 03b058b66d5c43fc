"""The seed's naive design, kept minimal as the benchmark's baseline.

One `broadcast.subscribe(room)` per WebSocket and every message parsed and re-serialised once
per subscriber, on broadcaster 0.3.1's stock Redis backend (redis-py 7.x). It speaks the same
frames as Chorus (welcome, message, ack) so one load generator drives both; it has none of
Chorus's guarantees (no stream ids, no history, no bounded queues). Served by the same uvicorn
with the same options, so a difference in the numbers is the design's, not the server's.

Run from its own venv (see requirements.txt): `uvicorn --app-dir loadtest/baselines naive:app`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

REPLICA = os.environ.get("CHORUS_REPLICA_NAME", "baseline")
broadcast = Broadcast(os.environ["CHORUS_REDIS_URL"])
ids = itertools.count()


def dumps(value: object) -> str:
    # Compact, like Chorus's frames, so both put the same bytes on the wire.
    return json.dumps(value, separators=(",", ":"))


async def readyz(request: object) -> JSONResponse:
    return JSONResponse({"status": "ready", "replica": REPLICA})


async def room_socket(websocket: WebSocket) -> None:
    room = websocket.path_params["room"]
    user = websocket.query_params.get("username", "anon")
    me = uuid.uuid4().hex
    channel = f"room:{room}"
    await websocket.accept()
    async with broadcast.subscribe(channel) as subscriber:
        welcome = {"type": "welcome", "room": room, "user": user, "replica": REPLICA}
        await websocket.send_text(dumps(welcome))

        async def relay() -> None:
            while True:
                event = await subscriber.get()  # raises Unsubscribed when the subscription ends
                message = json.loads(event.message)  # once per subscriber: the naive part
                if message.pop("sender") != me:
                    await websocket.send_text(dumps(message))

        relay_task = asyncio.create_task(relay())
        try:
            while True:
                body = json.loads(await websocket.receive_text())
                msg_id = f"{REPLICA}-{next(ids)}"
                message = {
                    "type": "message", "id": msg_id, "ts": time.time(), "room": room,
                    "user": user, "text": body["text"], "replica": REPLICA, "sender": me,
                }  # fmt: skip
                await broadcast.publish(channel, dumps(message))
                await websocket.send_text(dumps({"type": "ack", "id": msg_id}))
        except WebSocketDisconnect:
            pass
        finally:
            relay_task.cancel()


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    yield
    await broadcast.disconnect()


app = Starlette(
    routes=[Route("/readyz", readyz), WebSocketRoute("/ws/{room}", room_socket)],
    lifespan=lifespan,
)
