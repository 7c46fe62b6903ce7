#!/usr/bin/env bash
# Smoke test of tokenmart on a real Kubernetes cluster: install the KubeRay operator and the
# chart, wait for the RayService, create an API key through the admin API, send one chat
# request and check that it was answered and billed. Run `k8s/smoke.sh --help`.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RELEASE="tokenmart"
NAMESPACE="tokenmart"
CHART="${SCRIPT_DIR}/../helm/tokenmart"
KUBERAY_VERSION="1.5.1"
KUBERAY_NAMESPACE="kuberay-system"
INSTALL_KUBERAY=1
INSTALL_CHART=1
TIMEOUT_S=1800
MODEL=""
ADMIN_SECRET=""
ADMIN_KEY="admin-token"
UNINSTALL=0
HELM_ARGS=()

usage() {
  cat <<'EOF'
Usage: k8s/smoke.sh [options] [-- extra helm install arguments]

Installs the KubeRay operator (Helm repo "kuberay", pinned version) and the tokenmart chart,
waits until the RayService is Ready, creates an API key through the admin API, sends one
chat completion and checks that it was answered and billed. Prints PASS or FAIL; exits 0
only on PASS. Needs kubectl (pointed at the cluster), helm, curl and python3.

Options:
  -f, --values FILE        values file for the chart (repeatable), e.g.
                           -f helm/tokenmart/examples/values-cpu.yaml
  --set KEY=VALUE          a chart value (repeatable)
  --release NAME           Helm release (default: tokenmart)
  -n, --namespace NS       namespace of the release (default: tokenmart)
  --chart PATH             chart to install (default: helm/tokenmart next to this script)
  --kuberay-version V      KubeRay operator chart version (default: 1.5.1)
  --skip-kuberay           the operator is already installed: do not install it
  --skip-install           the release is already installed: only wait and test it
  --timeout SECONDS        how long to wait for the RayService (default: 1800; images and
                           model weights download on the first start)
  --model ID               listing to call (default: the first one of GET /v1/models)
  --admin-secret NAME      Secret holding the admin token (default: <fullname>-admin, the
                           chart's own; set it when adminToken.existingSecret is used)
  --admin-key KEY          key of the token in that Secret (default: admin-token)
  --uninstall              uninstall the release at the end (the operator stays)
  -h, --help               this help

Example (kind or minikube with internet, CPU only):
  k8s/smoke.sh -f helm/tokenmart/examples/values-cpu.yaml
EOF
}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
fail() {
  printf '\033[1;31mFAIL:\033[0m %s\n' "$*" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -f | --values) HELM_ARGS+=(--values "${2:?--values needs a file}"); shift 2 ;;
    --set) HELM_ARGS+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --release) RELEASE="${2:?--release needs a name}"; shift 2 ;;
    -n | --namespace) NAMESPACE="${2:?--namespace needs a name}"; shift 2 ;;
    --chart) CHART="${2:?--chart needs a path}"; shift 2 ;;
    --kuberay-version) KUBERAY_VERSION="${2:?--kuberay-version needs a version}"; shift 2 ;;
    --skip-kuberay) INSTALL_KUBERAY=0; shift ;;
    --skip-install) INSTALL_CHART=0; shift ;;
    --timeout) TIMEOUT_S="${2:?--timeout needs seconds}"; shift 2 ;;
    --model) MODEL="${2:?--model needs a listing id}"; shift 2 ;;
    --admin-secret) ADMIN_SECRET="${2:?--admin-secret needs a name}"; shift 2 ;;
    --admin-key) ADMIN_KEY="${2:?--admin-key needs a key}"; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; HELM_ARGS+=("$@"); break ;;
    *) usage >&2; fail "unknown argument: $1" ;;
  esac
done

for tool in kubectl helm curl python3; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed (needed: kubectl, helm, curl, python3)"
done
[[ "$TIMEOUT_S" =~ ^[0-9]+$ ]] || fail "--timeout must be a whole number of seconds, not '$TIMEOUT_S'"

