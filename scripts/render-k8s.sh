#!/usr/bin/env bash
# Render the plain manifests in k8s/manifests from the Helm chart, for users without Helm.
# They name two Secrets instead of generating them (see k8s/README.md); a test keeps them
# equal to what the chart renders.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HELM=${HELM:-.tools/bin/helm}
OUT=${1:-k8s/manifests/tokenmart-cpu.yaml}
mkdir -p "$(dirname "$OUT")"
"$HELM" template tokenmart helm/tokenmart --namespace tokenmart \
  -f helm/tokenmart/examples/values-cpu.yaml \
  --set adminToken.existingSecret=tokenmart-admin \
  --set redis.auth.existingSecret=tokenmart-redis \
  > "$OUT"
echo "wrote $OUT"
