"""The Dockerfile's text: pinned base, non-root, the chart's command (test_image.py builds and runs it)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from fnmatch import fnmatch

from tests.k8s import ROOT, chorus_deployment, render

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _args() -> dict[str, str]:
    return dict(rest.split("=", 1) for keyword, rest in _instructions() if keyword == "ARG" and "=" in rest)


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _base_images() -> list[str]:
    args = _args()
    images = []
    for stage in _stages():
        image = stage[0][1].split()[0]
        images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def test_multi_stage_from_a_pinned_python_slim() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build wheels in one stage, run from a slim one"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(part) for part in requires.removeprefix(">=").split("."))
    for image in _base_images():
        name, _, tag = image.partition(":")
        assert tag and tag != "latest", f"{image}: pin the base image by version"
        version = re.match(r"(\d+)\.(\d+)\.(\d+)-slim", tag)
        assert name == "python" and version, f"{image}: expected python:X.Y.Z-slim..."
        assert tuple(int(part) for part in version.groups()[:2]) >= minimum


def test_runtime_stage_is_non_root_and_probe_free() -> None:
    runtime = _stages()[-1]
    keywords = [keyword for keyword, _ in runtime]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10001, "a numeric UID runAsNonRoot can verify"
    assert "HEALTHCHECK" not in keywords, "Kubernetes probes /livez and /readyz"
    assert ("STOPSIGNAL", "SIGTERM") in runtime, "Chorus drains on SIGTERM"
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert copies and all("--chown=" in rest for rest in copies)


def test_cmd_is_what_the_chart_runs() -> None:
    cmd = json.loads(next(rest for keyword, rest in _stages()[-1] if keyword == "CMD"))
    container = chorus_deployment(render())["spec"]["template"]["spec"]["containers"][0]
    assert cmd == container["command"] + container["args"]
    assert cmd[:2] == ["chorus", "serve"]
    port = int(cmd[cmd.index("--port") + 1])
    exposed = [rest for keyword, rest in _stages()[-1] if keyword == "EXPOSE"]
    assert exposed == [str(port)]
    assert container["ports"][0]["containerPort"] == port


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip

    def sent(path: str) -> bool:
        included = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            pattern = pattern.removeprefix("!").rstrip("/")
            if fnmatch(path, pattern) or path.startswith(pattern + "/"):
                included = negated
        return included

    sources = []
    for stage in _stages():
        for keyword, rest in stage:
            if keyword == "COPY" and "--from=" not in rest:
                sources += [word for word in shlex.split(rest)[:-1] if not word.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert sent(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    for private in [".git", ".venv", ".tools", "tests", "artifacts", "service/chorus/__pycache__"]:
        assert not sent(private), f"{private} would be sent to the Docker daemon"
