//! OTLP export through the gateway: each call's server span continues the
//! caller's, each upstream attempt is a client span named by its route
//! template, and the `traceparent` the upstream saw names that client span.

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tonic::Code;

use gormic_gateway::metrics::Metrics;
use gormic_gateway::trace::{TraceArgs, Tracer};

use super::trace::{CALLER_SPAN, CALLER_TRACESTATE, request, traced, traceparent_parts};
use super::{CLOSE, SERVICE, UPDATE, close, closed, observed_gateway, update};
use crate::support::otlp::{OtlpReceiver, ReceivedSpan};
use crate::support::{FakeUpstream, Scripted, authed, error_info};

const CLOSE_TEMPLATE: &str = "/v1/om/invoices/{invoice_id}/close";
const UPDATE_TEMPLATE: &str = "/v1/om/invoices/{invoice_id}";

/// A tracer exporting to `receiver`, configured as the command line would,
/// naming `upstream` as the server of its client spans (as `main` does).
fn exporting_to(receiver: &OtlpReceiver, upstream: &FakeUpstream) -> Tracer {
    let args = TraceArgs {
        otlp_endpoint: Some(receiver.endpoint.clone()),
        otel_service_name: Some("gateway-e2e".into()),
        ..TraceArgs::default()
    };
    let config = args.resolve_with(|_| None).expect("valid trace config");
    let tracer =
        Tracer::start(&config, "127.0.0.1", upstream.addr().port()).expect("exporter starts");
    assert!(tracer.is_exporting());
    tracer
}

/// Exports the ended spans now; blocking, so off the test's runtime (which
/// also runs the receiver).
async fn flush(tracer: &Tracer) {
    let tracer = tracer.clone();
    tokio::task::spawn_blocking(move || tracer.force_flush())
        .await
        .expect("flush task")
        .expect("flush");
}

/// The spans of one trace, server span first, client spans in start order.
fn trace_of(spans: &[ReceivedSpan], trace_id: &str) -> (ReceivedSpan, Vec<ReceivedSpan>) {
    let of_trace: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id_hex() == trace_id)
        .cloned()
        .collect();
    let servers: Vec<_> = of_trace
        .iter()
        .filter(|s| s.span.kind == SpanKind::Server as i32)
        .cloned()
        .collect();
    assert_eq!(servers.len(), 1, "one server span in {of_trace:#?}");
    let mut clients: Vec<_> = of_trace
        .into_iter()
        .filter(|s| s.span.kind == SpanKind::Client as i32)
        .collect();
    clients.sort_by_key(|s| s.span.start_time_unix_nano);
    (servers[0].clone(), clients)
}

