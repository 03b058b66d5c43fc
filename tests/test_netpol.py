"""The chart's NetworkPolicies proven by flows, not by shape.

A small evaluator of Kubernetes NetworkPolicy semantics (networking.k8s.io/v1) runs the
RENDERED policies of every ci values file against a table of flows between pods built from the
rendered objects (the chat and Redis Deployments' pod templates, the helm test Pod) and a few
stand-ins for the rest of a cluster (a gateway, Prometheus, CoreDNS, strangers). The rules it
follows, as the API documents them:

- A pod is isolated for a direction when a policy in its namespace selects it and that
  direction is in the policy's policyTypes (omitted: Ingress, plus Egress when the policy has
  an egress section). An isolated pod admits a flow when any rule of any selecting policy does.
- A flow needs both ends: the source's egress and the destination's ingress.
- A rule matches when one of its peers matches (none listed: every peer) and one of its ports
  does (none listed: every port). A peer's podSelector and namespaceSelector together are an
  AND; podSelector alone means the policy's namespace; ipBlock is a CIDR minus its `except`.
- A port matches by protocol (default TCP) and number, or by name resolved against the
  destination pod's container ports; `endPort` makes a range.

An address outside the cluster (8.8.8.8 here) appears only in this table: nothing is sent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s import CHART, CI_VALUES, NAMESPACE, RELEASE, find, render, selects

NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str
    # Named container ports: name -> (number, protocol).
    ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Address:
    """An endpoint that is no pod (outside the cluster): only ipBlock peers can match it."""

    ip: str


Endpoint = Pod | Address


@dataclass(frozen=True)
class Cluster:
    namespaces: Mapping[str, Mapping[str, str]]
    policies: list[dict[str, Any]]

    def allows(self, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """Whether `source` may open a connection to `destination` on port/protocol."""
        egress = not isinstance(source, Pod) or self._admits(
            source, "Egress", destination, destination, port, protocol
        )
        ingress = not isinstance(destination, Pod) or self._admits(
            destination, "Ingress", source, destination, port, protocol
        )
        return egress and ingress

    def _admits(
        self, pod: Pod, direction: str, peer: Endpoint, destination: Endpoint, port: int, protocol: str
    ) -> bool:
        isolating = [
            policy
            for policy in self.policies
            if policy["metadata"].get("namespace") == pod.namespace
            and selects(policy["spec"].get("podSelector", {}), pod.labels)
            and direction in _policy_types(policy["spec"])
        ]
        if not isolating:
            return True
        peers_key = "from" if direction == "Ingress" else "to"
        return any(
            self._peer_matches(rule.get(peers_key), peer, policy["metadata"]["namespace"])
            and _port_matches(rule.get("ports"), destination, port, protocol)
            for policy in isolating
            for rule in policy["spec"].get(direction.lower()) or []
        )

    def _peer_matches(
        self, peers: list[dict[str, Any]] | None, peer: Endpoint, policy_namespace: str
    ) -> bool:
        if not peers:
            return True
        for item in peers:
            if "ipBlock" in item:
                block = item["ipBlock"]
                address = ipaddress.ip_address(peer.ip)
                if address in ipaddress.ip_network(block["cidr"]) and not any(
                    address in ipaddress.ip_network(cidr) for cidr in block.get("except") or []
                ):
                    return True
                continue
            if not isinstance(peer, Pod):
                continue
            if "namespaceSelector" in item:
                namespace_ok = selects(item["namespaceSelector"], self.namespaces[peer.namespace])
            else:
                namespace_ok = peer.namespace == policy_namespace
            if namespace_ok and selects(item.get("podSelector", {}), peer.labels):
                return True
        return False


def _policy_types(spec: Mapping[str, Any]) -> list[str]:
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _port_matches(
    ports: list[dict[str, Any]] | None, destination: Endpoint, port: int, protocol: str
) -> bool:
    if not ports:
        return True
    for item in ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        wanted = item.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            # A named port means that name on the destination pod; no pod, no name.
            if not isinstance(destination, Pod) or wanted not in destination.ports:
                continue
            number, named_protocol = destination.ports[wanted]
            if named_protocol == protocol and number == port:
                return True
            continue
        if wanted <= port <= item.get("endPort", wanted):
            return True
    return False


def namespace(name: str, **labels: str) -> tuple[str, dict[str, str]]:
    return name, {NAME_LABEL: name, **labels}


# ---------------------------------------------------------------------------------------------
# The evaluator on hand-made policies: a broken evaluator cannot pass the chart silently.


def _policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


WEB = Pod("web", "shop", {"app": "web", "tier": "front"}, "10.244.0.10", {"http": (8080, "TCP")})
API = Pod("api", "shop", {"app": "api"}, "10.244.0.11", {"http": (9000, "TCP"), "dns": (53, "UDP")})
SPY = Pod("spy", "other", {"app": "web"}, "10.244.1.10")
MON = Pod("prom", "monitoring", {"app": "prometheus"}, "10.244.2.10")
NAMESPACES = dict([namespace("shop"), namespace("other", team="red"), namespace("monitoring", team="ops")])


def test_evaluator_no_policy_allows_everything() -> None:
    cluster = Cluster(NAMESPACES, [])
    assert cluster.allows(SPY, WEB, 8080) and cluster.allows(WEB, Address("8.8.8.8"), 443)


def test_evaluator_isolation_needs_a_matching_rule() -> None:
    deny_in = _policy(
        "deny", "shop", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}
    )
    cluster = Cluster(NAMESPACES, [deny_in])
    assert not cluster.allows(API, WEB, 8080), "isolated for ingress, no rule"
    assert cluster.allows(WEB, API, 9000), "egress is not isolated by an Ingress-only policy"
    assert cluster.allows(SPY, API, 9000), "api is not selected"
    # A policy of another namespace never isolates a pod.
    elsewhere = _policy("deny", "other", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    assert Cluster(NAMESPACES, [elsewhere]).allows(API, WEB, 8080)
    # policyTypes omitted: Ingress, and Egress only when an egress section exists.
    implied = _policy("implied", "shop", {"podSelector": {"matchLabels": {"app": "web"}}})
    assert not Cluster(NAMESPACES, [implied]).allows(API, WEB, 8080)
    assert Cluster(NAMESPACES, [implied]).allows(WEB, Address("8.8.8.8"), 443)
    with_egress = _policy("e", "shop", {"podSelector": {"matchLabels": {"app": "web"}}, "egress": []})
    assert not Cluster(NAMESPACES, [with_egress]).allows(WEB, Address("8.8.8.8"), 443)
    # Policies add up: a second policy's rule opens what the first left closed.
    allow_api = _policy(
        "allow",
        "shop",
        {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"podSelector": {}}]}]},
    )
    assert Cluster(NAMESPACES, [deny_in, allow_api]).allows(API, WEB, 8080)
    assert not Cluster(NAMESPACES, [deny_in, allow_api]).allows(SPY, WEB, 8080), (
        "podSelector alone: own namespace"
    )


def test_evaluator_selectors_and_peers() -> None:
    def cluster_with(peers: list[dict[str, Any]] | None) -> Cluster:
        rule: dict[str, Any] = {} if peers is None else {"from": peers}
        return Cluster(NAMESPACES, [_policy("p", "shop", {"podSelector": {}, "ingress": [rule]})])

    assert cluster_with(None).allows(SPY, API, 9000), "no `from`: every source"
    assert cluster_with([]).allows(SPY, API, 9000), "empty `from`: every source"
    both = [
        {
            "namespaceSelector": {"matchLabels": {"team": "ops"}},
            "podSelector": {"matchLabels": {"app": "web"}},
        }
    ]
    assert not cluster_with(both).allows(MON, API, 9000) and not cluster_with(both).allows(SPY, API, 9000)
    either = [
        {"namespaceSelector": {"matchLabels": {"team": "ops"}}},
        {"podSelector": {"matchLabels": {"app": "web"}}},
    ]
    assert cluster_with(either).allows(MON, API, 9000) and cluster_with(either).allows(WEB, API, 9000)
    assert not cluster_with(either).allows(SPY, API, 9000), "app=web but in another namespace"
    expressions = [
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "team", "operator": "Exists"},
                    {"key": "team", "operator": "NotIn", "values": ["red"]},
                ]
            },
            "podSelector": {
                "matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["prometheus", "grafana"]},
                    {"key": "debug", "operator": "DoesNotExist"},
                ]
            },
        }
    ]
    assert cluster_with(expressions).allows(MON, API, 9000)
    assert not cluster_with(expressions).allows(SPY, API, 9000)
    debug = Pod("prom-debug", "monitoring", {"app": "prometheus", "debug": "1"}, "10.244.2.11")
    assert not cluster_with(expressions).allows(debug, API, 9000)
    blocks = [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}}]
    assert cluster_with(blocks).allows(MON, API, 9000) and not cluster_with(blocks).allows(SPY, API, 9000)
    assert not cluster_with([{"podSelector": {}}]).allows(Address("10.244.0.99"), API, 9000)


def test_evaluator_ports() -> None:
    def egress(ports: list[dict[str, Any]]) -> Cluster:
        spec = {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": ports}],
        }
        return Cluster(NAMESPACES, [_policy("p", "shop", spec)])

    assert egress([{"port": 9000}]).allows(WEB, API, 9000)
    assert not egress([{"port": 9000}]).allows(WEB, API, 9000, "UDP"), "protocol defaults to TCP"
    assert not egress([{"port": 9000}]).allows(WEB, API, 9001)
    assert egress([{"port": "http"}]).allows(WEB, API, 9000), "named port of the destination pod"
    assert not egress([{"port": "http"}]).allows(WEB, API, 8080), (
        "8080 is the source's http, not the destination's"
    )
    assert not egress([{"port": "http"}]).allows(WEB, Address("8.8.8.8"), 9000), (
        "an address has no named ports"
    )
    assert egress([{"port": "dns", "protocol": "UDP"}]).allows(WEB, API, 53, "UDP")
    assert egress([{"port": 30000, "endPort": 30100}]).allows(WEB, API, 30050)
    assert not egress([{"port": 30000, "endPort": 30100}]).allows(WEB, API, 30101)
    assert egress([{"protocol": "UDP"}]).allows(WEB, API, 5353, "UDP"), (
        "no number: every port of the protocol"
    )


def test_evaluator_needs_both_ends() -> None:
    out = {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"], "egress": [{}]}
    closed_in = {"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Ingress"]}
    cluster = Cluster(NAMESPACES, [_policy("out", "shop", out), _policy("in", "shop", closed_in)])
    assert not cluster.allows(WEB, API, 9000)


# ---------------------------------------------------------------------------------------------
# The chart's rendered policies against the flows that matter.

CASES = [pytest.param(path, id=path.name.removesuffix("-values.yaml")) for path in CI_VALUES]
OUTSIDE = Address("8.8.8.8")


def _merged(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merged(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _values(values_file: Path) -> dict[str, Any]:
    """The values the render used: the chart's defaults under the ci file (as helm merges them)."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return _merged(defaults, yaml.safe_load(values_file.read_text()) or {})


