"""The app factory: HTTP and WebSocket routes over a lifespan-owned broker, hub and probe."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__, metrics
from .api import create_api_router
from .broker import BrokerUnavailable, create_broker
from .config import Settings, load_settings
from .deadlines import Deadlines
from .health import Health
from .hub import Hub
from .keepalive import Keepalive
from .limits import create_user_limiter
from .logs import configure_logging
from .presence import create_presence
from .protocol import API_HISTORY_DEFAULT, API_HISTORY_MAX, REJECT_BAD_REQUEST, ROOM_RULE, is_room, user_key
from .rebalance import Rebalancer
from .runtime import Runtime, State, lifespan_state, runtime_of
from .security import Gatekeeper, Identity, Rejection
from .session import is_chat_socket, serve_chat_socket

log = logging.getLogger("chorus.app")

STATIC_DIR = Path(__file__).parent / "static"
MY_ROOMS_MAX = 200  # rooms listed by /api/me/rooms: one bounded XRANGE each


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ASGI app; every test can build its own with its own settings."""
    settings = settings or load_settings()
    gatekeeper = Gatekeeper(settings)  # one for the WebSocket handshakes and the HTTP routes
    # The replica's long-lived parts, built once here from one Settings: one broker (the
    # process's one Redis resource, from the settings' one parsed Topology), and what uses it.
    # The lifespan only starts and stops them.
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
    hub = Hub(
        broker,
        join_timeout=5.0,
        replay_limit=settings.history_size,
        coalesce_seconds=settings.coalesce_seconds,
        presence_interval=settings.presence_interval_seconds,
        presence_max_members=settings.presence_max_members,
    )
    # Presence entries are named by connection tag, so they share the tags' prefix.
    tag_prefix = secrets.token_hex(4).encode()
    presence = create_presence(settings, broker, owner=tag_prefix.decode())
    limiter = create_user_limiter(settings, broker)
    rebalancer = Rebalancer(
        broker,
        hub,
        health,
        process=tag_prefix.decode(),
        interval=settings.presence_heartbeat_seconds,
        tolerance=settings.rebalance_tolerance,
        rate=settings.rebalance_rate,
        settle=settings.rebalance_settle_seconds,
        refuse=settings.rebalance_refuse,
    )
    keepalive = Keepalive(settings.ping_interval_seconds, settings.ping_timeout_seconds)
    deadlines = Deadlines()
    runtime = Runtime(
        settings,
        broker,
        hub,
        health,
        presence,
        gatekeeper,
        limiter,
        keepalive,
        deadlines,
        tag_prefix=tag_prefix,
        rebalancer=rebalancer,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        configure_logging(settings)
        await broker.start()
        await presence.start()
        await limiter.start()
        await rebalancer.start()
        probe = asyncio.create_task(health.run(), name="chorus-probe")
        gauges = asyncio.create_task(_sample_gauges(runtime), name="chorus-gauges")
        control = asyncio.create_task(hub.run_control(), name="chorus-control")
        log.info(
            "chorus %s replica %s serving with broker %s",
            __version__,
            settings.replica_name,
            settings.redis_url_redacted,
        )
        try:
            yield lifespan_state(runtime)
        finally:
            for task in (probe, gauges, control):
                task.cancel()
            # Each step is bounded: a stuck client library must not turn a clean stop into a kill.
            await _bounded("probe and gauges", asyncio.gather(probe, gauges, control, return_exceptions=True))
            await _bounded("rebalancing", rebalancer.stop())
            await _bounded("presence", presence.stop())
            await _bounded("connection leases", limiter.stop())
            keepalive.stop()
            deadlines.stop()
            await _bounded("rooms", hub.close())
            await _bounded("broker", broker.stop())

    app = ChorusApp(
        title="Chorus", version=__version__, lifespan=lifespan, docs_url="/api/docs", redoc_url=None
    )
    # WebSocket /ws/{room} (protocol in README): served by ChorusApp itself, ahead of all this.
    app.add_middleware(ApiHosts, gatekeeper=gatekeeper)

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

    @app.get("/api/rooms/{room}/history", dependencies=[Depends(reader)])
    async def history(
        request: Request,
        room: str,
        limit: int = Query(API_HISTORY_DEFAULT, ge=1, le=API_HISTORY_MAX),
    ) -> Response:
        try:
            frames = await runtime_of(request).broker.latest(room, limit)
        except BrokerUnavailable:
            return JSONResponse({"detail": "the broker is unavailable"}, status_code=503)
        body = b'{"room":%s,"messages":[%s]}' % (orjson.dumps(room), b",".join(frames))
        return Response(body, media_type="application/json")

    @app.get("/api/rooms/{room}/presence", dependencies=[Depends(reader)])
    async def presence_endpoint(request: Request, room: str) -> JSONResponse:
        try:
            users = await runtime_of(request).presence.users(room)
        except BrokerUnavailable:
            return JSONResponse({"detail": "the broker is unavailable"}, status_code=503)
        return JSONResponse({"room": room, "online": len(users), "users": users})

    @app.get("/api/me/rooms")
    async def my_rooms(request: Request) -> JSONResponse:
        """The rooms the caller has joined: read marker and unread count (capped at 1000) each."""
        runtime = runtime_of(request)
        try:
            identity = runtime.gatekeeper.identify_caller(request.headers, request.query_params)
        except Rejection as rejection:
            raise RoomReadRefused(rejection) from None
        try:
            markers = await runtime.broker.read_markers(user_key(identity.user))
            rooms = [
                {"room": room, "last_read": marker, "unread": await runtime.broker.unread(room, marker)}
                for room, marker in sorted(markers.items())[:MY_ROOMS_MAX]
                if identity.may_enter(room)
            ]
        except BrokerUnavailable:
            return JSONResponse({"detail": "the broker is unavailable"}, status_code=503)
        return JSONResponse({"rooms": rooms})

    app.include_router(create_api_router(settings))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(RoomReadRefused, _refused)

    return app


class ChorusApp(FastAPI):
    """FastAPI that serves `/ws/{room}` itself, before its middleware stack (chorus.session)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_chat_socket(scope):
            await serve_chat_socket(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


async def _bounded(what: str, step: Awaitable[Any], timeout: float = 3.0) -> None:
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        log.error("shutdown: stopping %s took over %.0fs; going on", what, timeout)


class RoomReadRefused(Exception):
    """A read of a room refused before any Redis work; answered by `_refused`."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.detail)
        self.rejection = rejection


async def reader(request: Request, room: str) -> Identity:
    """Every HTTP read of a room passes here first: the room's name, then the WebSocket's auth rules."""
    try:
        if not is_room(room):
            raise Rejection(400, REJECT_BAD_REQUEST, ROOM_RULE)
        return runtime_of(request).gatekeeper.identify_reader(request.headers, request.query_params, room)
    except Rejection as rejection:
        raise RoomReadRefused(rejection) from None


def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RoomReadRefused)
    rejection = exc.rejection
    metrics.REJECTIONS.labels(rejection.reason).inc()
    headers = {"WWW-Authenticate": 'Bearer realm="chorus"'} if rejection.status == 401 else None
    return JSONResponse({"detail": rejection.detail}, status_code=rejection.status, headers=headers)


class ApiHosts:
    """CHORUS_ALLOWED_HOSTS for /api/*: a Host not served gets 400 (WebSockets check it in the handshake).

    /livez, /readyz and /metrics stay open to any Host: kubelet and Prometheus reach pods by IP.
    """

    def __init__(self, app: ASGIApp, *, gatekeeper: Gatekeeper) -> None:
        self.app = app
        self.gatekeeper = gatekeeper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            try:
                self.gatekeeper.check_host(Headers(scope=scope))
            except Rejection as rejection:
                metrics.REJECTIONS.labels(rejection.reason).inc()
                response = JSONResponse({"detail": rejection.detail}, status_code=rejection.status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
