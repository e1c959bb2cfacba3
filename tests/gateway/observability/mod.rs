//! Issue 8 through the gateway, not its parts: `/metrics` counts the calls
//! the gateway serves, its labels stay bounded whatever callers send, every
//! call carries an `x-request-id` and continues the caller's W3C trace
//! upstream, spans reach an OTLP collector with the right parents, and
//! readiness goes down with the gRPC health service when draining starts,
//! while the gateway keeps serving for `--shutdown-delay`. What the tests
//! share: the gateway wired as `main` wires it, requests, a fresh
//! connection, the call's log line.

mod export;
mod labels;
mod metrics;
mod probes;
mod request_id;
mod trace;

use tonic::transport::Channel;

use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::trace::Tracer;

pub(super) use crate::support::closed;
use crate::support::gateway::endpoint;
use crate::support::logs::Logs;
use crate::support::{FakeUpstream, TestGateway};

pub(super) const SERVICE: &str = "gormic.om.v1.InvoiceService";
pub(super) const CLOSE: &str = "CloseInvoice";
pub(super) const UPDATE: &str = "UpdateInvoice";

// ---- the gateway under test ----------------------------------------------

/// A gateway in front of `upstream` wired as `main` wires it: recording in
/// `metrics` (with its connection gauges), tracing with `tracer`.
pub(super) async fn observed_gateway(
    upstream: &FakeUpstream,
    metrics: &Metrics,
    tracer: Tracer,
    max_in_flight: usize,
) -> TestGateway {
    TestGateway::builder(&upstream.url())
        .max_in_flight(max_in_flight)
        .metrics(metrics)
        .tracer(tracer)
        .start()
        .await
}

pub(super) fn close(invoice_id: &str) -> pb::CloseInvoiceRequest {
    pb::CloseInvoiceRequest {
        invoice_id: invoice_id.into(),
    }
}

pub(super) fn update(invoice_id: &str) -> pb::UpdateInvoiceRequest {
    pb::UpdateInvoiceRequest {
        invoice_id: invoice_id.into(),
        order_id: "ord-1".into(),
        ..Default::default()
    }
}

/// The call's log line, found by its request id.
pub(super) async fn call_line(logs: &Logs, request_id: &str) -> serde_json::Value {
    let needle = format!("\"request_id\":\"{request_id}\"");
    let line = logs
        .wait_for_line(&format!("of the call {request_id}"), |l| {
            l.contains(&needle) && l.contains("\"message\":\"call\"")
        })
        .await;
    serde_json::from_str(&line).expect("a JSON log line")
}

pub(super) async fn connect(addr: std::net::SocketAddr) -> Channel {
    endpoint(addr)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("a new connection to {addr}: {e}"))
}

pub(super) fn ready_invoice() -> pb::CreateInvoiceRequest {
    pb::CreateInvoiceRequest {
        order_id: "ord-ready".into(),
        r#type: pb::InvoiceType::Standard as i32,
        ..Default::default()
    }
}
