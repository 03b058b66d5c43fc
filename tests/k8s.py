"""Helpers for the Kubernetes packaging tests: the project-local tools and `helm template`."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "chorus"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
TOOLS_BIN = ROOT / ".tools" / "bin"
INSTALLER = ROOT / "k8s" / "tools" / "install-tools.sh"
NAMESPACE = "chorus"
RELEASE = "chorus"

_install_lock = threading.Lock()


def tool(name: str) -> str:
    """Path of a tool: the project-local copy, else one on PATH, else installed now by the installer."""
    local = TOOLS_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is not None:
        return found
    with _install_lock:
        if not local.exists():
            subprocess.run(["bash", str(INSTALLER)], check=True, timeout=600)
    return str(local)


def run(
    argv: list[str], *, cwd: Path = ROOT, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # helm keeps its cache and config out of the user's home.
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/chorus-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/chorus-helm/config",
        **(env or {}),
    }
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@cache
def render_text(values_file: Path | None = None, sets: tuple[str, ...] = ()) -> str:
    argv = [tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values_file is not None:
        argv += ["--values", str(values_file)]
    for item in sets:
        argv += ["--set", item]
    result = run(argv)
    if result.returncode != 0:
        raise AssertionError(f"helm template failed:\n{result.stderr}")
    return result.stdout


def render(values_file: Path | None = None, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every object `helm template` renders (test hooks included), parsed."""
    return [doc for doc in yaml.safe_load_all(render_text(values_file, sets)) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def chorus_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment", RELEASE)


def secret_value(objects: list[dict[str, Any]], ref: dict[str, str]) -> str:
    secret = find(objects, "Secret", ref["name"])
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of dependent environment variables."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


class RenderedPod:
    """One pod as the chart renders it (a Deployment's template, or a bare Pod such as the test hook).

    It resolves what the kubelet would: the environment from ConfigMaps, Secrets, the downward
    API and $(VAR) expansion, named ports, and the security context the container runs with.
    """

    def __init__(
        self, objects: list[dict[str, Any]], name: str, *, spec: dict[str, Any] | None = None
    ) -> None:
        self.objects = objects
        self.name = name
        self.spec = spec if spec is not None else chorus_deployment(objects)["spec"]["template"]["spec"]
        self.container = self.spec["containers"][0]
        self.volumes = {v["name"]: v for v in self.spec.get("volumes", [])}

    @classmethod
    def hook(cls, objects: list[dict[str, Any]], name: str) -> RenderedPod:
        """A bare Pod the chart renders, such as the `helm test` hook."""
        return cls(objects, name, spec=find(objects, "Pod", name)["spec"])

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
                env[item["name"]] = secret_value(self.objects, item["valueFrom"]["secretKeyRef"])
        return env

    def security(self) -> dict[str, Any]:
        """The container's effective security context: its own fields over the pod's."""
        pod = self.spec.get("securityContext", {})
        merged = {
            key: pod[key]
            for key in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
            if key in pod
        }
        return {**merged, **self.container.get("securityContext", {}), "fsGroup": pod.get("fsGroup")}


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes LabelSelector (matchLabels AND matchExpressions) matches `labels`.

    An empty selector matches everything; a null one (None) matches nothing, as in the API.
    """
    if selector is None:
        return False
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in {"In", "NotIn", "Exists", "DoesNotExist"}:
            raise ValueError(f"unknown selector operator {operator!r}")
    return True
