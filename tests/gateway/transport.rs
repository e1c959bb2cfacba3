//! Faults between the gateway and the upstream: refused connections,
//! timeouts, caller deadlines and cancellations, redirects, and concurrency.

use std::time::{Duration, Instant};

use tonic::Code;

use gormic_gateway::errors::GATEWAY_DOMAIN;

use gormic_gateway::deadline::DeadlineArgs;

use crate::support::{
    FakeUpstream, Scripted, TestGateway, authed, close, closed, error_info, spawn_app,
};

#[tokio::test]
async fn an_upstream_that_refuses_connections_is_unavailable() {
    // A port bound but not listening: connections are refused.
    let unreachable = FakeUpstream::reserve();
    let mut gateway = TestGateway::builder(&unreachable.url()).start().await;
    let status = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable);
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert!(!info.metadata.contains_key("http_status"));
    assert_eq!(
        info.metadata["request_sent"], "false",
        "refused: safe to retry"
    );
    assert!(
        status.message().starts_with("upstream unreachable"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn an_unresolvable_upstream_host_is_unavailable() {
    let mut gateway = TestGateway::builder("http://upstream.invalid")
        .start()
        .await;
    let status = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_slow_upstream_hits_the_upstream_timeout_and_the_request_is_dropped() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()).delayed(Duration::from_secs(30)));
    let mut gateway = TestGateway::builder(&upstream.url())
        .upstream_timeout(Duration::from_millis(200))
        .start()
        .await;

    let started = Instant::now();
    let status = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect_err("times out");
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded);
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_TIMEOUT");
    assert_eq!(info.metadata["bound"], "upstream_timeout");
    assert_eq!(info.metadata["timeout_ms"], "200");
    assert!(
        status.message().contains("--upstream-timeout"),
        "{}",
        status.message()
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "answered promptly, not after the upstream: {elapsed:?}"
    );
    // The gateway dropped its request: the upstream sees the connection go.
    upstream.wait_for_abandoned(1).await;
}

#[tokio::test]
async fn the_callers_deadline_bounds_the_upstream_call() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()).delayed(Duration::from_secs(30)));
    // A 500 ms margin (the default 100 ms is unit-tested in deadline.rs):
    // the gateway's answer must beat the client's own timer even on a
    // loaded machine.
    let mut gateway = TestGateway::builder(&upstream.url())
        .deadlines(DeadlineArgs {
            deadline_margin: Duration::from_millis(500),
            ..Default::default()
        })
        .start()
        .await;

    let mut request = authed(close());
    request.set_timeout(Duration::from_secs(5));
    let started = Instant::now();
    let status = gateway
        .client
        .close_invoice(request)
        .await
        .expect_err("deadline");
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_TIMEOUT");
    assert_eq!(info.metadata["bound"], "caller_deadline");
    // 5 s less the 500 ms margin that lets this answer beat the client's timer.
    assert_eq!(info.metadata["timeout_ms"], "4500");
    assert!(
        elapsed < Duration::from_secs(5),
        "answered before the caller's deadline: {elapsed:?}"
    );
    upstream.wait_for_abandoned(1).await;
}

#[tokio::test]
async fn a_generous_caller_deadline_does_not_get_in_the_way() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(closed()));
    let mut request = authed(close());
    request.set_timeout(Duration::from_secs(30));
    let response = gateway.client.close_invoice(request).await.expect("ok");
    assert_eq!(response.into_inner().invoice_number, 1);
}

#[tokio::test]
async fn a_cancelled_call_cancels_its_upstream_request() {
    let (upstream, gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(closed()).delayed(Duration::from_secs(30)));
    let mut client = gateway.client.clone();
    let call = tokio::spawn(async move { client.close_invoice(authed(close())).await });
    upstream.wait_for_requests(1).await;
    call.abort(); // the client drops the call: an HTTP/2 RST_STREAM reaches the gateway
    upstream.wait_for_abandoned(1).await;
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = FakeUpstream::start().await;
    elsewhere.respond(Scripted::ok(closed()));
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::raw(307, "").header(
        "location",
        &format!("{}/v1/om/invoices/inv-1/close", elsewhere.url()),
    ));

    let status = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect_err("not followed");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(error_info(&status).metadata["http_status"], "307");
    assert!(
        elsewhere.requests().is_empty(),
        "the api-key must not travel to another host"
    );
}

#[tokio::test]
async fn two_hundred_concurrent_calls_run_at_once() {
    let (upstream, gateway) = spawn_app().await;
    let delay = Duration::from_millis(200);
    upstream.respond(Scripted::ok(closed()).delayed(delay));

    let started = Instant::now();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let mut client = gateway.client.clone();
            tokio::spawn(async move { client.close_invoice(authed(close())).await })
        })
        .collect();
    for call in calls {
        let response = call.await.expect("task").expect("call succeeds");
        assert_eq!(response.into_inner().invoice_number, 1);
    }
    let elapsed = started.elapsed();

    assert_eq!(upstream.requests().len(), 200);
    // One after the other would take 40 s; the bound leaves room for a
    // loaded CI machine while still proving the calls overlap.
    assert!(
        elapsed < delay + Duration::from_secs(10),
        "200 calls took {elapsed:?}"
    );
}

#[tokio::test]
async fn a_connection_dropped_after_the_request_is_unavailable_and_says_it_was_sent() {
    use tokio::io::AsyncReadExt;
    // An "upstream" that reads the request and hangs up without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buffer = [0u8; 4096];
            let _ = socket.read(&mut buffer).await;
            drop(socket);
        }
    });
    let mut gateway = TestGateway::builder(&format!("http://{addr}"))
        .start()
        .await;
    let status = gateway
        .client
        .close_invoice(authed(close()))
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert_eq!(
        info.metadata["request_sent"], "true",
        "the upstream may have acted on it"
    );
}
