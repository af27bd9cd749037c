#!/usr/bin/env bash
# End-to-end smoke test on a kind cluster: `make e2e-kind`.
#
# NOT RUN IN CI OR IN THE DEVELOPMENT SANDBOX: it needs Docker, kind and kubectl (and helm
# with E2E_ENVOY_GATEWAY_VERSION), none of which exist there. The unit tests cover the
# pieces against kmock and the real schemas; this script checks what only a cluster can:
# that the apiserver accepts config/default (admission, CEL rules, RBAC), that the image
# starts, that the operator wins its leader Lease and becomes Ready, and that it writes
# status on the sample CacheBackends.
#
# What it does:
#   1. creates kind cluster $KIND_CLUSTER (default inference-cache-e2e) unless it exists;
#   2. builds inference-cache:dev from the Dockerfile and loads it into the cluster;
#   3. optionally installs Envoy Gateway $E2E_ENVOY_GATEWAY_VERSION with helm (it brings
#      the Gateway API CRDs), so the HTTPRoute sample and the EnvoyGateway objects apply;
#   4. applies config/default, waits for the operator and server Deployments;
#   5. checks the Lease inference-cache-operator-leader names the operator pod;
#   6. applies config/samples/*.yaml (our CRs, namespace default) and, with Envoy Gateway,
#      the `qwen` HTTPRoute (config/samples/gateway/gateway_v1_httproute.yaml);
#   7. waits until every sample CacheBackend has a Ready condition (the reconciler ran and
#      wrote status) and prints them, their gateway status and CacheIndex cluster-default.
# No vLLM runs: the backends stay not Ready (no engine pods), which is the expected answer.
# The cluster is deleted at the end unless KEEP_CLUSTER=1.
set -euo pipefail

CLUSTER=${KIND_CLUSTER:-inference-cache-e2e}
IMAGE=inference-cache:dev
NS=inference-cache-system
TIMEOUT=${E2E_TIMEOUT:-300s}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool not found" >&2; exit 2; }
done
if [[ -n "${E2E_ENVOY_GATEWAY_VERSION:-}" ]]; then
  command -v helm >/dev/null || { echo "e2e-kind: helm not found" >&2; exit 2; }
fi

if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
  trap 'kind delete cluster --name "$CLUSTER"' EXIT
fi
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER"

docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

if [[ -n "${E2E_ENVOY_GATEWAY_VERSION:-}" ]]; then
  helm upgrade --install eg oci://docker.io/envoyproxy/gateway-helm \
    --version "$E2E_ENVOY_GATEWAY_VERSION" -n envoy-gateway-system --create-namespace --wait
fi

kubectl apply --server-side -k config/default
kubectl -n "$NS" rollout status deployment/inference-cache-operator --timeout="$TIMEOUT"
kubectl -n "$NS" rollout status deployment/inference-cache-server --timeout="$TIMEOUT"

holder=$(kubectl -n "$NS" get lease inference-cache-operator-leader -o jsonpath='{.spec.holderIdentity}')
operator_pods=$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=operator -o jsonpath='{.items[*].metadata.name}')
if [[ " $operator_pods " != *" $holder "* ]]; then
  echo "e2e-kind: lease holder '$holder' is not an operator pod ($operator_pods)" >&2
  exit 1
fi
echo "e2e-kind: leader is $holder"

kubectl apply -f config/samples/
if [[ -n "${E2E_ENVOY_GATEWAY_VERSION:-}" ]]; then
  # Only the EnvoyGateway route: no Inference-Extension gateway is installed here.
  kubectl apply -f config/samples/gateway/gateway_v1_httproute.yaml
fi

for backend in $(kubectl get cachebackends -o name); do
  kubectl wait "$backend" --timeout="$TIMEOUT" \
    --for=jsonpath='{.status.conditions[?(@.type=="Ready")].type}'=Ready
done
kubectl get cachebackends -o wide
kubectl get cachebackends -o custom-columns='NAME:.metadata.name,EMITTED:.status.gateway.emitted,SKIPPED:.status.gateway.skipped'
kubectl get cacheindex cluster-default -o yaml || true
echo "e2e-kind: ok"
