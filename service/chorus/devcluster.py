"""A local cluster without Kubernetes: redis-server, N replicas and a round-robin HAProxy.

Used by `chorus dev-cluster`, by the tests and by the load test: one harness for all three.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final


class HarnessError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise HarnessError(f"{name} not found on PATH; install it (Debian/Ubuntu: apt-get install {name})")
    return found


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check` until it is true; raise HarnessError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class Process:
    """A child process with its output in a log file; stopped by PID only."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.alive():
            self.proc.terminate()
            if self.wait(timeout) is None:
                self.proc.kill()
                self.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def rss_kib(self) -> int:
        """Resident memory of the process (not its children), from /proc."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise HarnessError(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class RedisServer:
    """A real redis-server on loopback that can be stopped, killed and restarted on its port."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            find_binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self.process = Process("redis", argv, self.workdir / f"redis-{self.port}.log")
        self.process.start()
        wait_until(self.ping, 10, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [find_binary("redis-cli"), "-p", str(self.port), *args],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            wait_until(lambda: not self.ping(), 10, "redis-server to stop")

    def kill(self) -> None:
        """SIGKILL, as a crash would; the log file is released as on a clean stop."""
        if self.process is not None:
            self.process.signal(signal.SIGKILL)
            self.process.wait(10)
            self.process.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


CLUSTER_SLOTS = 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (bounded tries)."""
    for _ in range(100):
        port = free_port()
        if port <= 55535 and _port_bindable(port + 10000):
            return port
    raise HarnessError("no free port pair for a Redis Cluster node after 100 tries")


def _port_bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisCluster:
    """A real Redis Cluster on loopback: N masters with equal slot ranges, optional replicas.

    Built by hand (config epochs, ADDSLOTSRANGE, CLUSTER MEET, CLUSTER REPLICATE) rather than
    with `redis-cli --cluster create`, which refuses fewer than three masters: one shard and
    three are made alike.
    """

    def __init__(
        self, workdir: Path, *, masters: int = 3, replicas_per_master: int = 0, node_timeout_ms: int = 1000
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.nodes: list[RedisServer] = []
        self.master_count = masters
        for _ in range(masters * (1 + replicas_per_master)):
            port = cluster_port()
            extra = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
            ]  # fmt: skip
            self.nodes.append(RedisServer(workdir, port=port, extra_args=extra))

    @property
    def url(self) -> str:
        """`CHORUS_REDIS_URL` with the first masters as seeds."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.master_count])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        masters, replicas = self.nodes[: self.master_count], self.nodes[self.master_count :]
        for index, node in enumerate(masters):
            first = index * CLUSTER_SLOTS // len(masters)
            last = (index + 1) * CLUSTER_SLOTS // len(masters) - 1
            # Distinct epochs up front, as redis-cli does, so no collision round is needed.
            node.cli("CLUSTER", "SET-CONFIG-EPOCH", str(index + 1))
            node.cli("CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
        for node in self.nodes[1:]:
            self.nodes[0].cli("CLUSTER", "MEET", "127.0.0.1", str(node.port))
        wait_until(lambda: self._everyone_knows(len(self.nodes)), 30, "the cluster nodes to meet", 0.2)
        for index, node in enumerate(replicas):
            master = masters[index % len(masters)]
            node.cli("CLUSTER", "REPLICATE", self.myid(master))
        wait_until(self.healthy, 30, "the Redis Cluster to be ok on every node", 0.2)
        wait_until(lambda: all(self._synced(node) for node in replicas), 30, "the replicas to sync", 0.2)

    @staticmethod
    def _synced(replica: RedisServer) -> bool:
        return "master_link_status:up" in replica.cli("INFO", "replication")

    def _everyone_knows(self, count: int) -> bool:
        try:
            return all(f"cluster_known_nodes:{count}" in node.cli("CLUSTER", "INFO") for node in self.nodes)
        except subprocess.CalledProcessError:
            return False

    def healthy(self) -> bool:
        try:
            return all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in self.alive())
        except subprocess.CalledProcessError:
            return False

    def alive(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None and node.process.alive()]

    def masters(self) -> list[RedisServer]:
        return [node for node in self.alive() if "role:master" in node.cli("INFO", "replication")]

    def myid(self, node: RedisServer) -> str:
        return node.cli("CLUSTER", "MYID")

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.stop()


# HAProxy holds two descriptors per proxied socket and sizes its descriptor limit from
# `maxconn`; it refuses to start when it cannot raise the limit that far. 9,000 fit a 20,000
# hard limit (this machine's, not raisable even as root), so a storm of 10,000 and more runs
# `proxies` HAProxy processes side by side, as a Service is served by every node's proxy.
PROXY_MAXCONN = 9000
# HAProxy's health check mirrors the chart's readinessProbe (helm/chorus/values.yaml; the
# kubelet's view of /readyz, checked equal by tests/test_chart.py): period, timeout, failures.
# The check used to be 500 ms with the timeout equal to it, and marked busy replicas DOWN 6-17
# times per 10,000-socket storm where a kubelet would have waited.
READINESS_PERIOD_S: Final = 2
READINESS_TIMEOUT_S: Final = 2
READINESS_FAILURES: Final = 2
HAPROXY_CONFIG = """\
global
    maxconn {maxconn}
    stats socket {stats}
defaults
    mode http
    option redispatch
    retries 3
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
frontend chorus
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    timeout check {check_timeout}s
    default-server inter {check_period}s fall {check_failures} rise 1
{retry}{servers}
"""
# An L7 balancer may send a refused handshake to the next replica itself (nginx calls it
# `proxy_next_upstream http_503`): a replica that drains or rebalances then costs the client
# no Retry-After wait. Off by default: a Kubernetes Service (kube-proxy) is L4 and cannot.
RETRY_ON_503 = """\
    retry-on conn-failure empty-response 503
    option redispatch 1
"""


class LocalCluster:
    """Redis + N Chorus replicas on loopback + HAProxy round-robin in front, no affinity."""

    def __init__(
        self,
        replicas: int = 3,
        *,
        port: int | None = None,
        redis: RedisServer | None = None,
        workers: int = 1,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        launch: Callable[[int, int], tuple[Sequence[str], dict[str, str]]] | None = None,
        proxy_maxconn: int = PROXY_MAXCONN,
        proxies: int = 1,
        proxy_retry_503: bool = False,
    ) -> None:
        # `launch(index, port)` gives a replica's argv and env overrides instead of the default
        # `chorus serve` (the chart contract test runs the Deployment's own command this way).
        self.launch = launch
        self.proxy_maxconn = proxy_maxconn
        self.proxy_count = proxies
        self.proxy_retry_503 = proxy_retry_503
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="chorus-cluster-"))
        self.port = port or free_port()
        self._own_redis = redis is None
        self.redis = redis or RedisServer(self.workdir)
        self.workers = workers
        self.env = env or {}
        self.replica_ports = [free_port() for _ in range(replicas)]
        self.replicas: list[Process] = []
        self.proxies: list[Process] = []
        self.proxy_ports = [self.port] + [free_port() for _ in range(proxies - 1)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def proxy(self) -> Process | None:
        """The first proxy (the one `url` and `ws_url` name)."""
        return self.proxies[0] if self.proxies else None

    def proxy_ws_url(self, index: int) -> str:
        return f"ws://127.0.0.1:{self.proxy_ports[index]}"

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[index]}"

    def replica_ws_url(self, index: int) -> str:
        return f"ws://127.0.0.1:{self.replica_ports[index]}"

    def replica_name(self, index: int) -> str:
        return f"replica-{index}"

    def replica_env(self, index: int) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("CHORUS_")}
        env.update(
            CHORUS_REDIS_URL=self.redis.url,
            CHORUS_REPLICA_NAME=self.replica_name(index),
            CHORUS_DRAIN_SECONDS="2",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        return env

    def _replica_process(self, index: int) -> Process:
        argv = [
            sys.executable, "-m", "chorus", "serve",
            "--host", "127.0.0.1", "--port", str(self.replica_ports[index]),
            "--workers", str(self.workers),
        ]  # fmt: skip
        env = self.replica_env(index)
        if self.launch is not None:
            command, overrides = self.launch(index, self.replica_ports[index])
            argv = list(command)
            env.update(overrides)
        log = self.workdir / f"{self.replica_name(index)}.log"
        return Process(self.replica_name(index), argv, log, env)

    def start(self, *, wait_ready: bool = True) -> LocalCluster:
        """Start everything; on any failure stop what was started, then raise."""
        try:
            if self._own_redis:
                self.redis.start()
            self.replicas = [self._replica_process(i) for i in range(len(self.replica_ports))]
            for replica in self.replicas:
                replica.start()
            if wait_ready:
                for index in range(len(self.replicas)):
                    self.wait_ready(index)
            for index in range(self.proxy_count):
                self._start_proxy(index)
            if wait_ready:
                self.wait_proxy_sees(len(self.replicas))
        except BaseException:
            self.stop()
            raise
        return self

    def proxy_servers_up(self, index: int = 0) -> int:
        """How many replicas the health checks of HAProxy `index` currently count as up."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self._proxy_file(index, "sock")))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return 0
        rows = [
            line.split(",") for line in data.decode().splitlines() if line.startswith("replicas,replica-")
        ]
        return sum(1 for row in rows if row[17].startswith("UP"))

    def wait_proxy_sees(self, count: int, timeout: float = 20) -> None:
        def seen() -> bool:
            return all(self.proxy_servers_up(i) == count for i in range(len(self.proxies)))

        wait_until(seen, timeout, f"HAProxy to count {count} replicas up")

    def _proxy_file(self, index: int, suffix: str) -> Path:
        return self.workdir / (f"haproxy.{suffix}" if index == 0 else f"haproxy-{index}.{suffix}")

    def _start_proxy(self, index: int) -> None:
        servers = "\n".join(
            f"    server {self.replica_name(i)} 127.0.0.1:{port} check"
            for i, port in enumerate(self.replica_ports)
        )
        config = self._proxy_file(index, "cfg")
        stats = self._proxy_file(index, "sock")
        port = self.proxy_ports[index]
        retry = RETRY_ON_503 if self.proxy_retry_503 else ""
        config.write_text(
            HAPROXY_CONFIG.format(
                port=port,
                servers=servers,
                stats=stats,
                maxconn=self.proxy_maxconn,
                retry=retry,
                check_period=READINESS_PERIOD_S,
                check_timeout=READINESS_TIMEOUT_S,
                check_failures=READINESS_FAILURES,
            )
        )
        proxy = Process(
            "haproxy", [find_binary("haproxy"), "-f", str(config)], self._proxy_file(index, "log")
        )
        self.proxies.append(proxy)
        proxy.start()

        def listening() -> bool:
            if not proxy.alive():
                raise HarnessError(f"haproxy exited:\n{proxy.output()[-2000:]}")
            return _port_open(port)

        wait_until(listening, 10, f"haproxy on port {port}")

    def wait_ready(self, index: int, timeout: float = 30) -> None:
        replica = self.replicas[index]

        def ready() -> bool:
            if not replica.alive():
                raise HarnessError(f"{replica.name} exited:\n{replica.output()[-3000:]}")
            return http_status(self.replica_url(index) + "/readyz") == 200

        wait_until(ready, timeout, f"{replica.name} to be ready")

    def stop_replica(self, index: int) -> None:
        """SIGTERM one replica and wait for its drain (a scale-in, or the first half of a restart)."""
        self.replicas[index].stop()

    def start_replica(self, index: int) -> None:
        """Start a fresh process for replica `index` and wait until it is ready and proxied."""
        self.replicas[index] = self._replica_process(index)
        self.replicas[index].start()
        self.wait_ready(index)
        if self.proxy is not None:
            self.wait_proxy_sees(sum(1 for replica in self.replicas if replica.alive()))

    def restart_replica(self, index: int) -> None:
        self.replicas[index].stop()
        self.replicas[index] = self._replica_process(index)
        self.replicas[index].start()
        self.wait_ready(index)
        if self.proxy is not None:
            self.wait_proxy_sees(sum(1 for replica in self.replicas if replica.alive()))

    def stop(self) -> None:
        for process in [*self.proxies, *self.replicas]:
            process.stop()
        if self._own_redis:
            self.redis.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
