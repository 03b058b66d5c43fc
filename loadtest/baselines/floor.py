"""The server stack's own floor: a bare ASGI app on the same uvicorn, for idle memory only.

It accepts a WebSocket, says welcome and waits: what uvicorn, its websockets-sansio protocol
and the event loop cost per idle connection before any application code (no Starlette, no
broadcaster). Served from the baseline's venv with the options Chorus uses.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


async def app(scope: Message, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":  # /readyz and anything else
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ready"})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": '{"type":"welcome"}'})
    while (await receive())["type"] != "websocket.disconnect":
        pass
