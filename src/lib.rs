//! gormic-gateway: serves `gormic.om.v1.InvoiceService` over gRPC and forwards
//! each call to the Gormic Order Management invoices REST API.
//!
//! Request flow: [`server`] accepts connections and routes gRPC calls to
//! [`service::InvoiceGateway`], which reads metadata, validates the request and
//! calls [`upstream::Upstream`]; every failure becomes a `tonic::Status` in
//! [`errors`]. [`sandbox`] is a stand-in for the REST API (`--sandbox`),
//! reached through the same client.

pub mod admin;
pub mod config;
pub mod cors;
pub mod errors;
pub mod metrics;
pub mod proto;
mod routes;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod trace;
pub mod upstream;
