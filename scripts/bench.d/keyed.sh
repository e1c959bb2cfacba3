#!/usr/bin/env bash
# What an idempotency key costs, with a real Redis, for each binary given:
# CreateInvoice calls each with a FRESH key (benches/keyed.rs: h2load sends
# the same headers on every request, so it cannot), against a fixed-answer
# nginx upstream, with
#   unkeyed          no key (the path every other call takes)
#   redis            --idempotency-store redis:// on one server: a lease and
#                    a record per call (2 store round trips), waiting for
#                    no replica (--idempotency-store-replicas 0, for
#                    binaries that have the flag: its default, auto, would
#                    wait for the replica this script runs)
#   redis+replica    the same server with a replica connected and
#                    --idempotency-store-replicas 1 (WAIT 1 on both writes),
#                    for binaries that have the flag
# at c=1 (latency: p50, p99) and c=64 (calls/s, gateway CPU per call).
# Binaries are measured one right after the other, configuration by
# configuration, so that they see the same machine.
#
#   scripts/bench.d/keyed.sh BINARY [BINARY...]
#   KEYED_SECONDS=5 KEYED_REPS=3 (medians over the repetitions)
#   KEYED_CONFIGS="unkeyed redis redis+replica" (a subset, to spend the time on it)
# Needs nginx and redis-server; builds the load driver (cargo bench --bench keyed).
set -euo pipefail
cd "$(dirname "$0")/../.."
(($#)) || { echo "usage: $0 BINARY [BINARY...]" >&2; exit 2; }
seconds=${KEYED_SECONDS:-5}
reps=${KEYED_REPS:-3}
for tool in nginx redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx redis-server)" >&2; exit 2; }
done
cargo bench --bench keyed --no-run >/dev/null 2>&1
driver=$(ls -t target/release/deps/keyed-* | grep -v '\.d$' | head -1)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port)
cat >"$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000; keepalive_timeout 600s;
  server { listen 127.0.0.1:$up; location / { default_type application/json;
    return 200 '{"app":"om","service":"invoices","warnings":[],"instanceId":"i-1","requestId":"r-1","data":{"id":"inv-1"}}'; } } }
CONF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
primary=$(port); replica=$(port)
redis-server --port "$primary" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$work/primary.log" 2>&1 & pids+=($!)
redis-server --port "$replica" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --replicaof 127.0.0.1 "$primary" >"$work/replica.log" 2>&1 & replica_pid=$!; pids+=($replica_pid)
for _ in $(seq 1 100); do redis-cli -p "$primary" ping >/dev/null 2>&1 && break; sleep 0.1; done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.1f}")' "$@"; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

# measure BINARY CONFIG: prints "p50 p99 calls_per_second cpu_us_per_call"
measure() {
    local bin=$1 config=$2 gw args=() unkeyed=()
    gw=$(port)
    case $config in
        unkeyed) unkeyed=(--unkeyed) ;;
        redis)
            args=(--idempotency-store "redis://127.0.0.1:$primary")
            if "$bin" --help | grep -q -- --idempotency-store-replicas; then
                args+=(--idempotency-store-replicas 0)
            fi
            ;;
        redis+replica) args=(--idempotency-store "redis://127.0.0.1:$primary" --idempotency-store-replicas 1) ;;
    esac
    "$bin" --listen "127.0.0.1:$gw" --upstream "http://127.0.0.1:$up" --admin-listen off \
        --log-level warn "${args[@]}" >"$work/gw.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$gw") 2>/dev/null && break; sleep 0.1; done
    "$driver" --target "127.0.0.1:$gw" --concurrency 16 --seconds 1 --warmup 0 "${unkeyed[@]}" >/dev/null
    local c1 c64 before after
    c1=$("$driver" --target "127.0.0.1:$gw" --concurrency 1 --seconds "$seconds" --warmup 0 "${unkeyed[@]}")
    before=$(cpu_ticks "$pid")
    c64=$("$driver" --target "127.0.0.1:$gw" --concurrency 64 --seconds "$seconds" --warmup 0 "${unkeyed[@]}")
    after=$(cpu_ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local calls tick
    calls=$(echo "$c64" | field calls)
    tick=$(getconf CLK_TCK)
    echo "$(echo "$c1" | field p50_us) $(echo "$c1" | field p99_us) $(echo "$c64" | field calls_per_second)" \
        "$(python3 -c "print(f'{($after - $before) / $tick * 1e6 / $calls:.1f}')")"
}

echo "| binary | configuration | c=1 p50 µs | c=1 p99 µs | c=64 calls/s | CPU µs per call (c=64) |"
echo "|---|---|---|---|---|---|"
# Binaries take turns within each repetition (one right after the other,
# so that drift on the machine falls on all of them), and Redis starts each
# measurement empty (the keys of earlier ones would slow later binaries).
for config in ${KEYED_CONFIGS:-unkeyed redis redis+replica}; do
    declare -A p50=() p99=() rate=() cpu=()
    bins=()
    for bin in "$@"; do
        if [[ $config == redis+replica ]] && ! "$bin" --help | grep -q -- --idempotency-store-replicas; then
            continue
        fi
        bins+=("$bin")
    done
    for _ in $(seq 1 "$reps"); do
        for bin in "${bins[@]}"; do
            redis-cli -p "$primary" flushall >/dev/null
            read -r a b c d < <(measure "$bin" "$config")
            p50[$bin]+=" $a"; p99[$bin]+=" $b"; rate[$bin]+=" $c"; cpu[$bin]+=" $d"
        done
    done
    for bin in "${bins[@]}"; do
        # shellcheck disable=SC2086 # the lists split on purpose
        echo "| $(basename "$bin") | $config | $(median ${p50[$bin]}) | $(median ${p99[$bin]}) | $(median ${rate[$bin]}) | $(median ${cpu[$bin]}) |"
    done
    unset p50 p99 rate cpu
done
