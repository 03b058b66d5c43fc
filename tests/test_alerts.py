"""The alert rules are valid and their promtool unit tests (fire and stay quiet) pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from chorus.devcluster import find_binary

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "helm" / "chorus" / "files" / "alerts.yaml"
RULE_TESTS = sorted((Path(__file__).parent / "rules").glob("*.yaml"))
REQUIRED = {
    "ChorusBrokerDown",
    "ChorusReplicaNotReady",
    "ChorusFanoutLatencyHigh",
    "ChorusSlowConsumerDrops",
    "ChorusNoReplicas",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_binary("promtool"), *args], capture_output=True, text=True, timeout=120)


def alert_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_file_is_valid() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist_with_severity_and_summary() -> None:
    assert alert_names() >= REQUIRED
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_fires_and_stays_quiet_in_unit_tests() -> None:
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # Each alert needs a case where it fires (listed in exp_alerts) and one where it must not.
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired >= alert_names(), alert_names() - fired
    assert quiet >= alert_names(), alert_names() - quiet
