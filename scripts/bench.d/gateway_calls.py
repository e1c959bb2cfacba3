"""The gateway's own count of finished calls, by RPC and gRPC code: from its
`/metrics` counter `gormic_gateway_calls_total` when it has an admin
listener, otherwise from its per-call log lines (`grpc_code=OK`)."""

import re
from pathlib import Path

from procs import http_get

_ANSI = re.compile(rb"\x1b\[[0-9;]*m")
# Text:  call rpc="CreateInvoice" upstream_status=200 grpc_code="OK" latency_ms=0.1
# JSON:  {..."message":"call","rpc":"CreateInvoice",...,"grpc_code":"OK",...}
_CALL = re.compile(rb'\brpc"?\s*[=:]\s*"?(\w+)"?[^\n]*?\bgrpc_code"?\s*[=:]\s*"?(\w+)')
_LEVEL = re.compile(rb"\b(WARN|ERROR)\b|\"level\"\s*:\s*\"(WARN|ERROR)\"")
_METRIC = re.compile(r"^gormic_gateway_calls_total\{([^}]*)\}\s+(\S+)", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# Keep the harness from filling the disk with the gateway's log: the file is
# emptied between runs once it is this large (it is opened O_APPEND, so the
# gateway's writes simply continue at the new end).
TRUNCATE_AT = 64 << 20
KEEP_LINES = 200


class LogCalls:
    """Counts call lines in the gateway's log as it grows; keeps the first
    lines (start-up) and any line that is not an OK call or is WARN/ERROR."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0
        self.counts = {}
        self.head = []
        self.unexpected = []
        self.unexpected_total = 0

    def size(self):
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def poll(self):
        """Reads what was appended since the last poll (whole lines only)."""
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            data = log.read()
        end = data.rfind(b"\n") + 1
        if end == 0:
            return self.counts
        chunk = _ANSI.sub(b"", data[:end])
        self.offset += end
        for rpc, code in _CALL.findall(chunk):
            key = (rpc.decode(), code.decode())
            self.counts[key] = self.counts.get(key, 0) + 1
        if len(self.head) < 20:
            self.head.extend(chunk.decode(errors="replace").splitlines()[: 20 - len(self.head)])
        ok_marks = chunk.count(b'grpc_code="OK"') + chunk.count(b'"grpc_code":"OK"')
        if chunk.count(b"grpc_code") != ok_marks or _LEVEL.search(chunk):
            for line in chunk.split(b"\n"):
                bad_call = b"grpc_code" in line and b'"OK"' not in line
                if bad_call or _LEVEL.search(line):
                    self.unexpected_total += 1
                    if len(self.unexpected) < KEEP_LINES:
                        self.unexpected.append(line.decode(errors="replace"))
        return self.counts

    def maybe_truncate(self):
        """Empties the file when large, after everything in it was counted."""
        if self.size() >= TRUNCATE_AT:
            self.poll()
            with open(self.path, "r+b") as log:
                log.truncate(0)
            self.offset = 0


def metrics_counts(admin_port):
    """{(rpc_method, code name or number): calls} from /metrics."""
    counts = {}
    for labels, value in _METRIC.findall(http_get(admin_port, "/metrics")):
        fields = dict(_LABEL.findall(labels))
        code = fields.get("rpc_grpc_status_code", "?")
        # `CreateInvoice`, also when given as `gormic.om.v1.InvoiceService/CreateInvoice`.
        method = fields.get("rpc_method", "?").rsplit("/", 1)[-1]
        key = (method, "OK" if code == "0" else code)
        counts[key] = counts.get(key, 0) + int(float(value))
    return counts


def split(counts, rpc):
    """(OK calls, other finished calls) of one RPC; other RPCs' calls count
    as `other` too, since none should have been made."""
    ok = counts.get((rpc, "OK"), 0)
    other = sum(n for (name, code), n in counts.items() if (name, code) != (rpc, "OK"))
    return ok, other
