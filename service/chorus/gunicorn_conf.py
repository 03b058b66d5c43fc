"""gunicorn settings for `chorus serve --workers N`, read from the environment.

`chorus serve` sets CHORUS_BIND, CHORUS_WORKERS and PROMETHEUS_MULTIPROC_DIR before it
starts gunicorn with this file; the drain window comes from CHORUS_DRAIN_SECONDS.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from chorus.config import load_settings

_settings = load_settings()

bind = os.environ.get("CHORUS_BIND", "0.0.0.0:8000")
workers = _settings.workers
worker_class = "chorus.server.ChorusWorker"
# Heartbeat files on tmpfs: a worker blocked on a slow disk is not a dead worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# The master waits this long for workers to drain before it kills them.
graceful_timeout = int(_settings.drain_seconds) + 10
timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level
proc_name = f"chorus-{_settings.replica_name}"


def on_starting(server: Any) -> None:
    """Start every run with an empty metrics directory: stale files would be summed in."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        Path(path).mkdir(parents=True, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    from chorus.metrics import mark_process_dead

    mark_process_dead(worker.pid)
