//! Integration tests: the gateway in-process on an ephemeral port, in front
//! of a scripted fake upstream or the built-in sandbox.

mod support;

mod admin;
mod call_path;
mod cooldowns;
mod credentials;
mod forwarding;
mod grpc_web;
mod idempotency;
mod idempotency_store;
mod limits;
mod network;
mod observability;
mod operations;
mod otlp;
mod quotas;
mod requests;
mod retries;
mod sandbox;
mod secure;
mod store_api;
mod store_failover;
mod tenants;
mod tls;
mod transport;
mod upstream_errors;