def _template_pod(objects: list[dict[str, Any]], kind: str, name: str, ip: str) -> Pod:
    obj = find(objects, kind, name)
    template = obj if kind == "Pod" else obj["spec"]["template"]
    ports = {
        port["name"]: (port["containerPort"], port.get("protocol", "TCP"))
        for container in template["spec"]["containers"]
        for port in container.get("ports", [])
        if "name" in port
    }
    return Pod(name, obj["metadata"]["namespace"], template["metadata"]["labels"], ip, ports)


def _namespace_name(selector: Mapping[str, Any]) -> str:
    return str(selector["matchLabels"][NAME_LABEL])


@dataclass(frozen=True)
class Flow:
    name: str
    source: Endpoint
    destination: Endpoint
    port: int
    protocol: str
    allowed: bool


def _flows(values_file: Path) -> tuple[Cluster, list[Flow]]:
    objects = render(values_file)
    values = _values(values_file)
    policy = values["networkPolicy"]
    gateway_ns = _namespace_name(policy["ingressNamespaceSelector"])
    monitoring_ns = _namespace_name(policy["monitoringNamespaceSelector"])
    dns_ns = _namespace_name(policy["dnsNamespaceSelector"])
    namespaces = dict(
        [
            namespace(NAMESPACE),
            namespace(gateway_ns),
            namespace(monitoring_ns),
            namespace(dns_ns),
            namespace("guests"),
        ]
    )
    cluster = Cluster(namespaces, [o for o in objects if o["kind"] == "NetworkPolicy"])

    chat = _template_pod(objects, "Deployment", RELEASE, "10.244.0.10")
    smoke = _template_pod(objects, "Pod", f"{RELEASE}-smoke", "10.244.0.11")
    chat_port = chat.ports["http"][0]
    gateway = Pod("gateway", gateway_ns, {"app": "gateway"}, "10.244.1.10")
    prometheus = Pod("prometheus", monitoring_ns, {"app.kubernetes.io/name": "prometheus"}, "10.244.2.10")
    dns = Pod(
        "coredns",
        dns_ns,
        {"k8s-app": "kube-dns"},
        "10.244.3.10",
        {"dns": (53, "UDP"), "dns-tcp": (53, "TCP")},
    )
    stranger = Pod("stranger", "guests", {"app": "curious"}, "10.244.4.10")
    # Same namespace, not of this release.
    neighbour = Pod(
        "neighbour",
        NAMESPACE,
        {"app.kubernetes.io/name": "other", "app.kubernetes.io/instance": "other"},
        "10.244.0.50",
    )

    restricted = any(p["metadata"]["name"] == RELEASE for p in cluster.policies)
    flows = [
        Flow("gateway/ingress namespace -> chat port", gateway, chat, chat_port, "TCP", True),
        Flow("helm test pod -> chat port", smoke, chat, chat_port, "TCP", True),
        Flow("chat -> DNS (UDP)", chat, dns, 53, "UDP", True),
        Flow("chat -> DNS (TCP)", chat, dns, 53, "TCP", True),
        Flow("monitoring namespace -> metrics", prometheus, chat, chat_port, "TCP", True),
        Flow("another namespace -> chat", stranger, chat, chat_port, "TCP", not restricted),
        Flow("chat -> outside the cluster", chat, OUTSIDE, 443, "TCP", not restricted),
        Flow("helm test pod -> outside the cluster", smoke, OUTSIDE, 443, "TCP", not restricted),
    ]
    if values["redis"]["enabled"]:
        redis = _template_pod(objects, "Deployment", f"{RELEASE}-redis", "10.244.0.20")
        redis_port = redis.ports["redis"][0]
        flows += [
            Flow("chat -> Redis", chat, redis, redis_port, "TCP", True),
            Flow("a pod outside the release -> Redis", neighbour, redis, redis_port, "TCP", not restricted),
            Flow("helm test pod -> Redis", smoke, redis, redis_port, "TCP", not restricted),
            Flow("Redis -> outside the cluster", redis, OUTSIDE, 443, "TCP", not restricted),
        ]
    else:
        external = values["externalRedis"]
        cidrs = external["cidrs"]
        address = (
            Address(str(next(ipaddress.ip_network(cidrs[0]).hosts()))) if cidrs else Address("10.99.0.5")
        )
        flows.append(Flow("chat -> external Redis", chat, address, external["port"], "TCP", True))
        if external["mode"] == "sentinel":
            for host in external["sentinel"]["hosts"]:
                port = int(host.rsplit(":", 1)[1])
                flows.append(Flow(f"chat -> sentinel {host}", chat, address, port, "TCP", True))
        if cidrs:
            outside = Address("192.0.2.7")  # TEST-NET-1: in no cidr of the values
            flows.append(
                Flow(
                    "chat -> Redis port outside externalRedis.cidrs",
                    chat,
                    outside,
                    external["port"],
                    "TCP",
                    False,
                )
            )
    return cluster, flows


