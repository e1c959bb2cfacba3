#!/usr/bin/env bash
# Installs the project's non-cargo tools, pinned, inside the repository:
#   .tools/venv                 buf, grpcurl, grpcio, grpcio-tools, grpcio-status
#                               (from interop/python/requirements.txt, PyPI)
#   interop/node/node_modules   @grpc/grpc-js, @grpc/proto-loader
#                               (from interop/node/package-lock.json, npm)
#   .tools/ops-venv             kubernetes-validate, checkov
#                               (from deploy/ops-requirements.txt, PyPI; a venv
#                               of its own: checkov's pins must not constrain
#                               the clients' packages)
# Needs python3 (>= 3.9, with venv) and node (>= 18) with npm.
# Idempotent: a stamp of the pin files' hash skips the work when nothing changed.
# Use the tools with: PATH="$PWD/.tools/venv/bin:$PATH"
#
# `scripts/tools.sh ops` installs only .tools/ops-venv (what
# scripts/ops-check.sh needs; it also needs promtool, which it installs itself
# with apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."

only=${1:-all}
case "$only" in
all | ops) ;;
*)
    echo "usage: scripts/tools.sh [ops]" >&2
    exit 2
    ;;
esac

venv=.tools/venv
requirements=interop/python/requirements.txt

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ---- Container and Kubernetes check tools (scripts/ops-check.sh)
ops_venv=.tools/ops-venv
ops_requirements=deploy/ops-requirements.txt
ops_stamp="$ops_venv/.installed"
ops_want=$(hash_of "$ops_requirements")
if [[ -x "$ops_venv/bin/python" && -f "$ops_stamp" && "$(cat "$ops_stamp")" == "$ops_want" ]]; then
    echo "tools: $ops_venv is up to date"
else
    echo "tools: installing $ops_requirements into $ops_venv"
    python3 -m venv "$ops_venv"
    "$ops_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-virtualenv -r "$ops_requirements"
    echo "$ops_want" >"$ops_stamp"
fi
echo "tools: checkov $("$ops_venv/bin/checkov" --version)," \
    "kubernetes-validate $("$ops_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')"
if [[ "$only" == ops ]]; then
    exit 0
fi

# ---- Python tools
python_stamp="$venv/.installed"
python_want=$(hash_of "$requirements")
if [[ -x "$venv/bin/python" && -f "$python_stamp" && "$(cat "$python_stamp")" == "$python_want" ]]; then
    echo "tools: $venv is up to date"
else
    echo "tools: installing $requirements into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-virtualenv -r "$requirements"
    echo "$python_want" >"$python_stamp"
fi

# ---- Node client dependencies
node_dir=interop/node
node_stamp="$node_dir/node_modules/.installed"
node_want=$(hash_of "$node_dir/package.json" "$node_dir/package-lock.json")
if [[ -f "$node_stamp" && "$(cat "$node_stamp")" == "$node_want" ]]; then
    echo "tools: $node_dir/node_modules is up to date"
else
    echo "tools: npm ci in $node_dir"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$node_want" >"$node_stamp"
fi

# ---- Report what is installed (also proves each tool runs)
echo "tools: buf $("$venv/bin/buf" --version)," \
    "$("$venv/bin/grpcurl" --version 2>&1)," \
    "grpcio-tools $("$venv/bin/python" -c 'import grpc_tools, importlib.metadata as m; print(m.version("grpcio-tools"))')," \
    "@grpc/grpc-js $(node -p 'require("./interop/node/node_modules/@grpc/grpc-js/package.json").version')," \
    "node $(node --version)"
