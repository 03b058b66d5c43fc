"""The processes under test: Redis plus R replicas of Chorus, the naive baseline or Socket.IO.

All are started with chorus.devcluster's RedisServer and Process, on loopback, and stopped by
PID. CPU and memory come from /proc, summed over each replica's process tree (gunicorn's
workers are children of the PID we started; node's threads are in its own counts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from chorus.devcluster import HarnessError, Process, RedisServer, free_port, http_status, wait_until

ROOT = Path(__file__).resolve().parent.parent
BASELINE_DIR = ROOT / "loadtest" / "baselines"
BASELINE_VENV = ROOT / ".venv-baseline"
SOCKETIO_DIR = BASELINE_DIR / "socketio"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

IMPLS = ("chorus", "baseline", "socketio")
BASELINES = ("baseline", "socketio")  # what Chorus is compared with, in the order reported
FLOOR = "floor"  # baselines/floor.py: a bare ASGI app, measured for idle memory only
# Chorus's limits stay on (the limiter still runs per message) but are raised above the load a
# benchmark publisher offers (up to ~100 messages/s each) and the sockets it opens per user name.
CHORUS_BENCH_ENV = {
    "CHORUS_RATE_LIMIT": "1000",
    "CHORUS_RATE_BURST": "1000",
    "CHORUS_MAX_CONNECTIONS_PER_USER": "0",
    "CHORUS_MAX_CONNECTIONS": "0",
    # The generator places every socket itself (the n-th member of a room on the next replica)
    # and its bare sockets do not reconnect: rebalancing would close them and count as loss
    # (100 rooms of 4 lost 25-42 % when it was on), and admission would refuse the sweep's
    # 2,000 sockets opened at once with 503.
    "CHORUS_REBALANCE_RATE": "0",
    "CHORUS_MAX_PENDING_HANDSHAKES": "100000",
}


def ensure_baseline_venv(venv: Path = BASELINE_VENV) -> Path:
    """Create the baseline's own venv on first use (it needs redis-py 7, Chorus pins 8)."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    requirements = BASELINE_DIR / "requirements.txt"
    if stamp.exists() and stamp.read_text() == requirements.read_text():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(requirements)],
        check=True,
    )
    stamp.write_text(requirements.read_text())
    return python


def ensure_socketio_modules(folder: Path = SOCKETIO_DIR) -> Path:
    """`npm ci` the Socket.IO baseline on first use (versions exact in its package-lock.json)."""
    lock = folder / "package-lock.json"
    stamp = folder / "node_modules" / ".installed"
    if stamp.exists() and stamp.read_text() == lock.read_text():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the socketio baseline needs Node.js 20+ and npm on PATH (or --impl to skip it)")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder, check=True
    )  # fmt: skip
    stamp.write_text(lock.read_text())
    return folder


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (live ones; children reaped count via cutime)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
        except OSError:
            continue
    return total


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Target:
    """One implementation under test: its own Redis and R replicas, clients connect directly."""

    def __init__(
        self, impl: str, replicas: int, workdir: Path, *, workers: int = 1, env: dict[str, str] | None = None
    ) -> None:
        if impl not in (*IMPLS, FLOOR):
            raise ValueError(f"impl must be one of {IMPLS} or {FLOOR!r}")
        self.impl = impl
        self.workdir = workdir / impl
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.workdir)
        self.ports = [free_port() for _ in range(replicas)]
        self.workers = workers
        self.env = env or {}  # e.g. PYTHONPATH to A/B a patched copy of the service
        self.replicas: list[Process] = []
        self._pids: list[int] = []

    def _argv(self, port: int) -> list[str]:
        if self.impl == "chorus":
            return [sys.executable, "-m", "chorus", "serve", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", str(self.workers)]  # fmt: skip
        if self.impl == "socketio":
            # One node process per replica, whatever `workers` says (Socket.IO's own model).
            node = shutil.which("node") or "node"
            return [node, str(ensure_socketio_modules() / "server.js"), "--port", str(port)]
        return [
            str(ensure_baseline_venv()), "-m", "uvicorn", "--app-dir", str(BASELINE_DIR),
            "floor:app" if self.impl == FLOOR else "naive:app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(self.workers),
            # The options Chorus runs uvicorn with (chorus.server.UVICORN_OPTIONS).
            "--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio",
            "--ws-per-message-deflate", "false", "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip

    def start(self) -> Target:
        self.redis.start()
        return self.start_replicas()

    def start_replicas(self) -> Target:
        """Start the replicas against the Redis already up (`bench_cluster` brings its own)."""
        for index, port in enumerate(self.ports):
            env = {key: value for key, value in os.environ.items() if not key.startswith("CHORUS_")}
            env.update(
                CHORUS_REDIS_URL=self.redis.url,
                CHORUS_REPLICA_NAME=f"{self.impl}-{index}",
                CHORUS_LOG_LEVEL="warning",
                PYTHONUNBUFFERED="1",
            )
            if self.impl == "chorus":
                env.update(CHORUS_BENCH_ENV)
            env.update(self.env)
            process = Process(
                f"{self.impl}-{index}", self._argv(port), self.workdir / f"replica-{index}.log", env
            )
            process.start()
            self.replicas.append(process)
        for process, port in zip(self.replicas, self.ports, strict=True):
            self._wait_ready(process, port)
        return self

    def _wait_ready(self, process: Process, port: int) -> None:
        def ready() -> bool:
            if not process.alive():
                raise HarnessError(f"{process.name} exited:\n{process.output()[-3000:]}")
            return http_status(f"http://127.0.0.1:{port}/readyz") == 200

        wait_until(ready, 60, f"{process.name} to be ready")

    def pids(self) -> list[int]:
        return [pid for process in self.replicas for pid in process_tree(process.pid)]

    def server_cpu(self) -> float:
        return cpu_seconds(self.pids())

    def redis_cpu(self) -> float:
        """Redis's own CPU count (INFO cpu, microseconds; /proc ticks are too coarse here)."""
        info = dict(line.split(":", 1) for line in self.redis.cli("INFO", "cpu").splitlines() if ":" in line)
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def server_rss_kib(self) -> int:
        return rss_kib(self.pids())

    def check_alive(self) -> None:
        for process in self.replicas:
            if not process.alive():
                raise HarnessError(f"{process.name} exited:\n{process.output()[-3000:]}")

    def stop(self) -> None:
        for process in self.replicas:
            process.stop()
        self.redis.stop()
