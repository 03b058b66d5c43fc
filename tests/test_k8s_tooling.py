"""Scripts, workflow and kustomize: shellcheck, actionlint, `kubectl kustomize` on every overlay."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from chorus.devcluster import find_binary
from tests.k8s import CHART, ROOT, run, tool

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


KIND = ROOT / "k8s" / "kind"


def _kind_render(namespace: str) -> list[dict[str, Any]]:
    """The chart as kind.sh installs it (k8s/kind/chorus-values.yaml) into `namespace`."""
    argv = [
        tool("helm"),
        "template",
        "chat",
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        str(KIND / "chorus-values.yaml"),
    ]
    result = run(argv)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kind_dashboard_lands_in_the_folder_it_asks_for() -> None:
    sidecar = yaml.safe_load((KIND / "monitoring-values.yaml").read_text())["grafana"]["sidecar"][
        "dashboards"
    ]
    (dashboard,) = [
        o
        for o in _kind_render("chorus")
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"][sidecar["label"]] == sidecar["labelValue"]
    assert sidecar["searchNamespace"] == "ALL"
    # The sidecar reads the folder from this annotation; the provider must turn it into a folder.
    assert dashboard["metadata"]["annotations"][sidecar["folderAnnotation"]] == "Chorus"
    assert sidecar["provider"]["foldersFromFilesStructure"] is True


@pytest.mark.parametrize("namespace", ["chorus", "chat-e2e"])
def test_kind_route_attaches_to_the_gateway_in_the_release_namespace(namespace: str) -> None:
    """kind.sh puts the Gateway into CHORUS_NAMESPACE; the route must look for it there."""
    (route,) = [o for o in _kind_render(namespace) if o["kind"] == "HTTPRoute"]
    gateway = yaml.safe_load((ROOT / "k8s" / "overlays" / "kind" / "gateway.yaml").read_text())
    assert "namespace" not in gateway["metadata"], "kind.sh applies it with --namespace"
    for ref in route["spec"]["parentRefs"]:
        assert ref["name"] == gateway["metadata"]["name"]
        assert ref.get("namespace", route["metadata"]["namespace"]) == namespace


def test_kind_scripts_follow_namespace_and_release() -> None:
    script = (KIND / "kind.sh").read_text()
    assert (
        'NAMESPACE="${CHORUS_NAMESPACE:-chorus}"' in script
        and 'RELEASE="${CHORUS_RELEASE:-chorus}"' in script
    )
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "kind-e2e.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert {"CHORUS_NAMESPACE", "CHORUS_RELEASE"} <= set(job["env"])
    scripts = "\n".join(step.get("run", "") for step in job["steps"])
    for hard_coded in ["--namespace chorus", "-n chorus", "deployment/chorus", "instance=chorus"]:
        assert hard_coded not in scripts, hard_coded


def test_kind_job_installs_only_what_it_needs() -> None:
    """Debian's prometheus would hold :9090, which kind maps; chromium is no Ubuntu package."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "kind-e2e.yml").read_text())
    (job,) = workflow["jobs"].values()
    scripts = "\n".join(step.get("run", "") for step in job["steps"])
    assert "system-deps" not in scripts
    for package in ["prometheus", "chromium", "haproxy", "redis-server"]:
        assert package not in scripts, package
    host_ports = {
        m["hostPort"]
        for n in yaml.safe_load((KIND / "cluster.yaml").read_text())["nodes"]
        for m in n.get("extraPortMappings", [])
    }
    assert 9090 in host_ports, "the port a host Prometheus would take"


def test_kind_node_image_is_pinned_within_kubectl_skew() -> None:
    client = json.loads(run([tool("kubectl"), "version", "--client", "-o", "json"]).stdout)["clientVersion"]
    kubectl_minor = int(client["minor"].rstrip("+"))
    nodes = yaml.safe_load((KIND / "cluster.yaml").read_text())["nodes"]
    images = {node.get("image") for node in nodes}
    assert len(images) == 1, "every node runs the same pinned image"
    (image,) = images
    match = re.fullmatch(r"kindest/node:v1\.(\d+)\.\d+@sha256:[0-9a-f]{64}", str(image))
    assert match, f"pin the node image by version and digest: {image}"
    assert abs(int(match.group(1)) - kubectl_minor) <= 1, "kubectl supports one minor of skew"
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "kind-e2e.yml").read_text())
    (job,) = workflow["jobs"].values()
    (kind_step,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("helm/kind-action@")]
    assert kind_step["with"]["config"] == "k8s/kind/cluster.yaml"
    assert kind_step["with"]["kubectl_version"].startswith(f"v1.{kubectl_minor}.")
