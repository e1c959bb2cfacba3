//! gormic-gateway: serves `gormic.om.v1.InvoiceService` over gRPC and forwards
//! each call to the Gormic Order Management invoices REST API.
//!
//! Request flow: [`server`] accepts connections and hands each to a worker
//! thread ([`runtime`]), which routes its gRPC calls to
//! [`service::InvoiceGateway`]; the [`service`] module doc lists the steps
//! of a call, each owned by its module. [`sandbox`] is a stand-in for the
//! REST API (`--sandbox`), reached through the same client.
//!
//! Layers point one way: `main` and [`config`] compose; [`server`] →
//! [`service`] → the steps → [`upstream`] → `wire`/[`routes`]; [`store`]
//! (the Redis the replicas share) knows none of its users; observability
//! ([`metrics`], [`logging`], [`trace`]), [`tls`] and the leaves ([`units`],
//! [`deadline`], [`validation`], [`grpc_code`]) import nothing above them.
//! docs/architecture.md maps every file.

pub mod admin;
pub mod call_end;
pub mod config;
pub mod cors;
pub mod credentials;
pub mod deadline;
pub mod errors;
pub mod grpc_code;
pub mod idempotency;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proto;
pub mod quota;
pub mod reload;
pub mod request_id;
pub mod routes;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod store;
pub mod tenant;
pub mod tls;
pub mod trace;
pub mod units;
pub mod upstream;
pub mod validation;
