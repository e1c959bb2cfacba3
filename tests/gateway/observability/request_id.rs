//! `x-request-id`: generated when absent (a UUID) or the caller's, sent
//! upstream, on the call's log line, and returned on success and on error.

use tonic::Code;

use gormic_gateway::metrics::Metrics;
use gormic_gateway::trace::Tracer;

use super::{CLOSE, call_line, close, closed, observed_gateway};
use crate::support::{API_KEY, FakeUpstream, ORGANIZATION, Scripted, authed, logs, with_metadata};

/// A version-4 UUID in its canonical lowercase form.
fn is_uuid_v4(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && groups
            .iter()
            .all(|g| g.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
        && groups[2].starts_with('4')
        && groups[3].starts_with(['8', '9', 'a', 'b'])
}

fn request_id_of(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id in the response metadata")
        .to_owned()
}

#[tokio::test]
async fn a_call_without_x_request_id_gets_a_uuid_returned_sent_upstream_and_logged() {
    let logs = logs();
    let upstream = FakeUpstream::start().await;
    let mut gateway =
        observed_gateway(&upstream, &Metrics::default(), Tracer::disabled(), 10).await;

    upstream.respond(Scripted::ok(closed()));
    let response = gateway
        .client
        .close_invoice(authed(close("inv-1")))
        .await
        .expect("success");
    let on_success = request_id_of(response.metadata());
    assert!(is_uuid_v4(&on_success), "{on_success}");

    upstream.respond(Scripted::code("ALREADY_CLOSED"));
    let status = gateway
        .client
        .close_invoice(authed(close("inv-1")))
        .await
        .expect_err("functional error");
    let on_error = request_id_of(status.metadata());
    assert!(is_uuid_v4(&on_error), "{on_error}");
    assert_ne!(on_success, on_error, "one id per call");

    // Refused by the gateway itself: no upstream request, still an id.
    let status = gateway
        .client
        .close_invoice(with_metadata(
            close("inv-1"),
            &[("organization-id", ORGANIZATION)],
        ))
        .await
        .expect_err("no api-key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let refused = request_id_of(status.metadata());
    assert!(is_uuid_v4(&refused), "{refused}");

    let sent: Vec<_> = upstream
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").map(str::to_owned))
        .collect();
    assert_eq!(sent, [Some(on_success.clone()), Some(on_error.clone())]);

    for (id, code) in [
        (&on_success, "OK"),
        (&on_error, "FAILED_PRECONDITION"),
        (&refused, "UNAUTHENTICATED"),
    ] {
        let line = call_line(&logs, id).await;
        assert_eq!(line["grpc_code"], code, "{line}");
        assert_eq!(line["rpc"], CLOSE, "{line}");
    }
}

#[tokio::test]
async fn the_callers_x_request_id_is_kept_sent_upstream_logged_and_echoed() {
    let logs = logs();
    let upstream = FakeUpstream::start().await;
    let mut gateway =
        observed_gateway(&upstream, &Metrics::default(), Tracer::disabled(), 10).await;
    let with_id = |id: &'static str| {
        with_metadata(
            close("inv-1"),
            &[
                ("api-key", API_KEY),
                ("organization-id", ORGANIZATION),
                ("x-request-id", id),
            ],
        )
    };

    upstream.respond(Scripted::ok(closed()));
    let response = gateway
        .client
        .close_invoice(with_id("obs-caller-ok-1"))
        .await
        .expect("success");
    assert_eq!(request_id_of(response.metadata()), "obs-caller-ok-1");

    upstream.respond(Scripted::code("ALREADY_CLOSED"));
    let status = gateway
        .client
        .close_invoice(with_id("obs-caller-error-1"))
        .await
        .expect_err("functional error");
    assert_eq!(request_id_of(status.metadata()), "obs-caller-error-1");

    let sent: Vec<_> = upstream
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").map(str::to_owned))
        .collect();
    assert_eq!(
        sent,
        [
            Some("obs-caller-ok-1".to_owned()),
            Some("obs-caller-error-1".to_owned())
        ]
    );
    assert_eq!(call_line(&logs, "obs-caller-ok-1").await["grpc_code"], "OK");
    assert_eq!(
        call_line(&logs, "obs-caller-error-1").await["grpc_code"],
        "FAILED_PRECONDITION"
    );
}
