"""The `chorus` command: serve, dev-cluster, smoke."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

from .config import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chorus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a replica (uvicorn, or gunicorn with --workers > 1)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=None, help="default: CHORUS_WORKERS or 1")

    cluster = commands.add_parser("dev-cluster", help="redis-server + N replicas + round-robin HAProxy")
    cluster.add_argument("--replicas", type=int, default=3)
    cluster.add_argument("--port", type=int, default=8000)
    cluster.add_argument("--workers", type=int, default=1)

    smoke = commands.add_parser("smoke", help="prove a message crosses replicas behind URL")
    smoke.add_argument("--url", required=True, help="e.g. ws://chorus:8000")
    smoke.add_argument("--attempts", type=int, default=20)
    smoke.add_argument("--timeout", type=float, default=10.0)

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.host, args.port, args.workers)
        if args.command == "dev-cluster":
            return _dev_cluster(args.replicas, args.port, args.workers)
        return _smoke(args.url, args.attempts, args.timeout)
    except SettingsError as exc:
        print(f"chorus: error: {exc}", file=sys.stderr)
        return 2


def _serve(host: str, port: int, workers: int | None) -> int:
    overrides = {"workers": workers} if workers is not None else {}
    settings = load_settings(**overrides)
    if settings.workers == 1:
        from .server import serve_uvicorn

        serve_uvicorn(settings, host=host, port=port)
        return 0
    env = dict(os.environ)
    env["CHORUS_WORKERS"] = str(settings.workers)
    env["CHORUS_BIND"] = f"{host}:{port}"
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="chorus-metrics-"))
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:chorus.gunicorn_conf", "chorus.app:create_app()"]
    os.execve(sys.executable, argv, env)


def _dev_cluster(replicas: int, port: int, workers: int) -> int:
    from .devcluster import HarnessError, LocalCluster

    # SIGTERM (e.g. `timeout`, a CI runner) must stop the children too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    cluster = LocalCluster(replicas, port=port, workers=workers)
    try:
        cluster.start()  # stops what it started when it fails
    except HarnessError as exc:
        print(f"chorus: error: {exc}", file=sys.stderr)
        return 1
    print(f"Chorus dev cluster: {replicas} replicas behind {cluster.url}  (Redis {cluster.redis.url})")
    for index in range(replicas):
        print(f"  {cluster.replica_name(index)}: {cluster.replica_url(index)}")
    print(f"logs in {cluster.workdir}; Ctrl-C stops everything")
    try:
        while all(replica.alive() for replica in cluster.replicas):
            time.sleep(0.5)
        print("chorus: a replica exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


def _smoke(url: str, attempts: int, timeout: float) -> int:
    from .smoke import SmokeFailure, run_smoke

    try:
        print(asyncio.run(run_smoke(url, attempts=attempts, timeout=timeout)))
        return 0
    except SmokeFailure as exc:
        print(f"chorus smoke: FAILED: {exc}", file=sys.stderr)
        return 1
