//! The gateway's own retries: requests that never left are retried for any
//! operation; requests that went out only for update and delete, only on
//! 502/503/504 or a broken connection; `Retry-After` and the deadline win;
//! attempts are reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tonic::Code;

use gormic_gateway::proto::v1 as pb;

use crate::support::{
    FakeUpstream, Scripted, TestGateway, authed, error_info, retry_delay, spawn_app,
};

fn update() -> pb::UpdateInvoiceRequest {
    pb::UpdateInvoiceRequest {
        invoice_id: "inv-1".into(),
        order_id: "ord-1".into(),
        ..Default::default()
    }
}

fn create() -> pb::CreateInvoiceRequest {
    pb::CreateInvoiceRequest {
        order_id: "ord-1".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_update_answered_503_is_retried_and_succeeds() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond_in_order(vec![
        Scripted::raw(503, "busy"),
        Scripted::ok(json!({"success": true})),
    ]);
    let response = gateway
        .client
        .update_invoice(authed(update()))
        .await
        .expect("the retry succeeds");
    assert!(response.into_inner().success);
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_create_answered_503_is_never_sent_twice() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond_in_order(vec![
        Scripted::raw(503, "busy"),
        Scripted::ok(json!({"id": "inv-2"})),
    ]);
    let status = gateway
        .client
        .create_invoice(authed(create()))
        .await
        .expect_err("not retried");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(error_info(&status).metadata["attempts"], "1");
    assert_eq!(
        upstream.requests().len(),
        1,
        "a second create is a second invoice"
    );
}

#[tokio::test]
async fn a_request_that_never_left_is_retried_for_any_operation() {
    // A port bound but not listening: connections are refused.
    let unreachable = FakeUpstream::reserve();
    let mut gateway = TestGateway::builder(&unreachable.url()).start().await;
    let status = gateway
        .client
        .create_invoice(authed(create()))
        .await
        .expect_err("unreachable");
    assert_eq!(status.code(), Code::Unavailable);
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert_eq!(info.metadata["request_sent"], "false");
    assert_eq!(
        info.metadata["attempts"], "3",
        "--max-attempts 3, even for create"
    );
}

/// An "upstream" that reads each request and hangs up without answering;
/// counts the connections it took.
async fn hanging_up_upstream() -> (String, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buffer = [0u8; 4096];
            let _ = socket.read(&mut buffer).await;
        }
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn a_broken_connection_is_retried_only_for_repeatable_operations() {
    let (url, seen) = hanging_up_upstream().await;
    let mut gateway = TestGateway::builder(&url).start().await;

    let status = gateway
        .client
        .update_invoice(authed(update()))
        .await
        .expect_err("every attempt breaks");
    let info = error_info(&status);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(info.metadata["request_sent"], "true");
    assert_eq!(info.metadata["attempts"], "3");
    assert_eq!(seen.load(Ordering::SeqCst), 3);

    let status = gateway
        .client
        .close_invoice(authed(pb::CloseInvoiceRequest {
            invoice_id: "inv-1".into(),
        }))
        .await
        .expect_err("breaks");
    assert_eq!(error_info(&status).metadata["attempts"], "1");
    assert_eq!(seen.load(Ordering::SeqCst), 4, "close was sent once");
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_is_not_waited_for() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::raw(503, "busy").header("retry-after", "5"));
    let mut request = authed(update());
    request.set_timeout(Duration::from_secs(1));
    let status = gateway
        .client
        .update_invoice(request)
        .await
        .expect_err("no retry");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(error_info(&status).metadata["attempts"], "1");
    assert_eq!(retry_delay(&status), Duration::from_secs(5));
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn a_retried_update_answered_no_changes_says_it_was_retried() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond_in_order(vec![
        Scripted::raw(502, "bad gateway"),
        Scripted::code("NoChanges"),
    ]);
    let status = gateway
        .client
        .update_invoice(authed(update()))
        .await
        .expect_err("NoChanges");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let info = error_info(&status);
    assert_eq!(info.reason, "NO_CHANGES");
    // The first attempt may have applied the change: attempts tells the
    // caller to read NO_CHANGES as "already applied".
    assert_eq!(info.metadata["attempts"], "2");
    assert_eq!(upstream.requests().len(), 2);
}
