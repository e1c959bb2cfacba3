#!/usr/bin/env bash
# User-space instructions per call of the release gateway, counted by
# valgrind's callgrind: unlike time, the count does not depend on what else
# the machine is doing, so it shows a regression of a few percent.
#
#   scripts/bench.d/instructions.sh [BINARY]
#   INSTRUCTIONS_STORE=redis://127.0.0.1:PORT scripts/bench.d/instructions.sh [BINARY]
#
# Starts a fixed-answer nginx upstream (the CloseInvoice envelope), the
# gateway under callgrind with one worker thread, warms it with 1,000 calls,
# then counts 5,000 CloseInvoice calls at concurrency 16 (h2load). Needs
# valgrind, nginx and h2load (apt-get install valgrind nginx nghttp2-client).
#
# With INSTRUCTIONS_STORE (a Redis the caller runs), the keyed path instead:
# the gateway uses that store, and CreateInvoice calls each carry a fresh
# idempotency key (a lease and a record per call; the load driver of
# benches/keyed.rs, which h2load cannot replace: it sends one set of
# headers), c=16, counted for INSTRUCTIONS_SECONDS [20] of calls after 2 s
# of warm-up; divided by the calls the driver completed.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/gormic-gateway}
[[ -x $bin ]] || { echo "build it first: cargo build --release" >&2; exit 2; }
for tool in valgrind callgrind_annotate nginx h2load python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install valgrind nginx nghttp2-client)" >&2; exit 2; }
done
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port); gw=$(port)
store=${INSTRUCTIONS_STORE:-}
answer='{"app":"om","service":"invoices","warnings":[],"instanceId":"i-1","requestId":"r-1","data":{"invoiceNumber":1043,"invoiceSource":"POS","invoicedAt":"2026-11-25T10:00:00Z"}}'
[[ -z $store ]] || answer='{"app":"om","service":"invoices","warnings":[],"instanceId":"i-1","requestId":"r-1","data":{"id":"inv-1"}}'
cat >"$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 100000000;
  server { listen 127.0.0.1:$up; location / { default_type application/json;
    return 200 '$answer'; } } }
CONF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
printf '\x00\x00\x00\x00\x07\x0a\x05inv-1' >"$work/close.bin"
# Older builds (the baseline) lack some flags: pass only those --help lists.
extra=()
"$bin" --help | grep -q -- --worker-threads && extra+=(--worker-threads 1)
"$bin" --help | grep -q -- --admin-listen && extra+=(--admin-listen off)
[[ -z $store ]] || extra+=(--idempotency-store "$store")
valgrind --tool=callgrind --callgrind-out-file="$work/cg" "$bin" --listen "127.0.0.1:$gw" \
    --upstream "http://127.0.0.1:$up" "${extra[@]}" 2>"$work/gw.log" & pids+=($!)
vg=${pids[-1]}
for _ in $(seq 1 120); do grep -q serving "$work/gw.log" && break; sleep 0.5; done
grep -q serving "$work/gw.log" || { tail "$work/gw.log" >&2; exit 1; }
load() {
    h2load -n "$1" -c 16 -m 1 -t 1 -d "$work/close.bin" -H content-type:application/grpc -H te:trailers \
        -H api-key:k -H organization-id:o "http://127.0.0.1:$gw/gormic.om.v1.InvoiceService/CloseInvoice" |
        grep -q "$1 succeeded" || { echo "not every call succeeded" >&2; exit 1; }
}
if [[ -n $store ]]; then
    cargo bench --bench keyed --no-run >/dev/null 2>&1
    driver=$(ls -t target/release/deps/keyed-* | grep -v '\.d$' | head -1)
    "$driver" --target "127.0.0.1:$gw" --concurrency 16 --seconds 2 --warmup 0 >/dev/null
    callgrind_control -z "$vg" >/dev/null
    ran=$("$driver" --target "127.0.0.1:$gw" --concurrency 16 --seconds "${INSTRUCTIONS_SECONDS:-20}" --warmup 0)
    callgrind_control -d "$vg" >/dev/null
    sleep 1
    calls=$(echo "$ran" | sed -n 's/.*calls=\([0-9]*\).*/\1/p')
    total=$(callgrind_annotate "$(ls -t "$work"/cg.* | head -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "instructions per call (user space, $calls keyed CreateInvoice with fresh keys, c=16, one worker): $((total / calls))"
    exit 0
fi
load 1000
callgrind_control -z "$vg" >/dev/null
load 5000
callgrind_control -d "$vg" >/dev/null
sleep 1
total=$(callgrind_annotate "$(ls -t "$work"/cg.* | head -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "instructions per call (user space, 5000 CloseInvoice, c=16, one worker): $((total / 5000))"