WORK="$(mktemp -d)"
PORT_FORWARD_PID=""
cleanup() {
  if [[ -n "$PORT_FORWARD_PID" ]]; then
    kill "$PORT_FORWARD_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# json FILE EXPRESSION: evaluate a Python expression over the JSON document `d` in FILE.
json() {
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# Show what the cluster says about the release, so a failure can be diagnosed from the output.
diagnose() {
  log "state of the release (for diagnosis)"
  kubectl -n "$NAMESPACE" get rayservice,raycluster,pods,svc -o wide >&2 || true
  kubectl -n "$NAMESPACE" get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 25 >&2 || true
}

log "cluster: $(kubectl config current-context 2>/dev/null || echo '(no current context)')"
kubectl version >/dev/null 2>&1 || fail "kubectl cannot reach the cluster (check KUBECONFIG / the current context)"

# -- 1. the KubeRay operator -------------------------------------------------------------
if [[ "$INSTALL_KUBERAY" == 1 ]]; then
  log "installing the KubeRay operator ${KUBERAY_VERSION} into ${KUBERAY_NAMESPACE}"
  helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
  helm repo update kuberay >/dev/null
  helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
    --namespace "$KUBERAY_NAMESPACE" --create-namespace --wait --timeout 10m
fi
kubectl wait --for=condition=Established crd/rayservices.ray.io --timeout=120s >/dev/null ||
  fail "the RayService CRD is not installed: install the KubeRay operator (drop --skip-kuberay)"

# -- 2. the chart --------------------------------------------------------------------------
if [[ "$INSTALL_CHART" == 1 ]]; then
  [[ -f "$CHART/Chart.yaml" ]] || fail "no chart at $CHART (use --chart)"
  log "installing the chart $CHART as release ${RELEASE} in ${NAMESPACE}"
  helm upgrade --install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace "${HELM_ARGS[@]}"
fi

FULLNAME="$(kubectl -n "$NAMESPACE" get rayservice -l "app.kubernetes.io/instance=${RELEASE}" \
  -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)"
[[ -n "$FULLNAME" ]] || fail "no RayService of release ${RELEASE} in namespace ${NAMESPACE}"
ADMIN_SECRET="${ADMIN_SECRET:-${FULLNAME}-admin}"

# -- 3. wait for the RayService --------------------------------------------------------------
log "waiting up to ${TIMEOUT_S} s for RayService ${FULLNAME} to be Ready (images, weights, Serve app)"
if ! kubectl -n "$NAMESPACE" wait --for=condition=Ready "rayservice/${FULLNAME}" --timeout="${TIMEOUT_S}s"; then
  diagnose
  fail "RayService ${FULLNAME} was not Ready after ${TIMEOUT_S} s"
fi

# -- 4. reach the API ----------------------------------------------------------------------
LOCAL_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log "port-forwarding svc/${FULLNAME}-api to 127.0.0.1:${LOCAL_PORT}"
SERVICE_PORT="$(kubectl -n "$NAMESPACE" get svc "${FULLNAME}-api" -o jsonpath='{.spec.ports[0].port}')" ||
  fail "the API Service ${FULLNAME}-api does not exist"
kubectl -n "$NAMESPACE" port-forward "svc/${FULLNAME}-api" "${LOCAL_PORT}:${SERVICE_PORT}" >"$WORK/port-forward.log" 2>&1 &
PORT_FORWARD_PID=$!
BASE="http://127.0.0.1:${LOCAL_PORT}"
for _ in $(seq 1 60); do
  if curl -fsS "$BASE/healthz" >"$WORK/healthz.json" 2>/dev/null; then break; fi
  sleep 1
done
curl -fsS "$BASE/healthz" >"$WORK/healthz.json" 2>/dev/null || {
  cat "$WORK/port-forward.log" >&2
  diagnose
  fail "GET /healthz did not answer 200 through the port-forward"
}
log "healthz: $(cat "$WORK/healthz.json")"

ADMIN_TOKEN="$(kubectl -n "$NAMESPACE" get secret "$ADMIN_SECRET" -o "jsonpath={.data.${ADMIN_KEY}}" | base64 -d)" ||
  fail "cannot read the admin token from Secret ${ADMIN_SECRET} (key ${ADMIN_KEY}); see --admin-secret"
[[ -n "$ADMIN_TOKEN" ]] || fail "Secret ${ADMIN_SECRET} has no key ${ADMIN_KEY}; see --admin-key"

# request METHOD PATH OUTFILE [curl args...]: prints the HTTP status (000: no answer).
request() {
  local method="$1" path="$2" out="$3"
  shift 3
  # A request that gets no answer prints 000, so the caller's message says which one failed.
  curl -sS -X "$method" -o "$out" -w '%{http_code}' "$BASE$path" "$@" || true
}

# -- 5. a key, then one chat request -----------------------------------------------------------
log "creating an API key with \$1 of credit (POST /admin/v1/keys)"
status="$(request POST /admin/v1/keys "$WORK/key.json" -H "Authorization: Bearer ${ADMIN_TOKEN}" \
  -H 'content-type: application/json' -d '{"name": "k8s-smoke-test", "credit_usd": 1}')"
[[ "$status" == 201 ]] || fail "creating a key answered $status: $(cat "$WORK/key.json")"
API_KEY="$(json "$WORK/key.json" 'd["key"]')"
KEY_ID="$(json "$WORK/key.json" 'd["id"]')"
log "key ${KEY_ID} created"

if [[ -z "$MODEL" ]]; then
  status="$(request GET /v1/models "$WORK/models.json" -H "Authorization: Bearer ${API_KEY}")"
  [[ "$status" == 200 ]] || fail "GET /v1/models answered $status: $(cat "$WORK/models.json")"
  MODEL="$(json "$WORK/models.json" 'd["data"][0]["id"]')"
fi

log "POST /v1/chat/completions with model ${MODEL}"
python3 - "$MODEL" >"$WORK/chat-request.json" <<'EOF'
import json, sys
print(json.dumps({"model": sys.argv[1], "max_tokens": 32,
                  "messages": [{"role": "user", "content": "Say hello in five words."}]}))
EOF
status="$(request POST /v1/chat/completions "$WORK/chat.json" -H "Authorization: Bearer ${API_KEY}" \
  -H 'content-type: application/json' --data-binary "@$WORK/chat-request.json")"
echo "response (HTTP $status):"
python3 -m json.tool "$WORK/chat.json" 2>/dev/null || cat "$WORK/chat.json"
[[ "$status" == 200 ]] || fail "the chat request answered $status"

CONTENT="$(json "$WORK/chat.json" 'd["choices"][0]["message"]["content"]')"
TOTAL_TOKENS="$(json "$WORK/chat.json" 'd["usage"]["total_tokens"]')"
COST="$(json "$WORK/chat.json" 'd["usage"]["cost"]')"
echo "usage: prompt $(json "$WORK/chat.json" 'd["usage"]["prompt_tokens"]'), completion" \
  "$(json "$WORK/chat.json" 'd["usage"]["completion_tokens"]'), total ${TOTAL_TOKENS}, cost \$${COST}"
[[ -n "$CONTENT" ]] || fail "the answer has no content"
[[ "$TOTAL_TOKENS" -gt 0 ]] || fail "usage.total_tokens is ${TOTAL_TOKENS}"

status="$(request GET /v1/key "$WORK/key-after.json" -H "Authorization: Bearer ${API_KEY}")"
[[ "$status" == 200 ]] || fail "GET /v1/key answered $status: $(cat "$WORK/key-after.json")"
echo "key after the request: $(json "$WORK/key-after.json" \
  '"credit $%s, spent $%s, on hold $%s" % (d["credit_usd"], d["spent_usd"], d["on_hold_usd"])')"
# Billed: $1 of credit = what is left + what was spent, and what was spent is the answer's cost.
json "$WORK/key-after.json" \
  'sys.exit(0 if abs(d["credit_usd"] + d["spent_usd"] - 1) < 1e-6 and abs(d["spent_usd"] - '"${COST}"') < 1e-6 else 1)' ||
  fail "the key's balance does not show the request's cost \$${COST} charged against its \$1"

# -- 6. tidy up ------------------------------------------------------------------------------
status="$(request DELETE "/admin/v1/keys/${KEY_ID}" "$WORK/revoke.json" -H "Authorization: Bearer ${ADMIN_TOKEN}")"
[[ "$status" == 200 ]] || log "revoking the smoke-test key ${KEY_ID} answered ${status}; revoke it by hand"
if [[ "$UNINSTALL" == 1 ]]; then
  log "uninstalling release ${RELEASE}"
  helm uninstall "$RELEASE" --namespace "$NAMESPACE"
fi

printf '\033[1;32mPASS:\033[0m %s answered through RayService %s/%s: %s tokens, $%s billed\n' \
  "$MODEL" "$NAMESPACE" "$FULLNAME" "$TOTAL_TOKENS" "$COST"
