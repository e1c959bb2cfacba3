#!/usr/bin/env python3
"""The side-by-side benchmark behind `scripts/bench` (which installs the
tools and builds the gateway, then runs this): starts the fixed upstream
nginx, the peer nginx and the gateway, verifies the request chain, drives
each path with h2load, checks every run's calls were really served, and
writes the raw results and the tables. Method: BENCHMARKS.md."""

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_calls  # noqa: E402
import h2load  # noqa: E402
import payloads  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402

HERE = Path(__file__).resolve().parent
ALL_PATHS = ("direct", "peer", "gateway")
ALL_RPCS = ("CreateInvoice", "CloseInvoice")
API_KEY = "bench-key"
ORGANIZATION = "bench-org"


class Abort(Exception):
    """The benchmark cannot go on (a broken chain, a dead process)."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings


def settings():
    """The BENCH_* knobs (documented in `scripts/bench --help`)."""
    quick = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
    errors = []

    def number(name, default, kind, minimum):
        raw = os.environ.get(name, "")
        if raw == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            errors.append(f"{name}={raw!r}: not a number")
            return default
        if value < minimum:
            errors.append(f"{name}={raw!r}: must be at least {minimum}")
        return value

    def words(name, default, allowed=None, kind=str):
        raw = os.environ.get(name, "")
        if raw.strip() == "":
            return list(default)
        values = []
        for word in raw.replace(",", " ").split():
            try:
                value = kind(word)
            except ValueError:
                errors.append(f"{name}: {word!r} is not a number")
                continue
            if allowed and value not in allowed:
                errors.append(f"{name}: {word!r} is not one of {', '.join(allowed)}")
                continue
            if kind is int and value < 1:
                errors.append(f"{name}: {word!r} must be at least 1")
                continue
            if value not in values:
                values.append(value)
        return values

    config = {
        "quick": quick,
        "reps": number("BENCH_REPS", 1 if quick else 3, int, 1),
        "duration_s": number("BENCH_DURATION", 1.0 if quick else 4.0, float, 0.1),
        "warmup_s": number("BENCH_WARMUP", 0.25 if quick else 0.5, float, 0.0),
        "concurrency": words("BENCH_CONCURRENCY", (1, 16, 64, 256), kind=int),
        "rpcs": words("BENCH_RPCS", ALL_RPCS, allowed=ALL_RPCS),
        "paths": [p for p in ALL_PATHS if p in words("BENCH_PATHS", ALL_PATHS, allowed=ALL_PATHS)],
        "gateway_args": shlex.split(os.environ.get("BENCH_GATEWAY_ARGS", "")),
        # The gateway's upstream hop over HTTP/2 with prior knowledge (h2c,
        # --upstream-http2) to the upstream's HTTP/2 port, instead of
        # HTTP/1.1: one multiplexed connection per worker.
        "upstream_http2": os.environ.get("BENCH_UPSTREAM_HTTP2", "") == "1",
        # Keyed calls on the gateway path: one idempotency key per RPC,
        # created once before anything is measured; every measured call then
        # takes the key's lease step (one store round trip, a WAIT with
        # --idempotency-store-replicas) and is answered from its record.
        "keyed": os.environ.get("BENCH_KEYED", "") == "1",
    }
    config["concurrency"].sort()
    # Calibration runs a fixed count to estimate each run's rate; the count
    # is large enough that connection set-up does not dominate it.
    config["calibration_calls"] = 300 if quick else 1000
    if errors:
        raise SystemExit("scripts/bench: " + "; ".join(errors) + " (see scripts/bench --help)")
    return config


# ------------------------------------------------------------------ machine


def machine_info(root, gateway_bin):
    return {**procs.machine_info(root, gateway_bin), "nginx": procs.command_output(["nginx", "-v"], root)}


# -------------------------------------------------------------------- bench


class Bench:
    def __init__(self, config, out_dir, work_dir, bodies, upstream, peer, gateway, log_calls, admin_port):
        self.config = config
        self.out = out_dir
        self.work = work_dir
        self.bodies = bodies
        self.upstream = upstream
        self.peer = peer
        self.gateway = gateway
        self.log_calls = log_calls
        self.admin_port = admin_port
        self.count_source = "log"
        # Fresh keys per invocation: a Redis store outlives the bench.
        self.key_prefix = f"bench-{os.getpid()}-{int(time.time())}"
        self.rates = {}
        self.runs = []
        self.runs_file = open(out_dir / "runs.jsonl", "w")
        self.h2load_file = open(out_dir / "h2load.txt", "w")

    # ---- addresses and requests

    def url(self, path, rpc):
        spec = self.bodies[rpc]
        if path == "direct":
            return f"http://127.0.0.1:{self.upstream.ports[1]}{spec['rest_path']}"
        if path == "peer":
            return f"http://127.0.0.1:{self.peer.ports[1]}{spec['rest_path']}"
        return f"http://127.0.0.1:{self.gateway.ports[0]}{spec['grpc_path']}"

    def request(self, path, rpc):
        """(body file or None, headers) of one call on a path."""
        spec = self.bodies[rpc]
        headers = [f"api-key: {API_KEY}", f"organization-id: {ORGANIZATION}"]
        if path == "gateway":
            if self.config["keyed"]:
                headers.append(f"idempotency-key: {self.key_prefix}-{rpc}")
            return spec["grpc_file"], headers + ["content-type: application/grpc", "te: trailers"]
        if spec["rest_body"] is not None:
            headers.append("content-type: application/json")
        if spec["rest_method"] != "POST":
            # h2load sends GET, or POST with -d; the pseudo-header overrides
            # the method (checked by verify_methods).
            headers.append(f":method: {spec['rest_method']}")
        return spec["rest_file"], headers

    # ---- the gateway's count of finished calls

    def gateway_counts(self):
        self.log_calls.poll()
        if self.count_source == "metrics":
            return gateway_calls.metrics_counts(self.admin_port)
        return dict(self.log_calls.counts)

    def settle_gateway(self, rpc, before, expected, timeout=5.0):
        """Waits until the gateway has counted `expected` more calls of `rpc`
        (its log may be written after the answer), then until its log stops
        growing, so the CPU spent writing it falls in this run."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.gateway_counts()
            finished = sum(n for (name, _), n in counts.items() if name == rpc) - sum(
                n for (name, _), n in before.items() if name == rpc
            )
            if finished >= expected or time.monotonic() > deadline or not self.gateway.alive():
                break
            time.sleep(0.01)
        size, stable = self.log_calls.size(), 0
        deadline = time.monotonic() + 2.0
        while stable < 2 and time.monotonic() < deadline:
            time.sleep(0.025)
            now = self.log_calls.size()
            stable = stable + 1 if now == size else 0
            size = now
        return self.gateway_counts()

    # ---- one h2load run, with every check

    def snapshot_cpu(self):
        return {
            "t": time.monotonic(),
            "machine": procs.machine_ticks(),
            "gateway": procs.cpu_ticks(self.gateway.pid),
            "peer": self.peer.cpu_ticks(),
            "upstream": self.upstream.cpu_ticks(),
            "children": resource.getrusage(resource.RUSAGE_CHILDREN),
            "self": resource.getrusage(resource.RUSAGE_SELF),
        }

    def execute(self, kind, path, rpc, c, n, rep=None, latency=False, upstream_expected=None):
        problems = []
        if upstream_expected is None:
            # Keyed gateway calls replay the record the first one made.
            upstream_expected = 0 if (self.config["keyed"] and path == "gateway") else n
        body, headers = self.request(path, rpc)
        log_file = self.work / "latency.tsv" if latency else None
        if log_file and log_file.exists():
            log_file.unlink()
        cmd = h2load.command(self.url(path, rpc), n, c, body, headers, log_file)

        gw_before = self.gateway_counts()
        up_before = procs.stub_requests(self.upstream.ports[0])
        peer_before = procs.stub_requests(self.peer.ports[0])
        overflows_before = procs.listen_overflows()
        cpu_before = self.snapshot_cpu()

        expected_s = n / max(self.rate_hint(path, rpc, c), 1.0)
        code, out, wall = h2load.run(cmd, timeout=60 + 20 * expected_s)

        gw_after = self.settle_gateway(rpc, gw_before, n if path == "gateway" else 0)
        cpu_after = self.snapshot_cpu()
        overflows_after = procs.listen_overflows()
        up_after = procs.stub_requests(self.upstream.ports[0])
        peer_after = procs.stub_requests(self.peer.ports[0])
        self.log_calls.maybe_truncate()

        self.h2load_file.write(f"### {kind} rep={rep} {rpc} {path} c={c} n={n}\n$ {shlex.join(cmd)}\n{out}\n")
        summary = h2load.parse(out)
        if code is None:
            problems.append(f"h2load timed out (killed after {wall:.0f} s)")
        elif code != 0:
            problems.append(f"h2load exited with status {code}")
        for key in ("done", "succeeded", "s2xx"):
            if summary.get(key) != n:
                problems.append(f"h2load {key}={summary.get(key)} for {n} requests")
        for key in ("failed", "errored", "timeout"):
            if summary.get(key) != 0:
                problems.append(f"h2load {key}={summary.get(key)}")
        if summary.get("protocol") != "h2c":
            problems.append(f"h2load spoke {summary.get('protocol')}, not h2c")

        # Each stub_status read counts itself: +1 for the read after the run.
        upstream_requests = up_after - up_before - 1
        if upstream_requests != upstream_expected:
            problems.append(f"upstream served {upstream_requests} requests for {n} calls ({upstream_expected} expected)")
        peer_requests = peer_after - peer_before - 1
        if path == "peer" and peer_requests != n:
            problems.append(f"peer served {peer_requests} requests for {n} calls")
        if path != "peer" and peer_requests != 0:
            problems.append(f"peer served {peer_requests} requests during a {path} run")

        ok_before, other_before = gateway_calls.split(gw_before, rpc)
        ok_after, other_after = gateway_calls.split(gw_after, rpc)
        gateway_ok, gateway_other = ok_after - ok_before, other_after - other_before
        if path == "gateway":
            if gateway_ok != n or gateway_other != 0:
                changed = {
                    f"{name}/{code}": gw_after.get((name, code), 0) - gw_before.get((name, code), 0)
                    for (name, code) in gw_after
                    if gw_after.get((name, code), 0) != gw_before.get((name, code), 0)
                }
                problems.append(
                    f"gateway counted {gateway_ok} OK calls of {n} ({self.count_source}); other outcomes: {changed or 'none'}"
                )
        elif gateway_ok or gateway_other:
            problems.append(f"gateway counted {gateway_ok + gateway_other} calls during a {path} run")

        latency_us = None
        if latency:
            try:
                rows = h2load.read_log(log_file)
            except (OSError, ValueError) as error:
                rows = []
                problems.append(f"cannot read h2load's log file: {error}")
            durations = sorted(d for status, d in rows)
            if len(rows) != n or any(status != 200 for status, _ in rows):
                problems.append(f"h2load's log has {len(rows)} rows for {n} calls, {sum(s != 200 for s, _ in rows)} not HTTP 200")
            if durations:
                latency_us = {p: h2load.percentile(durations, float(p[1:])) for p in report.PERCENTILES}
                latency_us["max"] = durations[-1]
                latency_us["mean"] = statistics.fmean(durations)
                latency_us["samples"] = len(durations)

        for service in (self.upstream, self.peer, self.gateway):
            if not service.alive():
                problems.append(f"{service.name} exited (status {service.proc.returncode})")

        window = cpu_after["t"] - cpu_before["t"]
        cpu_s = {}
        for proc in ("gateway", "peer", "upstream"):
            if cpu_before[proc] is None or cpu_after[proc] is None:
                cpu_s[proc] = None
                problems.append(f"cannot read the CPU time of {proc}")
            else:
                cpu_s[proc] = (cpu_after[proc] - cpu_before[proc]) / procs.CLK_TCK

        def rusage_cpu(key):
            a, b = cpu_after[key], cpu_before[key]
            return (a.ru_utime + a.ru_stime) - (b.ru_utime + b.ru_stime)

        cpu_s["h2load"] = rusage_cpu("children")
        harness = rusage_cpu("self")
        busy = (cpu_after["machine"][0] - cpu_before["machine"][0]) / procs.CLK_TCK
        steal = (cpu_after["machine"][1] - cpu_before["machine"][1]) / procs.CLK_TCK
        ours = sum(v for v in cpu_s.values() if v is not None) + harness
        record = {
            "kind": kind,
            "rep": rep,
            "rpc": rpc,
            "path": path,
            "c": c,
            "n": n,
            "ok": not problems,
            "problems": problems,
            "h2load_exit": code,
            "h2load": summary,
            "wall_s": wall,
            "calls_per_s": summary.get("req_per_s"),
            "connect_max_ms": summary.get("connect_max_ms"),
            # Machine-wide: also counts other programs' overflows.
            "listen_overflows": (
                overflows_after - overflows_before if None not in (overflows_before, overflows_after) else None
            ),
            "latency_us": latency_us,
            "cpu_s": cpu_s,
            "cpu_us_per_call": {k: (v / n * 1e6 if v is not None else None) for k, v in cpu_s.items()},
            "upstream_requests": upstream_requests,
            "peer_requests": peer_requests,
            "gateway_calls": {"ok": gateway_ok, "other": gateway_other, "source": self.count_source},
            "machine": {
                "window_s": window,
                "busy_cores": busy / window if window else None,
                "steal_cores": steal / window if window else None,
                # Whatever else ran (other engineers' compiles, daemons).
                "other_cores": max(0.0, busy - ours) / window if window else None,
            },
            "rss_kb": {
                "gateway_hwm": procs.status_kb(self.gateway.pid, "VmHWM"),
                "gateway_rss": procs.status_kb(self.gateway.pid, "VmRSS"),
                "peer_hwm": self.peer.peak_rss_kb(),
            },
        }
        self.runs.append(record)
        self.runs_file.write(json.dumps(record) + "\n")
        self.runs_file.flush()
        if not all(s.alive() for s in (self.upstream, self.peer, self.gateway)):
            raise Abort("; ".join(problems))
        return record

    # ---- rates: calibration first, then each run's count from its rate

    def rate_hint(self, path, rpc, c):
        return self.rates.get((path, rpc, c), 1000.0)

    def verify_methods(self):
        """Proves that h2load sends the method it is told to: the upstream's
        create route answers 405 to anything but POST, its close route to
        anything but PATCH."""
        base = f"http://127.0.0.1:{self.upstream.ports[1]}"
        checks = [
            ("PATCH to the POST-only create route", ["-H", ":method: PATCH"], "/v1/om/invoices", "s4xx"),
            ("default method (GET) to the PATCH-only close route", [], self.bodies["CloseInvoice"]["rest_path"], "s4xx"),
            ("PATCH to the close route", ["-H", ":method: PATCH"], self.bodies["CloseInvoice"]["rest_path"], "s2xx"),
        ]
        results = []
        for name, extra, route, expect in checks:
            cmd = ["h2load", "-n", "3", "-c", "1", "-m", "1", *extra, base + route]
            code, out, _ = h2load.run(cmd, timeout=30)
            summary = h2load.parse(out)
            good = code == 0 and summary.get(expect) == 3
            results.append({"check": name, "command": shlex.join(cmd), "expected": f"3 {expect[1:]}", "ok": good, "h2load": summary})
            if not good:
                raise Abort(f"method check failed, {name}: expected 3 {expect[1:]} answers; h2load said:\n{out}")
        log("h2load sends PATCH when told to: the POST-only route answered 405 to it, the PATCH-only route 200")
        return results

    def preflight(self):
        """A few calls down every path with all the checks, before measuring;
        picks the gateway's call counter (metrics when it has them)."""
        if self.config["keyed"] and "gateway" in self.config["paths"]:
            for rpc in self.config["rpcs"]:
                record = self.execute("prime", "gateway", rpc, 1, 1, upstream_expected=1)
                if not record["ok"]:
                    raise Abort(f"creating the keyed {rpc}'s record failed: " + "; ".join(record["problems"]))
            log("keyed: each RPC's idempotency key created; gateway calls replay it")
        for rpc in self.config["rpcs"]:
            for path in self.config["paths"]:
                record = self.execute("preflight", path, rpc, 1, 20)
                if path == "gateway" and self.admin_port and self.count_source == "log":
                    try:
                        ok, _ = gateway_calls.split(gateway_calls.metrics_counts(self.admin_port), rpc)
                    except (OSError, ValueError):
                        ok = 0
                    if ok >= 20:
                        self.count_source = "metrics"
                        log("gateway calls counted from /metrics (gormic_gateway_calls_total)")
                if not record["ok"]:
                    raise Abort(f"preflight {rpc} via {path} failed: " + "; ".join(record["problems"]))
        if self.count_source == "log":
            log("gateway calls counted from its log lines (grpc_code=OK)")

    def calibrate(self):
        """One fixed-count run per (rpc, path, concurrency), also warming
        everything up, gives the rate from which each measured run's count
        is chosen so that it lasts about BENCH_DURATION."""
        counts = {}
        for rpc in self.config["rpcs"]:
            for c in self.config["concurrency"]:
                for path in self.config["paths"]:
                    n = max(self.config["calibration_calls"], 20 * c)
                    record = self.execute("calibration", path, rpc, c, n)
                    if not record["ok"]:
                        raise Abort(f"calibration {rpc} via {path} at c={c} failed: " + "; ".join(record["problems"]))
                    rate = record["calls_per_s"]
                    self.rates[(path, rpc, c)] = rate
                    counts[(path, rpc, c)] = {
                        "rate": rate,
                        "measure": max(50 * c, 100, round(rate * self.config["duration_s"])),
                        "warmup": max(4 * c, round(rate * self.config["warmup_s"])) if self.config["warmup_s"] > 0 else 0,
                    }
                    log(f"calibration {rpc:13} c={c:<4} {path:8} {rate:>10,.0f} calls/s")
        return counts

    def measure(self, counts):
        """Repetitions; within each, every (rpc, concurrency) runs all paths
        back to back, in an order rotated per repetition, so slow drift of
        the machine hits every path alike."""
        reps, paths = self.config["reps"], self.config["paths"]
        for rep in range(1, reps + 1):
            order = paths[(rep - 1) % len(paths) :] + paths[: (rep - 1) % len(paths)]
            for rpc in self.config["rpcs"]:
                for c in self.config["concurrency"]:
                    for path in order:
                        plan = counts[(path, rpc, c)]
                        if plan["warmup"]:
                            self.execute("warmup", path, rpc, c, plan["warmup"], rep=rep)
                        r = self.execute("measure", path, rpc, c, plan["measure"], rep=rep, latency=(c == 1))
                        lat = r["latency_us"]
                        lat_text = f" p50 {lat['p50']} µs p99 {lat['p99']} µs" if lat else ""
                        hop = report.HOP_PROCESS[path]
                        cpu = r["cpu_us_per_call"].get(hop) if hop else None
                        cpu_text = f" CPU {cpu:.1f} µs/call" if cpu is not None else ""
                        rate = r["calls_per_s"]
                        log(
                            f"[rep {rep}/{reps}] {rpc:13} c={c:<4} {path:8} "
                            f"{(f'{rate:,.0f}' if rate else '?'):>8} calls/s{lat_text}{cpu_text}"
                            f"  {'ok' if r['ok'] else 'FAILED: ' + '; '.join(r['problems'])}"
                        )


