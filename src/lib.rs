//! gormic-gateway: serves `gormic.om.v1.InvoiceService` over gRPC and forwards
//! each call to the Gormic Order Management invoices REST API.
//!
//! Request flow: [`server`] accepts connections and hands each to a worker
//! thread ([`runtime`]), which routes its gRPC calls to
//! [`service::InvoiceGateway`]: admission ([`limits`]), metadata, validation,
//! then [`upstream::Upstream`] (a per-worker connection pool, with the
//! gateway's own [`retry`]s); every failure becomes a `tonic::Status` in
//! [`errors`]; every call writes one line ([`logging`]). [`sandbox`] is a
//! stand-in for the REST API (`--sandbox`), reached through the same client.

pub mod admin;
mod call_log;
pub mod config;
pub mod cors;
pub mod credentials;
pub mod errors;
pub mod idempotency;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod request_id;
pub mod retry;
pub mod routes;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod tls;
pub mod trace;
pub mod upstream;
