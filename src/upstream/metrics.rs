//! The upstream's series: each request (attempt) by how it ended and how
//! long it took, the retries, the circuit breaker's state and transitions
//! (`super::breaker`), and the connection cap's gauges, read at scrape
//! time (`super::limit`, through [`ConnectionGauges`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::limit::UpstreamGauges;
use crate::metrics::{CachedFamily, ConnectionGauges, MetricsArgs, RpcLatency, Series};
use crate::routes::{self, Route};

/// How many RPCs the service has (the per-RPC caches' size).
const RPCS: usize = routes::ALL.len();

/// Upstream results cached per RPC: statuses 100–599, then the four
/// failures without a status.
const STATUS_SLOTS: usize = 500;
const UPSTREAM_SLOTS: usize = STATUS_SLOTS + 4;

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
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    to: &'static str,
}

/// The upstream's series; registered with [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct UpstreamMetrics {
    /// Cached at `rpc index * UPSTREAM_SLOTS + result slot`.
    requests: CachedFamily<UpstreamLabels, Counter>,
    duration: RpcLatency,
    retries: Family<RetryLabels, Counter>,
    breaker_state: Family<StateLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
}

impl Series for UpstreamMetrics {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let requests = CachedFamily::new(RPCS * UPSTREAM_SLOTS);
        registry.register(
            "gormic_gateway_upstream_requests",
            "Requests sent to the upstream, by RPC, HTTP status (empty without an answer) \
             and error type (empty on an answer)",
            requests.family().clone(),
        );

        let duration = RpcLatency::new(RPCS);
        duration.register(
            registry,
            "gormic_gateway_upstream_request_duration",
            "Time from sending an upstream request to its answer or failure, by RPC",
        );

        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "gormic_gateway_upstream_retries",
            "Upstream requests sent again, by RPC and reason",
            retries.clone(),
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

        Self {
            requests,
            duration,
            retries,
            breaker_state,
            breaker_transitions,
        }
    }
}

impl UpstreamMetrics {
    /// One upstream request (each attempt of a retried call counts) ended
    /// with `result` after `elapsed`.
    pub fn upstream_request(
        &self,
        route: &'static Route,
        result: UpstreamResult,
        elapsed: Duration,
    ) {
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
        let slot = slot.map(|slot| route.index * UPSTREAM_SLOTS + slot);
        self.requests.with(slot, labels, |requests| requests.inc());
        self.duration.observe(route.index, rpc, elapsed);
    }

    /// An upstream request is sent again, for `reason` (a short
    /// `snake_case` constant of the retry policy, e.g. `connect`).
    pub fn retry(&self, route: &'static Route, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                rpc_method: route.rpc,
                reason,
            })
            .inc();
    }

    /// The upstream circuit breaker entered `state`.
    pub fn breaker_state(&self, state: BreakerState) {
        for each in BreakerState::ALL {
            self.breaker_state
                .get_or_create(&StateLabels {
                    state: each.as_str(),
                })
                .set(i64::from(each == state));
        }
        self.breaker_transitions
            .get_or_create(&TransitionLabels { to: state.as_str() })
            .inc();
    }
}

impl ConnectionGauges for UpstreamGauges {
    fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
    fn limit(&self) -> u64 {
        self.limit
    }
    fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::metrics::tests::sample;

    #[test]
    fn every_rpc_of_the_route_table_has_its_series_and_cache_slot() {
        let metrics = Metrics::default();
        let upstream = metrics.series::<UpstreamMetrics>();
        for route in routes::ALL {
            upstream.upstream_request(route, UpstreamResult::Status(200), Duration::ZERO);
        }
        let text = metrics.encode();
        for route in routes::ALL {
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
        let upstream = metrics.series::<UpstreamMetrics>();
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
            upstream.upstream_request(rpc, result, Duration::from_millis(1));
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
    fn the_breaker_state_is_one_hot_and_transitions_are_counted() {
        let metrics = Metrics::default();
        let upstream = metrics.series::<UpstreamMetrics>();
        let state = |text: &str, s: &str| {
            sample(
                text,
                &format!(r#"gormic_gateway_upstream_breaker_state{{state="{s}"}}"#),
            )
        };
        let text = metrics.encode();
        assert_eq!(state(&text, "closed").as_deref(), Some("1"));
        assert_eq!(state(&text, "open").as_deref(), Some("0"));
        upstream.breaker_state(BreakerState::Open);
        upstream.breaker_state(BreakerState::HalfOpen);
        upstream.breaker_state(BreakerState::Open);
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
}