# --------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description="run by scripts/bench; see scripts/bench --help")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--gateway-bin", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--command", default="scripts/bench")
    args = parser.parse_args()
    config = settings()
    if not config["rpcs"] or not config["paths"] or not config["concurrency"]:
        raise SystemExit("scripts/bench: BENCH_RPCS, BENCH_PATHS and BENCH_CONCURRENCY must not be empty")

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)

    started = time.monotonic()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": args.command,
        "env": {k: v for k, v in os.environ.items() if k.startswith("BENCH_")},
        "machine": machine_info(args.root, args.gateway_bin),
    }
    try:
        bodies = payloads.build(args.root)
    except payloads.ProtoMismatch as error:
        raise SystemExit(f"scripts/bench: {error}")

    work = Path(tempfile.mkdtemp(prefix="gormic-bench-work-"))
    services = []
    bench = None
    exit_code = 0
    meta["outcome"] = "complete"
    try:
        for rpc, spec in bodies.items():
            spec["grpc_file"] = work / f"{rpc}.grpc"
            spec["grpc_file"].write_bytes(spec["grpc_body"])
            spec["rest_file"] = None
            if spec["rest_body"] is not None:
                spec["rest_file"] = work / f"{rpc}.json"
                spec["rest_file"].write_bytes(spec["rest_body"])
        version = procs.nginx_version()
        upstream = procs.start_nginx(
            "upstream",
            HERE / "upstream.conf.in",
            lambda p: {"STATUS_PORT": p[0], "H2_PORT": p[1], "H1_PORT": p[2]},
            3,
            version,
        )
        services.append(upstream)
        peer = procs.start_nginx(
            "peer",
            HERE / "peer.conf.in",
            lambda p: {"STATUS_PORT": p[0], "H2_PORT": p[1], "UPSTREAM_H1_PORT": upstream.ports[2]},
            2,
            version,
        )
        services.append(peer)
        help_text = subprocess.run([str(args.gateway_bin), "--help"], capture_output=True, text=True, check=False).stdout
        admin_flag = "--admin-listen" in help_text
        gateway_log = work / "gateway.log"
        if config["upstream_http2"]:
            gateway_upstream = f"http://127.0.0.1:{upstream.ports[1]}"
            gateway_args = [*config["gateway_args"], "--upstream-http2"]
        else:
            gateway_upstream = f"http://127.0.0.1:{upstream.ports[2]}"
            gateway_args = config["gateway_args"]
        gateway = procs.start_gateway(args.gateway_bin, gateway_upstream, gateway_args, admin_flag, gateway_log)
        services.append(gateway)
        meta["gateway_command"] = shlex.join(gateway.args)
        meta["listen_backlog"] = {
            "gateway": procs.listen_backlog(gateway.ports[0]),
            "peer": procs.listen_backlog(peer.ports[1]),
            "upstream": procs.listen_backlog(upstream.ports[1]),
        }
        meta["gateway_admin_listener"] = admin_flag
        log(f"upstream nginx pid {upstream.pid} (h2c :{upstream.ports[1]}, http/1.1 :{upstream.ports[2]}), "
            f"peer nginx pid {peer.pid} (h2c :{peer.ports[1]}), gateway pid {gateway.pid}: {meta['gateway_command']}")

        log_calls = gateway_calls.LogCalls(gateway_log)
        bench = Bench(config, out, work, bodies, upstream, peer, gateway, log_calls, gateway.ports[1] if admin_flag else None)
        meta["method_checks"] = bench.verify_methods()
        bench.preflight()
        meta["gateway_count_source"] = bench.count_source
        counts = bench.calibrate()
        meta["plan"] = [{"path": p, "rpc": r, "c": c, **v} for (p, r, c), v in counts.items()]
        bench.measure(counts)
    except Abort as error:
        log(f"scripts/bench: ABORTED: {error}")
        meta["outcome"] = f"ABORTED: {error}"
        exit_code = 1
    except procs.StartError as error:
        log(f"scripts/bench: {error}")
        meta["outcome"] = f"could not start: {error}"
        exit_code = 2
    except KeyboardInterrupt:
        log("scripts/bench: interrupted")
        meta["outcome"] = "INTERRUPTED before the end"
        exit_code = 130
    finally:
        peaks = {}
        if len(services) == 3:
            peaks = {"gateway": procs.status_kb(services[2].pid, "VmHWM"), "peer": services[1].peak_rss_kb()}
        for service in reversed(services):
            service.stop()
        for service in services:
            for name in ("nginx.conf", "error.log", "stderr.log"):
                source = service.dir / name
                if source.exists():
                    target = out / ("configs" if name == "nginx.conf" else "logs") / f"{service.name}-{name}"
                    shutil.copyfile(source, target)
            service.remove_dir()
        if bench is not None:
            bench.log_calls.poll()
            (out / "logs" / "gateway-head.log").write_text("\n".join(bench.log_calls.head) + "\n")
            (out / "logs" / "gateway-unexpected.log").write_text(
                f"{bench.log_calls.unexpected_total} WARN/ERROR or non-OK call lines; the first {len(bench.log_calls.unexpected)}:\n"
                + "\n".join(bench.log_calls.unexpected)
                + "\n"
            )
            bench.runs_file.close()
            bench.h2load_file.close()
        shutil.rmtree(work, ignore_errors=True)

    if bench is None or not bench.runs:
        return exit_code or 1
    meta["runtime_s"] = round(time.monotonic() - started, 1)
    meta["peak_rss_kb"] = peaks
    summary = report.summarize(bench.runs, config, peaks)
    table = report.markdown(summary, config, bench.runs, meta)
    m = meta["machine"]
    header = "\n".join(
        [
            f"## scripts/bench — {meta['date_utc']}",
            "",
            f"- outcome: {meta['outcome']}",
            f"- gateway: {m['gateway_version']}, commit {m['git_commit'][:12]}{' (uncommitted changes)' if m['git_dirty'] else ''} on {m['git_branch']}",
            f"- gateway command: `{meta.get('gateway_command', '?')}`; OK calls counted from its {meta.get('gateway_count_source', '?')}",
            f"- machine: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, virtualization: {m['virtualization']}; "
            f"load average at start {' '.join(m['loadavg_at_start'])}",
            f"- tools: {m['nginx']}, {m['h2load']}, Python {m['python']}",
            "- listen backlogs (ss Send-Q): "
            + ", ".join(f"{k} {v if v is not None else '?'}" for k, v in meta.get("listen_backlog", {}).items()),
            f"- settings: reps={config['reps']} duration≈{config['duration_s']}s warm-up≈{config['warmup_s']}s "
            f"concurrency={' '.join(map(str, config['concurrency']))} rpcs={' '.join(config['rpcs'])}"
            + (f" gateway args: {shlex.join(config['gateway_args'])}" if config["gateway_args"] else "")
            + (" keyed (lease step and replay per gateway call)" if config["keyed"] else ""),
            f"- command: `{' '.join(f'{k}={shlex.quote(v)}' for k, v in meta['env'].items())}{' ' if meta['env'] else ''}{meta['command']}`; "
            f"runtime {meta['runtime_s']:.0f} s; raw results: {out}",
            "",
        ]
    )
    text = header + "\n" + table
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "config": config, "summary": _jsonable(summary), "runs": bench.runs}, indent=1)
    )
    print(text)
    if any(not r["ok"] for r in bench.runs):
        log("scripts/bench: some runs FAILED (listed above); exit status 1")
        return 1
    return exit_code


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
