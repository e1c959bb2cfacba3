"""Running h2load and reading what it says: the summary it prints and the
per-request log (`--log-file`) from which the latency percentiles come."""

import math
import os
import re
import signal
import subprocess
import time

_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", re.M)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
    re.M,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_PROTOCOL = re.compile(r"^Application protocol: (\S+)", re.M)
_CONNECT = re.compile(r"^time for connect:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", re.M)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def command(url, requests, clients, body_file=None, headers=(), log_file=None):
    """One closed-loop run: `clients` connections, one stream each (-m 1), one
    h2load thread (-t 1), `requests` requests in all."""
    cmd = ["h2load", "-n", str(requests), "-c", str(clients), "-m", "1", "-t", "1"]
    if body_file:
        cmd += ["-d", str(body_file)]
    for header in headers:
        cmd += ["-H", header]
    if log_file:
        cmd += ["--log-file", str(log_file)]
    cmd.append(url)
    return cmd


def run(cmd, timeout):
    """Runs h2load; returns (exit code or None on timeout, stdout+stderr,
    wall seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        timed_out = True
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): h2load runs in its own session, so
        # it would outlive the harness.
        _kill(proc)
        proc.wait()
        raise
    wall = time.monotonic() - started
    # Popen has reaped h2load; its CPU time is the growth of RUSAGE_CHILDREN,
    # which the caller measures around this call (see bench.py).
    return (None if timed_out else proc.returncode), out.decode(errors="replace"), wall


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def parse(text):
    """The numbers of h2load's summary; a missing line leaves its keys out (the
    caller treats that as a failed run)."""
    result = {}
    match = _FINISHED.search(text)
    if match:
        result["seconds"] = float(match.group(1)) * _UNIT[match.group(2)]
        result["req_per_s"] = float(match.group(3))
    match = _REQUESTS.search(text)
    if match:
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        result.update(zip(keys, map(int, match.groups())))
    match = _STATUS.search(text)
    if match:
        result.update(zip(("s2xx", "s3xx", "s4xx", "s5xx"), map(int, match.groups())))
    match = _PROTOCOL.search(text)
    if match:
        result["protocol"] = match.group(1)
    match = _CONNECT.search(text)
    if match:
        # The slowest TCP connect of the run: about 1 s when a SYN was
        # dropped (listen queue full) and retransmitted.
        result["connect_max_ms"] = float(match.group(3)) * _UNIT[match.group(4)] * 1e3
    return result


def read_log(path):
    """Per-request rows of `--log-file`: (HTTP status, microseconds from the
    request's start to the end of its response)."""
    rows = []
    with open(path) as log:
        for line in log:
            fields = line.split("\t")
            if len(fields) >= 3:
                rows.append((int(fields[1]), int(fields[2])))
    return rows


def percentile(sorted_values, p):
    """Nearest-rank percentile: the smallest value with at least p% of the
    values at or below it (no interpolation: every reported number is a
    latency some request really had)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]
