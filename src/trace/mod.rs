//! Distributed tracing: W3C trace context from the caller to the upstream
//! ([`TraceContext`], [`TraceParent`]), and OpenTelemetry spans exported over
//! OTLP/gRPC when a collector is configured ([`TraceArgs`], [`Tracer`]): one
//! server span per call ([`CallSpan`]) and one client span per upstream
//! request ([`UpstreamSpan`]).
//!
//! Export is off by default, and then costs next to nothing: no SDK span
//! exists, yet every call has a trace id (the caller's, or a new one) for its
//! log line, and every upstream request carries a `traceparent`.

mod config;
mod context;
mod export;
mod span;

pub use config::{DEFAULT_SERVICE_NAME, Endpoint, TraceArgs, TraceConfig, TraceError};
pub use context::{
    FLAG_RANDOM, FLAG_SAMPLED, MAX_TRACESTATE_BYTES, SpanId, TraceContext, TraceId, TraceIdHex,
    TraceParent,
};
pub use span::{CallSpan, RPC_SERVICE, Tracer, UpstreamSpan};
