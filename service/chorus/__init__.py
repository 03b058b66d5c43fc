"""Chorus: a real-time chat service whose stateless replicas fan out through Redis pub/sub."""

from __future__ import annotations

__version__ = "0.1.0"

from .app import create_app
from .config import Settings, SettingsError, load_settings

__all__ = ["Settings", "SettingsError", "__version__", "create_app", "load_settings"]
