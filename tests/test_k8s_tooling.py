"""Scripts, workflow and kustomize: shellcheck, actionlint, `kubectl kustomize` on every overlay."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chorus.devcluster import find_binary
from k8s import ROOT, run, tool

SCRIPTS = sorted((ROOT / "k8s").rglob("*.sh"))
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
OVERLAYS = sorted(path.parent for path in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))


def test_scripts_pass_shellcheck() -> None:
    assert SCRIPTS
    result = run([find_binary("shellcheck"), "--severity=style", *map(str, SCRIPTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_actionlint() -> None:
    assert [w.name for w in WORKFLOWS] and "kind-e2e.yml" in [w.name for w in WORKFLOWS]
    result = run([tool("actionlint"), *map(str, WORKFLOWS)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", [ROOT / "k8s" / "base", *OVERLAYS], ids=lambda p: p.name)
def test_kustomize_renders(overlay: Path) -> None:
    result = run([tool("kubectl"), "kustomize", str(overlay)])
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "HTTPRoute"} <= kinds


def test_kind_overlay_runs_the_loaded_image_in_its_namespace() -> None:
    result = run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / "kind")])
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert all(o["metadata"]["namespace"] == "chorus" for o in namespaced)
    chorus = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "chorus")
    assert chorus["spec"]["template"]["spec"]["containers"][0]["image"] == "chorus:dev"
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["chorus-redis"]
    cluster = yaml.safe_load((ROOT / "k8s" / "kind" / "cluster.yaml").read_text())
    roles = [node["role"] for node in cluster["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") == 2
