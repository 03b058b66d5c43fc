"""The release workflow: actionlint clean, and what it pushes is what the chart installs.

`helm install chorus oci://ghcr.io/<owner>/charts/chorus --version X` must pull an image that
exists: the chart's default image.repository and tag (appVersion) have to be exactly what
.github/workflows/release.yml pushes for tag vX. The workflow itself only runs on GitHub; here
its structure is read and its guard (k8s/tools/release_check.py) is run for real.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from typing import Any

import yaml

from tests.k8s import CHART, ROOT, chorus_deployment, render, run, tool

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
CHECK = ROOT / "k8s" / "tools" / "release_check.py"
# The owner the project publishes under (Chart.yaml `sources`).
OWNER = "chorus-chat"


def _workflow() -> dict[Any, Any]:
    workflow: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return workflow


def _steps() -> list[dict[str, Any]]:
    (job,) = _workflow()["jobs"].values()
    steps: list[dict[str, Any]] = job["steps"]
    return steps


def _step(uses_prefix: str) -> dict[str, Any]:
    (step,) = [s for s in _steps() if str(s.get("uses", "")).startswith(uses_prefix)]
    return step


def _check(tag: str, owner: str = OWNER) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), tag, "--owner", owner], capture_output=True, text=True, timeout=60
    )


def test_release_workflow_passes_actionlint() -> None:
    result = run([tool("actionlint"), str(WORKFLOW)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_versions_and_image_name_agree() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == chart["appVersion"] == version
    assert f"github.com/{OWNER}/" in " ".join(chart["sources"])
    image = chorus_deployment(render())["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/{OWNER}/chorus:{version}", "what helm install pulls by default"
    ok = _check(f"v{version}")
    assert ok.returncode == 0, ok.stderr
    assert f"ghcr.io/{OWNER}/chorus:{version}" in ok.stdout


def test_release_check_refuses_disagreement() -> None:
    wrong_tag = _check("v99.0.0")
    assert wrong_tag.returncode == 1
    for source in ["Chart.yaml version", "Chart.yaml appVersion", "pyproject.toml version"]:
        assert source in wrong_tag.stderr
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    fork = _check(f"v{version}", owner="SomeFork")
    assert fork.returncode == 1 and "ghcr.io/somefork/chorus" in fork.stderr, "GHCR names are lower case"
    assert "image.repository" in fork.stderr


def test_workflow_builds_signs_and_pushes_what_the_check_names() -> None:
    workflow = _workflow()
    triggers = workflow.get("on") or workflow[True]  # YAML 1.1 reads a bare `on` as True
    assert triggers == {"push": {"tags": ["v*"]}}
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "packages": "write", "id-token": "write"}
    for step in _steps():
        if "uses" in step:
            action, _, ref = step["uses"].partition("@")
            assert ref.startswith("v") and ref[1:].split(".")[0].isdigit(), f"pin {action} to a version"
    steps = _steps()
    check_index = next(i for i, s in enumerate(steps) if "release_check.py" in s.get("run", ""))
    check_id = steps[check_index]["id"]
    build = _step("docker/build-push-action@")
    assert steps.index(build) > check_index, "nothing is pushed before the versions are checked"
    options = build["with"]
    assert set(options["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert options["push"] is True
    assert (
        options["tags"]
        == f"${{{{ steps.{check_id}.outputs.image }}}}:${{{{ steps.{check_id}.outputs.version }}}}"
    )
    assert options["provenance"] == "mode=max" and options["sbom"] is True
    assert _step("docker/setup-qemu-action@") and _step("docker/setup-buildx-action@")
    assert _step("sigstore/cosign-installer@")
    sign = next(s for s in steps if "cosign sign --yes" in s.get("run", "") and "DIGEST" in s.get("env", {}))
    assert sign["env"]["DIGEST"] == f"${{{{ steps.{build['id']}.outputs.digest }}}}", (
        "sign by digest, not tag"
    )
    chart_step = next(s for s in steps if "helm push" in s.get("run", ""))
    assert "helm package helm/chorus" in chart_step["run"]
    assert chart_step["env"]["CHART_REPOSITORY"] == f"${{{{ steps.{check_id}.outputs.chart_repository }}}}"
