//! Hard limits: calls past the in-flight cap are shed, the upstream
//! connection cap and its queue hold, oversized messages and header lists
//! are refused, and none of those reaches the upstream.

use std::time::Duration;

use serde_json::json;
use tonic::Code;

use gormic_gateway::errors::GATEWAY_DOMAIN;
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::server::{ConnectionLimits, ServerOptions};
use gormic_gateway::upstream::UpstreamOptions;

use crate::support::{
    FakeUpstream, Scripted, TestGateway, authed, close, closed, details, error_info, logs,
    retry_delay, spawn_app, until, with_metadata,
};

/// An answer that takes longer than any test.
fn held() -> Scripted {
    Scripted::ok(closed()).delayed(Duration::from_secs(60))
}

#[tokio::test]
async fn calls_past_the_in_flight_cap_are_shed_at_once_and_never_forwarded() {
    let logs = logs();
    let upstream = FakeUpstream::start().await;
    let mut script = vec![Scripted::ok(closed())];
    script.extend(vec![held(); 3]);
    script.push(Scripted::ok(closed()));
    upstream.respond_in_order(script);
    let mut gateway = TestGateway::builder(&upstream.url())
        .max_in_flight(3)
        .start()
        .await;
    // One tenant alone may hold all but the reserve of the cap (one call
    // here: docs/tenants.md): the cap is reached by two. Gormic accepts
    // org-1 once, so that it is a tenant of its own; org-2, never
    // accepted, is the unverified organizations' one tenant.
    gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect("org-1 accepted");

    let mut holding = Vec::new();
    for (n, organization) in ["org-1", "org-1", "org-2"].into_iter().enumerate() {
        let mut client = gateway.client.clone();
        let request = with_metadata(
            close(),
            &[("api-key", "k"), ("organization-id", organization)],
        );
        holding.push(tokio::spawn(
            async move { client.close_invoice(request).await },
        ));
        // In this order: org-2 comes last, once org-1 holds its share.
        upstream.wait_for_requests(2 + n).await;
    }

    for n in 0..5 {
        let request_id = format!("shed-probe-{n}");
        let request = with_metadata(
            close(),
            &[
                ("api-key", "k"),
                ("organization-id", "org-1"),
                ("x-request-id", &request_id),
            ],
        );
        let status = gateway
            .client
            .close_invoice(request)
            .await
            .expect_err("shed");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let info = error_info(&status);
        assert_eq!(info.reason, "OVERLOADED");
        assert_eq!(info.domain, GATEWAY_DOMAIN);
        assert_eq!(info.metadata["max_in_flight"], "3");
        assert_eq!(retry_delay(&status), Duration::from_secs(1));
    }
    assert_eq!(
        upstream.requests().len(),
        4,
        "shed calls never reach the upstream"
    );

    // Logged once a second in all, never one line each: the lines of this
    // gateway (max_in_flight 3) add up to the five shed calls.
    let shed_logged = || -> u64 {
        logs.text()
            .lines()
            .filter(|l| {
                l.contains("overloaded: refused calls") && l.contains("\"max_in_flight\":3")
            })
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|line| line["shed"].as_u64())
            .sum()
    };
    // The second line comes from the once-a-second flush.
    until(
        "the summary lines to count five shed calls",
        Duration::from_secs(10),
        async || shed_logged(),
        |shed| *shed >= 5,
    )
    .every(Duration::from_millis(100))
    .await;
    assert_eq!(
        shed_logged(),
        5,
        "the summary lines count every shed call once"
    );
    assert!(
        !logs.text().contains("shed-probe-"),
        "a shed call writes no line of its own"
    );

    // The held calls go away; their places are free again.
    for call in &holding {
        call.abort();
    }
    upstream.wait_for_abandoned(3).await;
    let response = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect("admitted again");
    assert_eq!(response.into_inner().invoice_number, 1);
    assert_eq!(upstream.requests().len(), 5);
}

#[tokio::test]
async fn the_upstream_connection_cap_holds_under_a_burst() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()).delayed(Duration::from_millis(50)));
    let gateway = TestGateway::builder(&upstream.url())
        .upstream(UpstreamOptions {
            max_connections: 4,
            ..Default::default()
        })
        .start()
        .await;

    let calls: Vec<_> = (0..60)
        .map(|_| {
            let mut client = gateway.client.clone();
            tokio::spawn(async move { client.close_invoice(authed(close())).await })
        })
        .collect();
    for call in calls {
        let response = call.await.expect("task").expect("queued calls succeed");
        assert_eq!(response.into_inner().invoice_number, 1);
    }
    let connections = upstream.connections();
    assert_eq!(upstream.requests().len(), 60);
    assert!(
        connections.max_open <= 4,
        "never more than 4 upstream connections: {connections:?}"
    );
    assert!(
        connections.accepted <= 4,
        "the queue reuses connections instead of opening new ones: {connections:?}"
    );
}

