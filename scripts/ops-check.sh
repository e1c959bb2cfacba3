#!/usr/bin/env bash
# Checks everything the gateway ships for operators, without a container
# runtime or a cluster (neither exists in CI):
#   1. tools: .tools/ops-venv (kubernetes-validate, checkov; pinned in
#      deploy/ops-requirements.txt, through scripts/tools.sh ops) and promtool
#      (Debian's `prometheus` package, installed with apt-get when missing)
#   2. deploy/kubernetes: rendered with `kubectl kustomize` (kubectl is part of
#      this machine image; no registry we use ships kubectl or kustomize, so
#      without it the files are checked one by one and the kustomization's
#      file list is checked instead), every manifest and the rendering
#      validated by kubernetes-validate --strict against the oldest and the
#      newest Kubernetes we support (K8S_VERSIONS)
#   3. checkov over Dockerfile, deploy/kubernetes and the rendering; the only
#      skips are inline annotations with their reason:
#        Dockerfile       CKV_DOCKER_2  no HEALTHCHECK: no program in the image
#                                       could run one, and Kubernetes ignores it
#                                       (the kubelet probes /livez and /readyz)
#        deployment.yaml  CKV_K8S_43    image by tag: the digest is only known
#                                       to the operator's build pipeline
#                                       (`kustomize edit set image ...@sha256:`)
#        deployment.yaml  CKV_K8S_35    the Redis URL is an env var from a
#                                       Secret: --idempotency-store takes a
#                                       value, not a file
#      scripts/ops_check.py refuses any other skip and any skip without reason.
#   4. scripts/ops_check.py: the consistency checks no tool does (kustomization
#      lists every file; terminationGracePeriodSeconds > shutdown delay +
#      grace; ports, probes, security context; every GORMIC_* variable is a
#      flag's; Dockerfile shape; dashboard and alerts use only the gateway's
#      metric names and no hard-coded datasource; runbook links resolve to
#      headings of docs/operations.md; docs/operations.md names every flag
#      and metric; docs/configuration.md has a row for every flag with its
#      variable and default; every relative link of README.md and docs/*.md
#      resolves, to a heading where it names one)
#   5. promtool: check rules and test rules for deploy/prometheus, and every
#      dashboard query parsed as PromQL
#   6. the Docker build context: the build stage's COPY sources, copied alone
#      to a temporary directory, pass `cargo check --locked` there (a source
#      the Dockerfile forgets to copy fails here, not in the operator's build)
#
# OPS_CHECK_BINARY=target/debug/gormic-gateway also checks the lists of
# scripts/ops_check.py against that binary: every GORMIC_* variable the
# manifests set is one its --help lists and every flag it has is listed, that
# docs/configuration.md writes each flag with the placeholder --help shows,
# and every metric family its /metrics exposes (run with --sandbox on loopback
# ports) is listed with its type, none of the removed ones among them.
# Fails (exit 1) on the first failing step, naming it.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=(1.30.0 1.37.0)
venv=.tools/ops-venv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$SECONDS

step() { echo "ops-check: $*"; }
fail() {
    echo "ops-check: FAILED: $*" >&2
    exit 1
}

# ---- 1. Tools
scripts/tools.sh ops
if ! command -v promtool >/dev/null; then
    step "installing promtool (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update"
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null || fail "apt-get install prometheus"
fi
step "$(promtool --version 2>&1 | head -1)"

# ---- 2. Kubernetes manifests: render, validate
manifests=()
for f in deploy/kubernetes/*.yaml; do
    [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done
rendered=""
if command -v kubectl >/dev/null; then
    step "kubectl kustomize deploy/kubernetes"
    kubectl kustomize deploy/kubernetes >"$work/rendered.yaml" || fail "kubectl kustomize deploy/kubernetes"
    rendered="$work/rendered.yaml"
elif command -v kustomize >/dev/null; then
    step "kustomize build deploy/kubernetes"
    kustomize build deploy/kubernetes >"$work/rendered.yaml" || fail "kustomize build deploy/kubernetes"
    rendered="$work/rendered.yaml"
else
    echo "ops-check: WARNING: neither kubectl nor kustomize: the kustomization is not rendered;" \
        "each manifest is validated alone and the kustomization's file list is checked" >&2
fi
for version in "${K8S_VERSIONS[@]}"; do
    step "kubernetes-validate --strict, Kubernetes $version"
    # It reports an unknown kind as a warning and exits 0: any warning fails here.
    if ! "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" \
        "${manifests[@]}" ${rendered:+"$rendered"} >"$work/validate.log" 2>&1 ||
        [[ -s "$work/validate.log" ]]; then
        cat "$work/validate.log" >&2
        fail "kubernetes-validate (Kubernetes $version)"
    fi
done

# ---- 3. Security scan
checkov() {
    "$venv/bin/checkov" --quiet --compact --skip-download "$@"
}
step "checkov: Dockerfile"
checkov --framework dockerfile -f Dockerfile || fail "checkov Dockerfile"
step "checkov: deploy/kubernetes"
checkov --framework kubernetes -d deploy/kubernetes || fail "checkov deploy/kubernetes"
if [[ -n "$rendered" ]]; then
    step "checkov: rendered kustomization"
    checkov --framework kubernetes -f "$rendered" || fail "checkov on the rendered kustomization"
fi

# ---- 4. Consistency
step "consistency (scripts/ops_check.py)"
"$venv/bin/python" scripts/ops_check.py static . "$work/dashboard-rules.yaml" || fail "consistency checks"
if [[ -n "${OPS_CHECK_BINARY:-}" ]]; then
    step "flags known to $OPS_CHECK_BINARY"
    "$venv/bin/python" scripts/ops_check.py binary-env . "$OPS_CHECK_BINARY" || fail "variables unknown to $OPS_CHECK_BINARY"
    step "metrics exposed by $OPS_CHECK_BINARY --sandbox"
    "$venv/bin/python" scripts/ops_check.py binary-metrics . "$OPS_CHECK_BINARY" || fail "metrics of $OPS_CHECK_BINARY"
fi

# ---- 5. Prometheus rules and dashboard queries
step "promtool check rules deploy/prometheus/alerts.yaml"
promtool check rules deploy/prometheus/alerts.yaml || fail "promtool check rules"
step "promtool test rules deploy/prometheus/alerts.test.yaml"
promtool test rules deploy/prometheus/alerts.test.yaml || fail "promtool test rules"
step "dashboard queries parse as PromQL"
promtool check rules "$work/dashboard-rules.yaml" >"$work/promtool.log" 2>&1 || {
    cat "$work/promtool.log" >&2
    fail "a dashboard query is not valid PromQL"
}

# ---- 6. Docker build context
step "Docker build context: cargo check --locked on the COPY sources alone"
mapfile -t sources < <("$venv/bin/python" scripts/ops_check.py copy-sources .)
# A fixed place inside target/ (ignored by git and by the Docker build
# context): dependencies compiled by earlier cargo runs are reused through the
# shared target directory, and only the gateway itself is checked again.
context=target/ops-check-context
rm -rf "$context"
mkdir -p "$context"
cp -R "${sources[@]}" "$context/"
CARGO_TARGET_DIR="$PWD/target" cargo check --locked --quiet --manifest-path "$context/Cargo.toml" ||
    fail "cargo check in a build context holding only what the Dockerfile copies (${sources[*]})"

step "all checks passed in $((SECONDS - started)) s"
