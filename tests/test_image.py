"""The image as users run it: built by `make image`, the chart's own pods run in podman.

Every container runs exactly the pod spec `helm template` renders for production (an external
Redis whose URL lives in the chart's Secret; `workers=2` for the gunicorn path): command and
args, env from the ConfigMap and Secret, user and groups, read-only root, capabilities,
seccomp, no privilege escalation, each emptyDir as a tmpfs of its size limit, the memory and
CPU limits (see `podman.run_argv`). The one change is the listening address: pods share this
machine's network, so each listens on 127.0.0.1 and a port of its own. Two replicas stand
behind the round-robin HAProxy of `LocalCluster`, the harness every cluster test uses.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import ConnectionClosed

from chorus.devcluster import LocalCluster, RedisServer, http_status
from tests.chat import Chat, poll
from tests.k8s import RELEASE, RenderedPod, find, render
from tests.podman import BuiltImage, Podman, run_argv

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

IMAGE_REPOSITORY = "localhost/chorus"
IMAGE_TAG = "test"
ARTIFACTS = Path("artifacts")


@pytest.fixture(scope="session")
def podman() -> Podman:
    return Podman()


@pytest.fixture(scope="session")
def image(podman: Podman) -> BuiltImage:
    built = podman.build(f"{IMAGE_REPOSITORY}:{IMAGE_TAG}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "image.json").write_text(
        json.dumps(
            {
                "image": built.name,
                "base": built.base,
                "build_seconds": round(built.seconds, 1),
                "size_bytes": built.size_bytes,
            },
            indent=2,
        )
    )
    return built


def production(redis: RedisServer, *sets: str) -> list[dict[str, Any]]:
    """The chart rendered as production runs it, with this test's image and Redis."""
    return render(
        None,
        (
            "redis.enabled=false",
            f"externalRedis.url={redis.url}",
            f"image.repository={IMAGE_REPOSITORY}",
            f"image.tag={IMAGE_TAG}",
            *sets,
        ),
    )


