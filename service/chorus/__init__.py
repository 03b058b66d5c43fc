"""Chorus: a real-time chat service whose stateless replicas fan out through Redis pub/sub."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .app import create_app
    from .config import Settings, SettingsError, load_settings

__all__ = ["Settings", "SettingsError", "__version__", "create_app", "load_settings"]


def __getattr__(name: str) -> object:
    # Imported on first use, so `import chorus.client` (a bot, `chorus smoke`) does not load
    # FastAPI, Redis and Prometheus: 1.5 s of a 1.7 s import before this.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("Settings", "SettingsError", "load_settings"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'chorus' has no attribute {name!r}")
