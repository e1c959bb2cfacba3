#!/usr/bin/env python3
"""The consistency checks of scripts/ops-check.sh that no off-the-shelf tool does.

The gateway binary is the one list of its flags and metrics: nothing here
lists them. A developer adding a flag or a metric writes its code and its
docs line; these checks then hold the docs, the manifests, the dashboard and
the alerts to what the binary really has.

Run by scripts/ops-check.sh with the ops venv's Python (it needs PyYAML):

    ops_check.py surface ROOT BINARY SURFACE_OUT
        reads what BINARY offers and writes it as JSON to SURFACE_OUT:
        its flags, each with its variable, placeholder and default, from
        `BINARY --help`; and its metric families with their types, from the
        /metrics of two runs on loopback ports, with every feature that
        brings families of its own on and the events that create the others
        (read_metrics says which). Checks on the way that every flag has a
        GORMIC_* variable, that no removed metric is back, and that the
        series dashboards count on from the start are there from the start.
        Needs redis-server and openssl on PATH (ops-check.sh installs them).
    ops_check.py static ROOT SURFACE DASHBOARD_RULES_OUT
        kustomization lists every file; Deployment, ConfigMap env file and
        Dockerfile agree with each other and with the gateway's ports, and
        every GORMIC_* variable they set is a flag's; checkov skips are the
        documented ones; dashboard and alert rules use only the binary's
        metric names, and a panel shows each of its metrics; runbook links
        resolve to headings of docs/operations.md; docs/operations.md names
        every flag and has a row for every metric with its type (and none
        for a metric the binary lacks); docs/configuration.md has a row for
        every flag (and none other) with its variable, the placeholder and
        the default `--help` shows, and a meaning; every relative link of
        README.md and docs/*.md resolves, to a heading where it names one.
        Writes every dashboard query, with Grafana's variables replaced, as a
        Prometheus recording rule file, so that `promtool check rules`
        parses them.
    ops_check.py copy-sources ROOT
        prints the sources of the Dockerfile's build-stage COPY lines, one a
        line (scripts/ops-check.sh rebuilds the build context from them).

Every problem is printed, then the exit status is 1.
"""

import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

# ---- What only history knows (the binary cannot say what it no longer has,
# nor what others count on)

# Series the gateway no longer exposes: a dashboard, an alert or the docs'
# table of metrics that still used one would show nothing.
REMOVED = {
    "gormic_gateway_upstream_connections": "gormic_gateway_upstream_requests_active",
    "gormic_gateway_upstream_connections_limit": "gormic_gateway_upstream_requests_limit",
}
# Exposed from the start, before any call, by any gateway (with or without
# --sandbox, --tls-cert or a Redis store):
# the alerts and dashboard panels on them (breaker state, request cap, in
# flight, cooldowns, process) must have a series to read from the first
# scrape. A promise the binary keeps, not a list of every metric: a new
# metric need not be added here.
EXPOSED_AT_START = {
    "gormic_gateway_build_info",
    "gormic_gateway_calls_in_flight",
    "gormic_gateway_tenants_in_flight",
    "gormic_gateway_unverified_calls_in_flight",
    "gormic_gateway_tenants_trusted",
    "gormic_gateway_upstream_requests_active",
    "gormic_gateway_upstream_requests_limit",
    "gormic_gateway_upstream_pending_requests",
    "gormic_gateway_upstream_connections_opened_total",
    "gormic_gateway_upstream_breaker_state",
    "gormic_gateway_upstream_cooldowns_active",
    "gormic_gateway_upstream_cooldowns_opened_total",
    "gormic_gateway_upstream_cooldown_messages_total",
    "gormic_gateway_log_lines_dropped_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
}
# clap's own flags, which have no variable and need no docs row.
CLAP_FLAGS = {"help", "version"}

# ---- checkov skips: each one, and only these, with its reason in the file.
ALLOWED_SKIPS = {
    ("Dockerfile", "CKV_DOCKER_2"),
    ("deploy/kubernetes/deployment.yaml", "CKV_K8S_43"),
    ("deploy/kubernetes/deployment.yaml", "CKV_K8S_35"),
}

PORTS = {"grpc": 50051, "admin": 20051}

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def parse_duration(text):
    """humantime's simple forms: 500ms, 10s, 5m, 1h30m. None if not one."""
    parts = re.findall(r"(\d+)\s*(ms|s|m|h|d)", text)
    if not parts or re.sub(r"(\d+)\s*(ms|s|m|h|d)|\s", "", text):
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * scale[u] for n, u in parts)


def read_env_file(path):
    values = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            problem(f"{path}:{number}", "not NAME=value")
            continue
        name, value = line.split("=", 1)
        if name in values:
            problem(f"{path}:{number}", f"{name} set twice")
        values[name] = value
    return values


# ---- Kubernetes ------------------------------------------------------------

