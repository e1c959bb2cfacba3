//! The spans of a call: one server span per gRPC call, one client span per
//! upstream request, and the `traceparent` each upstream request carries.
//! With export off no SDK object exists: a span is a trace id, flags and,
//! per upstream request, a fresh span id.

use std::borrow::Cow;
use std::sync::Arc;

use http::HeaderValue;
use opentelemetry::trace::{
    self as otel, Span as _, SpanBuilder, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::Span as SdkSpan;

use super::config::{TraceConfig, TraceError};
use super::context::{SpanId, TraceContext, TraceId, TraceParent};
use super::export::Pipeline;

/// `rpc.service` of every call span.
pub const RPC_SERVICE: &str = "gormic.om.v1.InvoiceService";

/// Longest `error.code` recorded on a span: the code comes from the
/// upstream's body, which the gateway does not control.
const MAX_ERROR_CODE_BYTES: usize = 128;

/// Starts the spans of each call. Cheap to clone; with export off it holds
/// nothing.
#[derive(Debug, Clone, Default)]
pub struct Tracer {
    exporting: Option<Arc<Exporting>>,
}

#[derive(Debug)]
struct Exporting {
    pipeline: Pipeline,
    /// `server.address` and `server.port` of every upstream span.
    upstream_address: StringValue,
    upstream_port: i64,
}

impl Tracer {
    /// No export: trace context still flows from the caller to the upstream.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the export pipeline when `config` names an endpoint (else a
    /// disabled tracer). `upstream_host`/`upstream_port` are the REST API's,
    /// recorded on upstream spans as `server.address`/`server.port`. Does
    /// not connect: an unreachable collector costs the spans, not the start.
    pub fn start(
        config: &TraceConfig,
        upstream_host: &str,
        upstream_port: u16,
    ) -> Result<Self, TraceError> {
        let Some(pipeline) = Pipeline::start(config)? else {
            return Ok(Self::disabled());
        };
        Ok(Self {
            exporting: Some(Arc::new(Exporting {
                pipeline,
                upstream_address: StringValue::from(upstream_host.to_owned()),
                upstream_port: i64::from(upstream_port),
            })),
        })
    }

    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.exporting.is_some()
    }

    /// The server span of a call to `rpc` (`CreateInvoice`, ...), child of
    /// the caller's span when `context` has one, else the root of a new trace.
    pub fn start_call(&self, context: &TraceContext, rpc: &'static str) -> CallSpan {
        let Some(exporting) = &self.exporting else {
            let (trace_id, flags) = match context.parent {
                Some(parent) => (parent.trace_id, parent.flags),
                // Not sampled: the gateway records nothing of this trace.
                None => (TraceId::random(), 0),
            };
            return CallSpan {
                trace_id,
                flags,
                tracestate: context.tracestate.clone(),
                otel: None,
            };
        };
        let parent_cx = match context.parent {
            Some(parent) => Context::new().with_remote_span_context(otel::SpanContext::new(
                otel::TraceId::from_bytes(parent.trace_id.to_bytes()),
                otel::SpanId::from_bytes(parent.parent_id.to_bytes()),
                otel::TraceFlags::new(parent.flags),
                true,
                context
                    .tracestate
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_default(),
            )),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(format!("{RPC_SERVICE}/{rpc}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", RPC_SERVICE),
                KeyValue::new("rpc.method", rpc),
            ]);
        let span = exporting
            .pipeline
            .tracer
            .build_with_context(builder, &parent_cx);
        let span_context = span.span_context();
        let trace_id = TraceId::from_bytes(span_context.trace_id().to_bytes())
            // The SDK never makes an all-zero id; a new one keeps the call going.
            .unwrap_or_else(TraceId::random);
        CallSpan {
            trace_id,
            flags: span_context.trace_flags().to_u8(),
            tracestate: context.tracestate.clone(),
            otel: Some(Box::new(OtelCall {
                span,
                exporting: Arc::clone(exporting),
                ended: false,
            })),
        }
    }

    /// Exports the spans ended so far, now. Blocking (up to 5 s): call it
    /// from a plain thread or `spawn_blocking`, not from async code.
    pub fn force_flush(&self) -> Result<(), TraceError> {
        match &self.exporting {
            Some(exporting) => exporting.pipeline.force_flush(),
            None => Ok(()),
        }
    }

    /// Exports the remaining spans and stops the export thread; spans that
    /// end later are dropped. Blocking (up to 5 s): call it once the servers
    /// have drained, from a plain thread (e.g. `main` after its runtime
    /// returned) or `spawn_blocking`.
    pub fn shutdown(&self) -> Result<(), TraceError> {
        match &self.exporting {
            Some(exporting) => exporting.pipeline.shutdown(),
            None => Ok(()),
        }
    }
}

