"""The Helm chart: lint, schema, every rendered object valid for recent Kubernetes, checkov clean.

No cluster here: the chart is rendered with `helm template` over the values files kept in
helm/chorus/ci/ and each object is checked against the Kubernetes OpenAPI schemas; the CRD
objects (ServiceMonitor, PrometheusRule, HTTPRoute) by their own fields.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.k8s import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    chorus_deployment,
    find,
    render,
    render_text,
    run,
    selects,
    tool,
)

# Two recent minors (and the oldest the chart's kubeVersion promises to keep working on).
KUBERNETES_VERSIONS = ["1.33.0", "1.35.0"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}
CASES = [pytest.param(path, id=path.name.removesuffix("-values.yaml")) for path in CI_VALUES]


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = chorus_deployment(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "chorus")


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def test_ci_values_cover_the_matrix() -> None:
    names = {path.name.removesuffix("-values.yaml") for path in CI_VALUES}
    assert {"default", "ingress", "httproute", "autoscaling", "monitoring", "networkpolicy"} <= names
    assert {"external-redis", "auth"} <= names


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=["chart", *(p.name for p in CI_VALUES)])
def test_helm_lint_strict(values: Path | None) -> None:
    argv = [tool("helm"), "lint", "--strict", str(CHART)]
    if values is not None:
        argv += ["--values", str(values)]
    result = run(argv)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", CASES)
def test_rendered_objects_are_valid_kubernetes(values: Path) -> None:
    objects = render(values)
    assert objects
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc.message}")


def test_schema_rejects_a_typo_and_latest() -> None:
    typo = run([tool("helm"), "template", RELEASE, str(CHART), "--set", "replicaCont=3"])
    assert typo.returncode != 0
    assert "replicaCont" in typo.stderr
    nested = run([tool("helm"), "template", RELEASE, str(CHART), "--set", "redis.persistance.enabled=true"])
    assert nested.returncode != 0 and "persistance" in nested.stderr
    latest = run([tool("helm"), "template", RELEASE, str(CHART), "--set", "image.tag=latest"])
    assert latest.returncode != 0


def test_external_redis_needs_a_url() -> None:
    result = run([tool("helm"), "template", RELEASE, str(CHART), "--set", "redis.enabled=false"])
    assert result.returncode != 0
    assert "externalRedis" in result.stderr


def test_defaults_are_hardened_and_scaled_out() -> None:
    objects = render()
    deployment = chorus_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    container = _container(objects)
    assert deployment["spec"]["replicas"] >= 2
    assert container["image"].endswith(":0.1.0"), "image tag defaults to the chart appVersion"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10001
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    service = find(objects, "Service", RELEASE)
    assert service["spec"].get("sessionAffinity", "None") == "None"
    assert find(objects, "ServiceAccount", RELEASE)["automountServiceAccountToken"] is False
    assert find(objects, "PodDisruptionBudget", RELEASE)
    # Every chart-set CHORUS_ variable must be a real setting, never one Kubernetes injects.
    names = set(_env(container)) | set(find(objects, "ConfigMap", RELEASE)["data"])
    assert not {n for n in names if n == "CHORUS_PORT" or n.startswith("CHORUS_SERVICE_")}
    assert _env(container)["CHORUS_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert find(objects, "ConfigMap", RELEASE)["data"]["CHORUS_LOG_FORMAT"] == "json"
    # The bundled Redis runs restricted too.
    redis_pod = find(objects, "Deployment", f"{RELEASE}-redis")["spec"]["template"]["spec"]
    assert redis_pod["securityContext"]["runAsUser"] >= 10001
    assert redis_pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_grace_period_outlasts_prestop_and_drain() -> None:
    for sets in [(), ("config.drainSeconds=30", "preStopSleepSeconds=10")]:
        objects = render(None, sets)
        pod = chorus_deployment(objects)["spec"]["template"]["spec"]
        container = _container(objects)
        drain = float(find(objects, "ConfigMap", RELEASE)["data"]["CHORUS_DRAIN_SECONDS"])
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        # gunicorn's graceful timeout is drain + 10 (chorus.gunicorn_conf): the kubelet must wait longer.
        assert pod["terminationGracePeriodSeconds"] > pause + drain + 10


def test_workers_get_a_writable_multiprocess_dir() -> None:
    objects = render(None, ("workers=3",))
    container = _container(objects)
    path = _env(container)["PROMETHEUS_MULTIPROC_DIR"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in chorus_deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[path]] and "emptyDir" in volumes[mounts["/tmp"]]
    assert find(objects, "ConfigMap", RELEASE)["data"]["CHORUS_WORKERS"] == "3"
    assert "PROMETHEUS_MULTIPROC_DIR" not in _env(_container(render()))


def test_secrets_reach_the_env() -> None:
    inline = render(None, ("auth.jwtSecret=hunter2hunter2",))
    jwt = _env(_container(inline))["CHORUS_AUTH_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = find(inline, "Secret", jwt["name"])
    assert jwt["key"] in secret["data"]
    existing = render(CHART / "ci" / "auth-values.yaml")
    ref = _env(_container(existing))["CHORUS_AUTH_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "chorus-auth", "key": "jwt"}
    assert not [o for o in existing if o["kind"] == "Secret" and o["metadata"]["name"] == "chorus-auth"]
    assert "CHORUS_AUTH_JWT_SECRET" not in _env(_container(render()))
    external = render(CHART / "ci" / "external-redis-values.yaml")
    url = _env(_container(external))["CHORUS_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert url == {"name": "chorus-redis-url", "key": "url"}
    assert not [o for o in external if o["metadata"]["name"].endswith("-redis")]
    api = render(None, ("apiKeys.existingSecret=backend-keys",))
    keys = _env(_container(api))["CHORUS_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert keys == {"name": "backend-keys", "key": "api-keys"}
    assert "CHORUS_API_KEYS" not in _env(_container(render()))


def test_ingress_and_httproute_point_at_the_service() -> None:
    ingress_objects = render(CHART / "ci" / "ingress-values.yaml")
    service = find(ingress_objects, "Service", RELEASE)
    ingress = find(ingress_objects, "Ingress", RELEASE)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert ingress["spec"]["ingressClassName"] == "haproxy"
    assert ingress["metadata"]["annotations"]["haproxy.org/timeout-tunnel"] == "3600s"

    route_objects = render(CHART / "ci" / "httproute-values.yaml")
    route = find(route_objects, "HTTPRoute", RELEASE)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"][0] == {
        "name": "public",
        "namespace": "gateway-system",
        "sectionName": "https",
    }
    rule = route["spec"]["rules"][0]
    assert rule["matches"][0]["path"] == {"type": "PathPrefix", "value": "/"}
    assert rule["timeouts"]["request"] == "0s", "a request timeout would cut every WebSocket"
    (ref,) = rule["backendRefs"]
    assert ref["name"] == RELEASE
    assert ref["port"] == find(route_objects, "Service", RELEASE)["spec"]["ports"][0]["port"]


def test_monitoring_objects() -> None:
    objects = render(CHART / "ci" / "monitoring-values.yaml")
    service = find(objects, "Service", RELEASE)
    monitor = find(objects, "ServiceMonitor", RELEASE)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]

    rule = find(objects, "PrometheusRule", RELEASE)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert set(item) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert ("alert" in item) != ("record" in item) and item["expr"]

    dashboard = find(objects, "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = dashboard["data"].values()
    assert json.loads(body) == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_network_policy_limits_traffic() -> None:
    objects = render(CHART / "ci" / "networkpolicy-values.yaml")
    policy = find(objects, "NetworkPolicy", RELEASE)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    selectors = [p["namespaceSelector"]["matchLabels"] for p in sources if "namespaceSelector" in p]
    assert {"kubernetes.io/metadata.name": "gateway-system"} in selectors
    assert {"kubernetes.io/metadata.name": "monitoring"} in selectors
    assert all(port["port"] == "http" for rule in policy["spec"]["ingress"] for port in rule["ports"])
    egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert egress_ports == {53, 6379}
    redis_policy = find(objects, "NetworkPolicy", f"{RELEASE}-redis")
    assert redis_policy["spec"]["egress"] == []


def test_helm_test_pod_runs_the_smoke_command() -> None:
    objects = render()
    pod = find(objects, "Pod", f"{RELEASE}-smoke")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == _container(objects)["image"]
    service = find(objects, "Service", RELEASE)
    url = f"ws://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert container["command"] + container["args"][:3] == ["chorus", "smoke", "--url", url]


def test_checkov_finds_nothing(tmp_path: Path) -> None:
    for values in CI_VALUES:
        (tmp_path / values.name).write_text(render_text(values))
    result = run(
        [tool("checkov"), "--directory", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
         "--output", "json", "--skip-download"],
        timeout=300,
        env={"BC_SKIP_MAPPING": "TRUE"},  # offline: no guideline look-ups on the vendor's API
    )  # fmt: skip
    report = json.loads(result.stdout)
    summary = report["summary"] if isinstance(report, dict) else report[0]["summary"]
    failed = [] if isinstance(report, list) else report["results"]["failed_checks"]
    assert summary["failed"] == 0, [(c["check_id"], c["resource"]) for c in failed]
    assert summary["passed"] > 100


def test_chart_readme_lists_every_documented_value() -> None:
    """The chart README's values table is generated from values.yaml (`make chart-readme`)."""
    result = subprocess.run(
        [sys.executable, str(CHART.parents[1] / "k8s" / "tools" / "chart_readme.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("values", CASES)
def test_helm_test_pod_is_selected_by_nothing_of_the_chart(values: Path) -> None:
    """The smoke pod takes no chat traffic, blocks no drain and is held to no chat pod's policy."""
    objects = render(values)
    smoke = find(objects, "Pod", f"{RELEASE}-smoke")["metadata"]["labels"]
    deployment = chorus_deployment(objects)
    chat = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"],
        "Service": {"matchLabels": find(objects, "Service", RELEASE)["spec"]["selector"]},
    }
    for obj in objects:
        if obj["kind"] == "PodDisruptionBudget":
            selectors[f"PodDisruptionBudget/{obj['metadata']['name']}"] = obj["spec"]["selector"]
        if obj["kind"] == "NetworkPolicy" and obj["metadata"]["name"] == RELEASE:
            selectors["NetworkPolicy"] = obj["spec"]["podSelector"]
    for name, selector in selectors.items():
        assert selects(selector, chat), f"{name} must select the chat pods"
        assert not selects(selector, smoke), f"{name} selects the helm test pod"
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        # Only its own policy (egress to the chat port and DNS) selects the helm test pod.
        own = policy["metadata"]["name"] == f"{RELEASE}-test"
        assert selects(policy["spec"]["podSelector"], smoke) == own, policy["metadata"]["name"]
    assert any(name.startswith("PodDisruptionBudget") for name in selectors), (
        "every ci values file keeps the PDB"
    )


def _render_fresh(chart: Path = CHART, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One `helm template` run, never cached: each run draws its own random values."""
    argv = [tool("helm"), "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    for item in sets:
        argv += ["--set", item]
    result = run(argv)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _redis_password_and_checksums(objects: list[dict[str, Any]]) -> tuple[str, dict[str, str]]:
    secret = find(objects, "Secret", f"{RELEASE}-redis")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    checksums = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
        for d in objects
        if d["kind"] == "Deployment"
    }
    assert set(checksums) == {RELEASE, f"{RELEASE}-redis"}
    return password, checksums


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_generated_redis_password_is_drawn_once_and_only_it_is_hashed() -> None:
    passwords = set()
    for _ in range(2):
        password, checksums = _redis_password_and_checksums(_render_fresh())
        assert len(password) == 32
        # Both Deployments hash the very password the Secret holds, not a second random draw.
        assert set(checksums.values()) == {_sha256(password)}
        passwords.add(password)
    assert len(passwords) == 2, "without a live Secret (helm template has no lookup) each install draws anew"


def test_upgrade_keeps_the_live_redis_password_and_restarts_nothing(tmp_path: Path) -> None:
    """`lookup` stubbed with a live Secret: the checksums stay put across renders and config changes."""
    chart = tmp_path / "chorus"
    shutil.copytree(CHART, chart)
    helpers = chart / "templates" / "_helpers.tpl"
    call = 'lookup "v1" "Secret" .Release.Namespace (include "chorus.redis.fullname" .)'
    text = helpers.read_text()
    assert text.count(call) == 1, "the Secret lookup moved: update this stub"
    live = "live-password-from-the-cluster"
    helpers.write_text(text.replace(call, f'dict "data" (dict "redis-password" ("{live}" | b64enc))'))
    renders = [_render_fresh(chart), _render_fresh(chart), _render_fresh(chart, ("config.logLevel=debug",))]
    for objects in renders:
        password, checksums = _redis_password_and_checksums(objects)
        assert password == live
        assert set(checksums.values()) == {_sha256(live)}
    # A chat setting changes only the chat pods' config checksum; Redis (and its data) stays.
    redis = [find(o, "Deployment", f"{RELEASE}-redis")["spec"]["template"] for o in renders]
    assert redis[0] == redis[1] == redis[2]
    annotations = [chorus_deployment(o)["spec"]["template"]["metadata"]["annotations"] for o in renders]
    assert annotations[0] == annotations[1]
    assert annotations[2]["checksum/config"] != annotations[0]["checksum/config"]


def test_given_redis_password_is_the_one_hashed() -> None:
    password, checksums = _redis_password_and_checksums(_render_fresh(sets=("redis.auth.password=given-pw",)))
    assert password == "given-pw"
    assert set(checksums.values()) == {_sha256("given-pw")}


@pytest.mark.parametrize("drain", [10, 30])
def test_rollouts_lose_no_capacity(drain: int) -> None:
    objects = render(None, (f"config.drainSeconds={drain}",))
    spec = chorus_deployment(objects)["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout must never drop below the desired replicas"
    assert int(str(rolling["maxSurge"]).rstrip("%")) >= 1
    assert spec["minReadySeconds"] >= 1
    assert float(find(objects, "ConfigMap", RELEASE)["data"]["CHORUS_DRAIN_SECONDS"]) == drain
    # The grace period follows the drain window: derived in the template, not kept by hand.
    base = chorus_deployment(render())["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace - base == drain - 10
    pause = int(_container(objects)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace >= pause + drain + 10 + 1


def test_schema_keeps_rollouts_surging() -> None:
    for bad in ["rollingUpdate.maxSurge=0", "minReadySeconds=-1", "rollingUpdate.extra=1"]:
        result = run([tool("helm"), "template", RELEASE, str(CHART), "--set", bad])
        assert result.returncode != 0, bad


def _allowed_hosts(objects: list[dict[str, Any]]) -> list[str] | None:
    value = find(objects, "ConfigMap", RELEASE)["data"].get("CHORUS_ALLOWED_HOSTS")
    return None if value is None else value.split(",")


def test_allowed_hosts_follow_ingress_route_and_service() -> None:
    in_cluster = [
        RELEASE,
        f"{RELEASE}.{NAMESPACE}",
        f"{RELEASE}.{NAMESPACE}.svc",
        f"{RELEASE}.{NAMESPACE}.svc.cluster.local",
    ]
    assert _allowed_hosts(render()) is None, "nothing named: any Host, as the service defaults"
    ingress = _allowed_hosts(render(CHART / "ci" / "ingress-values.yaml"))
    assert ingress == ["chat.example.com", *in_cluster]
    route = render(CHART / "ci" / "httproute-values.yaml", ("config.allowedHosts={extra.example.com}",))
    assert _allowed_hosts(route) == ["chat.example.com", "extra.example.com", *in_cluster]
    assert _allowed_hosts(render(None, ("config.allowedHosts={a.example.com}",))) == [
        "a.example.com",
        *in_cluster,
    ]
    # The helm test pod reaches the Service by its short name, which must be on the list.
    smoke = find(render(CHART / "ci" / "ingress-values.yaml"), "Pod", f"{RELEASE}-smoke")
    url = smoke["spec"]["containers"][0]["args"][2]
    assert url.removeprefix("ws://").split(":")[0] in ingress
    bad = run([tool("helm"), "template", RELEASE, str(CHART), "--set", "config.allowedHosts={a.com b.com}"])
    assert bad.returncode != 0


def test_the_local_cluster_checks_readiness_as_the_kubelet_does() -> None:
    """The dev HAProxy takes a replica out as the chart's readinessProbe would, not sooner."""
    from chorus import devcluster

    probe = _container(render(None, ()))["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert probe["periodSeconds"] == devcluster.READINESS_PERIOD_S
    assert probe["timeoutSeconds"] == devcluster.READINESS_TIMEOUT_S
    assert probe["failureThreshold"] == devcluster.READINESS_FAILURES