def check_kustomization(root):
    kdir = root / "deploy/kubernetes"
    kust = load_yaml_docs(kdir / "kustomization.yaml")[0]
    listed = set(kust.get("resources", []))
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        listed.update(gen.get("envs", []))
        listed.update(f.split("=", 1)[-1] for f in gen.get("files", []))
    present = {
        p.name for p in kdir.iterdir()
        if p.is_file() and p.suffix in (".yaml", ".yml", ".env") and p.name != "kustomization.yaml"
    }
    for name in sorted(present - listed):
        problem("deploy/kubernetes/kustomization.yaml", f"does not list {name}")
    for name in sorted(listed - present):
        problem("deploy/kubernetes/kustomization.yaml", f"lists {name}, which does not exist")
    namespace = kust.get("namespace")
    for name in sorted(present & set(kust.get("resources", []))):
        for doc in load_yaml_docs(kdir / name):
            meta = doc.get("metadata", {})
            if doc.get("kind") == "Namespace":
                if meta.get("name") != namespace:
                    problem(name, f"Namespace {meta.get('name')} is not the kustomization's {namespace}")
            elif meta.get("namespace") != namespace:
                problem(name, f"{doc.get('kind')} {meta.get('name')} is not in namespace {namespace}")
    return kust


def check_deployment(root, surface):
    kdir = root / "deploy/kubernetes"
    env_file = read_env_file(kdir / "gateway.env")
    deployment = next(
        d for d in load_yaml_docs(kdir / "deployment.yaml") if d.get("kind") == "Deployment"
    )
    where = "deploy/kubernetes/deployment.yaml"
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    if spec.get("replicas", 1) < 2:
        problem(where, "fewer than 2 replicas")
    containers = pod["containers"]
    if len(containers) != 1:
        problem(where, "expected exactly one container")
    c = containers[0]

    # Drain: terminationGracePeriodSeconds > shutdown delay + grace.
    delay = parse_duration(env_file.get("GORMIC_SHUTDOWN_DELAY", "0s"))
    grace = parse_duration(env_file.get("GORMIC_SHUTDOWN_GRACE", "10s"))
    if delay is None or grace is None:
        problem("deploy/kubernetes/gateway.env", "GORMIC_SHUTDOWN_DELAY/GRACE are not durations this check reads")
    else:
        period = pod.get("terminationGracePeriodSeconds", 30)
        if not period > delay + grace:
            problem(where, f"terminationGracePeriodSeconds {period} must exceed "
                    f"GORMIC_SHUTDOWN_DELAY + GORMIC_SHUTDOWN_GRACE = {delay + grace:g}s")
    upstream_timeout = parse_duration(env_file.get("GORMIC_UPSTREAM_TIMEOUT", "10s"))
    if grace is not None and upstream_timeout is not None and grace < upstream_timeout:
        problem("deploy/kubernetes/gateway.env",
                "GORMIC_SHUTDOWN_GRACE is shorter than GORMIC_UPSTREAM_TIMEOUT: calls in flight would be cut")
    if "lifecycle" in c:
        problem(where, "no lifecycle hook expected: the image has no shell, and the gateway drains itself")

    # Ports, listen addresses and probes.
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if ports != PORTS:
        problem(where, f"container ports {ports}, expected {PORTS}")
    env = {e["name"]: e for e in c.get("env", [])}
    if env.get("GORMIC_ADMIN_LISTEN", {}).get("value") != "0.0.0.0:20051":
        problem(where, "GORMIC_ADMIN_LISTEN must be 0.0.0.0:20051 (probes and scraping come from outside the pod)")
    if env.get("GORMIC_LISTEN", {}).get("value", "0.0.0.0:50051") != "0.0.0.0:50051":
        problem(where, "GORMIC_LISTEN must be 0.0.0.0:50051")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "admin":
            problem(where, f"{probe} must be httpGet {path} on port admin")

    # Security context (checkov checks most of it; these are the brief's own).
    sc = c.get("securityContext", {})
    wanted = {"runAsNonRoot": True, "runAsUser": 65532, "readOnlyRootFilesystem": True,
              "allowPrivilegeEscalation": False}
    for key, value in wanted.items():
        if sc.get(key) != value:
            problem(where, f"container securityContext.{key} must be {value}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(where, "container capabilities must drop ALL")
    if pod.get("automountServiceAccountToken") is not False:
        problem(where, "automountServiceAccountToken must be false")

    # Every GORMIC_* name is a flag's variable (a typo would be ignored by the
    # gateway, silently). Settings belong in one place only.
    for name in sorted(set(env_file) & set(env)):
        problem(where, f"{name} is set both here and in gateway.env")
    variables = {f["env"] for f in surface["flags"].values()}
    for name in sorted(set(env_file) | set(env)):
        if name.startswith("GORMIC_") and name not in variables:
            problem(where if name in env else "deploy/kubernetes/gateway.env",
                    f"{name} is not the variable of any flag `{surface['binary']} --help` shows")

    # The HPA and PDB select this Deployment.
    hpa = load_yaml_docs(kdir / "hpa.yaml")[0]
    if hpa["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problem("deploy/kubernetes/hpa.yaml", "scaleTargetRef is not the Deployment")
    if hpa["spec"].get("minReplicas", 1) < 2:
        problem("deploy/kubernetes/hpa.yaml", "minReplicas must be at least 2")
    labels = spec["template"]["metadata"]["labels"]
    for name in ("pdb.yaml", "service.yaml", "service-headless.yaml", "networkpolicy.yaml"):
        doc = load_yaml_docs(kdir / name)[0]
        sel = doc["spec"].get("selector") or doc["spec"].get("podSelector")
        sel = sel.get("matchLabels", sel)
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            problem(f"deploy/kubernetes/{name}", "selector does not match the Deployment's pods")
    return set(env_file) | set(env)


# ---- Dockerfile ------------------------------------------------------------

def dockerfile_stages(root):
    stages = []
    for line in logical_lines(root / "Dockerfile"):
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append({"from": rest.split()[0], "lines": []})
        elif stages:
            stages[-1]["lines"].append((word.upper(), rest.strip()))
    return stages


def logical_lines(path):
    lines, current = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def copy_sources(root):
    build = dockerfile_stages(root)[0]
    sources = []
    for word, rest in build["lines"]:
        if word == "COPY" and "--from" not in rest:
            args = [a for a in rest.split() if not a.startswith("--")]
            sources.extend(args[:-1])
    return sources


def check_dockerfile(root, surface):
    where = "Dockerfile"
    stages = dockerfile_stages(root)
    if len(stages) != 2:
        problem(where, f"expected 2 stages (build, run), found {len(stages)}")
        return
    build, run = stages
    m = re.fullmatch(r"rust:(\d+)\.(\d+)(?:\.(\d+))?-bookworm(?: AS \w+)?", build["from"], re.I)
    cargo = (root / "Cargo.toml").read_text(encoding="utf-8")
    rv = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', cargo, re.M)
    if not m:
        problem(where, f"build stage must be FROM rust:X.Y[.Z]-bookworm, not {build['from']}")
    elif rv and (int(m.group(1)), int(m.group(2))) < (int(rv.group(1)), int(rv.group(2))):
        problem(where, f"rust image {build['from']} is older than rust-version {rv.group(1)}.{rv.group(2)}")
    if run["from"] != "gcr.io/distroless/cc-debian12:nonroot":
        problem(where, f"run stage must be FROM gcr.io/distroless/cc-debian12:nonroot, not {run['from']}")
    if not any(w == "RUN" and "cargo build --release --locked" in r for w, r in build["lines"]):
        problem(where, "build stage must run cargo build --release --locked")
    if not any(w == "ARG" and r.startswith("GORMIC_GIT_COMMIT") for w, r in build["lines"]):
        problem(where, "build stage must take ARG GORMIC_GIT_COMMIT")
    run_lines = dict((w, r) for w, r in run["lines"] if w != "LABEL")
    if run_lines.get("USER") != "65532:65532":
        problem(where, "run stage must be USER 65532:65532")
    if sorted(run_lines.get("EXPOSE", "").split()) != ["20051", "50051"]:
        problem(where, "run stage must EXPOSE 50051 20051")
    if run_lines.get("ENTRYPOINT") != '["/gormic-gateway"]':
        problem(where, 'ENTRYPOINT must be ["/gormic-gateway"]')
    copies = [r for w, r in run["lines"] if w == "COPY"]
    if copies != ["--from=build /gormic-gateway /gormic-gateway"]:
        problem(where, f"run stage must copy the binary only, not {copies}")
    if any(w == "RUN" for w, _ in run["lines"]):
        problem(where, "run stage has no shell: no RUN")
    # A GORMIC_* ENV configures the gateway: it must be a flag's variable.
    # (ARG GORMIC_GIT_COMMIT is a build input, read by the compiler.)
    variables = {f["env"] for f in surface["flags"].values()}
    for stage in stages:
        for word, rest in stage["lines"]:
            if word != "ENV":
                continue
            for name in re.findall(r"(?:^|\s)(GORMIC_[A-Z0-9_]+)(?==|\s|$)", rest):
                if name not in variables:
                    problem(where, f"ENV {name} is not the variable of any flag "
                            f"`{surface['binary']} --help` shows")
    # The build context must keep what the build stage copies.
    ignored = [l.strip() for l in (root / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if l.strip() and not l.startswith("#")]
    for src in copy_sources(root):
        if not (root / src).exists():
            problem(where, f"COPY {src}: no such file")
        for pattern in ignored:
            plain = pattern.rstrip("/")
            if re.fullmatch(re.escape(plain).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*"), src):
                problem(".dockerignore", f"{pattern} excludes {src}, which the build copies")


# ---- checkov skips ---------------------------------------------------------

def check_skips(root):
    found = set()
    files = [root / "Dockerfile"] + sorted((root / "deploy/kubernetes").glob("*.yaml"))
    for path in files:
        rel = str(path.relative_to(root))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in re.finditer(r"checkov:skip=(CKV2?_\w+)(?::(.*))?", line):
                found.add((rel, m.group(1)))
                if not (m.group(2) or "").strip():
                    problem(f"{rel}:{number}", f"skip of {m.group(1)} without a reason")
            for m in re.finditer(r"checkov\.io/skip\d+:\s*(CKV2?_\w+)(?:=(.*))?", line):
                found.add((rel, m.group(1)))
                if not (m.group(2) or "").strip():
                    problem(f"{rel}:{number}", f"skip of {m.group(1)} without a reason")
    for rel, check in sorted(found - ALLOWED_SKIPS):
        problem(rel, f"checkov skip {check} is not one of the documented skips (scripts/ops_check.py ALLOWED_SKIPS)")
    for rel, check in sorted(ALLOWED_SKIPS - found):
        problem(rel, f"documented checkov skip {check} is no longer there: remove it from ALLOWED_SKIPS")


# ---- PromQL ------------------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr):
    """The series names an expression selects (good enough for our own queries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        after = text[m.end():].lstrip()
        if after.startswith("(") or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def check_names(where, expr, series, extra=()):
    for name in sorted(metric_names(expr)):
        if name in REMOVED:
            problem(where, f"{name} was removed: use {REMOVED[name]}")
        elif name not in series and name not in extra:
            problem(where, f"{name} is not a metric the binary exposed (in the runs of "
                    "scripts/ops_check.py read_metrics: an event it does not make?)")


def grafana_to_promql(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def check_dashboard(root, surface, rules_out):
    path = root / "deploy/grafana/gormic-gateway.json"
    where = "deploy/grafana/gormic-gateway.json"
    try:
        dash = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problem(where, f"not valid JSON: {e}")
        return
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 39:
        problem(where, "schemaVersion missing or older than 39 (Grafana 11)")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource" or \
            variables["datasource"].get("query") != "prometheus":
        problem(where, "needs a `datasource` template variable of type datasource, query prometheus")

    def walk(node, trail):
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and ds.get("uid") not in ("${datasource}", "-- Grafana --"):
                problem(where, f"{trail}: hard-coded datasource uid {ds.get('uid')!r}")
            if isinstance(ds, str) and ds not in ("${datasource}", "$datasource"):
                problem(where, f"{trail}: hard-coded datasource {ds!r}")
            for k, v in node.items():
                walk(v, f"{trail}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{trail}[{i}]")
    walk(dash, "$")
    series = series_names(surface)

    exprs = []
    ids = set()
    panels = list(dash.get("panels", []))
    for p in panels:
        panels.extend(p.get("panels", []))
    for p in panels:
        if p.get("id") in ids:
            problem(where, f"panel id {p.get('id')} used twice")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        targets = p.get("targets", [])
        if not targets:
            problem(where, f"panel {p.get('title')!r} has no query")
        for t in targets:
            expr = t.get("expr", "")
            if not expr:
                problem(where, f"panel {p.get('title')!r} has an empty query")
                continue
            check_names(f"{where}: panel {p.get('title')!r}", expr, series)
            exprs.append(expr)
    for name, v in variables.items():
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
        if v.get("type") == "query" and m:
            check_names(f"{where}: variable {name}", m.group(1), series)
            exprs.append(m.group(1))
        elif v.get("type") == "query":
            problem(where, f"variable {name}: expected label_values(<selector>, <label>)")
    # Everything the dashboard charts, the gateway's main series at least.
    used = set().union(*(metric_names(e) for e in exprs)) if exprs else set()
    # The start time only tells restarts apart: no panel needs it.
    for name, kind in sorted(surface["metrics"].items()):
        shown = name + "_bucket" if kind == "histogram" else name
        if shown not in used and name != "process_start_time_seconds":
            problem(where, f"no panel shows {name}")
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"ops_check:dashboard_query_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(exprs)]}]}
    Path(rules_out).write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")


def github_anchors(markdown):
    anchors = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", "")).replace(" ", "-")
        n = anchors.get(slug, -1) + 1
        anchors[slug] = n
        if n:
            anchors[f"{slug}-{n}"] = 0
    return set(anchors)


def check_alerts(root, surface):
    where = "deploy/prometheus/alerts.yaml"
    docs = (root / "docs/operations.md").read_text(encoding="utf-8")
    anchors = github_anchors(docs)
    series = series_names(surface)
    rules = load_yaml_docs(root / where)[0]
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            if not name:
                problem(where, "only alerting rules belong here")
                continue
            if name in names:
                problem(where, f"{name} defined twice")
            names.add(name)
            check_names(f"{where}: {name}", rule["expr"], series, extra={"up"})
            if "for" not in rule:
                problem(where, f"{name}: no `for:`")
            if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
                problem(where, f"{name}: severity must be critical or warning")
            ann = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                if not ann.get(key):
                    problem(where, f"{name}: no {key} annotation")
            url = ann.get("runbook_url", "")
            anchor = url.partition("#")[2]
            if not url.split("#")[0].endswith("docs/operations.md") or anchor not in anchors:
                problem(where, f"{name}: runbook_url {url} is not a heading of docs/operations.md")
            if name not in docs:
                problem("docs/operations.md", f"does not mention the alert {name}")
    tests = (root / "deploy/prometheus/alerts.test.yaml").read_text(encoding="utf-8")
    for name in sorted(names):
        if not re.search(rf"alertname:\s*{name}\s*$", tests, re.M):
            problem("deploy/prometheus/alerts.test.yaml", f"no test of {name}")


def check_docs(root, surface, env_used):
    where = "docs/operations.md"
    docs = (root / where).read_text(encoding="utf-8")
    for flag, info in sorted(surface["flags"].items()):
        if f"--{flag}" not in docs:
            problem(where, f"does not document --{flag}")
        if info["env"] and info["env"] not in docs:
            problem(where, f"does not document {info['env']}")
    for name in sorted(env_used):
        if name not in docs:
            problem(where, f"does not mention {name}, which deploy/kubernetes sets")
    check_metrics_table(docs, surface)
    check_configuration(root, surface)
    check_links(root)


def check_metrics_table(docs, surface):
    """docs/operations.md's table of every metric (under "### Every
    metric"): a row for each family the binary exposes, with its type
    (`| `name` | type | labels | ... |`, several names to a row allowed),
    and none for a family it does not."""
    where = "docs/operations.md"
    section = re.search(r"^### Every metric\n(.*?)(?=^#{1,6} )", docs, re.M | re.S)
    if not section:
        problem(where, "no section \"### Every metric\" with the table of every metric")
        return
    rows = {}
    for m in re.finditer(r"^\| ([^|]*)\| ([^|]*)\|", section.group(1), re.M):
        kind = (m.group(2).split() or [""])[0]
        for name in re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^`]*\})?`", m.group(1)):
            if name in rows:
                problem(where, f"the metrics table has two rows for {name}")
            rows[name] = kind
    for name, kind in sorted(surface["metrics"].items()):
        if name not in rows:
            problem(where, f"the metrics table (### Every metric) has no row for {name} ({kind})")
        elif rows[name] != kind:
            problem(where, f"the metrics table says {name} is a {rows[name]}: it is a {kind}")
    for name in sorted(set(rows) - set(surface["metrics"])):
        if name in REMOVED:
            problem(where, f"the metrics table still lists {name}, which was removed (now {REMOVED[name]})")
        else:
            problem(where, f"the metrics table lists {name}, which the binary did not expose "
                    "(in the runs of scripts/ops_check.py read_metrics: an event it does not make?)")


# A row of docs/configuration.md's flag tables:
# | `--flag PLACEHOLDER` | `GORMIC_FLAG` | default | meaning |
# (a `|` inside a placeholder is escaped: `--admin-listen ADDR\|off`).
FLAG_ROW = re.compile(
    r"^\| `--([a-z0-9-]+)(?: ((?:[^`|\\]|\\\|)+))?` \| ((?:[^|\\]|\\\|)*)\| ((?:[^|\\]|\\\|)*)\| (.*)\|\s*$",
    re.M)


def configuration_rows(root):
    """{flag: (placeholder or None, env cell, default cell, meaning)} of
    docs/configuration.md; a flag documented twice is a problem."""
    where = "docs/configuration.md"
    text = (root / where).read_text(encoding="utf-8")
    rows = {}
    for m in FLAG_ROW.finditer(text):
        flag, placeholder, env, default, meaning = m.groups()
        if flag in rows:
            problem(where, f"--{flag} has two rows")
        placeholder = placeholder.replace("\\|", "|") if placeholder else None
        rows[flag] = (placeholder, env.strip(), default.strip(), meaning.strip())
    return rows


def check_configuration(root, surface):
    """Every flag has its row in docs/configuration.md, written as --help
    writes it (`--listen ADDR` for `--listen <ADDR>`, a switch without a
    placeholder), with its variable, a default (the one --help shows, when
    it shows one) and a meaning; no row is of a flag the gateway does not
    have."""
    where = "docs/configuration.md"
    flags = surface["flags"]
    rows = configuration_rows(root)
    for flag, info in sorted(flags.items()):
        if flag not in rows:
            problem(where, f"no row for --{flag} (| `--{flag} ...` | `{info['env']}` | default | meaning |)")
            continue
        placeholder, env, default, meaning = rows[flag]
        if placeholder != info["placeholder"]:
            want = f"--{flag} {info['placeholder']}" if info["placeholder"] else f"--{flag}"
            have = f"--{flag} {placeholder}" if placeholder else f"--{flag}"
            problem(where, f"writes `{have}`, --help shows `{want}`")
        if info["env"] and f"`{info['env']}`" not in env:
            problem(where, f"--{flag}: its variable is {info['env']}, the row says {env!r}")
        if not default:
            problem(where, f"--{flag}: no default")
        elif info["default"] is not None and f"`{info['default']}`" not in default:
            problem(where, f"--{flag}: --help shows the default {info['default']}, "
                    f"the row says {default!r}")
        if not meaning:
            problem(where, f"--{flag}: no meaning")
    for flag in sorted(set(rows) - set(flags)):
        problem(where, f"a row for --{flag}, which `{surface['binary']} --help` does not show")


def check_links(root):
    """Every relative link of README.md and docs/*.md names a file or
    directory of the repository and, with a #fragment, a heading of that
    Markdown file (or of the page itself, for a bare #fragment)."""
    pages = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    anchors = {}
    for page in pages:
        rel = page.relative_to(root)
        text = page.read_text(encoding="utf-8")
        # Links in fenced code are code, not links.
        prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
        for m in re.finditer(r"\]\(([^)\s]+)\)", prose):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page.resolve()
            if path and not dest.exists():
                problem(str(rel), f"link to {path}, which does not exist")
                continue
            if not fragment:
                continue
            if dest.suffix != ".md" or dest.is_dir():
                problem(str(rel), f"link to {target}: a #fragment needs a Markdown file")
                continue
            if dest not in anchors:
                anchors[dest] = github_anchors(dest.read_text(encoding="utf-8"))
            if fragment not in anchors[dest]:
                problem(str(rel), f"link to {target}, which is no heading of {path or rel}")


# ---- The binary: its flags and metrics --------------------------------------
#
# A surface is {"flags": {flag: {"env", "placeholder", "default"}},
# "metrics": {family: type}}, read from the binary by `surface` and used by
# every check of `static`.

# An option's heading in `--help`: `      --listen <ADDR>`, `  -h, --help`.
# Its text follows, indented deeper; clap may wrap it anywhere (with its
# wrap_help feature), so a heading is only ever read from this one line.
HELP_HEADING = re.compile(r"^ {2,6}(?:-[A-Za-z0-9], )?--([a-z0-9][a-z0-9-]*)(?: <([^<>]+)>)?$")


def child_env():
    """The environment of the binary's runs: no GORMIC_* variable (it would
    configure the gateway, and `--help` would show its value), no proxy
    (everything here is loopback), no colours."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith("GORMIC_") and k not in ("CLICOLOR_FORCE", "FORCE_COLOR")}
    env["NO_COLOR"] = "1"
    return env


def read_flags(binary):
    """{flag: {"env", "placeholder", "default"}} of `BINARY --help` (the
    long help: each option's heading on a line of its own, then its text
    with `[env: NAME=]` (`[env: NAME]` for a secret, whose value --help
    hides) and `[default: VALUE]` on lines of their own)."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=False,
                         env=child_env(), stdin=subprocess.DEVNULL, timeout=30)
    if out.returncode != 0:
        problem(binary, f"--help exited {out.returncode}: {out.stderr.strip()[-500:]}")
        return {}
    return parse_help(binary, out.stdout)


def parse_help(binary, text):
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    flags, texts, current = {}, {}, None
    for line in text.splitlines():
        line = line.rstrip()
        if re.match(r"^ {2,6}-", line):
            m = HELP_HEADING.match(line)
            if not m:
                problem(binary, f"--help: cannot read the option heading {line.strip()!r}")
                current = None
                continue
            current = m.group(1)
            if current in flags:
                problem(binary, f"--help shows --{current} twice")
            flags[current] = {"placeholder": m.group(2)}
            texts[current] = []
        elif current and (not line or line.startswith(" " * 7)):
            texts[current].append(line.strip())
        else:
            current = None  # a heading of options ("Limits:"), the footer
    for flag in CLAP_FLAGS:
        flags.pop(flag, None)
    for flag, info in flags.items():
        # Joined, so that a tag wrapped over two lines still reads.
        joined = " ".join(t for t in texts[flag] if t)
        env = re.search(r"\[env: ([A-Za-z0-9_]+)(?:=[^\]]*)?\]", joined)
        default = re.search(r"\[default: ([^\]]*)\]", joined)
        info["env"] = env.group(1) if env else None
        info["default"] = default.group(1) if default else None
        if not info["env"]:
            problem(binary, f"--{flag} has no environment variable (every flag has a GORMIC_* one)")
        elif not info["env"].startswith("GORMIC_"):
            problem(binary, f"--{flag} reads {info['env']}: a flag's variable starts with GORMIC_")
    if not flags:
        problem(binary, "--help shows no flag: is it the gateway?")
    return flags


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what, probe, seconds):
    """probe()'s first true value within `seconds`; a problem naming `what`
    (and None) when there is none by then."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            problem("ops-check", f"waited {seconds} s for {what}")
            return None
        time.sleep(0.05)


class Process:
    """A process of a run, its output in a file; stopped on exit, killed if
    it does not stop in 15 s."""

    def __init__(self, name, argv, workdir):
        self.name = name
        self.log = Path(workdir) / f"{name}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, env=child_env())

    def tail(self):
        text = self.log.read_text(encoding="utf-8", errors="replace").strip()
        return text[-1500:] or "(no output)"

    def alive(self):
        return self.popen.poll() is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.popen.terminate()
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def http_get(url):
    """(status, body) of a GET, or None when nothing answers yet."""
    # No proxy for loopback, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return None


def grpc_web_call(base, rpc, invoice_id, metadata, context=None):
    """Calls `rpc` of gormic.om.v1.InvoiceService with a request whose one
    field, invoice_id (1), is set, over gRPC-Web on HTTP/1.1, which the
    gateway serves on its gRPC port: the standard library is the client,
    nothing to install, no proto to compile. Returns the grpc-status, or a
    text saying why there is none. Its value does not matter here: a call
    is made for the series it creates."""
    field = invoice_id.encode()
    assert len(field) < 128  # its length is then one byte of varint
    message = b"\x0a" + bytes([len(field)]) + field
    request = urllib.request.Request(
        f"{base}/gormic.om.v1.InvoiceService/{rpc}",
        data=b"\x00" + struct.pack(">I", len(message)) + message, method="POST",
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **metadata})
    handlers = [urllib.request.ProxyHandler({})]
    if context:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=15) as r:
            body = r.read()
            status = r.headers.get("grpc-status")
            trailers = re.search(rb"grpc-status:\s*(\d+)", body)
            return status or (trailers.group(1).decode() if trailers else "none")
    except OSError as e:  # HTTPError and URLError included
        return f"no answer: {e}"


def families(exposition):
    """{family: type} of the `# TYPE` lines of a text exposition. The
    gateway's client library (prometheus-client) writes no `# TYPE` for a
    labelled family without a series yet: such a family appears only once an
    event created its first series."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))


def start_gateway(binary, args, workdir, name):
    """Starts the gateway on loopback ports; (process, grpc port, admin
    URL), its /readyz answered 200 (everything wired), or None."""
    grpc, admin = free_port(), free_port()
    gateway = Process(name, [binary, "--listen", f"127.0.0.1:{grpc}",
                             "--admin-listen", f"127.0.0.1:{admin}", *args], workdir)
    admin_url = f"http://127.0.0.1:{admin}"

    def ready():
        if not gateway.alive():
            return "exited"
        answer = http_get(f"{admin_url}/readyz")
        return "ready" if answer and answer[0] == 200 else None
    state = until(f"{name} ({' '.join(args)}) to be ready on its /readyz", ready, 30)
    if state != "ready":
        problem(binary, f"{name} did not start: {gateway.tail()}")
        gateway.stop()
        return None
    return gateway, grpc, admin_url


def scrape(admin_url):
    answer = http_get(f"{admin_url}/metrics")
    if not answer or answer[0] != 200:
        problem("ops-check", f"no /metrics from {admin_url}: {answer}")
        return {}
    return families(answer[1])


def self_signed_certificate(workdir):
    """A certificate for 127.0.0.1 and its key, valid a day (openssl)."""
    cert, key = Path(workdir) / "cert.pem", Path(workdir) / "key.pem"
    out = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, text=True, check=False, timeout=30)
    if out.returncode != 0:
        problem("openssl", f"could not make a test certificate: {out.stderr.strip()[-500:]}")
        return None
    return cert, key


def start_redis(workdir):
    """A redis-server of this run on an ephemeral loopback port, answering
    PING; (process, port) or None."""
    port = free_port()
    redis = Process("redis-server", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                    workdir)

    def pong():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
    if not until(f"redis-server on 127.0.0.1:{port} to answer PING", pong, 10):
        problem("redis-server", redis.tail())
        redis.stop()
        return None
    return redis, port


def read_metrics(binary):
    """{family: type} over two runs of the binary, which between them create
    every family:

    1. `--sandbox` with every feature that adds families: TLS (the
       certificate's expiry), a Redis store (the store's series), quotas
       (their checks). Read once ready, then after: a call with an idempotency key
       (calls, upstream requests, both histograms, idempotency results,
       quota checks), a second call over the quota (shed calls), and a
       change of the quotas file (reloads).
    2. An upstream that refuses connections, the breaker opening at the first
       failure, `--metrics-organization-label` (it changes the labels of
       calls_total, not the families): one call (retries, breaker
       transitions).

    Each run is read once ready too, before any call: the families of
    EXPOSED_AT_START must be there.
    A family that appears only after another kind of event is missing until
    its event is added here: the checks of `static` then say that the docs,
    the dashboard or the alerts name a metric the binary does not have."""
    exposed = {}

    def at_start(admin_url, run):
        found = scrape(admin_url)
        for name in sorted(EXPOSED_AT_START - set(found)):
            problem(binary, f"does not expose {name} at start ({run})")
        return found

    def add(found, run):
        for name, kind in found.items():
            if exposed.setdefault(name, kind) != kind:
                problem(binary, f"{name} is a {exposed[name]} in one run and a {kind} in {run}")

    with tempfile.TemporaryDirectory(prefix="ops-check-") as workdir:
        pair = self_signed_certificate(workdir)
        started = start_redis(workdir) if pair else None
        if not started:
            return exposed
        redis, redis_port = started
        with redis:
            quotas = Path(workdir) / "quotas.toml"
            quota = '[organizations."ops-check"]\ncalls_per_second = 0.001\nburst = {}\n'
            quotas.write_text(quota.format(1), encoding="utf-8")
            cert, key = pair
            run = start_gateway(binary, [
                "--sandbox", "--tls-cert", str(cert), "--tls-key", str(key),
                "--idempotency-store", f"redis://127.0.0.1:{redis_port}",
                "--quotas", str(quotas), "--reload-interval", "100ms"], workdir, "gateway-sandbox")
            if not run:
                return exposed
            gateway, grpc, admin_url = run
            with gateway:
                add(at_start(admin_url, "the sandbox run"), "the sandbox run")
                context = ssl.create_default_context(cafile=str(cert))
                metadata = {"api-key": "ops-check", "organization-id": "ops-check"}
                calls = [grpc_web_call(f"https://127.0.0.1:{grpc}", "CloseInvoice", "inv-closed",
                                       {**metadata, "idempotency-key": f"ops-check-{n}"}, context)
                         for n in (1, 2)]
                for status in calls:
                    if not status.isdigit():
                        problem(binary, f"a call of the sandbox run got {status}")
                before = scrape(admin_url)
                quotas.write_text(quota.format(2), encoding="utf-8")

                def grown():
                    now = scrape(admin_url)
                    return now if set(now) - set(before) else None
                after = until("a new metric family after the quotas file changed under "
                              "--reload-interval 100ms (its reload is counted)", grown, 10)
                add(after or before, "the sandbox run")
                if not gateway.alive():
                    problem(binary, f"the sandbox run stopped: {gateway.tail()}")

        # Bound, never listening: connections to it are refused.
        with socket.socket() as refusing:
            refusing.bind(("127.0.0.1", 0))
            run = start_gateway(binary, [
                "--upstream", f"http://127.0.0.1:{refusing.getsockname()[1]}",
                "--upstream-breaker-failures", "1", "--metrics-organization-label"],
                workdir, "gateway-refused")
            if not run:
                return exposed
            gateway, grpc, admin_url = run
            with gateway:
                add(at_start(admin_url, "the run against a refusing upstream"),
                    "the run against a refusing upstream")
                status = grpc_web_call(f"http://127.0.0.1:{grpc}", "CloseInvoice", "inv-closed",
                                       {"api-key": "ops-check", "organization-id": "ops-check"})
                if status != "14":
                    problem(binary, f"a call to an upstream refusing connections got "
                            f"grpc-status {status}, not 14 (UNAVAILABLE)")
                add(scrape(admin_url), "the run against a refusing upstream")
    print(f"ops-check: the calls got grpc-status {', '.join(calls)} (sandbox run), "
          f"{status} (refusing upstream)")
    for name in sorted(set(exposed) & set(REMOVED)):
        problem(binary, f"exposes {name} again, a removed metric (REMOVED in scripts/ops_check.py)")
    if not exposed:
        problem(binary, "exposed no metric family")
    return exposed


def write_surface(binary, out):
    for program in ("redis-server", "openssl"):
        if not shutil.which(program):
            problem("ops-check", f"{program} is not on PATH (scripts/ops-check.sh installs it)")
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        problem(binary, "no such executable")
    if problems:
        return
    surface = {"binary": binary, "flags": read_flags(binary), "metrics": read_metrics(binary)}
    Path(out).write_text(json.dumps(surface, indent=1, sort_keys=True), encoding="utf-8")
    print(f"ops-check: {binary}: {len(surface['flags'])} flags, "
          f"{len(surface['metrics'])} metric families")


def load_surface(path):
    surface = json.loads(Path(path).read_text(encoding="utf-8"))
    if not surface.get("flags") or not surface.get("metrics"):
        problem(str(path), "no flags or no metrics: run `ops_check.py surface` first")
    return surface


def series_names(surface):
    """Every series name the binary's families expose (a histogram's
    _bucket, _sum and _count)."""
    names = set()
    for family, kind in surface["metrics"].items():
        if kind == "histogram":
            names.update(family + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "summary":
            names.update((family, family + "_sum", family + "_count"))
        else:
            names.add(family)
    return names


def main(argv):
    if len(argv) >= 3 and argv[1] == "copy-sources":
        print("\n".join(copy_sources(Path(argv[2]))))
        return 0
    if len(argv) == 5 and argv[1] == "surface":
        write_surface(argv[3], argv[4])
    elif len(argv) == 5 and argv[1] == "static":
        root = Path(argv[2])
        surface = load_surface(argv[3])
        if not problems:
            check_kustomization(root)
            env_used = check_deployment(root, surface)
            check_dockerfile(root, surface)
            check_skips(root)
            check_dashboard(root, surface, argv[4])
            check_alerts(root, surface)
            check_docs(root, surface, env_used)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"ops-check: PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
