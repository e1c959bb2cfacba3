"""From the runs to the numbers: medians and spreads over repetitions, the
ratios between paths (paired within a repetition), the issue-10 targets,
and the markdown tables."""

import statistics

LABELS = {
    "direct": "direct REST (h2load → upstream)",
    "peer": "nginx proxy hop (h2load → peer → upstream; access log on, buffered)",
    "gateway": "gormic-gateway (h2load → gateway → upstream; default flags)",
}
# The process whose CPU is the hop's own cost on each path.
HOP_PROCESS = {"direct": None, "peer": "peer", "gateway": "gateway"}
PROCESS_LABELS = {
    "gateway": "gormic-gateway",
    "peer": "peer nginx (master + worker)",
    "upstream": "upstream nginx",
    "h2load": "h2load (load generator)",
}
PERCENTILES = ("p50", "p99", "p99.9")


def stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _runs(runs, rpc, path, c):
    return [r for r in runs if r["kind"] == "measure" and r["rpc"] == rpc and r["path"] == path and r["c"] == c]


def _by_rep(runs):
    return {r["rep"]: r for r in runs if r["ok"]}


def summarize(runs, config, peaks):
    summary = {}
    concurrency = config["concurrency"]
    for rpc in config["rpcs"]:
        per_rpc = {"paths": {}, "ratios": {}, "added": {}, "targets": []}
        for path in config["paths"]:
            cells = {}
            for c in concurrency:
                rs = _runs(runs, rpc, path, c)
                ok = [r for r in rs if r["ok"]]
                cell = {
                    "runs": len(rs),
                    "failed": len(rs) - len(ok),
                    "calls_per_s": stat([r["calls_per_s"] for r in ok]),
                    "cpu_us_per_call": {
                        proc: stat([r["cpu_us_per_call"].get(proc) for r in ok])
                        for proc in ("gateway", "peer", "upstream", "h2load")
                    },
                    "other_cores": stat([r["machine"]["other_cores"] for r in ok]),
                }
                if c == 1:
                    cell["latency_us"] = {
                        p: stat([r["latency_us"][p] for r in ok if r.get("latency_us")]) for p in PERCENTILES
                    }
                cells[c] = cell
            per_rpc["paths"][path] = {
                "cells": cells,
                "peak_rss_kb": peaks.get(HOP_PROCESS[path]) if HOP_PROCESS[path] else None,
            }
        # Paired within each repetition, so that drift between repetitions
        # cancels out of the differences and ratios.
        if "direct" in config["paths"] and 1 in concurrency:
            direct = _by_rep(_runs(runs, rpc, "direct", 1))
            for path in ("peer", "gateway"):
                if path not in config["paths"]:
                    continue
                mine = _by_rep(_runs(runs, rpc, path, 1))
                reps = sorted(set(direct) & set(mine))
                per_rpc["added"][path] = {
                    p: stat([mine[k]["latency_us"][p] - direct[k]["latency_us"][p] for k in reps]) for p in ("p50", "p99")
                }
        if "gateway" in config["paths"]:
            for other in ("direct", "peer"):
                if other not in config["paths"]:
                    continue
                ratios = {}
                for c in concurrency:
                    gw, ot = _by_rep(_runs(runs, rpc, "gateway", c)), _by_rep(_runs(runs, rpc, other, c))
                    reps = sorted(set(gw) & set(ot))
                    ratios[c] = {"calls_per_s": stat([gw[k]["calls_per_s"] / ot[k]["calls_per_s"] for k in reps])}
                    if other == "peer":
                        ratios[c]["cpu_per_call"] = stat(
                            [
                                gw[k]["cpu_us_per_call"]["gateway"] / ot[k]["cpu_us_per_call"]["peer"]
                                for k in reps
                                if ot[k]["cpu_us_per_call"]["peer"]
                            ]
                        )
                per_rpc["ratios"][other] = ratios
        per_rpc["targets"] = _targets(per_rpc, config)
        summary[rpc] = per_rpc
    return summary


def _median(s):
    return s["median"] if s else None


