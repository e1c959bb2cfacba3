//! OpenTelemetry export: spans reach an in-test OTLP collector with the
//! caller's trace, the right parents, attributes and status; the
//! `traceparent` sent upstream names the client span; nothing is exported
//! when export is off.

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use gormic_gateway::trace::{TraceArgs, TraceContext, TraceParent, Tracer};

use crate::support::otlp::{OtlpReceiver, ReceivedSpan};

/// The example of the W3C specification.
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";
const CLOSE_TEMPLATE: &str = "/v1/om/invoices/{invoice_id}/close";

fn traceparent(flags: &str) -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}")
}

/// A tracer exporting to `receiver`, configured as the command line would.
fn exporting_to(receiver: &OtlpReceiver) -> Tracer {
    let args = TraceArgs {
        otlp_endpoint: Some(receiver.endpoint.clone()),
        otel_service_name: Some("gateway-under-test".into()),
        ..TraceArgs::default()
    };
    let config = args.resolve_with(|_| None).expect("valid trace config");
    let tracer = Tracer::start(&config, "gormic.example", 8443).expect("exporter starts");
    assert!(tracer.is_exporting());
    tracer
}

/// `force_flush` blocks until the collector answered: off the test's
/// runtime, which also runs the receiver.
async fn flush(tracer: &Tracer) {
    let tracer = tracer.clone();
    tokio::task::spawn_blocking(move || tracer.force_flush())
        .await
        .expect("flush task")
        .expect("flush");
}

fn incoming(traceparent: &str, tracestate: Option<&str>) -> TraceContext {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("traceparent", traceparent.parse().expect("ascii"));
    if let Some(state) = tracestate {
        metadata.insert("tracestate", state.parse().expect("ascii"));
    }
    TraceContext::from_metadata(&metadata)
}

fn one(spans: &[ReceivedSpan], kind: SpanKind) -> &ReceivedSpan {
    let matching: Vec<_> = spans
        .iter()
        .filter(|s| s.span.kind == kind as i32)
        .collect();
    assert_eq!(matching.len(), 1, "one {kind:?} span expected in {spans:?}");
    matching[0]
}

#[tokio::test]
async fn a_call_continues_the_callers_trace_and_its_upstream_request_is_a_child() {
    let receiver = OtlpReceiver::start().await;
    let tracer = exporting_to(&receiver);

    let call = tracer.start_call(
        &incoming(&traceparent("01"), Some("rojo=00f067aa0ba902b7")),
        "CloseInvoice",
    );
    assert!(call.is_recording());
    assert_eq!(call.trace_id().to_string(), CALLER_TRACE);
    let upstream = call.upstream(&http::Method::PATCH, CLOSE_TEMPLATE);
    let sent = upstream.traceparent();
    let sent_state = upstream.tracestate();
    upstream.end(Some(400), None, Some("ORDER_CLOSED"));
    call.end(tonic::Code::FailedPrecondition, Some("ORDER_CLOSED"));
    flush(&tracer).await;

    let spans = receiver.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let server = one(&spans, SpanKind::Server);
    let client = one(&spans, SpanKind::Client);

    assert_eq!(server.trace_id_hex(), CALLER_TRACE);
    assert_eq!(server.parent_span_id_hex(), CALLER_SPAN);
    assert_eq!(server.span.name, "gormic.om.v1.InvoiceService/CloseInvoice");
    assert_eq!(server.string("rpc.system"), Some("grpc"));
    assert_eq!(
        server.string("rpc.service"),
        Some("gormic.om.v1.InvoiceService")
    );
    assert_eq!(server.string("rpc.method"), Some("CloseInvoice"));
    assert_eq!(server.int("rpc.grpc.status_code"), Some(9));
    assert_eq!(server.string("error.type"), Some("FAILED_PRECONDITION"));
    assert_eq!(server.string("error.code"), Some("ORDER_CLOSED"));
    // A caller's error, not the server's: the status stays unset.
    let server_status = server.span.status.clone().unwrap_or_default();
    assert_eq!(server_status.code, StatusCode::Unset as i32);
    assert_eq!(server.span.trace_state, "rojo=00f067aa0ba902b7");
    assert_eq!(server.service_name.as_deref(), Some("gateway-under-test"));

    assert_eq!(client.trace_id_hex(), CALLER_TRACE);
    assert_eq!(client.parent_span_id_hex(), server.span_id_hex());
    assert_eq!(client.span.name, format!("PATCH {CLOSE_TEMPLATE}"));
    assert_eq!(client.string("http.request.method"), Some("PATCH"));
    assert_eq!(client.string("url.template"), Some(CLOSE_TEMPLATE));
    assert_eq!(client.string("server.address"), Some("gormic.example"));
    assert_eq!(client.int("server.port"), Some(8443));
    assert_eq!(client.int("http.response.status_code"), Some(400));
    assert_eq!(client.string("error.code"), Some("ORDER_CLOSED"));
    assert_eq!(client.string("error.type"), Some("400"));
    let client_status = client.span.status.clone().unwrap_or_default();
    assert_eq!(client_status.code, StatusCode::Error as i32);

    // Upstream sees the same trace, with the client span as its parent.
    assert_eq!(
        sent.to_str().expect("ascii"),
        format!("00-{CALLER_TRACE}-{}-01", client.span_id_hex())
    );
    assert_eq!(
        sent_state.as_ref().map(|v| v.as_bytes()),
        Some(&b"rojo=00f067aa0ba902b7"[..])
    );
    tokio::task::spawn_blocking(move || tracer.shutdown())
        .await
        .expect("shutdown task")
        .expect("shutdown");
}

