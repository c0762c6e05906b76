#!/usr/bin/env bash
# Kubernetes deployment, container image, alerts and dashboards (k8s/tests): kustomize
# renders the base, the minikube overlay and the ghz Jobs; kubernetes-validate --strict
# checks every built-in object; the real binary starts with the ConfigMap's settings;
# promtool checks and unit-tests the alert rules; a real Prometheus scrapes a real
# server with the rules loaded and answers every dashboard query; the Dockerfile's
# stages and build context are checked statically (no container engine here).
# Needs target/release/tidewatch (scripts/test builds it), kubectl, kubernetes-validate,
# pytest (.venv from scripts/requirements-dev.txt), prometheus, promtool and
# redis-server (apt, .ci/run).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
for tool in kubectl kubernetes-validate promtool prometheus redis-server grpcurl; do
  command -v "$tool" >/dev/null || { echo "k8s.sh: $tool not found (run .ci/run)" >&2; exit 1; }
done
exec python -m pytest -q -p no:cacheprovider k8s/tests
