"""Process management: uvicorn that drains on SIGTERM, and the same as a gunicorn worker.

Uvicorn's own shutdown stops listening at once, closes every socket together and exits 143.
Chorus owns its shutdown instead: on SIGTERM it keeps serving HTTP (`/readyz` says draining),
refuses new WebSockets, closes open ones with 1012 spread over `CHORUS_DRAIN_SECONDS`, then
stops uvicorn and exits 0. A second SIGTERM or a SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import Any, ClassVar

import uvicorn
from uvicorn_worker import UvicornWorker

from .config import Settings
from .httpguard import HeadLimits, guarded_http
from .runtime import runtime_in

log = logging.getLogger("chorus.server")

# uvicorn settings Chorus relies on: uvloop + httptools, websockets' sans-I/O protocol (its
# send() waits while the socket's buffer is full, which is what makes slow readers visible),
# and no permessage-deflate (memory and compression side channels).
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "ws": "websockets-sansio",
    "ws_per_message_deflate": False,
    "lifespan": "on",
    "proxy_headers": True,
    "server_header": False,
}


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn settings that come from Chorus settings."""
    limits = HeadLimits(
        head_timeout=settings.handshake_timeout_seconds,
        max_pending=settings.max_pending_connections,
        max_url_bytes=settings.max_url_bytes,
        max_header_bytes=settings.max_header_bytes,
    )
    return {
        # The guarded protocol under uvicorn and under every gunicorn worker (ChorusWorker).
        "http": guarded_http(limits),
        # uvicorn arms this when a response ends; any byte cancels it, and the head deadline
        # (which keeps running) takes over. gunicorn's `keepalive` is overridden by this.
        "timeout_keep_alive": min(settings.keep_alive_timeout_seconds, settings.handshake_timeout_seconds),
        "ws_max_size": settings.max_frame_bytes,
        # uvicorn's own keepalive covers a socket only until chorus.keepalive takes it over
        # right after its accept (and any socket the pinned-uvicorn fast path cannot reach).
        "ws_ping_interval": settings.ping_interval_seconds,
        "ws_ping_timeout": settings.ping_timeout_seconds,
        "timeout_graceful_shutdown": 5,
    }


class ChorusServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM drains the app before it stops."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._drain_task is not None or not self.started:
            super().handle_exit(sig, frame)
            return
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            runtime = runtime_in(self.lifespan.state) if hasattr(self, "lifespan") else None
            if runtime is not None:
                await runtime.drain()
        except Exception:
            log.exception("drain failed; stopping now")
        self.should_exit = True


def serve_uvicorn(settings: Settings, *, host: str, port: int) -> None:
    """Run one process: uvicorn with the Chorus app, draining on SIGTERM."""
    from .app import create_app

    options = {**UVICORN_OPTIONS, **server_options(settings)}
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_config=None, **options)
    ChorusServer(config).run()


class ChorusWorker(UvicornWorker):
    """gunicorn worker running ChorusServer, so every worker drains on SIGTERM."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        key: value for key, value in UVICORN_OPTIONS.items() if key != "proxy_headers"
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from .config import load_settings

        # The worker's one read of the environment: its server options and its app both use it.
        self.settings = load_settings()
        for key, value in server_options(self.settings).items():
            setattr(self.config, key, value)

    def load_wsgi(self) -> None:
        """Build the app from this worker's settings (not gunicorn's `chorus.app:create_app()`,
        which would read the environment a second time)."""
        from .app import create_app

        self.wsgi = create_app(self.settings)

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = ChorusServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(3)  # gunicorn's WORKER_BOOT_ERROR
