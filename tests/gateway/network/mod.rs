//! Issue 13 on a real network (loopback only): the upstream client's connect
//! timeout shared between a name's addresses, the circuit breaker in front
//! of a blackholed or refusing upstream, forward proxies (a real tinyproxy),
//! HTTP/2 with prior knowledge, and keep-alive connections that the
//! upstream closes under the gateway. What the tests share: the gateway
//! wired with its own `Metrics`, one close call timed, and how its failure
//! reads.

mod addresses;
mod breaker;
mod proxy;

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use gormic_gateway::errors::{GATEWAY_DOMAIN, reason};
use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::upstream::UpstreamOptions;
use tonic::transport::Channel;

use crate::support::admin::Scrape;
use crate::support::binary::Serving;
use crate::support::gateway::endpoint;
use crate::support::{TestGateway, authed, details, error_info};

pub(super) use crate::support::{close, closed};

/// A gateway in front of `url` with `options`, recording in its own
/// `metrics`.
pub(super) struct Observed {
    pub gateway: TestGateway,
    pub metrics: Metrics,
    /// The proxy the upstream client goes through, as it shows it.
    pub proxy: Option<String>,
}

impl Observed {
    pub async fn start(url: &str, options: UpstreamOptions) -> Self {
        let metrics = Metrics::default();
        let gateway = TestGateway::builder(url)
            .upstream(options)
            .metrics(&metrics)
            .start()
            .await;
        let proxy = gateway.upstream_client().proxy().map(str::to_owned);
        Self {
            gateway,
            metrics,
            proxy,
        }
    }

    pub fn client(&self) -> InvoiceServiceClient<Channel> {
        self.gateway.client.clone()
    }

    pub fn scrape(&self) -> Scrape {
        Scrape(self.metrics.encode())
    }
}

/// A client of the binary's gRPC listener (started with `--log-format json`).
pub(super) async fn client_of(serving: &Serving) -> InvoiceServiceClient<Channel> {
    let addr = serving.grpc_addr();
    let channel = endpoint(addr)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the binary at {addr}: {e}"));
    InvoiceServiceClient::new(channel)
}

/// One close call and when it started and ended.
#[derive(Debug)]
pub(super) struct Timed {
    pub result: Result<pb::CloseInvoiceResponse, tonic::Status>,
    pub started: Instant,
    pub ended: Instant,
}

impl Timed {
    pub fn elapsed(&self) -> Duration {
        self.ended - self.started
    }

    pub fn status(&self) -> &tonic::Status {
        self.result.as_ref().expect_err("the call failed")
    }
}

pub(super) async fn timed_close(client: &mut InvoiceServiceClient<Channel>) -> Timed {
    let started = Instant::now();
    let result = client
        .close_invoice(authed(close()))
        .await
        .map(tonic::Response::into_inner);
    Timed {
        result,
        started,
        ended: Instant::now(),
    }
}

/// How a failed call that reached no upstream reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Unreachable {
    /// It tried to connect: `detail` says what happened, `attempts` how
    /// many requests were made.
    Tried { detail: String, attempts: u32 },
    /// The breaker refused it at once.
    BreakerOpen { retry_after: Duration },
}

/// Checks what every UNAVAILABLE call that sent nothing carries (reason,
/// domain, `request_sent=false`, RetryInfo) and tells a try from a
/// fast-fail of the open breaker.
pub(super) fn unreachable(status: &tonic::Status) -> Unreachable {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = error_info(status);
    assert_eq!(info.reason, reason::UPSTREAM_UNAVAILABLE, "{status:?}");
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(info.metadata["request_sent"], "false", "{status:?}");
    let retry_after = details(status)
        .retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_else(|| panic!("RetryInfo on an unsent UNAVAILABLE: {status:?}"));
    match info.metadata.get("breaker").map(String::as_str) {
        Some("open") => {
            assert!(
                !info.metadata.contains_key("attempts"),
                "a fast-fail makes no request: {status:?}"
            );
            assert!(
                status.message().contains("circuit breaker is open"),
                "{status:?}"
            );
            Unreachable::BreakerOpen { retry_after }
        }
        None => {
            assert_eq!(
                retry_after,
                gormic_gateway::upstream::UNREACHABLE_RETRY_DELAY,
                "{status:?}"
            );
            Unreachable::Tried {
                detail: info.metadata["detail"].clone(),
                attempts: info.metadata["attempts"].parse().expect("attempts"),
            }
        }
        Some(other) => panic!("breaker={other}: {status:?}"),
    }
}

// ---- /metrics series -------------------------------------------------------

pub(super) fn breaker_state(state: &str) -> String {
    format!(r#"gormic_gateway_upstream_breaker_state{{state="{state}"}}"#)
}

pub(super) fn breaker_transitions(to: &str) -> String {
    format!(r#"gormic_gateway_upstream_breaker_transitions_total{{to="{to}"}}"#)
}

/// The sum of every series of the metric `name` (0 when there is none).
pub(super) fn sum_of(scrape: &Scrape, name: &str) -> f64 {
    scrape
        .text()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

pub(super) const UPSTREAM_REQUESTS: &str = "gormic_gateway_upstream_requests_total";
pub(super) const CONNECTIONS_OPENED: &str = "gormic_gateway_upstream_connections_opened_total";
