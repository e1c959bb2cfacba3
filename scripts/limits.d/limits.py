#!/usr/bin/env python3
"""The memory and overload measurement behind `scripts/limits` (which
installs h2load and builds the gateway, then runs this): issue 7's three
targets against the release binary, each call accounted for.

  idle  a freshly started gateway, default flags: its RSS before any call
  A     N calls at once (10,000) against an upstream answering in 3 s: all
        OK, peak RSS, the upstream never sees more than its connection cap
  B     M calls at once (50,000), the in-flight cap at its default, upstream
        1 s: alive, every call OK or RESOURCE_EXHAUSTED, peak RSS, and calls
        made after the burst all OK

Each scenario has its own slow upstream (slow_upstream.py) and its own
gateway process, so that each peak (VmHWM) and each count is its own. Counts
come from the gateway's /metrics, cross-checked with its per-call log lines,
with h2load's summary and with the upstream's own request count. Results:
a table on stdout, raw JSON and logs under the output directory."""

import argparse
import datetime
import gzip
import http.client
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bench.d"))

import gateway_calls  # noqa: E402  (scripts/bench.d)
import h2load  # noqa: E402
import payloads  # noqa: E402
import procs  # noqa: E402

MIB = 1024 * 1024
RPC = "CloseInvoice"
API_KEY = "limits-key"
ORGANIZATION = "limits-org"
RESOURCE_EXHAUSTED = "8"
# What the gateway's defaults are (checked against its --help at start).
DEFAULT_MAX_IN_FLIGHT = 10_000
DEFAULT_UPSTREAM_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 256


class Abort(Exception):
    """The measurement cannot go on (a process died, a tool misbehaved)."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings


def settings():
    """The LIMITS_* knobs (documented in `scripts/limits --help`)."""
    quick = os.environ.get("LIMITS_QUICK", "0") not in ("", "0")
    errors = []

    def number(name, default, kind=int, minimum=1):
        raw = os.environ.get(name, "")
        if raw == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            errors.append(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number")
            return default
        if value < minimum:
            errors.append(f"{name}={raw!r} must be at least {minimum}")
        return value

    config = {
        "quick": quick,
        "a_calls": number("LIMITS_A_CALLS", 2000 if quick else 10_000),
        "a_connections": number("LIMITS_A_CONNECTIONS", 20 if quick else 100),
        "a_delay_s": number("LIMITS_A_DELAY", 3.0, float, 0.1),
        "a_upstream_timeout": os.environ.get("LIMITS_A_UPSTREAM_TIMEOUT", "120s"),
        "b_calls": number("LIMITS_B_CALLS", 5000 if quick else 50_000),
        "b_connections": number("LIMITS_B_CONNECTIONS", 20 if quick else 200),
        "b_delay_s": number("LIMITS_B_DELAY", 1.0, float, 0.1),
        "b_upstream_timeout": os.environ.get("LIMITS_B_UPSTREAM_TIMEOUT", "60s"),
        # Quick mode lowers the cap so that its 5,000 calls still overflow it.
        "b_max_in_flight": number("LIMITS_B_MAX_IN_FLIGHT", 1000 if quick else DEFAULT_MAX_IN_FLIGHT),
        "after_calls": number("LIMITS_AFTER_CALLS", 100),
        "idle_rss_bound_mib": number("LIMITS_IDLE_RSS_MIB", 16.0, float),
        "a_rss_bound_mib": number("LIMITS_A_RSS_MIB", 64.0, float),
        "b_rss_bound_mib": number("LIMITS_B_RSS_MIB", 256.0, float),
        "settle_s": number("LIMITS_SETTLE", 3.0, float, 0),
    }
    for prefix in ("a", "b"):
        calls, conns = config[f"{prefix}_calls"], config[f"{prefix}_connections"]
        if calls % conns:
            errors.append(
                f"LIMITS_{prefix.upper()}_CALLS={calls} is not a multiple of LIMITS_{prefix.upper()}_CONNECTIONS={conns}: "
                "every connection must carry the same number of calls, all at once"
            )
        elif calls // conns > DEFAULT_MAX_CONCURRENT_STREAMS:
            errors.append(
                f"{calls} calls on {conns} connections is {calls // conns} streams per connection, more than the "
                f"gateway's --http2-max-concurrent-streams default ({DEFAULT_MAX_CONCURRENT_STREAMS}): raise "
                f"LIMITS_{prefix.upper()}_CONNECTIONS"
            )
    if config["after_calls"] % 10:
        errors.append(f"LIMITS_AFTER_CALLS={config['after_calls']} must be a multiple of 10 (10 connections)")
    if errors:
        raise SystemExit("scripts/limits: " + "; ".join(errors))
    return config


def machine_info(root, gateway_bin):
    return {**procs.machine_info(root, gateway_bin), "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE))}


# ------------------------------------------------------------ the processes


def start_upstream(delay_s, work):
    """The slow upstream, in its own session; returns a procs.Service whose
    ports are (API port, stats port)."""
    directory = tempfile.mkdtemp(prefix="gormic-limits-upstream-", dir=work)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "slow_upstream.py"), "--delay", str(delay_s)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=open(Path(directory) / "stderr.log", "wb"),
        start_new_session=True,
    )
    service = procs.Service("upstream", proc, directory, [])
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline().decode(errors="replace") if ready else ""
    match = re.fullmatch(r"listening (\d+) (\d+)\n", line)
    if not match:
        service.stop()
        err = (Path(directory) / "stderr.log").read_text(errors="replace")
        raise procs.StartError(f"slow_upstream.py did not start (said {line!r}): {err.strip()[-1500:]}")
    service.ports = [int(match.group(1)), int(match.group(2))]
    return service


def upstream_stats(upstream):
    with urllib.request.urlopen(f"http://127.0.0.1:{upstream.ports[1]}/stats", timeout=10) as answer:
        return json.loads(answer.read())


def metrics_text(gateway):
    return procs.http_get(gateway.ports[1], "/metrics")


def metric_values(text, name):
    """{labels text: value} of one metric family's samples."""
    values = {}
    for labels, value in re.findall(r"^" + re.escape(name) + r"(?:\{([^}]*)\})?\s+(\S+)", text, re.M):
        values[labels] = float(value)
    return values


