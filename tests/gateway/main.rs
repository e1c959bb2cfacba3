//! Integration tests: the gateway in-process on an ephemeral port, in front
//! of a scripted fake upstream or the built-in sandbox.

mod support;

mod admin;
mod forwarding;
mod grpc_web;
mod operations;
mod otlp;
mod requests;
mod sandbox;
mod transport;
mod upstream_errors;