#[tokio::test]
async fn a_call_without_traceparent_starts_a_new_trace() {
    let receiver = OtlpReceiver::start().await;
    let tracer = exporting_to(&receiver);

    let call = tracer.start_call(&TraceContext::root(), "CreateInvoice");
    let trace_id = call.trace_id().to_string();
    assert_ne!(trace_id, CALLER_TRACE);
    let upstream = call.upstream(&http::Method::POST, "/v1/om/invoices");
    let sent = TraceParent::parse(upstream.traceparent().as_bytes()).expect("valid traceparent");
    assert!(upstream.tracestate().is_none());
    upstream.end(None, Some("timeout"), None);
    call.end(tonic::Code::Unavailable, Some("UPSTREAM_TIMEOUT"));
    flush(&tracer).await;

    let spans = receiver.wait_for(2).await;
    let server = one(&spans, SpanKind::Server);
    let client = one(&spans, SpanKind::Client);
    assert_eq!(server.trace_id_hex(), trace_id);
    assert!(server.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(server.int("rpc.grpc.status_code"), Some(14));
    let server_status = server.span.status.clone().unwrap_or_default();
    assert_eq!(server_status.code, StatusCode::Error as i32);
    assert_eq!(server_status.message, "UNAVAILABLE");

    assert_eq!(client.trace_id_hex(), trace_id);
    assert_eq!(client.parent_span_id_hex(), server.span_id_hex());
    assert_eq!(client.string("error.type"), Some("timeout"));
    assert_eq!(client.int("http.response.status_code"), None);
    assert_eq!(sent.trace_id.to_string(), trace_id);
    assert_eq!(sent.parent_id.to_string(), client.span_id_hex());
    assert!(sent.sampled());
}

#[tokio::test]
async fn cancelled_calls_end_their_spans() {
    let receiver = OtlpReceiver::start().await;
    let tracer = exporting_to(&receiver);

    let call = tracer.start_call(&incoming(&traceparent("01"), None), "SendInvoice");
    let upstream = call.upstream(&http::Method::POST, "/v1/om/invoices/{invoice_id}/send");
    // The caller went away: the call's future, and these with it, are dropped.
    drop(upstream);
    drop(call);
    flush(&tracer).await;

    let spans = receiver.wait_for(2).await;
    let server = one(&spans, SpanKind::Server);
    let client = one(&spans, SpanKind::Client);
    assert_eq!(server.int("rpc.grpc.status_code"), Some(1));
    assert_eq!(server.string("error.type"), Some("CANCELLED"));
    assert_eq!(client.string("error.type"), Some("cancelled"));
}

#[tokio::test]
async fn an_unsampled_caller_is_not_exported_but_its_trace_flows_upstream() {
    let receiver = OtlpReceiver::start().await;
    let tracer = exporting_to(&receiver);

    let unsampled = tracer.start_call(&incoming(&traceparent("00"), None), "DeleteInvoice");
    assert!(!unsampled.is_recording());
    let upstream = unsampled.upstream(&http::Method::DELETE, "/v1/om/invoices/{invoice_id}");
    let sent = TraceParent::parse(upstream.traceparent().as_bytes()).expect("valid");
    assert_eq!(sent.trace_id.to_string(), CALLER_TRACE);
    assert!(!sent.sampled());
    upstream.end(Some(200), None, None);
    unsampled.end(tonic::Code::Ok, None);

    // A sampled call after it: once its span arrives, the unsampled one
    // would have arrived too, had it been exported.
    let marker = tracer.start_call(&TraceContext::root(), "DeleteInvoice");
    let marker_trace = marker.trace_id().to_string();
    marker.end(tonic::Code::Ok, None);
    flush(&tracer).await;

    let spans = receiver.wait_for(1).await;
    let traces: Vec<String> = spans.iter().map(ReceivedSpan::trace_id_hex).collect();
    assert_eq!(traces, vec![marker_trace]);
}

#[tokio::test]
async fn nothing_is_exported_when_export_is_off() {
    let receiver = OtlpReceiver::start().await;
    // The standard variables point at the receiver, but OTEL_SDK_DISABLED
    // turns export off.
    let endpoint = receiver.endpoint.clone();
    let config = TraceArgs::default()
        .resolve_with(|name| match name {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.clone()),
            "OTEL_SDK_DISABLED" => Some("true".into()),
            _ => None,
        })
        .expect("valid");
    assert_eq!(config.endpoint, None);
    let off = Tracer::start(&config, "gormic.example", 443).expect("disabled tracer");
    assert!(!off.is_exporting());

    let call = off.start_call(&incoming(&traceparent("01"), None), "CloseInvoice");
    assert!(!call.is_recording());
    let upstream = call.upstream(&http::Method::PATCH, CLOSE_TEMPLATE);
    let sent = TraceParent::parse(upstream.traceparent().as_bytes()).expect("valid");
    assert_eq!(sent.trace_id.to_string(), CALLER_TRACE);
    assert_ne!(sent.parent_id.to_string(), CALLER_SPAN);
    upstream.end(Some(200), None, None);
    call.end(tonic::Code::Ok, None);
    off.force_flush().expect("no-op");

    // The same receiver, exporting on: only this marker arrives.
    let on = exporting_to(&receiver);
    let marker = on.start_call(&TraceContext::root(), "CloseInvoice");
    let marker_trace = marker.trace_id().to_string();
    marker.end(tonic::Code::Ok, None);
    flush(&on).await;
    let spans = receiver.wait_for(1).await;
    let traces: Vec<String> = spans.iter().map(ReceivedSpan::trace_id_hex).collect();
    assert_eq!(traces, vec![marker_trace]);
}

