"""The chart and the service agree: the rendered Deployment's own command and env, run here.

Two replicas are started from the Deployment `helm template` renders (one with the defaults,
one with `workers=2`, the gunicorn path), Redis pointed at the test redis-server, emptyDir
mounts replaced by temp dirs. The probes must answer on the probe port, the Service must
target the port the container listens on, and the `helm test` pod's `chorus smoke` must pass
through a round-robin proxy in front of the two.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from chorus.devcluster import LocalCluster, RedisServer, http_status
from k8s import RELEASE, chorus_deployment, find, render

CHORUS = str(Path(sys.executable).with_name("chorus"))


def _secret_value(objects: list[dict[str, Any]], ref: dict[str, str]) -> str:
    secret = find(objects, "Secret", ref["name"])
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of dependent environment variables."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


class Pod:
    """One rendered Chorus pod, turned into an argv and env this machine can run."""

    def __init__(self, objects: list[dict[str, Any]], name: str) -> None:
        self.objects = objects
        self.spec = chorus_deployment(objects)["spec"]["template"]["spec"]
        self.container = next(c for c in self.spec["containers"] if c["name"] == "chorus")
        self.name = name
        self.volumes = {v["name"]: v for v in self.spec["volumes"]}

    def container_port(self, port: int | str) -> int:
        if isinstance(port, int):
            return port
        (match,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == port]
        return int(match)

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            env.update(find(self.objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = _expand(item["value"], env)
            elif "fieldRef" in item["valueFrom"]:
                assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                env[item["name"]] = self.name
            else:
                env[item["name"]] = _secret_value(self.objects, item["valueFrom"]["secretKeyRef"])
        return env

    def local_env(self, redis: RedisServer) -> dict[str, str]:
        """The pod's env with cluster-only parts rewritten: Redis address, emptyDir paths."""
        env = self.env()
        url = urlsplit(env["CHORUS_REDIS_URL"])
        redis_service = find(self.objects, "Service", url.hostname)
        assert url.port == redis_service["spec"]["ports"][0]["port"], "URL port is the Redis Service port"
        assert url.password == env["REDIS_PASSWORD"], "the password reached the URL through $(REDIS_PASSWORD)"
        env["CHORUS_REDIS_URL"] = redis.url
        for mount in self.container["volumeMounts"]:
            assert "emptyDir" in self.volumes[mount["name"]], f"{mount['mountPath']} must be an emptyDir"
            local = tempfile.mkdtemp(prefix=f"chorus-{mount['name']}-")
            for key, value in env.items():
                if value == mount["mountPath"] or value.startswith(mount["mountPath"] + "/"):
                    env[key] = local + value.removeprefix(mount["mountPath"])
            if mount["mountPath"] == "/tmp":
                env["TMPDIR"] = local
        return env

    def argv(self, port: int) -> list[str]:
        argv = [*self.container["command"], *self.container.get("args", [])]
        assert argv[0] == "chorus"
        assert argv[argv.index("--host") + 1] == "0.0.0.0", "reachable from the Service, not only loopback"
        assert int(argv[argv.index("--port") + 1]) == self.container_port("http")
        # Loopback only, and a port of our own: two pods share this machine.
        argv[0] = CHORUS
        argv[argv.index("--host") + 1] = "127.0.0.1"
        argv[argv.index("--port") + 1] = str(port)
        return argv


@pytest.mark.slow
def test_rendered_deployment_runs_and_fans_out(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pods = [Pod(render(), f"{RELEASE}-pod-a"), Pod(render(None, ("workers=2",)), f"{RELEASE}-pod-b")]
    assert pods[1].env()["CHORUS_WORKERS"] == "2"

    # The Service targets the port the container listens on.
    service = find(pods[0].objects, "Service", RELEASE)
    (service_port,) = service["spec"]["ports"]
    listen_port = int(pods[0].container["args"][pods[0].container["args"].index("--port") + 1])
    assert pods[0].container_port(service_port["targetPort"]) == listen_port

    def launch(index: int, port: int) -> tuple[Sequence[str], dict[str, str]]:
        return pods[index].argv(port), pods[index].local_env(redis)

    cluster = LocalCluster(len(pods), redis=redis, workdir=tmp_path_factory.mktemp("contract"), launch=launch)
    try:
        cluster.start()
        for index, pod in enumerate(pods):
            base = cluster.replica_url(index)
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
                get = pod.container[probe]["httpGet"]
                assert pod.container_port(get["port"]) == listen_port, f"{probe} probes the listening port"
                assert http_status(base + get["path"]) == 200, f"{pod.name} {probe} {get['path']}"
            assert http_status(base + "/metrics") == 200

        smoke = find(pods[0].objects, "Pod", f"{RELEASE}-smoke")["spec"]["containers"][0]
        argv = [*smoke["command"], *smoke["args"]]
        target = urlsplit(argv[argv.index("--url") + 1])
        assert target.hostname == service["metadata"]["name"] and target.port == service_port["port"]
        argv[0] = CHORUS
        argv[argv.index("--url") + 1] = cluster.ws_url
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("ok: ") and f"{RELEASE}-pod-a" in result.stdout
        assert f"{RELEASE}-pod-b" in result.stdout
    finally:
        cluster.stop()
