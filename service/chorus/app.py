"""The app factory: HTTP and WebSocket routes over a lifespan-owned broker, hub and probe."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.websockets import WebSocketState

from . import __version__, metrics
from .broker import Broker, BrokerUnavailable, create_broker
from .config import Settings, load_settings
from .health import Health
from .hub import Connection, Hub
from .logs import configure_logging
from .presence import Member, Presence, create_presence
from .protocol import (
    API_HISTORY_DEFAULT,
    API_HISTORY_MAX,
    CLOSE_INTERNAL_ERROR,
    CLOSE_SERVICE_RESTART,
    CLOSE_UNSUPPORTED_DATA,
    DEFAULT_HISTORY,
    ERROR_UNAVAILABLE,
    MAX_HISTORY,
    ROOM_RE,
    USERNAME_RE,
    ProtocolError,
    ack_frame,
    error_frame,
    message_tail,
    parse_client_frame,
    parse_since,
    welcome_frame,
)
from .sockets import CaptureRawSend, close_now

log = logging.getLogger("chorus.app")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class Runtime:
    """The replica's long-lived parts, built in the lifespan."""

    settings: Settings
    broker: Broker
    hub: Hub
    health: Health
    presence: Presence
    tag_prefix: bytes = field(default_factory=lambda: secrets.token_hex(4).encode())
    _tags: itertools.count[int] = field(default_factory=itertools.count)
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def next_tag(self) -> bytes:
        return b"%s.%d" % (self.tag_prefix, next(self._tags))

    async def drain(self) -> None:
        """Stop taking sockets, close open ones with 1012 spread over the drain window."""
        if self.health.draining:
            await self._drained.wait()
            return
        self.health.draining = True
        window = self.settings.drain_seconds
        conns = list(self.hub.connections)
        log.info("draining: closing %d WebSockets over %.1fs", len(conns), window)
        # Spread the closes so the clients' reconnects do not land on the other replicas at once.
        delays = sorted(random.uniform(0, window) for _ in conns)
        started = time.monotonic()
        random.shuffle(conns)
        for conn, delay in zip(conns, delays, strict=True):
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
            conn.close_after_flush(CLOSE_SERVICE_RESTART, "replica draining")
        deadline = time.monotonic() + 5.0
        while self.hub.connections and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.05)
        for conn in list(self.hub.connections):
            conn.close(CLOSE_SERVICE_RESTART, "replica draining")
        log.info("drain complete")
        self._drained.set()


class State(TypedDict):
    chorus: Runtime


def runtime_of(conn: Request | WebSocket) -> Runtime:
    runtime: Runtime = conn.state.chorus
    return runtime


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ASGI app; every test can build its own with its own settings."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        configure_logging(settings)
        health: Health | None = None

        def connection_changed(up: bool) -> None:
            if health is not None:
                health.connection_changed(up)

        broker = create_broker(settings, on_connection_change=connection_changed)
        health = Health(
            broker,
            replica=settings.replica_name,
            interval=settings.probe_interval_seconds,
            timeout=settings.probe_timeout_seconds,
        )
        hub = Hub(broker, join_timeout=5.0, replay_limit=settings.history_size)
        # Presence entries are named by connection tag, so they share the tags' prefix.
        tag_prefix = secrets.token_hex(4).encode()
        presence = create_presence(settings, broker, owner=tag_prefix.decode())
        runtime = Runtime(settings, broker, hub, health, presence, tag_prefix=tag_prefix)
        await broker.start()
        await presence.start()
        probe = asyncio.create_task(health.run(), name="chorus-probe")
        gauges = asyncio.create_task(_sample_gauges(runtime), name="chorus-gauges")
        log.info(
            "chorus %s replica %s serving with broker %s",
            __version__,
            settings.replica_name,
            settings.redis_url_redacted,
        )
        try:
            yield {"chorus": runtime}
        finally:
            for task in (probe, gauges):
                task.cancel()
            # Each step is bounded: a stuck client library must not turn a clean stop into a kill.
            await _bounded("probe and gauges", asyncio.gather(probe, gauges, return_exceptions=True))
            await _bounded("presence", presence.stop())
            await _bounded("rooms", hub.close())
            await _bounded("broker", broker.stop())

    app = FastAPI(
        title="Chorus", version=__version__, lifespan=lifespan, docs_url="/api/docs", redoc_url=None
    )
    app.add_middleware(CaptureRawSend)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        runtime = runtime_of(request)
        if runtime.health.ready:
            return JSONResponse({"status": "ready", "replica": settings.replica_name})
        return JSONResponse(
            {
                "status": "not ready",
                "reason": runtime.health.why_not_ready(),
                "replica": settings.replica_name,
            },
            status_code=503,
        )

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/api/rooms/{room}/history")
    async def history(
        request: Request,
        room: str,
        limit: int = Query(API_HISTORY_DEFAULT, ge=1, le=API_HISTORY_MAX),
    ) -> Response:
        if not ROOM_RE.match(room):
            return _bad_room()
        try:
            entries = await runtime_of(request).broker.recent(room, limit)
        except BrokerUnavailable:
            return JSONResponse({"detail": "the broker is unavailable"}, status_code=503)
        body = b'{"room":"%s","messages":[%s]}' % (room.encode(), b",".join(e.frame for e in entries))
        return Response(body, media_type="application/json")

    @app.get("/api/rooms/{room}/presence")
    async def presence_endpoint(request: Request, room: str) -> JSONResponse:
        if not ROOM_RE.match(room):
            return _bad_room()
        try:
            users = await runtime_of(request).presence.users(room)
        except BrokerUnavailable:
            return JSONResponse({"detail": "the broker is unavailable"}, status_code=503)
        return JSONResponse({"room": room, "online": len(users), "users": users})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.websocket("/ws/{room}")
    async def websocket_room(websocket: WebSocket, room: str) -> None:
        await _serve_socket(websocket, room, runtime_of(websocket))

    return app