#[tokio::test]
async fn a_full_connection_queue_refuses_at_once() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(held());
    let mut gateway = TestGateway::builder(&upstream.url())
        .upstream(UpstreamOptions {
            max_connections: 1,
            max_pending: 0,
            ..Default::default()
        })
        .start()
        .await;
    let mut client = gateway.client.clone();
    let holding = tokio::spawn(async move { client.close_invoice(authed(close())).await });
    upstream.wait_for_requests(1).await;

    let status = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect_err("no connection and no queue");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_info(&status).reason, "UPSTREAM_QUEUE_FULL");
    assert!(details(&status).retry_info().is_some(), "RetryInfo");
    assert_eq!(upstream.requests().len(), 1);
    holding.abort();
}

#[tokio::test]
async fn a_call_that_gets_no_connection_within_its_deadline_says_nothing_was_sent() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(held());
    let mut gateway = TestGateway::builder(&upstream.url())
        .upstream(UpstreamOptions {
            max_connections: 1,
            ..Default::default()
        })
        .start()
        .await;
    let mut client = gateway.client.clone();
    let holding = tokio::spawn(async move { client.close_invoice(authed(close())).await });
    upstream.wait_for_requests(1).await;

    let mut request = authed(close());
    request.set_timeout(Duration::from_millis(500));
    let status = gateway
        .client
        .close_invoice(request)
        .await
        .expect_err("queued past its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_CONNECTION_TIMEOUT");
    assert_eq!(info.metadata["request_sent"], "false");
    assert_eq!(info.metadata["bound"], "caller_deadline");
    assert_eq!(
        upstream.requests().len(),
        1,
        "the queued call was never sent"
    );
    holding.abort();
}

#[tokio::test]
async fn an_oversized_request_message_is_resource_exhausted_and_never_forwarded() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-9"})));
    let mut gateway = TestGateway::builder(&upstream.url())
        .server(ServerOptions {
            limits: ConnectionLimits {
                max_request_bytes: 1024,
                ..Default::default()
            },
            ..Default::default()
        })
        .start()
        .await;
    let create = |order_id: String| pb::CreateInvoiceRequest {
        order_id,
        ..Default::default()
    };

    let status = gateway
        .client
        .create_invoice(authed(create("o".repeat(2000))))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "REQUEST_TOO_LARGE");
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    // Field tag, two length bytes, 2000 bytes of id.
    assert_eq!(info.metadata["size"], "2003");
    assert_eq!(info.metadata["limit"], "1024");
    assert!(upstream.requests().is_empty(), "nothing sent upstream");

    // Just under the limit goes through, on the same connection.
    let response = gateway
        .client
        .create_invoice(authed(create("o".repeat(1000))))
        .await
        .expect("within the limit");
    assert_eq!(response.into_inner().id, "inv-9");
    assert_eq!(
        upstream.only_request().json()["params"]["orderId"]
            .as_str()
            .map(str::len),
        Some(1000)
    );
}

#[tokio::test]
async fn an_oversized_header_list_is_refused_without_harming_other_calls() {
    let (upstream, gateway) = spawn_app().await;
    upstream.respond_in_order(vec![
        Scripted::ok(closed()).delayed(Duration::from_millis(300)),
        Scripted::ok(closed()),
    ]);
    // One HTTP/2 connection carries all three calls.
    let mut slow_client = gateway.client.clone();
    let slow = tokio::spawn(async move { slow_client.close_invoice(authed(close())).await });
    upstream.wait_for_requests(1).await;

    let big = "b".repeat(20 * 1024); // over the 16 KiB default, under h2's 4x abuse bound
    let request = with_metadata(
        close(),
        &[
            ("api-key", "k"),
            ("organization-id", "org-1"),
            ("x-big", &big),
        ],
    );
    let mut client = gateway.client.clone();
    let status = client.close_invoice(request).await.expect_err("refused");
    // HTTP/2 refuses the stream with status 431 before any gRPC processing;
    // gRPC clients map an HTTP status without grpc-status to UNKNOWN.
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(status.message().contains("431"), "{status:?}");

    let response = slow
        .await
        .expect("task")
        .expect("the call in flight is unharmed");
    assert_eq!(response.into_inner().invoice_number, 1);
    let response = client
        .close_invoice(authed(close()))
        .await
        .expect("the connection still serves");
    assert_eq!(response.into_inner().invoice_number, 1);
    assert_eq!(
        upstream.requests().len(),
        2,
        "the refused call never reached the upstream"
    );
}

#[tokio::test]
async fn every_answer_carries_the_request_id_generated_or_given() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(closed()));
    let response = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect("ok");
    let generated = response
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id in the response")
        .to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert_eq!(
        upstream.only_request().header("x-request-id"),
        Some(generated.as_str()),
        "the same id went upstream"
    );

    upstream.respond(Scripted::code("ALREADY_CLOSED"));
    let request = with_metadata(
        close(),
        &[
            ("api-key", "k"),
            ("organization-id", "org-1"),
            ("x-request-id", "mine-42"),
        ],
    );
    let status = gateway
        .client
        .close_invoice(request)
        .await
        .expect_err("refused");
    assert_eq!(
        status
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("mine-42")
    );
    assert_eq!(
        upstream.requests()[1].header("x-request-id"),
        Some("mine-42")
    );
}
