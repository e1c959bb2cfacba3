//! The gateway's Prometheus metrics: the series, the recording methods the
//! call path uses, and the text exposition served on the admin listener's
//! `/metrics` (encoded by `prometheus-client`).
//!
//! Recording is lock-free and allocation-free on the call path: every label
//! set is bounded (the RPCs of the route table, 17 gRPC codes, HTTP
//! statuses, a few error types), and the counter for a label set is resolved
//! once, then cached in a slot indexed by the route's index and the code.
//! The list of RPCs is `routes::ALL`, generated from the proto: nothing here
//! names an RPC. Only the opt-in organization label takes a read
//! lock per call. No label ever carries an api-key, an invoice id or another
//! value chosen by the caller, except the organization id behind
//! `--metrics-organization-label`.

mod external;
mod histogram;
mod process;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::ArgAction;
use clap::builder::BoolishValueParser;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

pub use external::{ConnectionGauges, Series};
pub use histogram::{LATENCY_BUCKETS, LatencyHistogram};

use crate::limits::InFlightLimit;
use crate::routes::{self, Route};

/// How many RPCs the service has (the per-RPC caches' size).
const RPCS: usize = routes::ALL.len();

/// `Content-Type` of [`Metrics::encode`]'s output: the Prometheus text
/// format 0.0.4, which every Prometheus-compatible scraper and `promtool`
/// read.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The git commit the binary was built from: CI and the Dockerfile set
/// `GORMIC_GIT_COMMIT` in the build environment (`option_env!` is read by
/// the compiler, and cargo rebuilds when it changes); `unknown` otherwise.
pub const GIT_COMMIT: &str = match option_env!("GORMIC_GIT_COMMIT") {
    Some(commit) if !commit.is_empty() => commit,
    _ => "unknown",
};

/// Most distinct organizations counted with `--metrics-organization-label`;
/// calls of further organizations are counted under `_other`. Each
/// organization adds up to 85 series (5 RPCs × 17 codes).
pub const MAX_ORGANIZATIONS: usize = 1000;

/// Longest organization id used as a label value; longer ones, or ones with
/// characters outside `A-Z a-z 0-9 . _ : -` (or not starting with a letter
/// or digit), are counted under `_invalid`.
pub const MAX_ORGANIZATION_ID_BYTES: usize = 64;

/// Metrics flags, flattened into the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Add an `organization` label (the caller's organization-id) to
    /// gormic_gateway_calls_total. Off by default because it is a
    /// cardinality risk: each organization adds up to 85 series, so at most
    /// 1000 organizations are tracked and the rest are counted as `_other`.
    #[arg(
        long,
        env = "GORMIC_METRICS_ORGANIZATION_LABEL",
        action = ArgAction::SetTrue,
        value_parser = BoolishValueParser::new()
    )]
    pub metrics_organization_label: bool,
}

/// Why a call was refused before it reached the upstream
/// (`gormic_gateway_calls_shed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// `--max-in-flight` calls were already in flight (`OVERLOADED`).
    InFlightLimit,
    /// The queue of calls waiting for an upstream connection was full
    /// (`UPSTREAM_QUEUE_FULL`).
    UpstreamQueueFull,
}

impl ShedReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InFlightLimit => "in_flight_limit",
            Self::UpstreamQueueFull => "upstream_queue_full",
        }
    }
}

/// How one upstream request ended
/// (`gormic_gateway_upstream_requests_total{http_response_status_code, error_type}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    /// An answer with this HTTP status, success or error answer alike.
    Status(u16),
    /// No complete answer before the deadline.
    Timeout,
    /// No connection could be opened (refused, DNS, TLS handshake).
    Connect,
    /// The connection failed while the request or its answer was in flight.
    Connection,
    /// The caller went away while the request was in flight: the upstream
    /// may have received it, the gateway dropped the answer.
    Cancelled,
    /// An answer the gateway cannot read: a broken HTTP message (no status)
    /// or a body that is not what the API documents (with its status).
    Malformed(Option<u16>),
}

impl UpstreamResult {
    /// The HTTP status, when an answer came (`http.response.status_code`).
    pub const fn status(self) -> Option<u16> {
        match self {
            Self::Status(status) => Some(status),
            Self::Malformed(status) => status,
            Self::Timeout | Self::Connect | Self::Connection | Self::Cancelled => None,
        }
    }