async def _bounded(what: str, step: Awaitable[Any], timeout: float = 3.0) -> None:
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        log.error("shutdown: stopping %s took over %.0fs; going on", what, timeout)


def _bad_room() -> JSONResponse:
    return JSONResponse({"detail": f"room must match {ROOM_RE.pattern}"}, status_code=400)


async def _deny(websocket: WebSocket, status: int, detail: str) -> None:
    await websocket.send_denial_response(JSONResponse({"detail": detail}, status_code=status))


async def _serve_socket(websocket: WebSocket, room: str, runtime: Runtime) -> None:
    settings = runtime.settings
    params = websocket.query_params
    if not ROOM_RE.match(room):
        return await _deny(websocket, 400, f"room must match {ROOM_RE.pattern}")
    user = params.get("username") or f"anon-{secrets.token_hex(2)}"
    if not USERNAME_RE.match(user):
        return await _deny(websocket, 400, f"username must match {USERNAME_RE.pattern}")
    try:
        history = int(params.get("history", DEFAULT_HISTORY))
        if not 0 <= history <= MAX_HISTORY:
            raise ValueError
    except ValueError:
        return await _deny(websocket, 400, f"history must be a whole number from 0 to {MAX_HISTORY}")
    if runtime.health.draining:
        return await _deny(websocket, 503, "this replica is draining; reconnect")
    resume = "since" in params
    since = parse_since(params.get("since"))

    await websocket.accept()
    metrics.CONNECTIONS.inc()
    metrics.CONNECTIONS_OPENED.inc()
    conn = Connection(
        room=room,
        user=user,
        tag=runtime.next_tag(),
        limit=settings.send_queue_size,
        send=websocket.send_text,
        close=lambda code, reason: _close(websocket, code, reason),
    )
    conn.start()
    close_code: Any = "none"
    hub = runtime.hub
    member = Member(room, user, conn.tag.decode())
    try:
        try:
            await hub.join(conn)
            online = await runtime.presence.join(member)
            conn.offer(welcome_frame(room, user, settings.replica_name, online), force=True)
            await hub.replay(conn, since=since, resume=resume, history=history)
        except BrokerUnavailable as exc:
            log.warning("cannot join %s: %s", room, exc)
            conn.close(CLOSE_INTERNAL_ERROR, "broker unavailable")
        while not conn.closing:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                close_code = message.get("code", 1005)
                break
            text = message.get("text")
            if text is None:
                conn.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported")
                break
            await _handle_text(runtime, conn, text)
    finally:
        hub.leave(conn)
        await runtime.presence.leave(member)
        if conn.closing and conn.closed_with is not None:
            close_code = conn.closed_with
        await conn.wait_closed()
        metrics.CONNECTIONS.dec()
        metrics.CONNECTIONS_CLOSED.labels(str(close_code)).inc()
        if websocket.application_state == WebSocketState.CONNECTED and not conn.closing:
            try:
                await websocket.close()
            except Exception:  # the peer is gone; nothing to tell it
                pass


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if not close_now(websocket.scope, code, reason):
        await websocket.close(code, reason)


async def _handle_text(runtime: Runtime, conn: Connection, text: str) -> None:
    settings = runtime.settings
    metrics.MESSAGES_RECEIVED.inc()
    try:
        message = parse_client_frame(text, max_message_bytes=settings.max_message_bytes)
    except ProtocolError as exc:
        metrics.MESSAGES_DROPPED.labels(exc.code).inc()
        conn.offer(error_frame(exc.code, exc.detail, exc.client_id))
        return
    tail = message_tail(
        room=conn.room, user=conn.user, text=message.text, ts=time.time(), replica=settings.replica_name
    )
    try:
        msg_id = await runtime.broker.append(conn.room, tail, conn.tag)
    except BrokerUnavailable as exc:
        metrics.MESSAGES_DROPPED.labels(metrics.DROP_BROKER_UNAVAILABLE).inc()
        log.warning("message from %s in %s not sent: %s", conn.user, conn.room, exc)
        conn.offer(
            error_frame(
                ERROR_UNAVAILABLE, "the message was not sent: the broker is unavailable", message.client_id
            )
        )
        return
    metrics.MESSAGES_PUBLISHED.inc()
    conn.offer(ack_frame(msg_id.decode(), message.client_id))


async def _sample_gauges(runtime: Runtime) -> None:
    """Sample the gauges that would cost too much to keep exact on the hot path."""
    reconnects = 0
    while True:
        metrics.SEND_QUEUE_DEPTH.set(runtime.hub.max_queue_depth())
        now = runtime.broker.reconnects
        if now > reconnects:
            metrics.BROKER_RECONNECTS.inc(now - reconnects)
            reconnects = now
        await asyncio.sleep(1.0)
