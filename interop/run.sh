#!/usr/bin/env bash
# Proves the contract with real clients in other languages, against the real
# binary in --sandbox mode:
#   1. the README's quick-start grpcurl session, extracted from README.md and
#      checked against its printed outputs (interop/readme_quickstart.py);
#   2. the Python client (grpcio, code generated from proto/ by grpcio-tools);
#   3. the Node client (@grpc/grpc-js + @grpc/proto-loader).
# The gateway is built once, started on a free loopback port, polled with
# grpcurl until its health service answers SERVING, and always stopped.
#
# Usage: interop/run.sh            (debug build; INTEROP_PROFILE=release for release)
# Tools: installed by scripts/tools.sh (run here; quick when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/tools.sh >/dev/null
venv=$root/.tools/venv
export PATH="$venv/bin:$PATH"

profile=${INTEROP_PROFILE:-debug}
echo "interop: building gormic-gateway ($profile)"
if [[ "$profile" == release ]]; then
    cargo build --release --quiet --bin gormic-gateway
else
    cargo build --quiet --bin gormic-gateway
fi
bin=$root/target/$profile/gormic-gateway

work=$(mktemp -d)
gateway_pid=""
stop_gateway() {
    if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
    fi
    gateway_pid=""
}
cleanup() {
    stop_gateway
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nobody listens on now (the kernel's choice; released before use).
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target=127.0.0.1:$port
log=$work/gateway.log

echo "interop: starting $bin --sandbox --listen $target"
"$bin" --sandbox --listen "$target" >"$log" 2>&1 &
gateway_pid=$!

# Readiness poll of an external process: bounded (about 30 s).
ready=""
for _ in $(seq 1 150); do
    if ! kill -0 "$gateway_pid" 2>/dev/null; then
        echo "interop: the gateway exited before it was ready; its output:" >&2
        cat "$log" >&2
        exit 1
    fi
    if grpcurl -plaintext -max-time 2 "$target" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then
        ready=yes
        break
    fi
    sleep 0.2
done
if [[ -z "$ready" ]]; then
    echo "interop: the gateway did not report SERVING within 30 s; its output:" >&2
    cat "$log" >&2
    exit 1
fi
echo "interop: gateway ready on $target"

failed=()
run_step() {
    local name=$1
    shift
    echo
    echo "=== $name"
    if "$@"; then
        echo "=== $name: passed"
    else
        echo "=== $name: FAILED"
        failed+=("$name")
    fi
}

# The README session first: it runs exactly as printed against a fresh
# default fixture. The clients use organizations of their own.
run_step "README quick start (grpcurl)" \
    "$venv/bin/python" interop/readme_quickstart.py --target "$target" README.md
run_step "Python client" "$venv/bin/python" interop/python/scenario.py "$target"
run_step "Node client" node interop/node/scenario.js "$target"

# SIGTERM: the gateway drains and exits 0.
kill -TERM "$gateway_pid"
status=0
wait "$gateway_pid" || status=$?
gateway_pid=""
if [[ $status -ne 0 ]]; then
    echo "interop: the gateway exited with status $status after SIGTERM" >&2
    failed+=("graceful shutdown")
fi

echo
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "interop: FAILED: ${failed[*]}" >&2
    echo "interop: gateway output:" >&2
    tail -n 50 "$log" >&2
    exit 1
fi
echo "interop: all passed (README quick start, Python client, Node client, graceful shutdown)"