def gauge(text, name):
    values = metric_values(text, name)
    return sum(values.values()) if values else None


def upstream_busy(text):
    """Upstream requests in flight: `gormic_gateway_upstream_requests_active`,
    or, from a build before it, the pool's busy connections."""
    active = gauge(text, "gormic_gateway_upstream_requests_active")
    if active is not None:
        return active
    return metric_values(text, "gormic_gateway_upstream_connections").get('state="busy"')


def shed_counts(text):
    out = {}
    for labels, value in metric_values(text, "gormic_gateway_calls_shed_total").items():
        reason = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("reason", "?")
        out[reason] = out.get(reason, 0) + int(value)
    return out


def call_counts(gateway):
    """{"CloseInvoice/0": n, ...} from /metrics."""
    return {f"{m}/{'0' if c == 'OK' else c}": n for (m, c), n in gateway_calls.metrics_counts(gateway.ports[1]).items()}


def delta(after, before):
    keys = set(after) | set(before)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys) if after.get(k, 0) != before.get(k, 0)}


def smaps_rollup(pid):
    """The kB fields of /proc/<pid>/smaps_rollup (Rss, Anonymous, ...)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Sampler(threading.Thread):
    """Samples the gateway every 0.2 s (RSS, open fds; /metrics gauges every
    second) while a scenario runs; keeps the timeline, the maxima and the
    smaps_rollup taken when RSS was highest."""

    def __init__(self, gateway):
        super().__init__(daemon=True)
        self.gateway = gateway
        self.stop_event = threading.Event()
        self.timeline = []
        self.max_rss_kb = 0
        self.max_fds = 0
        self.max_in_flight = 0
        self.max_pending = 0
        self.max_busy = 0
        self.smaps_at_max = None
        self.started = time.monotonic()

    def run(self):
        last_scrape = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            rss = procs.status_kb(self.gateway.pid, "VmRSS")
            fds = open_fds(self.gateway.pid)
            row = {"t": round(now - self.started, 2), "rss_kb": rss, "fds": fds}
            if rss is not None and rss > self.max_rss_kb:
                self.max_rss_kb = rss
                # Reading smaps_rollup walks the page tables: only when RSS
                # grew by 1 MiB since the last one.
                if self.smaps_at_max is None or rss - self.smaps_at_max.get("Rss", 0) >= 1024:
                    self.smaps_at_max = smaps_rollup(self.gateway.pid)
            if fds is not None:
                self.max_fds = max(self.max_fds, fds)
            if now - last_scrape >= 1.0:
                last_scrape = now
                try:
                    text = metrics_text(self.gateway)
                except (OSError, http.client.HTTPException):
                    text = ""  # a scrape that failed under load: a gap in the timeline
                in_flight = gauge(text, "gormic_gateway_calls_in_flight")
                pending = gauge(text, "gormic_gateway_upstream_pending_requests")
                busy = upstream_busy(text)
                row.update(in_flight=in_flight, pending=pending, busy=busy)
                self.max_in_flight = max(self.max_in_flight, in_flight or 0)
                self.max_pending = max(self.max_pending, pending or 0)
                self.max_busy = max(self.max_busy, busy or 0)
            self.timeline.append(row)
            self.stop_event.wait(0.2)

    def finish(self):
        self.stop_event.set()
        self.join(timeout=5)


# ------------------------------------------------------------- the harness


class Limits:
    def __init__(self, config, binary, out, work, body_file):
        self.config = config
        self.binary = binary
        self.out = out
        self.work = work
        self.body_file = body_file
        self.services = []
        self.h2load_file = open(out / "h2load.txt", "w")
        self.results = {}
        self.checks = []

    def check(self, scenario, what, measured, bound, ok, kind="target", note="over (smoke run: not the target)"):
        """kind: `target` (issue 7's targets) and `count` (the accounting
        reconciles) fail the run; `info` (an RSS bound in a smoke run, which
        is not the target's load) does not."""
        self.checks.append(
            {"scenario": scenario, "what": what, "measured": measured, "bound": bound, "ok": bool(ok), "kind": kind,
             "note": note}
        )
        log(f"  {'ok  ' if ok else 'FAIL' if kind != 'info' else 'over'} {what}: {measured} (bound: {bound})")

    def start_gateway(self, name, extra_args):
        log_path = self.out / "logs" / f"{name}-gateway.log"
        gateway = procs.start_gateway(
            self.binary, f"http://127.0.0.1:{self.upstream.ports[0]}", extra_args, True, log_path
        )
        self.services.append(gateway)
        gateway.log_path = log_path
        log(f"[{name}] gateway pid {gateway.pid}: {shlex.join(gateway.args)}")
        return gateway

    def start_upstream(self, name, delay_s):
        self.upstream = start_upstream(delay_s, self.work)
        self.services.append(self.upstream)
        log(f"[{name}] slow upstream pid {self.upstream.pid}, {delay_s:g} s per answer, :{self.upstream.ports[0]}")
        return self.upstream

    def stop(self, service):
        service.stop()
        if service in self.services:
            self.services.remove(service)
        final = None
        if service.name == "upstream":
            text = service.proc.stdout.read().decode(errors="replace").strip()
            try:
                final = json.loads(text.splitlines()[-1]) if text else None
            except ValueError:
                final = None
        service.remove_dir()
        return final

    def h2load(self, name, calls, connections, timeout):
        streams = calls // connections
        url = f"http://127.0.0.1:{self.gateway.ports[0]}/gormic.om.v1.InvoiceService/{RPC}"
        cmd = ["h2load", "-n", str(calls), "-c", str(connections), "-m", str(streams), "-t", "1", "-d", str(self.body_file)]
        for header in (f"api-key: {API_KEY}", f"organization-id: {ORGANIZATION}", "content-type: application/grpc", "te: trailers"):
            cmd += ["-H", header]
        cmd.append(url)
        log(f"[{name}] $ {shlex.join(cmd)}")
        code, text, wall = h2load.run(cmd, timeout=timeout)
        self.h2load_file.write(f"### {name}\n$ {shlex.join(cmd)}\n{text}\n")
        self.h2load_file.flush()
        summary = h2load.parse(text)
        summary["exit"] = code
        summary["wall_s"] = round(wall, 2)
        summary["command"] = shlex.join(cmd)
        if code is None:
            raise Abort(f"[{name}] h2load did not finish within {timeout:.0f} s")
        return summary

    def wait_drained(self, name, timeout=90.0):
        """Until the gateway has no call in flight and no upstream request
        busy or pending (from /metrics)."""
        deadline = time.monotonic() + timeout
        while True:
            self.require_alive(name)
            text = metrics_text(self.gateway)
            in_flight = gauge(text, "gormic_gateway_calls_in_flight")
            pending = gauge(text, "gormic_gateway_upstream_pending_requests")
            busy = upstream_busy(text)
            if not in_flight and not pending and not busy:
                return
            if time.monotonic() > deadline:
                raise Abort(f"[{name}] the gateway still had {in_flight} calls in flight, {busy} upstream requests busy "
                            f"and {pending} pending {timeout:.0f} s after the load ended")
            time.sleep(0.2)

    def require_alive(self, name):
        if not self.gateway.alive():
            raise Abort(f"[{name}] the gateway exited with status {self.gateway.proc.returncode}; "
                        f"its last lines:\n{tail(self.gateway.log_path)}")

    def settled_rss(self, pid):
        time.sleep(self.config["settle_s"])
        return {"VmRSS_kb": procs.status_kb(pid, "VmRSS"), "VmHWM_kb": procs.status_kb(pid, "VmHWM"),
                "smaps_rollup": smaps_rollup(pid)}

    def log_counts(self, gateway):
        """Per-call log lines by gRPC code, the WARN/ERROR lines, and the
        shed calls the rate-limited `overloaded` lines report; then the log
        is compressed (B's is ~15 MB)."""
        calls = gateway_calls.LogCalls(gateway.log_path)
        calls.poll()
        counts = {}
        for (rpc, code), n in calls.counts.items():
            counts[f"{rpc}/{code}"] = n
        warn = [line for line in calls.unexpected if "WARN" in line or "ERROR" in line]
        overloaded = {"lines": 0, "shed_reported": 0}
        with open(gateway.log_path, "rb") as text:
            for line in text:
                if b"overloaded" in line and b"WARN" in line:
                    overloaded["lines"] += 1
                    match = re.search(rb"\bshed=(\d+)", line)
                    overloaded["shed_reported"] += int(match.group(1)) if match else 0
        with open(gateway.log_path, "rb") as source, gzip.open(f"{gateway.log_path}.gz", "wb") as target:
            shutil.copyfileobj(source, target)
        os.unlink(gateway.log_path)
        return counts, warn[:20], overloaded

    # ---------------------------------------------------------- scenarios

    def idle(self):
        name = "idle"
        log(f"[{name}] a fresh gateway with its default flags, before any call")
        self.start_upstream(name, self.config["a_delay_s"])
        self.gateway = self.start_gateway(name, [])
        rss = self.settled_rss(self.gateway.pid)
        opened = gauge(metrics_text(self.gateway), "gormic_gateway_upstream_connections_opened_total")
        result = {"gateway_command": shlex.join(self.gateway.args), "settle_s": self.config["settle_s"], **rss,
                  "upstream_connections_opened": opened}
        self.stop(self.gateway)
        self.stop(self.upstream)
        self.results[name] = result
        bound = self.config["idle_rss_bound_mib"]
        self.check(name, "idle RSS, fresh gateway, default flags", mib(rss["VmRSS_kb"]), f"≤ {bound:g} MiB",
                   rss["VmRSS_kb"] <= bound * 1024)

    def scenario_a(self):
        name, c = "A", self.config
        calls, conns = c["a_calls"], c["a_connections"]
        log(f"[{name}] {calls} calls at once against an upstream answering in {c['a_delay_s']:g} s")
        self.start_upstream(name, c["a_delay_s"])
        self.gateway = self.start_gateway(name, ["--upstream-timeout", c["a_upstream_timeout"]])
        before = call_counts(self.gateway)
        sampler = Sampler(self.gateway)
        sampler.start()
        waves = -(-calls // DEFAULT_UPSTREAM_MAX_CONNECTIONS)
        summary = self.h2load(name, calls, conns, timeout=120 + 3 * waves * c["a_delay_s"])
        self.wait_drained(name)
        sampler.finish()
        peak_kb = procs.status_kb(self.gateway.pid, "VmHWM")
        counts = delta(call_counts(self.gateway), before)
        text = metrics_text(self.gateway)
        drained = self.settled_rss(self.gateway.pid)
        up = upstream_stats(self.upstream)
        opened = gauge(text, "gormic_gateway_upstream_connections_opened_total")
        alive = self.gateway.alive()
        self.stop(self.gateway)
        log_counts, warn, overloaded = self.log_counts(self.gateway)
        self.stop(self.upstream)
        ok = counts.get(f"{RPC}/0", 0)
        self.results[name] = {
            "calls": calls,
            "connections": conns,
            "streams_per_connection": calls // conns,
            "upstream_delay_s": c["a_delay_s"],
            "gateway_command": shlex.join(self.gateway.args),
            "h2load": summary,
            "gateway_calls": counts,
            "gateway_log_calls": log_counts,
            "gateway_warnings": warn,
            "overloaded_log_lines": overloaded,
            "upstream": up,
            "upstream_connections_opened": opened,
            "peak_rss_kb": peak_kb,
            "smaps_rollup_at_peak": sampler.smaps_at_max,
            "max_open_fds": sampler.max_fds,
            "max_in_flight_seen": sampler.max_in_flight,
            "max_pending_seen": sampler.max_pending,
            "max_upstream_busy_seen": sampler.max_busy,
            "marginal_kib_per_queued_call": marginal_kib_per_call(sampler.timeline),
            "drained": drained,
            "timeline": sampler.timeline,
        }
        self.check(name, "gateway metrics: calls OK", f"{ok:,} of {calls:,}", "all", ok == calls and counts == {f"{RPC}/0": calls})
        if counts != {f"{RPC}/0": calls}:
            self.check(name, "gateway metrics: other codes", json.dumps(counts), "none", False)
        self.check(name, "gateway log lines agree with metrics", json.dumps(log_counts), "= metrics",
                   _same_codes(log_counts, counts), kind="count")
        self.check(name, "h2load: succeeded, HTTP 2xx", f"{summary.get('succeeded')}, {summary.get('s2xx')}", f"{calls}, {calls}",
                   summary.get("succeeded") == calls and summary.get("s2xx") == calls, kind="count")
        self.check(name, "upstream requests received / answered", f"{up['requests_received']:,} / {up['requests_answered']:,}",
                   f"{calls:,}", up["requests_received"] == calls and up["requests_answered"] == calls)
        self.check(name, "upstream max concurrent connections", f"{up['max_connections']:,}",
                   f"≤ {DEFAULT_UPSTREAM_MAX_CONNECTIONS:,}", up["max_connections"] <= DEFAULT_UPSTREAM_MAX_CONNECTIONS)
        self.check(name, "gateway alive at the end", "yes" if alive else "NO", "alive", alive)
        bound = c["a_rss_bound_mib"]
        self.check(name, "peak RSS (VmHWM)", mib(peak_kb), f"≤ {bound:g} MiB", peak_kb <= bound * 1024,
                   kind="info" if c["quick"] else "target")
        log(f"[{name}] RSS after draining ({c['settle_s']:g} s idle): {mib(drained['VmRSS_kb'])}")

    def scenario_b(self):
        name, c = "B", self.config
        calls, conns = c["b_calls"], c["b_connections"]
        cap = c["b_max_in_flight"]
        log(f"[{name}] {calls} calls at once, --max-in-flight {cap}, upstream answering in {c['b_delay_s']:g} s")
        self.start_upstream(name, c["b_delay_s"])
        args = ["--upstream-timeout", c["b_upstream_timeout"]]
        if cap != DEFAULT_MAX_IN_FLIGHT:
            args += ["--max-in-flight", str(cap)]
        self.gateway = self.start_gateway(name, args)
        before = call_counts(self.gateway)
        sampler = Sampler(self.gateway)
        sampler.start()
        waves = -(-cap // DEFAULT_UPSTREAM_MAX_CONNECTIONS)
        summary = self.h2load(name, calls, conns, timeout=120 + 3 * waves * c["b_delay_s"])
        self.require_alive(name)
        self.wait_drained(name)
        sampler.finish()
        peak_kb = procs.status_kb(self.gateway.pid, "VmHWM")
        text = metrics_text(self.gateway)
        burst = delta(call_counts(self.gateway), before)
        shed = shed_counts(text)
        up_burst = upstream_stats(self.upstream)
        # Calls after the burst, once it has drained.
        after_before = call_counts(self.gateway)
        after_summary = self.h2load(f"{name}-after", c["after_calls"], 10, timeout=120 + 3 * c["b_delay_s"])
        self.wait_drained(f"{name}-after")
        after = delta(call_counts(self.gateway), after_before)
        up_after = upstream_stats(self.upstream)
        drained = self.settled_rss(self.gateway.pid)
        alive = self.gateway.alive()
        try:
            livez = procs.http_get(self.gateway.ports[1], "/livez") is not None
        except OSError:
            livez = False
        final_text = metrics_text(self.gateway)
        opened = gauge(final_text, "gormic_gateway_upstream_connections_opened_total")
        dropped = gauge(final_text, "gormic_gateway_log_lines_dropped_total")
        self.stop(self.gateway)
        log_counts, warn, overloaded = self.log_counts(self.gateway)
        self.stop(self.upstream)
        ok = burst.get(f"{RPC}/0", 0)
        # Calls refused at admission are counted only by the shed counter
        # (issue 14); a build before that also counted them in calls_total.
        admitted_refused = burst.get(f"{RPC}/{RESOURCE_EXHAUSTED}", 0)
        shed_at_admission = shed.get("in_flight_limit", 0)
        # Every other shed reason (upstream_queue_full, fair_share, ...) is
        # a call admitted, then refused: in calls_total as well.
        shed_after_admission = sum(v for k, v in shed.items() if k != "in_flight_limit")
        counted_twice = admitted_refused >= shed_at_admission + shed_after_admission
        refused = admitted_refused if counted_twice else admitted_refused + shed_at_admission
        other = {k: v for k, v in burst.items() if k not in (f"{RPC}/0", f"{RPC}/{RESOURCE_EXHAUSTED}")}
        forwarded = up_burst["requests_received"]
        self.results[name] = {
            "calls": calls,
            "connections": conns,
            "streams_per_connection": calls // conns,
            "max_in_flight": cap,
            "upstream_delay_s": c["b_delay_s"],
            "gateway_command": shlex.join(self.gateway.args),
            "h2load": summary,
            "gateway_calls": burst,
            "shed_total": shed,
            "gateway_log_calls": log_counts,
            "gateway_warnings": warn,
            "overloaded_log_lines": overloaded,
            "upstream_after_burst": up_burst,
            "upstream_final": up_after,
            "upstream_connections_opened": opened,
            "peak_rss_kb": peak_kb,
            "smaps_rollup_at_peak": sampler.smaps_at_max,
            "max_open_fds": sampler.max_fds,
            "max_in_flight_seen": sampler.max_in_flight,
            "max_pending_seen": sampler.max_pending,
            "max_upstream_busy_seen": sampler.max_busy,
            "after": {
                "calls": c["after_calls"],
                "h2load": after_summary,
                "gateway_calls": after,
                "upstream_requests": up_after["requests_received"] - forwarded,
            },
            "drained": drained,
            "alive": alive,
            "livez": livez,
            "log_lines_dropped": dropped,
            "timeline": sampler.timeline,
        }
        self.check(name, "gateway alive after the burst (process, /livez)", "yes" if alive and livez else "NO", "alive", alive and livez)
        self.check(name, "burst: OK + RESOURCE_EXHAUSTED", f"{ok:,} + {refused:,} = {ok + refused:,}", f"{calls:,}, nothing else",
                   ok + refused == calls and not other)
        if other:
            self.check(name, "burst: other codes", json.dumps(other), "none", False)
        self.check(name, "burst: shed by reason", json.dumps(shed), f"sum = {refused:,}",
                   sum(shed.values()) == refused)
        self.check(name, "burst: shedding kicked in", f"{refused:,} refused", "> 0 (calls > cap)", refused > 0 or calls <= cap)
        self.check(name, "burst: upstream requests = OK calls (shed never forwarded)", f"{forwarded:,}", f"{ok:,}",
                   forwarded == ok and up_burst["requests_answered"] == ok)
        self.check(name, "upstream max concurrent connections", f"{up_after['max_connections']:,}",
                   f"≤ {DEFAULT_UPSTREAM_MAX_CONNECTIONS:,}", up_after["max_connections"] <= DEFAULT_UPSTREAM_MAX_CONNECTIONS)
        # Shed calls (in-flight cap) write no call line of their own: they
        # are counted by the rate-limited `overloaded` lines checked below.
        expected_lines = dict(_merge(burst, after))
        shed_calls = shed.get("in_flight_limit", 0) if counted_twice else 0
        key = f"{RPC}/8"
        if key in expected_lines:
            expected_lines[key] -= shed_calls
            if expected_lines[key] == 0:
                del expected_lines[key]
        self.check(name, "gateway call lines agree with metrics (shed calls excepted)", json.dumps(log_counts),
                   "= metrics", _same_codes(log_counts, expected_lines), kind="count")
        self.check(name, "h2load: requests done (HTTP 2xx)", f"{summary.get('done')} ({summary.get('s2xx')})", f"{calls}",
                   summary.get("done") == calls, kind="count")
        after_ok = after.get(f"{RPC}/0", 0)
        self.check(name, f"after the burst: {c['after_calls']} calls OK", f"{after_ok} ({json.dumps(after)})",
                   f"{c['after_calls']}, nothing else", after == {f"{RPC}/0": c["after_calls"]}
                   and up_after["requests_received"] - forwarded == c["after_calls"])
        # Shed calls are logged rate-limited: the `overloaded` WARN lines
        # must account for every one of them.
        self.check(name, "rate-limited `overloaded` WARN lines: lines, shed calls they report",
                   f"{overloaded['lines']}, {overloaded['shed_reported']:,}", f"shed = {shed.get('in_flight_limit', 0):,}",
                   overloaded["shed_reported"] == shed.get("in_flight_limit", 0), kind="count")
        bound = c["b_rss_bound_mib"]
        self.check(name, "peak RSS (VmHWM)", mib(peak_kb), f"≤ {bound:g} MiB", peak_kb <= bound * 1024,
                   kind="info" if c["quick"] else "target")
        log(f"[{name}] RSS after draining ({c['settle_s']:g} s idle): {mib(drained['VmRSS_kb'])}")


def marginal_kib_per_call(timeline):
    """Least-squares slope of RSS against calls in flight over the samples
    taken while every upstream connection was busy (so only the number of
    queued calls changes): the memory one more waiting call costs, in KiB.
    None with fewer than 3 distinct points."""
    busy = max((row.get("busy") or 0 for row in timeline), default=0)
    points = [(row["in_flight"], row["rss_kb"]) for row in timeline
              if row.get("in_flight") is not None and row.get("rss_kb") and row.get("busy") == busy and busy
              and row["in_flight"] > busy]
    if len({x for x, _ in points}) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return round(sxy / sxx, 2) if sxx else None


def _merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _same_codes(log_counts, metric_counts):
    """Log lines say `grpc_code="OK"`, metrics `0`: compare by code."""
    names = {"OK": "0", "RESOURCE_EXHAUSTED": "8", "DEADLINE_EXCEEDED": "4", "UNAVAILABLE": "14", "CANCELLED": "1",
             "INTERNAL": "13", "UNKNOWN": "2"}
    by_code = {}
    for key, n in log_counts.items():
        rpc, code = key.split("/", 1)
        by_code[f"{rpc}/{names.get(code, code)}"] = by_code.get(f"{rpc}/{names.get(code, code)}", 0) + n
    return by_code == {k: v for k, v in metric_counts.items() if v}


def tail(path, lines=20):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def mib(kb):
    return "?" if kb is None else f"{kb / 1024:.1f} MiB"


# ------------------------------------------------------------------ report


def report(meta, config, limits):
    r = limits.results
    lines = [
        f"## scripts/limits — {meta['date_utc']}{' (LIMITS_QUICK=1: smoke run, not the targets)' if config['quick'] else ''}",
        "",
        f"- outcome: {meta['outcome']}",
        f"- gateway: {meta['machine']['gateway_version']}, commit {meta['machine']['git_commit'][:12]}"
        f"{' (uncommitted changes)' if meta['machine']['git_dirty'] else ''} on {meta['machine']['git_branch']}",
        f"- machine: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}), {meta['machine']['memory']}, "
        f"kernel {meta['machine']['kernel']}, virtualization {meta['machine']['virtualization']}; "
        f"load average at start {' '.join(meta['machine']['loadavg_at_start'])}",
        f"- command: `{meta['command']}`; runtime {meta.get('runtime_s', 0):.0f} s; raw results: {meta['out']}",
        "",
        "| scenario | check | measured | bound | result |",
        "|---|---|---|---|---|",
    ]
    for check in limits.checks:
        if check["kind"] == "info":
            verdict = "ok" if check["ok"] else check["note"]
        else:
            verdict = "PASS" if check["ok"] else "**FAIL**"
        lines.append(f"| {check['scenario']} | {check['what']} | {check['measured']} | {check['bound']} | {verdict} |")
    lines.append("")
    figures = []
    if "idle" in r:
        i = r["idle"]
        sm = i.get("smaps_rollup") or {}
        figures.append(f"- idle: VmRSS {mib(i['VmRSS_kb'])} (anonymous {mib(sm.get('Anonymous'))}, file-backed "
                       f"{mib((sm.get('Rss') or 0) - (sm.get('Anonymous') or 0))}), {i['settle_s']:g} s after start-up; "
                       f"`{i['gateway_command']}`")
    for name in ("A", "B"):
        if name not in r:
            continue
        s = r[name]
        sm = s.get("smaps_rollup_at_peak") or {}
        idle_kb = r.get("idle", {}).get("VmRSS_kb")
        per_call = ""
        if idle_kb and s.get("max_in_flight_seen"):
            per_call = (f", {(s['peak_rss_kb'] - idle_kb) / 1024:.1f} MiB above idle for "
                        f"{s['max_in_flight_seen']:,.0f} calls in flight and {s['max_upstream_busy_seen']:,.0f} busy upstream connections")
        if s.get("marginal_kib_per_queued_call"):
            per_call += (f"; each call waiting for a connection adds {s['marginal_kib_per_queued_call']:.1f} KiB "
                         "(slope of RSS over the drain)")
        figures.append(
            f"- {name}: peak RSS {mib(s['peak_rss_kb'])} (anonymous at peak {mib(sm.get('Anonymous'))}){per_call}; "
            f"at most {s['max_in_flight_seen']:,.0f} calls in flight, {s['max_pending_seen']:,.0f} waiting for an upstream "
            f"connection, {s['max_upstream_busy_seen']:,.0f} upstream connections busy, {s['max_open_fds']:,} open fds; "
            f"h2load {s['h2load'].get('seconds', 0):.1f} s; RSS after draining {mib(s['drained']['VmRSS_kb'])}; "
            f"`{s['gateway_command']}`"
        )
        figures.append(f"  - `{s['h2load']['command']}`")
    lines += figures
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="run by scripts/limits; see scripts/limits --help")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--gateway-bin", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--command", default="scripts/limits")
    args = parser.parse_args()
    config = settings()

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starts background jobs with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)

    started = time.monotonic()
    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("LIMITS_")}
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())), args.command]),
        "out": str(out),
        "machine": machine_info(args.root, args.gateway_bin),
        "outcome": "complete",
    }
    help_text = subprocess.run([str(args.gateway_bin), "--help"], capture_output=True, text=True, check=False).stdout
    for flag, default in (("--max-in-flight", DEFAULT_MAX_IN_FLIGHT),
                          ("--upstream-max-connections", DEFAULT_UPSTREAM_MAX_CONNECTIONS),
                          ("--http2-max-concurrent-streams", DEFAULT_MAX_CONCURRENT_STREAMS)):
        block = re.search(re.escape(flag) + r" <N>.*?\[default: (\d+)\]", help_text, re.S)
        if not block or int(block.group(1)) != default:
            raise SystemExit(f"scripts/limits: the gateway's {flag} default is not {default} (its --help says "
                             f"{block.group(1) if block else 'nothing'}); update scripts/limits.d/limits.py")
    if "--admin-listen" not in help_text:
        raise SystemExit("scripts/limits: the gateway has no --admin-listen; its /metrics are needed for the counts")
    try:
        close = payloads.build(args.root)[RPC]
    except payloads.ProtoMismatch as error:
        raise SystemExit(f"scripts/limits: {error}")

    work = Path(tempfile.mkdtemp(prefix="gormic-limits-"))
    body_file = work / f"{RPC}.grpc"
    body_file.write_bytes(close["grpc_body"])
    limits = Limits(config, args.gateway_bin, out, work, body_file)
    exit_code = 0
    try:
        limits.idle()
        limits.scenario_a()
        limits.scenario_b()
    except Abort as error:
        log(f"scripts/limits: ABORTED: {error}")
        meta["outcome"] = f"ABORTED: {error}"
        exit_code = 1
    except (procs.StartError, OSError) as error:
        log(f"scripts/limits: {error}")
        meta["outcome"] = f"could not run: {error}"
        exit_code = 2
    except KeyboardInterrupt:
        log("scripts/limits: interrupted")
        meta["outcome"] = "INTERRUPTED before the end"
        exit_code = 130
    finally:
        for service in reversed(list(limits.services)):
            limits.stop(service)
        limits.h2load_file.close()
        shutil.rmtree(work, ignore_errors=True)

    meta["runtime_s"] = round(time.monotonic() - started, 1)
    text = report(meta, config, limits)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "config": config, "checks": limits.checks, "results": limits.results}, indent=1)
    )
    print(text)
    failed = [c for c in limits.checks if not c["ok"] and c["kind"] != "info"]
    if failed and exit_code == 0:
        log(f"scripts/limits: {len(failed)} check(s) failed (FAIL above); exit status 1")
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
