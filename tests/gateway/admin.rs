//! The admin listener: the probes, and `/metrics` as Prometheus scrapes it
//! (exact counter values, only bounded labels, accepted by `promtool`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use gormic_gateway::admin::{self, Readiness};
use gormic_gateway::call_end::CallMetrics;
use gormic_gateway::idempotency::{IdempotencyMetrics, IdempotencyResult};
use gormic_gateway::limits::{InFlightLimit, ShedMetrics, ShedReason};
use gormic_gateway::metrics::{ConnectionGauges, Metrics, MetricsArgs};
use gormic_gateway::reload::{Outcome, ReloadMetrics};
use gormic_gateway::routes::{self, Route};
use gormic_gateway::upstream::{BreakerState, UpstreamMetrics, UpstreamResult};

use crate::support::{API_KEY, PATIENCE, within};

/// An admin listener on `127.0.0.1:<ephemeral>`.
struct Admin {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Admin {
    async fn start(metrics: Metrics, readiness: Readiness) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(admin::serve(listener, metrics, readiness, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.request("GET", path).await
    }

    /// One HTTP/1.1 request on its own connection.
    async fn request(&self, method: &str, path: &str) -> Answer {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut raw = Vec::new();
        within(
            &format!("the answer to {method} {path}"),
            PATIENCE,
            stream.read_to_end(&mut raw),
        )
        .await
        .expect("read answer");
        let raw = String::from_utf8(raw).expect("UTF-8 answer");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Answer {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    async fn scrape(&self) -> String {
        let answer = self.get("/metrics").await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.headers.get("content-type").map(String::as_str),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        answer.body
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("the admin server to stop", PATIENCE, self.task)
            .await
            .expect("admin task")
            .expect("admin server stops cleanly");
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// The value of one series, exactly as written in the exposition.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("numeric sample"))
}

const CLOSE_ROUTE: &Route = &routes::CLOSE_INVOICE;
const CLOSE: &str = "CloseInvoice";

/// The three calls of the issue's test, recorded as the call path does: a
/// success, a functional error (upstream 400 → FAILED_PRECONDITION), and a
/// call shed at the in-flight limit (never reaches the upstream: counted
/// by the shed counter alone).
fn three_calls(metrics: &Metrics) {
    let (upstream, calls) = (
        metrics.series::<UpstreamMetrics>(),
        metrics.series::<CallMetrics>(),
    );
    upstream.upstream_request(
        CLOSE_ROUTE,
        UpstreamResult::Status(200),
        Duration::from_millis(2),
    );
    calls.call_finished(CLOSE_ROUTE, tonic::Code::Ok, Duration::from_millis(3), None);
    upstream.upstream_request(
        CLOSE_ROUTE,
        UpstreamResult::Status(400),
        Duration::from_millis(4),
    );
    calls.call_finished(
        CLOSE_ROUTE,
        tonic::Code::FailedPrecondition,
        Duration::from_millis(5),
        Some("org-1"),
    );
    metrics
        .series::<ShedMetrics>()
        .call_shed(ShedReason::InFlightLimit);
}

#[tokio::test]
async fn livez_always_readyz_follows_readiness() {
    let readiness = Readiness::new();
    let admin = Admin::start(Metrics::default(), readiness.clone()).await;

    let live = admin.get("/livez").await;
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
    assert_eq!(
        admin.get("/readyz").await.status,
        503,
        "not ready before start"
    );
    readiness.set_ready(true);
    assert_eq!(admin.get("/readyz").await.status, 200);
    readiness.set_ready(false); // draining
    let draining = admin.get("/readyz").await;
    assert_eq!(draining.status, 503);
    assert_eq!(
        admin.get("/livez").await.status,
        200,
        "alive while draining"
    );

    assert_eq!(admin.get("/").await.status, 404);
    assert_eq!(admin.get("/metrics/x").await.status, 404);
    assert_eq!(admin.get("/debug/pprof").await.status, 404);
    assert_eq!(admin.request("POST", "/readyz").await.status, 405);
    admin.stop().await;
}

#[tokio::test]
async fn metrics_count_a_success_a_functional_error_and_a_shed_call() {
    let metrics = Metrics::default();
    let admin = Admin::start(metrics.clone(), Readiness::new()).await;
    let calls = |code: &str| {
        format!(
            r#"gormic_gateway_calls_total{{rpc_method="{CLOSE}",rpc_grpc_status_code="{code}"}}"#
        )
    };
    let upstream = |status: &str| {
        format!(
            r#"gormic_gateway_upstream_requests_total{{rpc_method="{CLOSE}",http_response_status_code="{status}",error_type=""}}"#
        )
    };
    let shed = r#"gormic_gateway_calls_shed_total{reason="in_flight_limit"}"#;
    let duration_count =
        format!(r#"gormic_gateway_call_duration_seconds_count{{rpc_method="{CLOSE}"}}"#);
    let upstream_count = format!(
        r#"gormic_gateway_upstream_request_duration_seconds_count{{rpc_method="{CLOSE}"}}"#
    );

    let before = admin.scrape().await;
    for series in [
        calls("0"),
        calls("9"),
        calls("8"),
        upstream("200"),
        upstream("400"),
    ] {
        assert_eq!(value(&before, &series), None, "{series} before any call");
    }
    assert_eq!(value(&before, shed), None);
    assert_eq!(value(&before, "gormic_gateway_calls_in_flight"), Some(0.0));

    three_calls(&metrics);
    let admission = InFlightLimit::new(10);
    metrics.count_in_flight(&admission);
    let held = admission.try_admit().expect("room");
    let during = admin.scrape().await;
    assert_eq!(value(&during, "gormic_gateway_calls_in_flight"), Some(1.0));
    drop(held);

    let after = admin.scrape().await;
    assert_eq!(value(&after, &calls("0")), Some(1.0));
    assert_eq!(value(&after, &calls("9")), Some(1.0));
    assert_eq!(
        value(&after, &calls("8")),
        None,
        "shed: the shed counter only"
    );
    assert_eq!(value(&after, shed), Some(1.0));
    assert_eq!(value(&after, &upstream("200")), Some(1.0));
    assert_eq!(value(&after, &upstream("400")), Some(1.0));
    assert_eq!(value(&after, &duration_count), Some(2.0));
    assert_eq!(value(&after, &upstream_count), Some(2.0));
    let bucket = |le: &str| {
        format!(r#"gormic_gateway_call_duration_seconds_bucket{{rpc_method="{CLOSE}",le="{le}"}}"#)
    };
    assert_eq!(value(&after, &bucket("0.0001")), Some(0.0));
    assert_eq!(value(&after, &bucket("0.0025")), Some(0.0));
    assert_eq!(value(&after, &bucket("0.005")), Some(2.0));
    assert_eq!(value(&after, &bucket("+Inf")), Some(2.0));
    let sum = value(
        &after,
        &format!(r#"gormic_gateway_call_duration_seconds_sum{{rpc_method="{CLOSE}"}}"#),
    )
    .expect("sum");
    assert!((sum - 0.008).abs() < 1e-9, "{sum}");
    assert_eq!(value(&after, "gormic_gateway_calls_in_flight"), Some(0.0));

    // Scraping does not change the counters.
    assert_eq!(value(&admin.scrape().await, &calls("0")), Some(1.0));
    admin.stop().await;
}

struct FakeConnections;

impl ConnectionGauges for FakeConnections {
    fn active(&self) -> u64 {
        2
    }
    fn pending(&self) -> u64 {
        1
    }
    fn limit(&self) -> u64 {
        512
    }
    fn opened_total(&self) -> u64 {
        7
    }
}

/// Every series of the contract, once each kind of event happened.
fn record_everything(metrics: &Metrics) {
    three_calls(metrics);
    let upstream = metrics.series::<UpstreamMetrics>();
    let reloads = metrics.series::<ReloadMetrics>();
    metrics
        .series::<ShedMetrics>()
        .call_shed(ShedReason::UpstreamQueueFull);
    upstream.upstream_request(
        CLOSE_ROUTE,
        UpstreamResult::Timeout,
        Duration::from_secs(10),
    );
    upstream.retry(CLOSE_ROUTE, "connect");
    upstream.breaker_state(BreakerState::Open);
    metrics
        .series::<IdempotencyMetrics>()
        .idempotency(IdempotencyResult::Replayed);
    reloads.reload("credentials", Outcome::Success);
    reloads.reload("tls_certificate", Outcome::Failure);
    metrics.log_lines_dropped(4);
    metrics.set_tls_certificate_expiry(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
    // Two clients: the series are their sums.
    metrics.register_connections(Arc::new(FakeConnections));
    metrics.register_connections(Arc::new(FakeConnections));
}

/// `(name, type, label names)` of every series in the contract.
const CONTRACT: &[(&str, &str, &[&str])] = &[
    (
        "gormic_gateway_build_info",
        "gauge",
        &["version", "git_commit"],
    ),
    (
        "gormic_gateway_calls_total",
        "counter",
        &["rpc_method", "rpc_grpc_status_code"],
    ),
    (
        "gormic_gateway_call_duration_seconds",
        "histogram",
        &["rpc_method"],
    ),
    ("gormic_gateway_calls_in_flight", "gauge", &[]),
    ("gormic_gateway_calls_shed_total", "counter", &["reason"]),
    (
        "gormic_gateway_upstream_requests_total",
        "counter",
        &["rpc_method", "http_response_status_code", "error_type"],
    ),
    (
        "gormic_gateway_upstream_request_duration_seconds",
        "histogram",
        &["rpc_method"],
    ),
    ("gormic_gateway_upstream_requests_active", "gauge", &[]),
    ("gormic_gateway_upstream_requests_limit", "gauge", &[]),
    ("gormic_gateway_upstream_pending_requests", "gauge", &[]),
    ("gormic_gateway_upstream_breaker_state", "gauge", &["state"]),
    (
        "gormic_gateway_upstream_breaker_transitions_total",
        "counter",
        &["to"],
    ),
    (
        "gormic_gateway_upstream_connections_opened_total",
        "counter",
        &[],
    ),
    (
        "gormic_gateway_upstream_retries_total",
        "counter",
        &["rpc_method", "reason"],
    ),
    (
        "gormic_gateway_idempotency_requests_total",
        "counter",
        &["result"],
    ),
    (
        "gormic_gateway_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        &[],
    ),
    (
        "gormic_gateway_reloads_total",
        "counter",
        &["file", "result"],
    ),
    ("gormic_gateway_log_lines_dropped_total", "counter", &[]),
    ("process_cpu_seconds_total", "counter", &[]),
    ("process_resident_memory_bytes", "gauge", &[]),
    ("process_open_fds", "gauge", &[]),
    ("process_max_fds", "gauge", &[]),
    ("process_start_time_seconds", "gauge", &[]),
];

/// `(series name, label name → value)` of every sample line.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (series, _value) = line.rsplit_once(' ').expect("sample value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            // Our label values never contain `,` or `"`: splitting is enough.
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            (name.to_owned(), labels)
        })
        .collect()
}

#[tokio::test]
async fn every_contract_series_is_exposed_with_its_type_and_labels() {
    let metrics = Metrics::default();
    record_everything(&metrics);
    let admin = Admin::start(metrics, Readiness::new()).await;
    let text = admin.scrape().await;
    admin.stop().await;

    let samples = samples(&text);
    for (name, kind, labels) in CONTRACT {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "no `# TYPE {name} {kind}` in\n{text}"
        );
        let family: Vec<_> = samples
            .iter()
            .filter(|(series, _)| {
                series == name
                    || (*kind == "histogram"
                        && series
                            .strip_prefix(*name)
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s)))
            })
            .collect();
        assert!(!family.is_empty(), "no sample of {name}");
        for (series, found) in family {
            let mut expected: BTreeSet<&str> = labels.iter().copied().collect();
            if series.ends_with("_bucket") {
                expected.insert("le");
            }
            let found: BTreeSet<&str> = found.keys().map(String::as_str).collect();
            assert_eq!(found, expected, "labels of {series}");
        }
    }
    let gauge = |series: &str| value(&text, series);
    assert_eq!(gauge("gormic_gateway_upstream_requests_active"), Some(4.0));
    assert_eq!(
        gauge("gormic_gateway_upstream_requests_limit"),
        Some(1024.0)
    );
    assert_eq!(
        gauge(r#"gormic_gateway_upstream_breaker_state{state="open"}"#),
        Some(1.0)
    );
    assert_eq!(
        gauge(r#"gormic_gateway_upstream_breaker_transitions_total{to="open"}"#),
        Some(1.0)
    );
    assert_eq!(gauge("gormic_gateway_upstream_pending_requests"), Some(2.0));
    assert_eq!(
        gauge("gormic_gateway_upstream_connections_opened_total"),
        Some(14.0)
    );
    assert_eq!(
        gauge("gormic_gateway_tls_certificate_expiry_timestamp_seconds"),
        Some(1_900_000_000.0)
    );
    assert_eq!(gauge("gormic_gateway_log_lines_dropped_total"), Some(4.0));
    assert_eq!(
        gauge(
            r#"gormic_gateway_upstream_requests_total{rpc_method="CloseInvoice",http_response_status_code="",error_type="timeout"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        gauge(r#"gormic_gateway_reloads_total{file="tls_certificate",result="failure"}"#),
        Some(1.0)
    );
}

/// A constant of the code (`connect`, `http_503`, `tls_certificate`).
fn snake_case(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[tokio::test]
async fn labels_carry_only_bounded_values() {
    let metrics = Metrics::default();
    record_everything(&metrics);
    // A caller that put its api-key and an invoice id where an organization
    // id goes: without the organization label, neither may appear.
    metrics.series::<CallMetrics>().call_finished(
        &routes::UPDATE_INVOICE,
        tonic::Code::NotFound,
        Duration::from_millis(1),
        Some(API_KEY),
    );
    let text = metrics.encode();
    assert!(!text.contains(API_KEY));
    assert!(!text.contains("org-1"));

    let rpcs = [
        "CreateInvoice",
        "UpdateInvoice",
        "DeleteInvoice",
        "CloseInvoice",
        "SendInvoice",
    ];
    for (series, labels) in samples(&text) {
        for (label, v) in &labels {
            let bounded = match label.as_str() {
                "rpc_method" => rpcs.contains(&v.as_str()),
                "rpc_grpc_status_code" => v.parse::<u8>().is_ok_and(|c| c <= 16),
                "http_response_status_code" => {
                    v.is_empty() || v.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s))
                }
                "error_type" => [
                    "",
                    "timeout",
                    "connect",
                    "connection",
                    "cancelled",
                    "malformed",
                ]
                .contains(&v.as_str()),
                "reason" if series.starts_with("gormic_gateway_calls_shed") => {
                    ["in_flight_limit", "upstream_queue_full"].contains(&v.as_str())
                }
                "reason" => snake_case(v),
                "state" | "to" => ["closed", "open", "half_open"].contains(&v.as_str()),
                "result" if series.starts_with("gormic_gateway_reloads") => {
                    ["success", "failure"].contains(&v.as_str())
                }
                "result" => [
                    "new",
                    "replayed",
                    "in_progress",
                    "reused",
                    "outcome_unknown",
                    "store_error",
                ]
                .contains(&v.as_str()),
                "file" => snake_case(v),
                "le" => v == "+Inf" || v.parse::<f64>().is_ok(),
                "version" => v == env!("CARGO_PKG_VERSION"),
                "git_commit" => v.chars().all(|c| c.is_ascii_alphanumeric()),
                _ => false,
            };
            assert!(bounded, "{series}: {label}={v:?} is not a bounded label");
        }
    }
}

#[tokio::test]
async fn the_organization_label_only_when_enabled() {
    let off = Metrics::new(&MetricsArgs::default());
    three_calls(&off);
    assert!(!off.encode().contains("organization"));

    let on = Metrics::new(&MetricsArgs {
        metrics_organization_label: true,
    });
    three_calls(&on);
    let text = on.encode();
    assert_eq!(
        value(
            &text,
            r#"gormic_gateway_calls_total{rpc_method="CloseInvoice",rpc_grpc_status_code="9",organization="org-1"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"gormic_gateway_calls_total{rpc_method="CloseInvoice",rpc_grpc_status_code="0",organization=""}"#
        ),
        Some(1.0)
    );
    // Only the call counter carries it: latency histograms stay per RPC.
    assert!(
        text.lines()
            .filter(|l| l.contains("organization="))
            .all(|l| l.starts_with("gormic_gateway_calls_total{"))
    );
}

/// promtool from Debian's `prometheus` package.
async fn promtool_check(text: &str) {
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .kill_on_drop(true)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => panic!(
            "cannot run promtool ({error}): install it with `apt-get install prometheus` \
             (Debian's package ships /usr/bin/promtool)"
        ),
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(text.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let output = within("promtool's verdict", PATIENCE, child.wait_with_output())
        .await
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let metrics = Metrics::default();
    record_everything(&metrics);
    let admin = Admin::start(metrics, Readiness::new()).await;
    promtool_check(&admin.scrape().await).await;
    admin.stop().await;

    let by_organization = Metrics::new(&MetricsArgs {
        metrics_organization_label: true,
    });
    record_everything(&by_organization);
    promtool_check(&by_organization.encode()).await;
}