def local_argv(pod: RenderedPod, port: int) -> list[str]:
    """The container's command with only the listening address changed (shared host network)."""
    argv = [*pod.container["command"], *pod.container.get("args", [])]
    assert argv[:2] == ["chorus", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0", "reachable from the Service, not only loopback"
    assert int(argv[argv.index("--port") + 1]) == pod.container_port("http")
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    return argv


class Pods:
    """Rendered pods run as containers behind a LocalCluster's proxy; removed whatever happens."""

    def __init__(self, podman: Podman, image: BuiltImage, pods: Sequence[RenderedPod], workdir: Path) -> None:
        self.podman = podman
        self.image = image
        self.pods = list(pods)
        self.workdir = workdir
        self.names = [f"chorus-test-{pod.name}-{int(time.time() * 1000) % 10**8}" for pod in pods]

    def launch(self, index: int, port: int) -> tuple[Sequence[str], dict[str, str]]:
        pod = self.pods[index]
        argv = run_argv(
            pod,
            image=self.image.name,
            container_name=self.names[index],
            env_file=self.workdir / f"{pod.name}.env",
            argv=local_argv(pod, port),
        )
        return ["podman", *argv], self.podman.env

    def remove(self) -> None:
        for name in self.names:
            self.podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
def run_pods(podman: Podman, image: BuiltImage, redis: RedisServer, tmp_path: Path) -> Iterator[Any]:
    started: list[tuple[LocalCluster, Pods]] = []

    def start(pods: Sequence[RenderedPod]) -> tuple[LocalCluster, Pods]:
        containers = Pods(podman, image, pods, tmp_path)
        cluster = LocalCluster(len(pods), redis=redis, workdir=tmp_path, launch=containers.launch)
        started.append((cluster, containers))
        # A cold container start (runc, uvloop import, first Redis round trip) takes about a second.
        cluster.start()
        return cluster, containers

    yield start
    for cluster, containers in started:
        cluster.stop()
        containers.remove()


async def test_rendered_pods_serve_fan_out_and_drain(
    run_pods: Any, image: BuiltImage, podman: Podman, redis: RedisServer
) -> None:
    single = production(redis)
    pods = [
        RenderedPod(single, f"{RELEASE}-pod-a"),
        RenderedPod(production(redis, "workers=2"), f"{RELEASE}-pod-b"),
    ]
    assert pods[1].env()["CHORUS_WORKERS"] == "2"
    assert urlsplit(pods[0].env()["CHORUS_REDIS_URL"]).port == redis.port, "the URL came from the Secret"
    started = time.monotonic()
    cluster, containers = run_pods(pods)
    ready_seconds = time.monotonic() - started

    # The Service targets the port the container listens on; every probe asks that port.
    service = find(single, "Service", RELEASE)
    (service_port,) = service["spec"]["ports"]
    assert pods[0].container_port(service_port["targetPort"]) == pods[0].container_port("http")
    for index, pod in enumerate(pods):
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
            get = pod.container[probe]["httpGet"]
            assert pod.container_port(get["port"]) == pod.container_port("http"), (
                f"{probe} probes the chat port"
            )
            assert http_status(cluster.replica_url(index) + get["path"]) == 200, f"{pod.name} {probe}"
        assert http_status(cluster.replica_url(index) + "/metrics") == 200

    # The gunicorn pod keeps its metrics in files on its emptyDir: both workers report.
    metrics = podman("exec", containers.names[1], "ls", pods[1].env()["PROMETHEUS_MULTIPROC_DIR"]).stdout
    assert len({line.rsplit("_", 1)[-1] for line in metrics.split()}) >= 2, metrics

    # The rendered `helm test` pod, from the same image, passes through the proxy.
    smoke = RenderedPod.hook(single, f"{RELEASE}-smoke")
    argv = [*smoke.container["command"], *smoke.container["args"]]
    target = urlsplit(argv[argv.index("--url") + 1])
    assert target.hostname == service["metadata"]["name"] and target.port == service_port["port"]
    argv[argv.index("--url") + 1] = cluster.ws_url
    name = f"chorus-test-smoke-{int(time.time())}"
    try:
        result = podman(
            *run_argv(
                smoke,
                image=image.name,
                container_name=name,
                env_file=cluster.workdir / "smoke.env",
                argv=argv,
            ),
            timeout=120,
            check=False,
        )
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        result.stdout.startswith("ok: ")
        and f"{RELEASE}-pod-a" in result.stdout
        and f"{RELEASE}-pod-b" in result.stdout
    )

    # A message crosses the two containers both ways.
    a = await Chat.join(cluster.replica_ws_url(0), "image-room", username="ann")
    b = await Chat.join(cluster.replica_ws_url(1), "image-room", username="bob")
    assert (a.replica, b.replica) == (pods[0].name, pods[1].name)
    await a.send("from a")
    assert (await b.wait_for(lambda f: f.get("text") == "from a"))["user"] == "ann"
    await b.send("from b")
    assert (await a.wait_for(lambda f: f.get("text") == "from b"))["user"] == "bob"
    await b.close()

    # Termination as the kubelet does it: the rendered preStop, then SIGTERM, within the grace period.
    others = [await Chat.join(cluster.replica_ws_url(0), "image-room", username=f"u{i}") for i in range(3)]
    members = [a, *others]
    grace = int(pods[0].spec["terminationGracePeriodSeconds"])
    pre_stop = pods[0].container["lifecycle"]["preStop"]["exec"]["command"]
    terminating = time.monotonic()
    assert podman("exec", containers.names[0], *pre_stop, timeout=grace).returncode == 0
    assert http_status(cluster.replica_url(0) + "/readyz") == 200, "still serving during preStop"
    podman("kill", "--signal", "TERM", containers.names[0])
    await poll(
        lambda: http_status(cluster.replica_url(0) + "/readyz") == 503, 5, "/readyz 503 while draining"
    )

    codes = []
    for member in members:
        with pytest.raises(ConnectionClosed) as closed:
            await member.wait_for(lambda f: False, timeout=grace)
        codes.append(closed.value.rcvd.code if closed.value.rcvd else None)
    assert codes == [1012] * len(members)
    replica = cluster.replicas[0]
    exit_code = replica.wait(max(1.0, grace - (time.monotonic() - terminating)))
    assert exit_code == 0, f"exit {exit_code} within {grace}s:\n{replica.output()[-2000:]}"
    stopped = time.monotonic() - terminating
    print(
        f"\nimage {image.name}: {image.size_bytes / 1e6:.0f} MB, built in {image.seconds:.0f}s"
        f" on {image.base};"
        f" two pods ready {ready_seconds:.1f}s after podman run; stopped in {stopped:.1f}s of {grace}s"
    )


async def test_runs_under_an_arbitrary_uid(run_pods: Any, redis: RedisServer) -> None:
    """OpenShift gives each namespace a UID range and runs the pod as one of them, group 0."""
    uid = 1000650000
    sets = [
        f"{context}.{key}={value}"
        for context in ("podSecurityContext", "securityContext")
        for key, value in (("runAsUser", uid), ("runAsGroup", 0))
    ]
    objects = production(redis, "workers=2", *sets, f"podSecurityContext.fsGroup={uid}")
    pod = RenderedPod(objects, f"{RELEASE}-pod-uid")
    assert pod.security()["runAsUser"] == uid
    cluster, containers = run_pods([pod])
    assert http_status(cluster.replica_url(0) + "/metrics") == 200
    chat = await Chat.join(cluster.replica_ws_url(0), "uid-room", username="ola")
    await chat.send("hello", client_id="c1")
    assert (await chat.wait_for(lambda f: f.get("type") == "ack"))["client_id"] == "c1"
    await chat.close()
    identity = containers.podman("exec", containers.names[0], "id", "-u").stdout.strip()
    assert identity == str(uid)
    cluster.replicas[0].signal(signal.SIGTERM)
    assert cluster.replicas[0].wait(int(pod.spec["terminationGracePeriodSeconds"])) == 0