/// The server span of one gRPC call. Dropping it without
/// [`CallSpan::end`] (the caller went away) ends it as CANCELLED.
#[derive(Debug)]
pub struct CallSpan {
    trace_id: TraceId,
    flags: u8,
    tracestate: Option<HeaderValue>,
    otel: Option<Box<OtelCall>>,
}

#[derive(Debug)]
struct OtelCall {
    span: SdkSpan,
    exporting: Arc<Exporting>,
    ended: bool,
}

impl CallSpan {
    /// The call's trace id, for its log line (`Display` is lowercase hex,
    /// written without allocating).
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// Whether this span is recorded and will be exported.
    pub fn is_recording(&self) -> bool {
        self.otel.as_ref().is_some_and(|o| o.span.is_recording())
    }

    /// The client span of one upstream request (one per attempt), child of
    /// this call's span. `route_template` is the route as written in the
    /// proto (`/v1/om/invoices/{invoice_id}/close`), never the filled-in path.
    pub fn upstream(&self, method: &http::Method, route_template: &'static str) -> UpstreamSpan {
        let Some(call) = &self.otel else {
            return UpstreamSpan {
                traceparent: TraceParent {
                    trace_id: self.trace_id,
                    parent_id: SpanId::random(),
                    flags: self.flags,
                },
                tracestate: self.tracestate.clone(),
                otel: None,
            };
        };
        let method_name = http_method(method);
        let parent_cx = Context::new().with_remote_span_context(call.span.span_context().clone());
        let builder = SpanBuilder::from_name(format!("{method_name} {route_template}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("http.request.method", method_name),
                KeyValue::new("url.template", route_template),
                KeyValue::new(
                    "server.address",
                    Value::String(call.exporting.upstream_address.clone()),
                ),
                KeyValue::new("server.port", call.exporting.upstream_port),
            ]);
        let span = call
            .exporting
            .pipeline
            .tracer
            .build_with_context(builder, &parent_cx);
        let span_context = span.span_context();
        UpstreamSpan {
            traceparent: TraceParent {
                trace_id: self.trace_id,
                parent_id: SpanId::from_bytes(span_context.span_id().to_bytes())
                    .unwrap_or_else(SpanId::random),
                flags: span_context.trace_flags().to_u8(),
            },
            tracestate: self.tracestate.clone(),
            otel: Some(span),
        }
    }

    /// Ends the call with the gRPC `code` it was answered with and, on an
    /// error, the `ErrorInfo.reason` (or upstream error code) as `error.code`.
    /// Server faults (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
    /// UNAVAILABLE, DATA_LOSS) set the span status to Error, as the
    /// OpenTelemetry gRPC conventions ask; the caller's own errors do not.
    pub fn end(mut self, code: tonic::Code, error_code: Option<&str>) {
        if let Some(call) = self.otel.as_mut() {
            finish_call(call, code, error_code);
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if let Some(call) = self.otel.as_mut().filter(|c| !c.ended) {
            finish_call(call, tonic::Code::Cancelled, None);
        }
    }
}

fn finish_call(call: &mut OtelCall, code: tonic::Code, error_code: Option<&str>) {
    call.ended = true;
    let span = &mut call.span;
    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
    if code != tonic::Code::Ok {
        span.set_attribute(KeyValue::new("error.type", crate::grpc_code::name(code)));
    }
    if let Some(error_code) = error_code {
        span.set_attribute(KeyValue::new("error.code", bounded(error_code)));
    }
    if is_server_fault(code) {
        span.set_status(Status::error(crate::grpc_code::name(code)));
    }
    span.end();
}

/// The client span of one upstream request. Dropping it without
/// [`UpstreamSpan::end`] (the call was cancelled) ends it with
/// `error.type = cancelled`.
#[derive(Debug)]
pub struct UpstreamSpan {
    traceparent: TraceParent,
    tracestate: Option<HeaderValue>,
    otel: Option<SdkSpan>,
}

impl UpstreamSpan {
    /// The `traceparent` header for the upstream request: the call's trace
    /// id and, as parent, this client span (exporting) or a fresh span id
    /// (not exporting).
    pub fn traceparent(&self) -> HeaderValue {
        self.traceparent.to_header_value()
    }

    /// The caller's `tracestate`, forwarded unchanged.
    pub fn tracestate(&self) -> Option<HeaderValue> {
        self.tracestate.clone()
    }

    /// The span id sent upstream as the parent.
    pub fn span_id(&self) -> SpanId {
        self.traceparent.parent_id
    }