    /// The failure, when there was one (`error.type`); an error answer with a
    /// status is not a transport failure and has none.
    pub const fn error_type(self) -> Option<&'static str> {
        match self {
            Self::Status(_) => None,
            Self::Timeout => Some("timeout"),
            Self::Connect => Some("connect"),
            Self::Connection => Some("connection"),
            Self::Cancelled => Some("cancelled"),
            Self::Malformed(_) => Some("malformed"),
        }
    }
}

/// The upstream circuit breaker's state
/// (`gormic_gateway_upstream_breaker_state{state}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    const ALL: [Self; 3] = [Self::Closed, Self::Open, Self::HalfOpen];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// What the idempotency layer did with a call
/// (`gormic_gateway_idempotency_requests_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotencyResult {
    /// First use of the key: the call went to the upstream.
    New,
    /// A stored outcome was returned.
    Replayed,
    /// The key's first call is still running (`IDEMPOTENCY_KEY_IN_PROGRESS`).
    InProgress,
    /// The key came with a different request (`IDEMPOTENCY_KEY_REUSED`).
    Reused,
    /// The key's first call ended without a known outcome
    /// (`IDEMPOTENCY_OUTCOME_UNKNOWN`).
    OutcomeUnknown,
    /// The store failed or was full.
    StoreError,
}

impl IdempotencyResult {
    const ALL: [Self; 6] = [
        Self::New,
        Self::Replayed,
        Self::InProgress,
        Self::Reused,
        Self::OutcomeUnknown,
        Self::StoreError,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Replayed => "replayed",
            Self::InProgress => "in_progress",
            Self::Reused => "reused",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::StoreError => "store_error",
        }
    }
}

/// `rpc_grpc_status_code` values: the numeric code, as the OpenTelemetry
/// convention has it.
const GRPC_CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// Upstream results cached per RPC: statuses 100–599, then the four
/// failures without a status.
const STATUS_SLOTS: usize = 500;
const UPSTREAM_SLOTS: usize = STATUS_SLOTS + 4;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    rpc_method: &'static str,
    rpc_grpc_status_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrganizationCallLabels {
    rpc_method: &'static str,
    rpc_grpc_status_code: &'static str,
    organization: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc_method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    rpc_method: &'static str,
    /// Empty when no answer came.
    http_response_status_code: Option<u16>,
    /// Empty on an answer.
    error_type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    rpc_method: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    to: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    result: &'static str,
}

/// The handle the gateway records through. Cheap to clone (one `Arc`);
/// every clone records into the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    calls: Calls,
    call_duration: Family<RpcLabels, LatencyHistogram>,
    call_duration_cache: [OnceLock<LatencyHistogram>; RPCS],
    shed: Family<ReasonLabels, Counter>,
    shed_cache: [OnceLock<Counter>; 2],
    upstream: Family<UpstreamLabels, Counter>,
    upstream_cache: Box<[OnceLock<Counter>]>,
    upstream_duration: Family<RpcLabels, LatencyHistogram>,
    upstream_duration_cache: [OnceLock<LatencyHistogram>; RPCS],
    retries: Family<RetryLabels, Counter>,
    idempotency: Family<ResultLabels, Counter>,
    idempotency_cache: [OnceLock<Counter>; 6],
    reloads: Family<ReloadLabels, Counter>,
    breaker_state: Family<StateLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    log_lines_dropped: external::DroppedLinesCollector,
    tls_expiry: external::ExpiryCollector,
    connections: external::ConnectionCollector,
    in_flight: external::InFlightCollector,
    late: external::LateSeries,
}

/// `gormic_gateway_calls_total`, with or without the organization label.
#[derive(Debug)]
enum Calls {
    Plain {
        family: Family<CallLabels, Counter>,
        /// `rpc index * 17 + code`.
        cache: Box<[OnceLock<Counter>]>,
    },
    ByOrganization {
        family: Family<OrganizationCallLabels, Counter>,
        organizations: Organizations,
    },
}

/// Interned organization label values, bounded by [`MAX_ORGANIZATIONS`].
#[derive(Debug)]
struct Organizations {
    known: RwLock<HashMap<Box<str>, Arc<str>>>,
    none: Arc<str>,
    other: Arc<str>,
    invalid: Arc<str>,
}

impl Organizations {
    fn new() -> Self {
        Self {
            known: RwLock::default(),
            none: Arc::from(""),
            other: Arc::from("_other"),
            invalid: Arc::from("_invalid"),
        }
    }

