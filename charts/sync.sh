#!/usr/bin/env bash
# Copies the two single sources the chart ships into it: the CRDs (crds/ -> the chart's crds/)
# and the RBAC manifests (rbac/ -> the chart's files/rbac/, which templates/rbac.yaml reads).
# Helm cannot read files outside a chart, and `helm package` does not follow symlinks out of
# it, so the chart carries copies; tests/chart/test_sources.py fails when they differ.
# Run it after editing crds/ or rbac/:   charts/sync.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
chart=$root/charts/ipvs-operator

mkdir -p "$chart/crds" "$chart/files/rbac"
rm -f "$chart"/crds/*.yaml "$chart"/files/rbac/*.yaml
cp "$root"/crds/*.yaml "$chart/crds/"
cp "$root"/rbac/*.yaml "$chart/files/rbac/"
echo "charts/sync.sh: copied $(ls "$root"/crds/*.yaml | wc -l) CRD and" \
    "$(ls "$root"/rbac/*.yaml | wc -l) RBAC files into $chart" >&2
