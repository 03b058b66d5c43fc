"""Podman from Debian's packages, set up for this class of machine, and rendered pods run in it.

What works here (measured): podman 4.3 with runc (crun 1.8 refuses this hybrid cgroup
layout), cgroupfs, overlay storage in a folder of ours (nothing written to /etc/containers),
host networking only, and ulimits at or below the host's hard limits (podman's default
nofile of 1048576 cannot be set here). The image is built with `make image`, as a user builds
it; when the Dockerfile's default base cannot be pulled (no registry reachable), on a base
that `make image-base` builds from Debian with debootstrap. Both are cached between runs in
the storage folder, keyed by the base's recipe and by the build's layers.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.k8s import ROOT, RenderedPod

STATE_DIR = Path(os.environ.get("CHORUS_PODMAN_DIR", "/var/tmp/chorus-podman"))

# Kubernetes resource quantities, as podman takes them.
_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def memory_bytes(quantity: str) -> int:
    for suffix, factor in _BINARY_SUFFIXES.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


def cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text.removesuffix("m")) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class BuiltImage:
    name: str
    base: str
    seconds: float
    size_bytes: int


class Podman:
    """The podman CLI with this project's own storage and configuration."""

    def __init__(self, state_dir: Path = STATE_DIR) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        storage = state_dir / "storage.conf"
        storage.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{state_dir / "storage"}"\n'
            f'runroot = "{state_dir / "run"}"\n'
        )
        config = state_dir / "containers.conf"
        config.write_text(
            '[containers]\nnetns = "host"\n\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{state_dir / "tmp"}"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(storage),
            "CONTAINERS_CONF": str(config),
            "CONTAINER_ENGINE": "podman",
        }

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {shlex.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def make(self, *args: str, timeout: float = 900) -> str:
        """A Makefile target with this podman: what a user runs, not a restatement of it."""
        result = subprocess.run(
            ["make", "-s", "--no-print-directory", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=self.env,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(
                f"make {shlex.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result.stdout

    def base_image(self) -> str:
        """The Dockerfile's default base if it can be pulled, else one built from Debian."""
        match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
        assert match, "the Dockerfile names its base in ARG PYTHON_IMAGE"
        default = match.group(1)
        if self("image", "exists", default, check=False).returncode == 0:
            return default
        if self("pull", "-q", default, check=False, timeout=300).returncode == 0:
            return default
        return self.make("image-base").strip().splitlines()[-1]

    def build(self, name: str) -> BuiltImage:
        base = self.base_image()
        started = time.monotonic()
        self.make(
            "image",
            f"IMAGE={name}",
            f"PYTHON_IMAGE={base}",
            # No registry: the base is local; the build's pip reaches PyPI over the host network.
            "IMAGE_BUILD_ARGS=--pull=never --network=host",
        )
        seconds = time.monotonic() - started
        size = json.loads(self("image", "inspect", name).stdout)[0]["Size"]
        return BuiltImage(name, base, seconds, int(size))


def _ulimits() -> list[str]:
    """nofile at the host's hard limit, nproc well under it (podman's defaults exceed both here).

    Measured on this machine: nproc 32768 is accepted, 65536 is refused although the shell's
    hard limit is 96365; a pod needs a few dozen processes at most.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


_SUPPORTED_CONTAINER_KEYS = {
    "name", "image", "imagePullPolicy", "command", "args", "ports", "env", "envFrom", "resources",
    "securityContext", "volumeMounts", "startupProbe", "livenessProbe", "readinessProbe", "lifecycle",
}  # fmt: skip


def run_argv(
    pod: RenderedPod,
    *,
    image: str,
    container_name: str,
    env_file: Path,
    argv: Sequence[str] | None = None,
) -> list[str]:
    """`podman run` for a rendered pod's container, everything taken from the render.

    The kubelet's part is played here: env (written to `env_file`, so secrets stay out of the
    process list), user, groups and fsGroup, read-only root, capabilities, no privilege
    escalation, seccomp, each emptyDir as a tmpfs of its sizeLimit, and the resource limits.
    `argv` replaces the container's command and args only where a test must (its own port on
    the host network); anything in the render this does not know how to run fails loudly.
    """
    container = pod.container
    unknown = set(container) - _SUPPORTED_CONTAINER_KEYS
    assert not unknown, f"the chart renders {sorted(unknown)}, which this harness does not run yet"
    assert not pod.spec.get("initContainers") and len(pod.spec["containers"]) == 1, "one container per pod"
    security = pod.security()
    uid, gid = security.get("runAsUser"), security.get("runAsGroup")
    assert uid is not None, "the render must name a numeric user"
    if security.get("runAsNonRoot"):
        assert int(uid) != 0, "runAsNonRoot with user 0: the kubelet would refuse to start it"

    env = pod.env()
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    env_file.chmod(0o600)

    args = [
        "run", "--rm", "--pull=never", "--name", container_name, "--hostname", pod.name,
        "--network=host", "--env-file", str(env_file), *_ulimits(),
        "--user", f"{uid}:{gid if gid is not None else 0}",
    ]  # fmt: skip
    fs_group = security.get("fsGroup")
    if fs_group is not None:
        args += ["--group-add", str(fs_group)]
    if security.get("readOnlyRootFilesystem"):
        # Only the rendered emptyDirs are writable: podman would add its own tmpfs mounts.
        args += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = security.get("capabilities", {})
    args += [f"--cap-drop={cap.lower()}" for cap in capabilities.get("drop", [])]
    args += [f"--cap-add={cap.lower()}" for cap in capabilities.get("add", [])]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    seccomp = security.get("seccompProfile", {}).get("type", "Unconfined")
    assert seccomp in ("RuntimeDefault", "Unconfined"), f"seccomp {seccomp} is not run by this harness"
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    for mount in container.get("volumeMounts", []):
        volume = pod.volumes[mount["name"]]
        assert "emptyDir" in volume, f"volume {mount['name']}: only emptyDir is run by this harness"
        size = memory_bytes(volume["emptyDir"].get("sizeLimit", "64Mi"))
        # An emptyDir is world-writable (0777); podman's tmpfs cannot take fsGroup's group,
        # which is given to the process as a supplementary group above.
        args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=0777"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(memory_bytes(limits["memory"]))]
    if "cpu" in limits:
        args += ["--cpus", str(cpus(limits["cpu"]))]
    command = list(argv) if argv is not None else [*container["command"], *container.get("args", [])]
    return [*args, "--entrypoint", json.dumps(command[:1]), image, *command[1:]]


def probe_port(pod: RenderedPod, probe: str) -> int:
    return pod.container_port(pod.container[probe]["httpGet"]["port"])


def pod_fields(pod: RenderedPod) -> dict[str, Any]:
    """What the tests read of a pod's lifecycle: preStop and the grace period."""
    return {
        "preStop": pod.container["lifecycle"]["preStop"]["exec"]["command"],
        "grace": int(pod.spec["terminationGracePeriodSeconds"]),
    }
