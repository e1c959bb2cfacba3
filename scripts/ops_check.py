#!/usr/bin/env python3
"""The consistency checks of scripts/ops-check.sh that no off-the-shelf tool does.

Run by scripts/ops-check.sh with the ops venv's Python (it needs PyYAML):

    ops_check.py static ROOT DASHBOARD_RULES_OUT
        kustomization lists every file; Deployment, ConfigMap env file and
        Dockerfile agree with each other and with the gateway's ports and
        flags; checkov skips are the documented ones; dashboard and alert
        rules use only the gateway's metric names; runbook links resolve to
        headings of docs/operations.md; docs/operations.md names every flag
        and metric; docs/configuration.md has a row for every flag (and none
        other) with its variable and a default; every relative link of
        README.md and docs/*.md resolves, to a heading where it names one.
        Writes every dashboard query, with Grafana's variables replaced, as a
        Prometheus recording rule file, so that `promtool check rules`
        parses them.
    ops_check.py copy-sources ROOT
        prints the sources of the Dockerfile's build-stage COPY lines, one a
        line (scripts/ops-check.sh rebuilds the build context from them).
    ops_check.py binary-env ROOT BINARY
        checks that every GORMIC_* variable the manifests set is one that
        `BINARY --help` lists, that FLAGS holds every flag the binary has,
        and that docs/configuration.md writes each flag with the placeholder
        `--help` shows (`--listen ADDR` for `--listen <ADDR>`) (opt-in:
        OPS_CHECK_BINARY).
    ops_check.py binary-metrics ROOT BINARY
        starts `BINARY --sandbox` on loopback ports, reads its /metrics and
        checks that every family it exposes is in the lists below with its
        type, and that those exposed from the start are there (opt-in:
        OPS_CHECK_BINARY).

Every problem is printed, then the exit status is 1.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

# ---- What the gateway exposes. OPS_CHECK_BINARY checks both lists against
# the real binary (its --help, and the /metrics of a --sandbox run); the docs
# (docs/operations.md, and docs/configuration.md for the flags) must name
# every entry.

FLAGS = [
    # existing
    "listen", "upstream", "sandbox", "sandbox-fixture", "upstream-timeout",
    "deadline-margin", "shutdown-grace", "cors-allowed-origins", "log-level",
    "log-format",
    # runtime, limits, HTTP/2, retries
    "worker-threads", "shutdown-delay", "max-in-flight",
    "upstream-max-connections", "upstream-max-pending", "upstream-idle-timeout",
    "upstream-connect-timeout", "upstream-http2", "upstream-proxy",
    "max-request-bytes", "max-header-bytes", "http2-max-concurrent-streams",
    "http2-keepalive-interval", "http2-keepalive-timeout", "max-connection-age",
    "max-connection-age-grace", "http1-header-read-timeout", "max-attempts",
    "retry-budget-ratio", "retry-budget-min-per-second",
    # many tenants
    "tenant-key",
    # upstream circuit breaker
    "upstream-breaker-failures", "upstream-breaker-gateway-errors",
    "upstream-breaker-backoff", "upstream-breaker-max-backoff",
    # upstream rate limits
    "upstream-cooldown-max",
    # TLS and credentials
    "tls-cert", "tls-key", "tls-client-ca", "tls-handshake-timeout",
    "reload-interval", "upstream-ca", "upstream-client-cert",
    "upstream-client-key", "allow-insecure-upstream", "credentials",
    # quotas
    "quotas", "quota-store-failure",
    # idempotency
    "idempotency-store", "idempotency-ttl", "idempotency-max-entries",
    "idempotency-max-bytes", "idempotency-store-timeout",
    "idempotency-store-replicas",
    # observability
    "admin-listen", "otlp-endpoint", "otel-service-name", "otlp-timeout",
    "metrics-organization-label",
]


def env_of(flag):
    # --upstream predates the naming rule: its variable is GORMIC_UPSTREAM_URL.
    if flag == "upstream":
        return "GORMIC_UPSTREAM_URL"
    return "GORMIC_" + flag.upper().replace("-", "_")


ENV_VARS = {env_of(f) for f in FLAGS}

COUNTERS = [
    "gormic_gateway_calls_total",
    "gormic_gateway_calls_shed_total",
    "gormic_gateway_upstream_requests_total",
    "gormic_gateway_upstream_connections_opened_total",
    "gormic_gateway_upstream_retries_total",
    "gormic_gateway_upstream_breaker_transitions_total",
    "gormic_gateway_upstream_cooldowns_opened_total",
    "gormic_gateway_upstream_cooldown_messages_total",
    "gormic_gateway_idempotency_requests_total",
    "gormic_gateway_reloads_total",
    "gormic_gateway_quota_checks_total",
    "gormic_gateway_log_lines_dropped_total",
    # the shared store (a Redis --idempotency-store only)
    "gormic_gateway_store_failovers_total",
    "gormic_gateway_store_reconnects_total",
    "gormic_gateway_store_wait_shortfalls_total",
    "process_cpu_seconds_total",
]
GAUGES = [
    "gormic_gateway_build_info",
    "gormic_gateway_calls_in_flight",
    "gormic_gateway_tenants_in_flight",
    "gormic_gateway_unverified_calls_in_flight",
    "gormic_gateway_tenants_trusted",
    "gormic_gateway_upstream_requests_active",
    "gormic_gateway_upstream_requests_limit",
    "gormic_gateway_upstream_pending_requests",
    "gormic_gateway_upstream_breaker_state",
    "gormic_gateway_upstream_cooldowns_active",
    "gormic_gateway_tls_certificate_expiry_timestamp_seconds",
    "gormic_gateway_store_state",
    "gormic_gateway_store_primary_info",
    "gormic_gateway_store_replicas_required",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
]
HISTOGRAMS = [
    "gormic_gateway_call_duration_seconds",
    "gormic_gateway_upstream_request_duration_seconds",
]
METRICS = COUNTERS + GAUGES + HISTOGRAMS
# Exposed from the start by a gateway without --tls-cert (the others appear
# with their first value; the certificate expiry only with --tls-cert).
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
# Series the gateway no longer exposes: a dashboard, an alert or the docs'
# list of metrics that still used one would show nothing.
REMOVED = {
    "gormic_gateway_upstream_connections": "gormic_gateway_upstream_requests_active",
    "gormic_gateway_upstream_connections_limit": "gormic_gateway_upstream_requests_limit",
}
SERIES = set(COUNTERS + GAUGES) | {
    h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}

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


def check_deployment(root):
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
    for name in sorted(set(env_file) | set(env)):
        if name.startswith("GORMIC_") and name not in ENV_VARS:
            problem(where if name in env else "deploy/kubernetes/gateway.env",
                    f"{name} is not the variable of any gateway flag")

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


def check_dockerfile(root):
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


def check_names(where, expr, extra=()):
    for name in sorted(metric_names(expr)):
        if name in REMOVED:
            problem(where, f"{name} was removed: use {REMOVED[name]}")
        elif name not in SERIES and name not in extra:
            problem(where, f"{name} is not a gormic-gateway metric (contract list in scripts/ops_check.py)")


def grafana_to_promql(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def check_dashboard(root, rules_out):
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
            check_names(f"{where}: panel {p.get('title')!r}", expr)
            exprs.append(expr)
    for name, v in variables.items():
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
        if v.get("type") == "query" and m:
            check_names(f"{where}: variable {name}", m.group(1))
            exprs.append(m.group(1))
        elif v.get("type") == "query":
            problem(where, f"variable {name}: expected label_values(<selector>, <label>)")
    # Everything the dashboard charts, the gateway's main series at least.
    used = set().union(*(metric_names(e) for e in exprs)) if exprs else set()
    for name in METRICS:
        base = {name} if name not in HISTOGRAMS else {name + "_bucket"}
        if not base & used and name not in ("process_start_time_seconds",):
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


def check_alerts(root):
    where = "deploy/prometheus/alerts.yaml"
    docs = (root / "docs/operations.md").read_text(encoding="utf-8")
    anchors = github_anchors(docs)
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
            check_names(f"{where}: {name}", rule["expr"], extra={"up"})
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


def check_docs(root, env_used):
    where = "docs/operations.md"
    docs = (root / where).read_text(encoding="utf-8")
    for flag in FLAGS:
        if f"--{flag}" not in docs:
            problem(where, f"does not document --{flag}")
        if env_of(flag) not in docs:
            problem(where, f"does not document {env_of(flag)}")
    for name in METRICS:
        if name not in docs:
            problem(where, f"does not document the metric {name}")
    for name in sorted(env_used):
        if name not in docs:
            problem(where, f"does not mention {name}, which deploy/kubernetes sets")
    # The table of every metric: one row per series the gateway exposes.
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_:]+)(?:\{[^`]*\})?` \|", docs, re.M)}
    for name in sorted(set(REMOVED) & rows):
        problem(where, f"the metrics table still lists {name}, which was removed (now {REMOVED[name]})")
    check_configuration(root)
    check_links(root)


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


def check_configuration(root):
    """Every flag has its row in docs/configuration.md, with its variable, a
    default and a meaning; no row is of a flag the gateway does not have."""
    where = "docs/configuration.md"
    rows = configuration_rows(root)
    for flag in FLAGS:
        if flag not in rows:
            problem(where, f"no row for --{flag} (| `--{flag} ...` | `{env_of(flag)}` | default | meaning |)")
            continue
        _, env, default, meaning = rows[flag]
        if f"`{env_of(flag)}`" not in env:
            problem(where, f"--{flag}: its variable is {env_of(flag)}, the row says {env!r}")
        if not default:
            problem(where, f"--{flag}: no default")
        if not meaning:
            problem(where, f"--{flag}: no meaning")
    for flag in sorted(set(rows) - set(FLAGS)):
        problem(where, f"a row for --{flag}, which is no flag of the gateway (FLAGS in scripts/ops_check.py)")


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


def check_binary_env(root, binary, env_used):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        problem(binary, f"--help exited {out.returncode}: {out.stderr.strip()}")
        return
    known = set(re.findall(r"\[env:\s*([A-Z0-9_]+)", out.stdout))
    for name in sorted(env_used):
        if name.startswith("GORMIC_") and name not in known:
            problem("deploy/kubernetes", f"{name} is not a variable `{binary} --help` lists")
    for name in sorted(known - ENV_VARS - {"OTEL_EXPORTER_OTLP_ENDPOINT"}):
        problem("scripts/ops_check.py", f"FLAGS lacks the binary's {name}: add it (and to docs)")
    # Each flag is written in docs/configuration.md as --help writes it:
    # `--listen ADDR` for `--listen <ADDR>`, a switch without a placeholder.
    shown = {}
    for m in re.finditer(r"^ +(?:-\w, )?--([a-z0-9-]+)(?: <([^>]+)>)?\s*$", out.stdout, re.M):
        shown[m.group(1)] = m.group(2)
    for flag, (placeholder, *_rest) in sorted(configuration_rows(root).items()):
        if flag not in shown:
            problem("docs/configuration.md", f"documents --{flag}, which `{binary} --help` does not show")
        elif shown[flag] != placeholder:
            want = f"--{flag} {shown[flag]}" if shown[flag] else f"--{flag}"
            have = f"--{flag} {placeholder}" if placeholder else f"--{flag}"
            problem("docs/configuration.md", f"writes `{have}`, --help shows `{want}`")


def check_binary_metrics(binary):
    """Runs the binary with --sandbox on loopback and reads its /metrics."""
    import os
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        admin = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith("GORMIC_")}
    gateway = subprocess.Popen(
        [binary, "--sandbox", "--listen", "127.0.0.1:0", "--admin-listen", f"127.0.0.1:{admin}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    text = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and gateway.poll() is None:
            try:
                # No proxy for loopback, whatever the environment says.
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
                    text = r.read().decode("utf-8")
                break
            except OSError:
                time.sleep(0.1)
    finally:
        gateway.terminate()
        try:
            _, err = gateway.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            _, err = gateway.communicate()
    if text is None:
        problem(binary, "no /metrics from `--sandbox` within 20 s: "
                + err.decode("utf-8", "replace").strip()[-500:])
        return
    kinds = {**{n: "counter" for n in COUNTERS}, **{n: "gauge" for n in GAUGES},
             **{n: "histogram" for n in HISTOGRAMS}}
    exposed = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in sorted(exposed.items()):
        if name in REMOVED:
            problem(binary, f"still exposes {name}, listed as removed in scripts/ops_check.py")
        elif name not in kinds:
            problem("scripts/ops_check.py", f"the binary exposes {name} ({kind}): add it to the lists (and to the docs)")
        elif kinds[name] != kind:
            problem("scripts/ops_check.py", f"{name} is a {kind}, not a {kinds[name]}")
    for name in sorted(EXPOSED_AT_START - set(exposed)):
        problem(binary, f"does not expose {name} at start")


def main(argv):
    if len(argv) >= 3 and argv[1] == "copy-sources":
        print("\n".join(copy_sources(Path(argv[2]))))
        return 0
    if len(argv) == 4 and argv[1] == "static":
        root = Path(argv[2])
        check_kustomization(root)
        env_used = check_deployment(root)
        check_dockerfile(root)
        check_skips(root)
        check_dashboard(root, argv[3])
        check_alerts(root)
        check_docs(root, env_used)
    elif len(argv) == 4 and argv[1] == "binary-env":
        root = Path(argv[2])
        env_used = set(read_env_file(root / "deploy/kubernetes/gateway.env"))
        deployment = load_yaml_docs(root / "deploy/kubernetes/deployment.yaml")[0]
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            env_used.update(e["name"] for e in c.get("env", []))
        check_binary_env(root, argv[3], env_used)
    elif len(argv) == 4 and argv[1] == "binary-metrics":
        check_binary_metrics(argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"ops-check: PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