/// The gateway runs one current-thread runtime per worker plus a main one:
/// export must not depend on any of them. The tracer is built inside a
/// runtime that is then dropped, spans start and end on plain threads, and
/// `shutdown` alone (no flush) delivers them.
#[tokio::test]
async fn export_outlives_the_runtime_that_built_it_and_shutdown_flushes() {
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint.clone();
    let handle = std::thread::spawn(move || {
        let built_in = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let tracer = built_in.block_on(async {
            let args = TraceArgs {
                otlp_endpoint: Some(endpoint),
                ..TraceArgs::default()
            };
            let config = args.resolve_with(|_| None).expect("valid");
            Tracer::start(&config, "gormic.example", 443).expect("exporter")
        });
        drop(built_in);

        let workers: Vec<_> = ["CreateInvoice", "UpdateInvoice"]
            .into_iter()
            .map(|rpc| {
                let tracer = tracer.clone();
                std::thread::spawn(move || {
                    let call = tracer.start_call(&TraceContext::root(), rpc);
                    let trace = call.trace_id().to_string();
                    call.end(tonic::Code::Ok, None);
                    trace
                })
            })
            .collect();
        let mut traces: Vec<String> = workers
            .into_iter()
            .map(|w| w.join().expect("worker thread"))
            .collect();
        tracer.shutdown().expect("shutdown flushes");
        // After shutdown, spans are dropped, not exported.
        tracer
            .start_call(&TraceContext::root(), "CloseInvoice")
            .end(tonic::Code::Ok, None);
        traces.sort();
        traces
    });
    let expected = tokio::task::spawn_blocking(move || handle.join().expect("tracer thread"))
        .await
        .expect("join");

    let spans = receiver.wait_for(2).await;
    let mut traces: Vec<String> = spans.iter().map(ReceivedSpan::trace_id_hex).collect();
    traces.sort();
    assert_eq!(traces, expected);
    assert!(
        spans
            .iter()
            .all(|s| s.service_name.as_deref() == Some("gormic-gateway"))
    );
}

#[tokio::test]
async fn an_unreachable_collector_is_reported_in_the_log() {
    let logs = crate::support::logs();
    // A port nobody listens on any more: connections are refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let args = TraceArgs {
        otlp_endpoint: Some(endpoint.clone()),
        otlp_timeout: Some(std::time::Duration::from_millis(200)),
        ..TraceArgs::default()
    };
    let config = args.resolve_with(|_| None).expect("valid");
    let tracer = Tracer::start(&config, "gormic.example", 443).expect("starts without connecting");
    tracer
        .start_call(&TraceContext::root(), "CreateInvoice")
        .end(tonic::Code::Ok, None);

    let flushed = {
        let tracer = tracer.clone();
        tokio::task::spawn_blocking(move || tracer.force_flush())
            .await
            .expect("flush task")
    };
    let error = flushed.expect_err("nothing listens there").to_string();
    assert!(
        error.starts_with("flushing spans to the OTLP collector failed"),
        "{error}"
    );
    let warning = logs
        .text()
        .lines()
        .find(|l| l.contains(&format!("\"endpoint\":\"{endpoint}/\"")))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no warning naming {endpoint} in the log"));
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(warning.contains("\"lost_spans\":1"), "{warning}");
    assert!(warning.contains("OTLP span export failed"), "{warning}");
    tokio::task::spawn_blocking(move || tracer.shutdown())
        .await
        .expect("shutdown task")
        .expect("nothing is left to send");
}
