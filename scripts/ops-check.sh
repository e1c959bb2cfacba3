#!/usr/bin/env bash
# Checks everything the gateway ships for operators, without a container
# runtime or a cluster (neither exists in CI), against the gateway binary
# itself: its --help and its /metrics are the one list of its flags and
# metrics (nothing here lists them), so a flag or a metric is added in its
# code and its docs line, and these checks hold everything else to it.
#   1. tools: .tools/ops-venv (kubernetes-validate, checkov; pinned in
#      deploy/ops-requirements.txt, through scripts/tools.sh ops), promtool,
#      redis-server and openssl (Debian's prometheus, redis-server and openssl
#      packages, installed with apt-get when missing; without apt-get it
#      names what to install and stops)
#   2. the binary: OPS_CHECK_BINARY (CI: target/debug/gormic-gateway), else
#      target/debug/gormic-gateway, built first with `cargo build`.
#      scripts/ops_check.py reads its flags, with their variables,
#      placeholders and defaults, from `--help`, and its metric families,
#      with their types, from the /metrics of two runs on loopback ports: one
#      with --sandbox, TLS (a throw-away certificate), a Redis store (a
#      redis-server of its own on an ephemeral port, stopped after) and
#      --quotas, a call with an idempotency key, one over the quota and a
#      change of the quotas file; one against an upstream that refuses
#      connections, with --metrics-organization-label (retries, the breaker).
#      Every flag must have a GORMIC_* variable, no removed metric may come
#      back, and the series alerts count on must be there from the start.
#   3. deploy/kubernetes: rendered with `kubectl kustomize` (kubectl is part of
#      this machine image; no registry we use ships kubectl or kustomize, so
#      without it the files are checked one by one and the kustomization's
#      file list is checked instead), every manifest and the rendering
#      validated by kubernetes-validate --strict against the oldest and the
#      newest Kubernetes we support (K8S_VERSIONS)
#   4. checkov over Dockerfile, deploy/kubernetes and the rendering; the only
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
#   5. scripts/ops_check.py: the consistency checks no tool does, against the
#      binary's lists of step 2 (kustomization lists every file;
#      terminationGracePeriodSeconds > shutdown delay + grace; ports, probes,
#      security context; every GORMIC_* variable of deploy/kubernetes and of
#      the Dockerfile's ENV is a flag's; Dockerfile shape; dashboard and
#      alerts use only the binary's metric names, a panel shows each of them,
#      no hard-coded datasource; runbook links resolve to headings of
#      docs/operations.md; docs/operations.md names every flag and has a row
#      for every metric with its type; docs/configuration.md has a row for
#      every flag with its variable, --help's placeholder and default; every
#      relative link of README.md and docs/*.md resolves, to a heading where
#      it names one)
#   6. promtool: check rules and test rules for deploy/prometheus, and every
#      dashboard query parsed as PromQL
#   7. the Docker build context: the build stage's COPY sources, copied alone
#      to a temporary directory, pass `cargo check --locked` there (a source
#      the Dockerfile forgets to copy fails here, not in the operator's build)
#
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
missing=()  # Debian packages
programs=() # the programs they provide
command -v promtool >/dev/null || { missing+=(prometheus) && programs+=(promtool); }
command -v redis-server >/dev/null || { missing+=(redis-server) && programs+=(redis-server); }
command -v openssl >/dev/null || { missing+=(openssl) && programs+=(openssl); }
if ((${#missing[@]})); then
    command -v apt-get >/dev/null ||
        fail "needs promtool (from Prometheus), redis-server and openssl on PATH; missing: ${programs[*]}," \
            "and no apt-get to install them: install them with your package manager, then run it again"
    step "installing ${missing[*]} (Debian packages)"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq || fail "apt-get update"
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        fail "apt-get install ${missing[*]}"
fi
step "$(promtool --version 2>&1 | head -1)"

# ---- 2. The binary: its flags and metrics, the lists every check uses
if [[ -n "${OPS_CHECK_BINARY:-}" ]]; then
    binary=$OPS_CHECK_BINARY
else
    step "cargo build (OPS_CHECK_BINARY=path checks another build)"
    cargo build --quiet || fail "cargo build"
    binary=target/debug/gormic-gateway
fi
step "flags (--help) and metrics (/metrics, two runs on loopback) of $binary"
"$venv/bin/python" scripts/ops_check.py surface . "$binary" "$work/surface.json" ||
    fail "reading the flags and metrics of $binary"

# ---- 3. Kubernetes manifests: render, validate
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

# ---- 4. Security scan
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

# ---- 5. Consistency, against the binary's flags and metrics
step "consistency (scripts/ops_check.py)"
"$venv/bin/python" scripts/ops_check.py static . "$work/surface.json" "$work/dashboard-rules.yaml" ||
    fail "consistency checks"

# ---- 6. Prometheus rules and dashboard queries
step "promtool check rules deploy/prometheus/alerts.yaml"
promtool check rules deploy/prometheus/alerts.yaml || fail "promtool check rules"
step "promtool test rules deploy/prometheus/alerts.test.yaml"
promtool test rules deploy/prometheus/alerts.test.yaml || fail "promtool test rules"
step "dashboard queries parse as PromQL"
promtool check rules "$work/dashboard-rules.yaml" >"$work/promtool.log" 2>&1 || {
    cat "$work/promtool.log" >&2
    fail "a dashboard query is not valid PromQL"
}

# ---- 7. Docker build context
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