def _targets(per_rpc, config):
    """The targets of issue 10, judged on the medians."""
    targets = []
    if set(config["paths"]) != {"direct", "peer", "gateway"}:
        return targets
    if 64 in config["concurrency"]:
        ratio = _median(per_rpc["ratios"]["peer"][64]["calls_per_s"])
        targets.append(("c=64 calls/s, gateway/peer ≥ 1.0", ratio, f"{ratio:.2f}×" if ratio else "–", ratio and ratio >= 1.0))
        cpu = _median(per_rpc["paths"]["gateway"]["cells"][64]["cpu_us_per_call"]["gateway"])
        targets.append(("c=64 gateway CPU per call ≤ 25 µs", cpu, _us(cpu), cpu is not None and cpu <= 25))
    if 1 in config["concurrency"]:
        added = _median(per_rpc["added"]["gateway"]["p50"])
        targets.append(("c=1 added p50 over direct ≤ 60 µs", added, _us(added, signed=True), added is not None and added <= 60))
        gw99, peer99 = _median(per_rpc["added"]["gateway"]["p99"]), _median(per_rpc["added"]["peer"]["p99"])
        ratio = gw99 / peer99 if gw99 is not None and peer99 else None
        text = f"{_us(gw99, signed=True)} vs peer {_us(peer99, signed=True)}" + (f" ({ratio:.2f}×)" if ratio else "")
        targets.append(
            ("c=1 added p99 ≤ 2× the peer's", ratio, text, gw99 is not None and peer99 is not None and gw99 <= 2 * peer99)
        )
    return targets


def _us(value, signed=False):
    if value is None:
        return "–"
    sign = "+" if signed and value >= 0 else ""
    return f"{sign}{value:,.0f} µs" if abs(value) >= 10 else f"{sign}{value:.1f} µs"


def _rate(value):
    return "–" if value is None else f"{value:,.0f}"


def _mib(kb):
    return "–" if kb is None else f"{kb / 1024:.1f} MiB"


def _cell(s, fmt, spread, **kw):
    if s is None:
        return "–"
    if spread:
        return f"{fmt(s['min'], **kw)} – {fmt(s['max'], **kw)}"
    return fmt(s["median"], **kw)


def _failed_or(cell, text):
    return f"FAILED ({cell['failed']}/{cell['runs']})" if cell["failed"] else text


