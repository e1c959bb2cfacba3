//! W3C trace context continued upstream: the caller's trace id under the
//! gateway's own span id (one per attempt), `tracestate` unchanged, a fresh
//! trace without one, and the trace id on the call's log line.

use serde_json::json;

use gormic_gateway::metrics::Metrics;
use gormic_gateway::trace::Tracer;

use super::{call_line, close, closed, observed_gateway, update};
use crate::support::{API_KEY, FakeUpstream, ORGANIZATION, Scripted, logs, with_metadata};

/// The W3C specification's example.
pub(super) const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
pub(super) const CALLER_SPAN: &str = "b7ad6b7169203331";
pub(super) const CALLER_TRACESTATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

/// `(trace id, parent span id, flags)` of a `traceparent`, checked against
/// the W3C format (version 00, lowercase hex, ids not all zero).
pub(super) fn traceparent_parts(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
    };
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
            && parts[1] != "0".repeat(32)
            && parts[2] != "0".repeat(16),
        "not a valid traceparent: {value:?}"
    );
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// An authenticated caller's metadata with its request id, `traceparent`
/// and [`CALLER_TRACESTATE`].
pub(super) fn traced(request_id: &'static str, traceparent: &str) -> Vec<(&'static str, String)> {
    vec![
        ("api-key", API_KEY.to_owned()),
        ("organization-id", ORGANIZATION.to_owned()),
        ("x-request-id", request_id.to_owned()),
        ("traceparent", traceparent.to_owned()),
        ("tracestate", CALLER_TRACESTATE.to_owned()),
    ]
}

/// A request with exactly these metadata entries (owned values).
pub(super) fn request<T>(message: T, entries: &[(&'static str, String)]) -> tonic::Request<T> {
    let entries: Vec<(&'static str, &str)> =
        entries.iter().map(|(k, v)| (*k, v.as_str())).collect();
    with_metadata(message, &entries)
}

#[tokio::test]
async fn the_callers_trace_continues_upstream_under_a_new_parent_and_on_the_log_line() {
    let logs = logs();
    let upstream = FakeUpstream::start().await;
    let mut gateway =
        observed_gateway(&upstream, &Metrics::default(), Tracer::disabled(), 10).await;
    upstream.respond(Scripted::ok(closed()));

    let incoming = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    gateway
        .client
        .close_invoice(request(close("inv-1"), &traced("obs-trace-1", &incoming)))
        .await
        .expect("success");
    let sent = upstream.only_request();
    let (trace, parent, flags) =
        traceparent_parts(sent.header("traceparent").expect("traceparent"));
    assert_eq!(trace, CALLER_TRACE, "the caller's trace");
    assert_ne!(parent, CALLER_SPAN, "the gateway's own span is the parent");
    assert_eq!(flags, "01", "the caller's sampling decision");
    assert_eq!(sent.header("tracestate"), Some(CALLER_TRACESTATE));
    assert_eq!(
        call_line(&logs, "obs-trace-1").await["trace_id"],
        CALLER_TRACE
    );

    // Without a traceparent: a fresh trace per call, on its log line too.
    for id in ["obs-trace-fresh-1", "obs-trace-fresh-2"] {
        gateway
            .client
            .close_invoice(with_metadata(
                close("inv-1"),
                &[
                    ("api-key", API_KEY),
                    ("organization-id", ORGANIZATION),
                    ("x-request-id", id),
                ],
            ))
            .await
            .expect("success");
    }
    let requests = upstream.requests();
    let fresh: Vec<_> = requests[1..]
        .iter()
        .map(|r| traceparent_parts(r.header("traceparent").expect("a traceparent anyway")))
        .collect();
    assert_ne!(fresh[0].0, CALLER_TRACE);
    assert_ne!(fresh[0].0, fresh[1].0, "a new trace per call");
    for (request, parts) in requests[1..].iter().zip(&fresh) {
        assert_eq!(request.header("tracestate"), None);
        let id = request.header("x-request-id").expect("request id");
        assert_eq!(call_line(&logs, id).await["trace_id"], parts.0.as_str());
    }
}

#[tokio::test]
async fn each_retried_attempt_carries_its_own_span_id_under_the_callers_trace() {
    let upstream = FakeUpstream::start().await;
    let mut gateway =
        observed_gateway(&upstream, &Metrics::default(), Tracer::disabled(), 10).await;
    upstream.respond_in_order(vec![
        Scripted::raw(503, "busy"),
        Scripted::raw(502, "bad gateway"),
        Scripted::ok(json!({"success": true})),
    ]);
    let incoming = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    gateway
        .client
        .update_invoice(request(update("inv-1"), &traced("obs-retry-1", &incoming)))
        .await
        .expect("the third attempt succeeds");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    let parents: Vec<String> = requests
        .iter()
        .map(|r| {
            let (trace, parent, _) =
                traceparent_parts(r.header("traceparent").expect("traceparent"));
            assert_eq!(trace, CALLER_TRACE);
            assert_eq!(r.header("tracestate"), Some(CALLER_TRACESTATE));
            parent
        })
        .collect();
    assert!(!parents.contains(&CALLER_SPAN.to_owned()), "{parents:?}");
    assert!(
        parents[0] != parents[1] && parents[1] != parents[2] && parents[0] != parents[2],
        "one span per attempt: {parents:?}"
    );
}