def _verdicts(cluster: Cluster, flows: Iterable[Flow]) -> list[str]:
    wrong = []
    for flow in flows:
        got = cluster.allows(flow.source, flow.destination, flow.port, flow.protocol)
        if got != flow.allowed:
            verdict, want = ("allowed" if x else "denied" for x in (got, flow.allowed))
            wrong.append(f"{flow.name}: {verdict}, want {want}")
    return wrong


@pytest.mark.parametrize("values_file", CASES)
def test_rendered_policies_admit_exactly_the_flows_chorus_needs(values_file: Path) -> None:
    cluster, flows = _flows(values_file)
    enabled = bool(_values(values_file)["networkPolicy"]["enabled"])
    assert bool(cluster.policies) == enabled, "policies are rendered exactly when networkPolicy.enabled"
    if not enabled:
        # No policy selects anything: every flow is allowed, the denials included.
        assert all(cluster.allows(f.source, f.destination, f.port, f.protocol) for f in flows)
        return
    assert _verdicts(cluster, flows) == []


def test_every_restricting_values_file_is_covered() -> None:
    """At least the bundled-Redis and the external-Redis forms render policies to evaluate."""
    enabled = [p.name for p in CI_VALUES if _values(p)["networkPolicy"]["enabled"]]
    assert {"networkpolicy-values.yaml", "external-redis-values.yaml", "sentinel-values.yaml"} <= set(enabled)


def test_the_old_smoke_labels_would_be_caught() -> None:
    """The helm test pod labelled like a chat pod (the bug of issue 11) fails the flow table."""
    cluster, flows = _flows(CHART / "ci" / "networkpolicy-values.yaml")
    chat = next(f.destination for f in flows if f.name == "gateway/ingress namespace -> chat port")
    assert isinstance(chat, Pod)
    old_smoke = Pod(
        "smoke", NAMESPACE, {**chat.labels, "app.kubernetes.io/component": "smoke-test"}, "10.244.0.11"
    )
    assert not cluster.allows(old_smoke, chat, chat.ports["http"][0])
