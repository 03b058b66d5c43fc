#!/usr/bin/env bash
# Chorus on a local kind cluster: `kind.sh up|deploy|test|down`.
#   up      create the cluster, install Gateway API CRDs, Traefik and kube-prometheus-stack
#   deploy  build the image, `kind load` it, `helm upgrade --install` Chorus
#   test    `helm test` (cross-replica smoke) and a short load run through the Gateway
#   roll    rolling restart of the chat Deployment, waiting until it is done
#   down    delete the cluster
# Needs docker and kind on PATH; helm and kubectl come from `make k8s-tools` when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/k8s/kind"
CLUSTER="${KIND_CLUSTER:-chorus}"
NAMESPACE="${CHORUS_NAMESPACE:-chorus}"
RELEASE="${CHORUS_RELEASE:-chorus}"
IMAGE="${CHORUS_IMAGE:-chorus:dev}"
GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-v1.2.1}"
TRAEFIK_CHART_VERSION="${TRAEFIK_CHART_VERSION:-34.4.1}"
KPS_CHART_VERSION="${KPS_CHART_VERSION:-69.8.2}"
GATEWAY_URL="http://127.0.0.1:8080"

export PATH="$ROOT/.tools/bin:$PATH"
CONTEXT="kind-$CLUSTER"
# The chat Deployment by its labels: its name is the release's only when that contains "chorus".
CHAT_PODS="app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=server"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

require() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "kind.sh: $tool not found; see README 'Deploy to Kubernetes'" >&2; exit 1; }
  done
}

up() {
  require docker kind helm kubectl
  if kind get clusters | grep -qx "$CLUSTER"; then
    log "kind cluster $CLUSTER exists"
  else
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config "$HERE/cluster.yaml" --wait 120s
  fi
  log "Gateway API CRDs $GATEWAY_API_VERSION"
  kubectl --context "$CONTEXT" apply --server-side -f \
    "https://github.com/kubernetes-sigs/gateway-api/releases/download/$GATEWAY_API_VERSION/standard-install.yaml"
  helm repo add traefik https://traefik.github.io/charts --force-update >/dev/null
  helm repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update >/dev/null
  log "Traefik (Gateway API controller)"
  helm --kube-context "$CONTEXT" upgrade --install traefik traefik/traefik --version "$TRAEFIK_CHART_VERSION" \
    --namespace traefik --create-namespace --values "$HERE/traefik-values.yaml" --wait --timeout 5m
  log "kube-prometheus-stack"
  helm --kube-context "$CONTEXT" upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack \
    --version "$KPS_CHART_VERSION" --namespace monitoring --create-namespace \
    --values "$HERE/monitoring-values.yaml" --wait --timeout 10m
}

deploy() {
  require docker kind helm kubectl
  log "building $IMAGE"
  # The one way the image is built (make image); kind loads from docker, so docker builds it.
  make -C "$ROOT" --no-print-directory image IMAGE="$IMAGE" CONTAINER_ENGINE=docker
  log "loading $IMAGE into kind"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
  kubectl --context "$CONTEXT" create namespace "$NAMESPACE" --dry-run=client -o yaml \
    | kubectl --context "$CONTEXT" apply -f -
  kubectl --context "$CONTEXT" label namespace "$NAMESPACE" --overwrite pod-security.kubernetes.io/enforce=restricted
  # The Gateway lives with Chorus; Traefik serves it on its `web` entrypoint.
  kubectl --context "$CONTEXT" apply --namespace "$NAMESPACE" -f "$ROOT/k8s/overlays/kind/gateway.yaml"
  log "helm upgrade --install $RELEASE"
  helm --kube-context "$CONTEXT" upgrade --install "$RELEASE" "$ROOT/helm/chorus" \
    --namespace "$NAMESPACE" --values "$HERE/chorus-values.yaml" \
    --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --wait --timeout 5m
  # A new image under the same tag needs new pods.
  roll
  urls
}

roll() {
  require kubectl
  log "rolling restart of release $RELEASE in $NAMESPACE"
  kubectl --context "$CONTEXT" --namespace "$NAMESPACE" rollout restart deployment --selector "$CHAT_PODS"
  kubectl --context "$CONTEXT" --namespace "$NAMESPACE" rollout status deployment --selector "$CHAT_PODS" --timeout 5m
}

run_test() {
  require helm kubectl
  log "helm test (a message must cross two replicas through the Service)"
  helm --kube-context "$CONTEXT" test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout 3m
  log "smoke through the Gateway at $GATEWAY_URL"
  "$ROOT/.venv/bin/chorus" smoke --url "ws://127.0.0.1:8080" --attempts 40
  log "short load run through the Gateway (SLO verdict in results/)"
  (cd "$ROOT" && .venv/bin/python -m loadtest --url "$GATEWAY_URL" --replicas 3 --users 40 --run-time 30)
}

urls() {
  cat <<URLS

Chorus:      $GATEWAY_URL/         (WebSocket ws://127.0.0.1:8080/ws/<room>)
Prometheus:  http://127.0.0.1:9090/
Grafana:     http://127.0.0.1:3000/  (admin / kubectl --context $CONTEXT -n monitoring get secret kube-prometheus-stack-grafana -o jsonpath='{.data.admin-password}' | base64 -d)
URLS
}

down() {
  require kind
  kind delete cluster --name "$CLUSTER"
}

case "${1:-}" in
  up) up ;;
  deploy) deploy ;;
  test) run_test ;;
  roll) roll ;;
  urls) urls ;;
  down) down ;;
  *) echo "usage: $0 up|deploy|test|roll|urls|down" >&2; exit 2 ;;
esac