#[tokio::test]
async fn each_call_exports_a_server_span_and_a_client_span_per_upstream_attempt() {
    let receiver = OtlpReceiver::start().await;
    let upstream = FakeUpstream::start().await;
    let tracer = exporting_to(&receiver, &upstream);
    let mut gateway = observed_gateway(&upstream, &Metrics::default(), tracer.clone(), 10).await;
    let port = i64::from(upstream.addr().port());

    // A functional error, then a retried update ending in another one, then
    // a success without a caller trace.
    upstream.respond_in_order(vec![
        Scripted::code("ALREADY_CLOSED"),
        Scripted::raw(502, "bad gateway"),
        Scripted::code("NoChanges"),
        Scripted::ok(closed()),
    ]);
    let first_trace = "11111111111111111111111111111111";
    let second_trace = "22222222222222222222222222222222";
    let invoice_id = "inv-otlp-raw-4471";
    let status = gateway
        .client
        .close_invoice(request(
            close(invoice_id),
            &traced("obs-otlp-1", &format!("00-{first_trace}-{CALLER_SPAN}-01")),
        ))
        .await
        .expect_err("ALREADY_CLOSED");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = gateway
        .client
        .update_invoice(request(
            update(invoice_id),
            &traced("obs-otlp-2", &format!("00-{second_trace}-{CALLER_SPAN}-01")),
        ))
        .await
        .expect_err("NoChanges after a retry");
    assert_eq!(error_info(&status).reason, "NO_CHANGES");
    gateway
        .client
        .close_invoice(authed(close(invoice_id)))
        .await
        .expect("success");
    flush(&tracer).await;

    let spans = receiver.wait_for(7).await;
    assert_eq!(spans.len(), 7, "3 server spans, 4 client spans: {spans:#?}");
    let seen: Vec<(String, String)> = upstream
        .requests()
        .iter()
        .map(|r| {
            let (trace, parent, _) =
                traceparent_parts(r.header("traceparent").expect("traceparent"));
            (trace, parent)
        })
        .collect();
    for span in &spans {
        assert!(
            !format!("{:?}", span.span).contains(invoice_id),
            "the raw invoice id reached a span: {span:#?}"
        );
        assert_eq!(span.service_name.as_deref(), Some("gateway-e2e"));
    }

    // The functional error.
    let (server, clients) = trace_of(&spans, first_trace);
    assert_eq!(server.span.name, format!("{SERVICE}/{CLOSE}"));
    assert_eq!(server.parent_span_id_hex(), CALLER_SPAN);
    assert_eq!(server.string("rpc.method"), Some(CLOSE));
    assert_eq!(server.string("rpc.service"), Some(SERVICE));
    assert_eq!(server.int("rpc.grpc.status_code"), Some(9));
    assert_eq!(server.string("error.code"), Some("ALREADY_CLOSED"));
    assert_eq!(server.span.trace_state, CALLER_TRACESTATE);
    assert_eq!(clients.len(), 1);
    let client = &clients[0];
    assert_eq!(client.parent_span_id_hex(), server.span_id_hex());
    assert_eq!(client.span.name, format!("PATCH {CLOSE_TEMPLATE}"));
    assert_eq!(client.string("http.request.method"), Some("PATCH"));
    assert_eq!(client.string("url.template"), Some(CLOSE_TEMPLATE));
    assert_eq!(client.int("http.response.status_code"), Some(400));
    assert_eq!(client.string("error.code"), Some("ALREADY_CLOSED"));
    assert_eq!(client.string("server.address"), Some("127.0.0.1"));
    assert_eq!(client.int("server.port"), Some(port));
    assert_eq!(
        seen[0],
        (first_trace.to_owned(), client.span_id_hex()),
        "the upstream's parent is the client span"
    );

    // The retried update: one client span per attempt; the server span's
    // error.code is the ErrorInfo reason, the client's the upstream code.
    let (server, clients) = trace_of(&spans, second_trace);
    assert_eq!(server.span.name, format!("{SERVICE}/{UPDATE}"));
    assert_eq!(server.parent_span_id_hex(), CALLER_SPAN);
    assert_eq!(server.int("rpc.grpc.status_code"), Some(9));
    assert_eq!(server.string("error.code"), Some("NO_CHANGES"));
    assert_eq!(clients.len(), 2, "{clients:#?}");
    for client in &clients {
        assert_eq!(client.parent_span_id_hex(), server.span_id_hex());
        assert_eq!(client.string("http.request.method"), Some("PATCH"));
        assert_eq!(client.string("url.template"), Some(UPDATE_TEMPLATE));
    }
    assert_eq!(clients[0].int("http.response.status_code"), Some(502));
    assert_eq!(clients[0].string("error.code"), None);
    assert_eq!(clients[1].int("http.response.status_code"), Some(400));
    assert_eq!(clients[1].string("error.code"), Some("NoChanges"));
    assert_eq!(
        seen[1..3],
        [
            (second_trace.to_owned(), clients[0].span_id_hex()),
            (second_trace.to_owned(), clients[1].span_id_hex()),
        ]
    );

    // The success started its own trace.
    let fresh_trace = seen[3].0.as_str();
    assert_ne!(fresh_trace, first_trace);
    let (server, clients) = trace_of(&spans, fresh_trace);
    assert!(server.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(server.int("rpc.grpc.status_code"), Some(0));
    assert_eq!(server.string("error.code"), None);
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].int("http.response.status_code"), Some(200));
    assert_eq!(clients[0].string("error.code"), None);
    assert_eq!(seen[3].1, clients[0].span_id_hex());

    tokio::task::spawn_blocking(move || tracer.shutdown())
        .await
        .expect("shutdown task")
        .expect("shutdown");
}