    /// The label value for an organization id.
    fn label(&self, organization: Option<&str>) -> Arc<str> {
        let Some(id) = organization.filter(|id| !id.is_empty()) else {
            return self.none.clone();
        };
        if !valid_organization_id(id) {
            return self.invalid.clone();
        }
        let read = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(label) = read.get(id) {
            return label.clone();
        }
        drop(read);
        let mut write = self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(label) = write.get(id) {
            return label.clone();
        }
        if write.len() >= MAX_ORGANIZATIONS {
            return self.other.clone();
        }
        let label: Arc<str> = Arc::from(id);
        write.insert(Box::from(id), label.clone());
        label
    }
}

fn valid_organization_id(id: &str) -> bool {
    id.len() <= MAX_ORGANIZATION_ID_BYTES
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl Default for Metrics {
    /// The command line's defaults (no organization label).
    fn default() -> Self {
        Self::new(&MetricsArgs::default())
    }
}

impl Metrics {
    pub fn new(args: &MetricsArgs) -> Self {
        let mut registry = Registry::default();

        registry.register(
            "gormic_gateway_build",
            "Build of the running gateway; the value is always 1",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_commit", GIT_COMMIT),
            ]),
        );

        let calls = if args.metrics_organization_label {
            let family = Family::<OrganizationCallLabels, Counter>::default();
            registry.register(
                "gormic_gateway_calls",
                "gRPC calls answered, by RPC, gRPC status code and organization",
                family.clone(),
            );
            Calls::ByOrganization {
                family,
                organizations: Organizations::new(),
            }
        } else {
            let family = Family::<CallLabels, Counter>::default();
            registry.register(
                "gormic_gateway_calls",
                "gRPC calls answered, by RPC and gRPC status code",
                family.clone(),
            );
            Calls::Plain {
                family,
                cache: (0..RPCS * GRPC_CODES.len())
                    .map(|_| OnceLock::new())
                    .collect(),
            }
        };

        let call_duration = Family::<RpcLabels, LatencyHistogram>::default();
        registry.register_with_unit(
            "gormic_gateway_call_duration",
            "Time from a call's arrival to its answer, by RPC",
            Unit::Seconds,
            call_duration.clone(),
        );

        let in_flight = external::InFlightCollector::default();
        registry.register_collector(Box::new(in_flight.clone()));

        let shed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "gormic_gateway_calls_shed",
            "gRPC calls refused with RESOURCE_EXHAUSTED before reaching the upstream, by reason \
             (in_flight_limit: refused at admission, counted nowhere else)",
            shed.clone(),
        );

        let upstream = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "gormic_gateway_upstream_requests",
            "Requests sent to the upstream, by RPC, HTTP status (empty without an answer) \
             and error type (empty on an answer)",
            upstream.clone(),
        );

        let upstream_duration = Family::<RpcLabels, LatencyHistogram>::default();
        registry.register_with_unit(
            "gormic_gateway_upstream_request_duration",
            "Time from sending an upstream request to its answer or failure, by RPC",
            Unit::Seconds,
            upstream_duration.clone(),
        );

        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "gormic_gateway_upstream_retries",
            "Upstream requests sent again, by RPC and reason",
            retries.clone(),
        );

        let idempotency = Family::<ResultLabels, Counter>::default();
        registry.register(
            "gormic_gateway_idempotency_requests",
            "Calls with an idempotency key, by what the idempotency store did",
            idempotency.clone(),
        );

        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "gormic_gateway_reloads",
            "Reloads of the certificates and credentials files, by file and result",
            reloads.clone(),
        );

        let breaker_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "gormic_gateway_upstream_breaker_state",
            "The upstream circuit breaker's state: 1 for the current one of closed, open, half_open",
            breaker_state.clone(),
        );
        for state in BreakerState::ALL {
            let value = i64::from(state == BreakerState::Closed);
            breaker_state
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(value);
        }
        let breaker_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "gormic_gateway_upstream_breaker_transitions",
            "Changes of the upstream circuit breaker's state, by the state entered",
            breaker_transitions.clone(),
        );

        let log_lines_dropped = external::DroppedLinesCollector::default();
        registry.register_collector(Box::new(log_lines_dropped.clone()));

        let tls_expiry = external::ExpiryCollector::default();
        registry.register_collector(Box::new(tls_expiry.clone()));
        let connections = external::ConnectionCollector::default();
        registry.register_collector(Box::new(connections.clone()));
        registry.register_collector(Box::new(process::ProcessCollector));
        let late = external::LateSeries::default();
        registry.register_collector(Box::new(late.clone()));

        Self {
            inner: Arc::new(Inner {
                registry,
                calls,
                call_duration,
                call_duration_cache: Default::default(),
                shed,
                shed_cache: Default::default(),
                upstream,
                upstream_cache: (0..RPCS * UPSTREAM_SLOTS)
                    .map(|_| OnceLock::new())
                    .collect(),
                upstream_duration,
                upstream_duration_cache: Default::default(),
                retries,
                idempotency,
                idempotency_cache: Default::default(),
                reloads,
                breaker_state,
                breaker_transitions,
                log_lines_dropped,
                tls_expiry,
                connections,
                in_flight,
                late,
            }),
        }
    }

    /// `gormic_gateway_calls_in_flight` reads this admission cap's count:
    /// the calls admitted and not yet finished (their outcome record
    /// included), the one in-flight figure. The last one set is used.
    pub fn count_in_flight(&self, limit: &InFlightLimit) {
        self.inner.in_flight.set(limit.clone());
    }

    /// An admitted call was answered with `code` after `elapsed` (calls
    /// refused at admission are counted by [`Metrics::call_shed`] alone).
    /// `organization` is the organization-id sent upstream for it; it is
    /// used only with `--metrics-organization-label`, and never for
    /// UNAUTHENTICATED calls (a caller that did not authenticate could claim
    /// any organization).
    pub fn call_finished(
        &self,
        route: &'static Route,
        code: tonic::Code,
        elapsed: Duration,
        organization: Option<&str>,
    ) {
        let inner = &*self.inner;
        let rpc = route.rpc;
        let code_index = (code as usize).min(GRPC_CODES.len() - 1);
        let code_label = GRPC_CODES[code_index];
        match &inner.calls {
            Calls::Plain { family, cache } => cache[route.index * GRPC_CODES.len() + code_index]
                .get_or_init(|| family.get_or_create(&call_labels(rpc, code_label)).clone())
                .inc(),
            Calls::ByOrganization {
                family,
                organizations,
            } => {
                let organization = if code == tonic::Code::Unauthenticated {
                    None
                } else {
                    organization
                };
                let labels = OrganizationCallLabels {
                    rpc_method: rpc,
                    rpc_grpc_status_code: code_label,
                    organization: organizations.label(organization),
                };
                family.get_or_create(&labels).inc()
            }
        };
        inner
            .histogram(&inner.call_duration, &inner.call_duration_cache, route)
            .observe(elapsed);
    }

    /// A call was refused before reaching the upstream. A call refused at
    /// admission (`in_flight_limit`) is counted here only; one refused for a
    /// full connection queue is also counted by [`Metrics::call_finished`].
    pub fn call_shed(&self, reason: ShedReason) {
        let index = reason as usize;
        self.inner.shed_cache[index]
            .get_or_init(|| {
                self.inner
                    .shed
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .clone()
            })
            .inc();
    }

    /// One upstream request (each attempt of a retried call counts) ended
    /// with `result` after `elapsed`.
    pub fn upstream_request(
        &self,
        route: &'static Route,
        result: UpstreamResult,
        elapsed: Duration,
    ) {
        let inner = &*self.inner;
        let rpc = route.rpc;
        let labels = || UpstreamLabels {
            rpc_method: rpc,
            http_response_status_code: result.status(),
            error_type: result.error_type().unwrap_or(""),
        };
        let slot = match result {
            UpstreamResult::Status(status @ 100..=599) => Some(usize::from(status - 100)),
            UpstreamResult::Timeout => Some(STATUS_SLOTS),
            UpstreamResult::Connect => Some(STATUS_SLOTS + 1),
            UpstreamResult::Connection => Some(STATUS_SLOTS + 2),
            UpstreamResult::Malformed(None) => Some(STATUS_SLOTS + 3),
            // Rare: an out-of-range status, a malformed answer with one, an
            // abandoned attempt.
            UpstreamResult::Status(_)
            | UpstreamResult::Malformed(Some(_))
            | UpstreamResult::Cancelled => None,
        };
        match slot {
            Some(slot) => inner.upstream_cache[route.index * UPSTREAM_SLOTS + slot]
                .get_or_init(|| inner.upstream.get_or_create(&labels()).clone())
                .inc(),
            None => inner.upstream.get_or_create(&labels()).inc(),
        };
        inner
            .histogram(
                &inner.upstream_duration,
                &inner.upstream_duration_cache,
                route,
            )
            .observe(elapsed);
    }

    /// An upstream request is sent again, for `reason` (a short
    /// `snake_case` constant of the retry policy, e.g. `connect`).
    pub fn retry(&self, route: &'static Route, reason: &'static str) {
        self.inner
            .retries
            .get_or_create(&RetryLabels {
                rpc_method: route.rpc,
                reason,
            })
            .inc();
    }

    /// The upstream circuit breaker entered `state`.
    pub fn breaker_state(&self, state: BreakerState) {
        let inner = &*self.inner;
        for each in BreakerState::ALL {
            inner
                .breaker_state
                .get_or_create(&StateLabels {
                    state: each.as_str(),
                })
                .set(i64::from(each == state));
        }
        inner
            .breaker_transitions
            .get_or_create(&TransitionLabels { to: state.as_str() })
            .inc();
    }

    pub fn idempotency(&self, result: IdempotencyResult) {
        let index = result as usize;
        self.inner.idempotency_cache[index]
            .get_or_init(|| {
                self.inner
                    .idempotency
                    .get_or_create(&ResultLabels {
                        result: IdempotencyResult::ALL[index].as_str(),
                    })
                    .clone()
            })
            .inc();
    }

    /// A reload of `file` (a short constant naming the file set: `tls`,
    /// `upstream_tls`, `credentials`) succeeded or failed.
    pub fn reload(&self, file: &'static str, ok: bool) {
        self.inner
            .reloads
            .get_or_create(&ReloadLabels {
                file,
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// `n` more log lines were dropped.
    pub fn log_lines_dropped(&self, n: u64) {
        self.inner.log_lines_dropped.add(n);
    }

    /// Reads the log writer's running total of dropped lines on each scrape
    /// (e.g. `crate::logging::dropped_lines`), added to what
    /// [`Metrics::log_lines_dropped`] reported. Only the first source set
    /// is used; returns `false` for a later one.
    pub fn count_log_lines_dropped_from(&self, source: fn() -> u64) -> bool {
        self.inner.log_lines_dropped.set_source(source)
    }

    /// The serving certificate's `notAfter`. Until the first call the series
    /// is absent.
    pub fn set_tls_certificate_expiry(&self, not_after: SystemTime) {
        let seconds = match not_after.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        };
        self.inner.tls_expiry.set(seconds);
    }

    /// Adds an upstream client's connection cap to the
    /// `gormic_gateway_upstream_*` request and connection series (summed
    /// over all registered, read at scrape time).
    pub fn register_connections(&self, gauges: Arc<dyn ConnectionGauges>) {
        self.inner.connections.register(gauges);
    }

    /// Adds series a component declares itself (the shared store's), read
    /// at scrape time.
    pub fn register_series(&self, series: Arc<dyn Series>) {
        self.inner.late.register(series);
    }

    /// The text exposition of every series, as served on `/metrics` with
    /// [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail, and none of our metrics or
        // collectors returns an error of its own.
        let _ =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry);
        out
    }
}