    /// Ends the request: the HTTP `status` when an answer came, the
    /// transport failure (`timeout`, `connect`, `connection`, `malformed`)
    /// when it did not, and the upstream's `error.code` from its body. An
    /// answer of 400 or more, or a failure, sets the span status to Error
    /// (the HTTP client convention); `error.type` is then the failure or
    /// the status code.
    pub fn end(mut self, status: Option<u16>, error_type: Option<&str>, error_code: Option<&str>) {
        if let Some(span) = self.otel.as_mut() {
            finish_upstream(span, status, error_type, error_code);
        }
        self.otel = None;
    }
}

impl Drop for UpstreamSpan {
    fn drop(&mut self) {
        if let Some(span) = self.otel.as_mut() {
            finish_upstream(span, None, Some("cancelled"), None);
        }
    }
}

fn finish_upstream(
    span: &mut SdkSpan,
    status: Option<u16>,
    error_type: Option<&str>,
    error_code: Option<&str>,
) {
    if let Some(status) = status {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    let error_type: Option<Cow<'_, str>> = match (error_type, status) {
        (Some(kind), _) => Some(Cow::Borrowed(kind)),
        (None, Some(status)) if status >= 400 => Some(Cow::Owned(status.to_string())),
        (None, _) => None,
    };
    if let Some(error_code) = error_code {
        span.set_attribute(KeyValue::new("error.code", bounded(error_code)));
    }
    if let Some(error_type) = error_type {
        span.set_attribute(KeyValue::new("error.type", error_type.into_owned()));
        span.set_status(Status::error(""));
    }
    span.end();
}

/// At most [`MAX_ERROR_CODE_BYTES`], cut on a character boundary.
fn bounded(value: &str) -> String {
    let mut end = value.len().min(MAX_ERROR_CODE_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

/// `http.request.method`: the standard methods by name, others as `_OTHER`
/// (the HTTP convention, which keeps the attribute bounded).
fn http_method(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::TRACE => "TRACE",
        http::Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// The codes the OpenTelemetry gRPC conventions count as server errors.
fn is_server_fault(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn incoming(traceparent: &str, tracestate: Option<&str>) -> TraceContext {
        TraceContext::from_values(Some(traceparent.as_bytes()), tracestate.map(str::as_bytes))
    }

    #[test]
    fn disabled_continues_the_callers_trace_with_fresh_span_ids() {
        let tracer = Tracer::disabled();
        assert!(!tracer.is_exporting());
        let call = tracer.start_call(&incoming(SPEC, Some("rojo=1")), "CloseInvoice");
        assert!(!call.is_recording());
        assert_eq!(
            call.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );

        let first = call.upstream(&http::Method::PATCH, "/v1/om/invoices/{invoice_id}/close");
        let second = call.upstream(&http::Method::PATCH, "/v1/om/invoices/{invoice_id}/close");
        let header = first.traceparent();
        let header = header.to_str().expect("ascii");
        let parsed = TraceParent::parse(header.as_bytes()).expect("valid traceparent");
        assert_eq!(parsed.trace_id, call.trace_id());
        assert_ne!(parsed.parent_id.to_string(), "b7ad6b7169203331");
        assert_eq!(parsed.parent_id, first.span_id());
        assert_ne!(first.span_id(), second.span_id());
        assert!(parsed.sampled(), "the caller's sampling decision is kept");
        assert_eq!(
            first.tracestate().as_ref().map(HeaderValue::as_bytes),
            Some(&b"rojo=1"[..])
        );
        first.end(Some(200), None, None);
        call.end(tonic::Code::Ok, None);
    }

    #[test]
    fn disabled_starts_an_unsampled_trace_without_a_traceparent() {
        let tracer = Tracer::disabled();
        let a = tracer.start_call(&TraceContext::root(), "CreateInvoice");
        let b = tracer.start_call(&TraceContext::root(), "CreateInvoice");
        assert_ne!(a.trace_id(), b.trace_id());
        let upstream = a.upstream(&http::Method::POST, "/v1/om/invoices");
        let parsed = TraceParent::parse(upstream.traceparent().as_bytes()).expect("valid");
        assert_eq!(parsed.trace_id, a.trace_id());
        assert!(!parsed.sampled());
        assert!(upstream.tracestate().is_none());
    }

    /// The call path's future holds these across `.await`s on any worker.
    #[test]
    fn spans_travel_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tracer>();
        send_sync::<CallSpan>();
        send_sync::<UpstreamSpan>();
        send_sync::<TraceContext>();
    }

    #[test]
    fn error_codes_are_bounded() {
        assert_eq!(bounded("ORDER_CLOSED"), "ORDER_CLOSED");
        assert_eq!(bounded(&"x".repeat(500)).len(), MAX_ERROR_CODE_BYTES);
        let multibyte = "é".repeat(100); // 200 bytes
        assert_eq!(bounded(&multibyte).len(), MAX_ERROR_CODE_BYTES);
    }

    #[test]
    fn server_faults() {
        assert!(is_server_fault(tonic::Code::Unavailable));
        assert!(is_server_fault(tonic::Code::DeadlineExceeded));
        assert!(!is_server_fault(tonic::Code::FailedPrecondition));
        assert!(!is_server_fault(tonic::Code::NotFound));
        assert!(!is_server_fault(tonic::Code::Ok));
    }
}