def _main_table(per_rpc, config, spread):
    conc = config["concurrency"]
    cpu_cols = [c for c in (1, 64) if c in conc] or conc[:1]
    head = ["path"]
    if 1 in conc:
        head += [f"c=1 {p}" for p in PERCENTILES] + ["added p50", "added p99"]
    head += [f"calls/s c={c}" for c in conc]
    head += [f"CPU/call c={c}" for c in cpu_cols] + ["peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in config["paths"]:
        p = per_rpc["paths"][path]
        row = [LABELS[path]]
        if 1 in conc:
            c1 = p["cells"][1]
            row += [_failed_or(c1, _cell(c1["latency_us"][q], _us, spread)) for q in PERCENTILES]
            added = per_rpc["added"].get(path)
            row += [_cell(added[q], _us, spread, signed=True) if added else "–" for q in ("p50", "p99")]
        row += [_failed_or(p["cells"][c], _cell(p["cells"][c]["calls_per_s"], _rate, spread)) for c in conc]
        proc = HOP_PROCESS[path]
        row += [
            _failed_or(p["cells"][c], _cell(p["cells"][c]["cpu_us_per_call"][proc], _us, spread)) if proc else "–"
            for c in cpu_cols
        ]
        row.append(_mib(p["peak_rss_kb"]))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _ratio_table(per_rpc, config):
    conc = config["concurrency"]
    lines = ["| ratio (median, min – max) | " + " | ".join(f"c={c}" for c in conc) + " |", "|---|" + "---|" * len(conc)]

    def fmt(s):
        return "–" if s is None else f"{s['median']:.2f}× ({s['min']:.2f} – {s['max']:.2f})"

    for other, name in (("direct", "gateway/direct calls/s"), ("peer", "gateway/peer calls/s")):
        if other in per_rpc["ratios"]:
            lines.append(f"| {name} | " + " | ".join(fmt(per_rpc["ratios"][other][c]["calls_per_s"]) for c in conc) + " |")
    if "peer" in per_rpc["ratios"]:
        lines.append(
            "| gateway/peer CPU per call | "
            + " | ".join(fmt(per_rpc["ratios"]["peer"][c].get("cpu_per_call")) for c in conc)
            + " |"
        )
    return lines


def _cpu_table(per_rpc, config):
    conc = config["concurrency"]
    lines = [
        "| path | process | " + " | ".join(f"c={c}" for c in conc) + " |",
        "|---|---|" + "---|" * len(conc),
    ]
    for path in config["paths"]:
        cells = per_rpc["paths"][path]["cells"]
        for proc in ("gateway", "peer", "upstream", "h2load"):
            if proc in ("gateway", "peer") and HOP_PROCESS[path] != proc:
                continue
            row = [_failed_or(cells[c], _cell(cells[c]["cpu_us_per_call"][proc], _us, False)) for c in conc]
            lines.append(f"| {path} | {PROCESS_LABELS[proc]} | " + " | ".join(row) + " |")
    return lines


def markdown(summary, config, runs, meta):
    out = []
    reps = config["reps"]
    for rpc, per_rpc in summary.items():
        out += [f"### {rpc}", ""]
        what = f"Medians of {reps} repetitions" if reps > 1 else "One repetition (BENCH_REPS=1: no spread)"
        out += [f"{what}; latency at c=1 from h2load's per-request log; added = path − direct, paired within a repetition; CPU per call of the hop's own process.", ""]
        out += _main_table(per_rpc, config, spread=False) + [""]
        if reps > 1:
            out += [f"Spread (min – max over {reps} repetitions):", ""]
            out += _main_table(per_rpc, config, spread=True) + [""]
        if per_rpc["ratios"]:
            out += _ratio_table(per_rpc, config) + [""]
        out += ["CPU µs per call of every process on the path (medians):", ""]
        out += _cpu_table(per_rpc, config) + [""]
        if per_rpc["targets"]:
            out += ["| issue 10 target | measured (median) | |", "|---|---|---|"]
            for name, value, text, met in per_rpc["targets"]:
                verdict = "not measured" if value is None else "met" if met else "missed"
                out.append(f"| {name} | {text} | {verdict} |")
            out.append("")
    measured = [r for r in runs if r["kind"] == "measure"]
    others = sorted(r["machine"]["other_cores"] for r in measured if r["machine"].get("other_cores") is not None)
    steal = sorted(r["machine"]["steal_cores"] for r in measured if r["machine"].get("steal_cores") is not None)
    if others:
        out += [
            f"Machine: CPU time not attributed to the benchmark's processes during the measured runs "
            f"(other processes such as compiles, and kernel softirq work), of {meta['machine']['cpus']} CPUs: "
            f"median {statistics.median(others):.2f}, max {max(others):.2f} CPUs; hypervisor steal median "
            f"{statistics.median(steal):.2f}, max {max(steal):.2f} CPUs.",
            "",
        ]
    slow = [r for r in measured if (r.get("connect_max_ms") or 0) > 200]
    if slow:
        cells = {}
        for r in slow:
            key = f"{r['rpc']} {r['path']} c={r['c']}"
            cells.setdefault(key, []).append(r)
        out += [
            f"Connection set-up: in {len(slow)} of {len(measured)} measured runs h2load waited over 200 ms for a TCP "
            "connection (about 1 s means a SYN was dropped because the listen queue was full, then retransmitted); "
            "that wait is inside the run's time, so those runs' calls/s are lower than the steady rate. "
            "Kernel listen-queue overflows during them (machine-wide): "
            + "; ".join(
                f"{key}: {len(rs)} run(s), slowest {max(r['connect_max_ms'] for r in rs):,.0f} ms, "
                f"{sum(r['listen_overflows'] or 0 for r in rs)} overflows"
                for key, rs in cells.items()
            )
            + ".",
            "",
        ]
    failed = [r for r in runs if not r["ok"]]
    out += [f"Runs: {len(measured)} measured, {len(runs) - len(measured)} preflight/calibration/warm-up; failed: {len(failed)}.", ""]
    for r in failed:
        out.append(
            f"- FAILED {r['kind']} rep={r['rep']} {r['rpc']} {r['path']} c={r['c']} n={r['n']}: " + "; ".join(r["problems"])
        )
    if failed:
        out.append("")
    return "\n".join(out)