fn call_labels(rpc: &'static str, code: &'static str) -> CallLabels {
    CallLabels {
        rpc_method: rpc,
        rpc_grpc_status_code: code,
    }
}

impl Inner {
    /// The histogram of `route`, from its cache slot.
    fn histogram<'a>(
        &self,
        family: &'a Family<RpcLabels, LatencyHistogram>,
        cache: &'a [OnceLock<LatencyHistogram>; RPCS],
        route: &'static Route,
    ) -> &'a LatencyHistogram {
        cache[route.index].get_or_init(|| {
            family
                .get_or_create(&RpcLabels {
                    rpc_method: route.rpc,
                })
                .clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn calls_by_rpc_and_code_with_latency() {
        let metrics = Metrics::default();
        metrics.call_finished(
            &routes::CLOSE_INVOICE,
            tonic::Code::Ok,
            Duration::from_millis(3),
            None,
        );
        metrics.call_finished(
            &routes::CLOSE_INVOICE,
            tonic::Code::Ok,
            Duration::from_millis(3),
            None,
        );
        metrics.call_finished(
            &routes::CLOSE_INVOICE,
            tonic::Code::FailedPrecondition,
            Duration::from_micros(90),
            Some("org-1"),
        );
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_calls_total{rpc_method="CloseInvoice",rpc_grpc_status_code="0"}"#
            )
            .as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_calls_total{rpc_method="CloseInvoice",rpc_grpc_status_code="9"}"#
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_call_duration_seconds_bucket{rpc_method="CloseInvoice",le="0.0001"}"#
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_call_duration_seconds_bucket{rpc_method="CloseInvoice",le="0.005"}"#
            )
            .as_deref(),
            Some("3")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_call_duration_seconds_count{rpc_method="CloseInvoice"}"#
            )
            .as_deref(),
            Some("3")
        );
        assert!(!text.contains("org-1"), "{text}");
    }

    #[test]
    fn every_rpc_of_the_route_table_has_its_series_and_cache_slot() {
        let metrics = Metrics::default();
        for route in routes::ALL {
            metrics.call_finished(route, tonic::Code::Ok, Duration::ZERO, None);
            metrics.upstream_request(route, UpstreamResult::Status(200), Duration::ZERO);
        }
        let text = metrics.encode();
        for route in routes::ALL {
            let calls = format!(
                r#"gormic_gateway_calls_total{{rpc_method="{}",rpc_grpc_status_code="0"}}"#,
                route.rpc
            );
            assert_eq!(sample(&text, &calls).as_deref(), Some("1"), "{calls}");
            let upstream = format!(
                r#"gormic_gateway_upstream_request_duration_seconds_count{{rpc_method="{}"}}"#,
                route.rpc
            );
            assert_eq!(sample(&text, &upstream).as_deref(), Some("1"), "{upstream}");
        }
    }

    #[test]
    fn upstream_results_label_status_or_error_type() {
        let metrics = Metrics::default();
        let rpc = &routes::SEND_INVOICE;
        for result in [
            UpstreamResult::Status(400),
            UpstreamResult::Status(400),
            UpstreamResult::Timeout,
            UpstreamResult::Connect,
            UpstreamResult::Connection,
            UpstreamResult::Malformed(None),
            UpstreamResult::Malformed(Some(200)),
            UpstreamResult::Status(999),
        ] {
            metrics.upstream_request(rpc, result, Duration::from_millis(1));
        }
        let text = metrics.encode();
        let series = |status: &str, error: &str| {
            sample(
                &text,
                &format!(
                    r#"gormic_gateway_upstream_requests_total{{rpc_method="SendInvoice",http_response_status_code="{status}",error_type="{error}"}}"#
                ),
            )
        };
        assert_eq!(series("400", "").as_deref(), Some("2"));
        assert_eq!(series("", "timeout").as_deref(), Some("1"));
        assert_eq!(series("", "connect").as_deref(), Some("1"));
        assert_eq!(series("", "connection").as_deref(), Some("1"));
        assert_eq!(series("", "malformed").as_deref(), Some("1"));
        assert_eq!(series("200", "malformed").as_deref(), Some("1"));
        assert_eq!(series("999", "").as_deref(), Some("1"));
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_upstream_request_duration_seconds_count{rpc_method="SendInvoice"}"#
            )
            .as_deref(),
            Some("8")
        );
    }

    #[test]
    fn organizations_are_bounded_and_sanitised() {
        let metrics = Metrics::new(&MetricsArgs {
            metrics_organization_label: true,
        });
        let ok = tonic::Code::Ok;
        let create = &routes::CREATE_INVOICE;
        for i in 0..MAX_ORGANIZATIONS + 5 {
            let id = format!("org-{i}");
            metrics.call_finished(create, ok, Duration::ZERO, Some(&id));
        }
        metrics.call_finished(create, ok, Duration::ZERO, Some("org-0"));
        metrics.call_finished(create, ok, Duration::ZERO, Some("bad\"id"));
        metrics.call_finished(create, ok, Duration::ZERO, None);
        metrics.call_finished(
            create,
            tonic::Code::Unauthenticated,
            Duration::ZERO,
            Some("org-claimed"),
        );
        let text = metrics.encode();
        let series = |code: &str, org: &str| {
            sample(
                &text,
                &format!(
                    r#"gormic_gateway_calls_total{{rpc_method="CreateInvoice",rpc_grpc_status_code="{code}",organization="{org}"}}"#
                ),
            )
        };
        assert_eq!(series("0", "org-0").as_deref(), Some("2"));
        assert_eq!(series("0", "org-999").as_deref(), Some("1"));
        assert_eq!(series("0", "org-1000"), None);
        assert_eq!(series("0", "_other").as_deref(), Some("5"));
        assert_eq!(series("0", "_invalid").as_deref(), Some("1"));
        assert_eq!(series("0", "").as_deref(), Some("1"));
        assert_eq!(series("16", "").as_deref(), Some("1"));
        assert!(!text.contains("org-claimed"));
    }

    #[test]
    fn organization_ids_accepted_as_labels() {
        assert!(valid_organization_id("org-1"));
        assert!(valid_organization_id(
            "3f2a9c1e-0b7d-4f4e-9a51-3c2d1e0f9a8b"
        ));
        assert!(valid_organization_id(
            &"a".repeat(MAX_ORGANIZATION_ID_BYTES)
        ));
        assert!(!valid_organization_id(
            &"a".repeat(MAX_ORGANIZATION_ID_BYTES + 1)
        ));
        assert!(!valid_organization_id("_other"));
        assert!(!valid_organization_id("a b"));
        assert!(!valid_organization_id("é"));
        assert!(!valid_organization_id(""));
    }

    #[test]
    fn the_organization_flag() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            metrics: MetricsArgs,
        }
        Cli::command().debug_assert();
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.metrics);
        assert!(!parse(&["gw"]).expect("valid").metrics_organization_label);
        assert!(
            parse(&["gw", "--metrics-organization-label"])
                .expect("valid")
                .metrics_organization_label
        );
    }

    #[test]
    fn handles_travel_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Metrics>();
    }

    #[test]
    fn in_flight_is_the_admission_count() {
        let metrics = Metrics::default();
        let gauge = "gormic_gateway_calls_in_flight";
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("0"));
        let limit = InFlightLimit::new(10);
        metrics.count_in_flight(&limit);
        let first = limit.try_admit().expect("room");
        let second = limit.try_admit().expect("room");
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("2"));
        drop(first);
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("1"));
        drop(second);
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("0"));
    }

    #[test]
    fn the_breaker_state_is_one_hot_and_transitions_are_counted() {
        let metrics = Metrics::default();
        let state = |text: &str, s: &str| {
            sample(
                text,
                &format!(r#"gormic_gateway_upstream_breaker_state{{state="{s}"}}"#),
            )
        };
        let text = metrics.encode();
        assert_eq!(state(&text, "closed").as_deref(), Some("1"));
        assert_eq!(state(&text, "open").as_deref(), Some("0"));
        metrics.breaker_state(BreakerState::Open);
        metrics.breaker_state(BreakerState::HalfOpen);
        metrics.breaker_state(BreakerState::Open);
        let text = metrics.encode();
        assert_eq!(state(&text, "closed").as_deref(), Some("0"));
        assert_eq!(state(&text, "open").as_deref(), Some("1"));
        assert_eq!(state(&text, "half_open").as_deref(), Some("0"));
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_upstream_breaker_transitions_total{to="open"}"#
            )
            .as_deref(),
            Some("2")
        );
    }

    #[test]
    fn tls_expiry_appears_once_set() {
        let metrics = Metrics::default();
        let name = "gormic_gateway_tls_certificate_expiry_timestamp_seconds";
        assert!(!metrics.encode().contains(name));
        metrics.set_tls_certificate_expiry(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        assert_eq!(
            sample(&metrics.encode(), name).as_deref(),
            Some("1900000000")
        );
    }

    #[test]
    fn dropped_log_lines_from_reports_and_a_source() {
        let metrics = Metrics::default();
        let name = "gormic_gateway_log_lines_dropped_total";
        assert_eq!(sample(&metrics.encode(), name).as_deref(), Some("0"));
        metrics.log_lines_dropped(2);
        assert!(metrics.count_log_lines_dropped_from(|| 40));
        assert!(!metrics.count_log_lines_dropped_from(|| 1));
        assert_eq!(sample(&metrics.encode(), name).as_deref(), Some("42"));
    }

    #[test]
    fn build_info_names_version_and_commit() {
        let text = Metrics::default().encode();
        let expected = format!(
            r#"gormic_gateway_build_info{{version="{}",git_commit="{}"}} 1"#,
            env!("CARGO_PKG_VERSION"),
            GIT_COMMIT
        );
        assert!(text.lines().any(|l| l == expected), "{text}");
    }
}
