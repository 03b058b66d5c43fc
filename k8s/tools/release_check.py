"""Check that a release tag, the chart and the package agree before anything is pushed.

Usage: python k8s/tools/release_check.py vX.Y.Z --owner GITHUB_OWNER [--github-output FILE]

One version names everything a release publishes: the tag `vX.Y.Z`, the chart's `version` and
`appVersion` (so `helm install --version X.Y.Z` runs image tag X.Y.Z, the default of
`image.tag`), and the Python package's version in pyproject.toml. The image goes to
`ghcr.io/<owner>/chorus`, which must be the chart's default `image.repository`; a fork that
publishes under its own owner sets that value in helm/chorus/values.yaml first. With
--github-output the version, image and chart repository are written there for later steps.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "chorus"


def release_facts(owner: str) -> dict[str, str]:
    """The versions and names the repository declares, and where the release pushes for `owner`."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    registry = f"ghcr.io/{owner.lower()}"  # GHCR names are lower case
    return {
        "chart_version": str(chart["version"]),
        "app_version": str(chart["appVersion"]),
        "package_version": str(project["version"]),
        "values_repository": str(values["image"]["repository"]),
        "image": f"{registry}/chorus",
        "chart_repository": f"oci://{registry}/charts",
    }


def problems(tag: str, facts: dict[str, str]) -> list[str]:
    found = []
    if not tag.startswith("v"):
        found.append(f"tag {tag!r} is not v<version>")
    version = tag.removeprefix("v")
    for key, label in [
        ("chart_version", "helm/chorus/Chart.yaml version"),
        ("app_version", "helm/chorus/Chart.yaml appVersion"),
        ("package_version", "pyproject.toml version"),
    ]:
        if facts[key] != version:
            found.append(f"{label} is {facts[key]!r}, the tag says {version!r}")
    if facts["values_repository"] != facts["image"]:
        found.append(
            f"helm/chorus/values.yaml image.repository is {facts['values_repository']!r} but this release "
            f"pushes {facts['image']!r}: a fork sets image.repository to its own image first"
        )
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag", help="the release tag, e.g. v0.1.0")
    parser.add_argument("--owner", required=True, help="GitHub owner the image and chart are pushed under")
    parser.add_argument("--github-output", type=Path, help="append version=, image=, chart_repository= here")
    args = parser.parse_args(argv)
    facts = release_facts(args.owner)
    found = problems(args.tag, facts)
    for problem in found:
        print(f"release check: {problem}", file=sys.stderr)
    if found:
        return 1
    version = args.tag.removeprefix("v")
    chart = f"{facts['chart_repository']}/chorus"
    print(f"release check: ok: {facts['image']}:{version} and chart {chart} {version}")
    if args.github_output is not None:
        with args.github_output.open("a") as out:
            out.write(
                f"version={version}\nimage={facts['image']}\nchart_repository={facts['chart_repository']}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
