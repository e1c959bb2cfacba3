#!/usr/bin/env bash
# Installs the project's non-cargo tools, pinned, inside the repository:
#   .tools/venv                 buf, grpcurl, grpcio, grpcio-tools, grpcio-status
#                               (from interop/python/requirements.txt, PyPI)
#   interop/node/node_modules   @grpc/grpc-js, @grpc/proto-loader
#                               (from interop/node/package-lock.json, npm)
# Needs python3 (>= 3.9, with venv) and node (>= 18) with npm.
# Idempotent: a stamp of the pin files' hash skips the work when nothing changed.
# Use the tools with: PATH="$PWD/.tools/venv/bin:$PATH"
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.tools/venv
requirements=interop/python/requirements.txt

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

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
