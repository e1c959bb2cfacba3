//! `/metrics` as calls go through the gateway: exact counter deltas for a
//! success, a functional error, a shed call, a retry and a cancelled call,
//! the in-flight gauge, and the same series from the real binary.

use serde_json::json;
use tonic::Code;

use gormic_gateway::admin::Readiness;
use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::trace::Tracer;

use super::{CLOSE, UPDATE, close, closed, connect, observed_gateway, ready_invoice, update};
use crate::support::admin::{AdminServer, Scrape, scrape, scrape_until};
use crate::support::binary::Serving;
use crate::support::sandbox::as_org;
use crate::support::{
    API_KEY, FakeUpstream, ORGANIZATION, Scripted, authed, error_info, logs, with_metadata,
};

const IN_FLIGHT: &str = "gormic_gateway_calls_in_flight";
const SHED_IN_FLIGHT: &str = r#"gormic_gateway_calls_shed_total{reason="in_flight_limit"}"#;
const SHED_QUEUE: &str = r#"gormic_gateway_calls_shed_total{reason="upstream_queue_full"}"#;

// ---- series --------------------------------------------------------------

pub(super) fn calls(rpc: &str, code: Code) -> String {
    format!(
        r#"gormic_gateway_calls_total{{rpc_method="{rpc}",rpc_grpc_status_code="{}"}}"#,
        code as i32
    )
}

fn upstream_requests(rpc: &str, status: u16) -> String {
    format!(
        r#"gormic_gateway_upstream_requests_total{{rpc_method="{rpc}",http_response_status_code="{status}",error_type=""}}"#
    )
}

fn retries(rpc: &str, reason: &str) -> String {
    format!(r#"gormic_gateway_upstream_retries_total{{rpc_method="{rpc}",reason="{reason}"}}"#)
}

fn call_latency_count(rpc: &str) -> String {
    format!(r#"gormic_gateway_call_duration_seconds_count{{rpc_method="{rpc}"}}"#)
}

fn upstream_latency_count(rpc: &str) -> String {
    format!(r#"gormic_gateway_upstream_request_duration_seconds_count{{rpc_method="{rpc}"}}"#)
}

/// How much every series of the metric `name` grew together.
fn total_delta(after: &Scrape, before: &Scrape, name: &str) -> f64 {
    let sum = |scrape: &Scrape| -> f64 {
        scrape
            .text()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    sum(after) - sum(before)
}

#[tokio::test]
async fn metrics_count_exactly_one_success_one_functional_error_and_one_shed_call() {
    let upstream = FakeUpstream::start().await;
    let metrics = Metrics::default();
    let mut gateway = observed_gateway(&upstream, &metrics, Tracer::disabled(), 1).await;
    let admin = AdminServer::start(metrics.clone(), Readiness::new()).await;
    let before = admin.scrape().await;
    assert_eq!(before.value(IN_FLIGHT), Some(0.0));

    // The success is held upstream: it is the one call in flight while the
    // next one is shed at --max-in-flight 1.
    upstream.respond(Scripted::ok(closed()));
    upstream.hold_answers();
    let mut client = gateway.client.clone();
    let held = tokio::spawn(async move { client.close_invoice(authed(close("inv-1"))).await });
    upstream.wait_for_requests(1).await;
    assert_eq!(admin.scrape().await.value(IN_FLIGHT), Some(1.0));

    let shed = gateway
        .client
        .close_invoice(authed(close("inv-1")))
        .await
        .expect_err("shed at the in-flight cap");
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert_eq!(error_info(&shed).reason, "OVERLOADED");
    let shedding = admin.scrape().await;
    assert_eq!(shedding.value(IN_FLIGHT), Some(1.0), "only the held call");
    assert_eq!(shedding.delta(&before, SHED_IN_FLIGHT), 1.0);
    assert_eq!(
        total_delta(&shedding, &before, "gormic_gateway_calls_total"),
        0.0,
        "a shed call is counted by the shed counter alone; the held call \
         when it is answered"
    );

    upstream.release_answers();
    let response = held.await.expect("task").expect("the held call succeeds");
    assert_eq!(response.into_inner().invoice_number, 1);

    upstream.respond(Scripted::code("ALREADY_CLOSED"));
    let refused = gateway
        .client
        .close_invoice(authed(close("inv-1")))
        .await
        .expect_err("a functional error");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let after = admin.scrape().await;
    assert_eq!(after.delta(&before, &calls(CLOSE, Code::Ok)), 1.0);
    assert_eq!(
        after.delta(&before, &calls(CLOSE, Code::FailedPrecondition)),
        1.0
    );
    assert_eq!(
        after.delta(&before, &calls(CLOSE, Code::ResourceExhausted)),
        0.0
    );
    assert_eq!(
        total_delta(&after, &before, "gormic_gateway_calls_total"),
        2.0
    );
    assert_eq!(after.delta(&before, &upstream_requests(CLOSE, 200)), 1.0);
    assert_eq!(after.delta(&before, &upstream_requests(CLOSE, 400)), 1.0);
    assert_eq!(
        total_delta(&after, &before, "gormic_gateway_upstream_requests_total"),
        2.0,
        "the shed call never reached the upstream"
    );
    assert_eq!(after.delta(&before, SHED_IN_FLIGHT), 1.0);
    assert_eq!(after.delta(&before, SHED_QUEUE), 0.0);
    assert_eq!(after.delta(&before, &call_latency_count(CLOSE)), 2.0);
    assert_eq!(after.delta(&before, &upstream_latency_count(CLOSE)), 2.0);
    assert_eq!(
        total_delta(&after, &before, "gormic_gateway_upstream_retries_total"),
        0.0
    );
    assert_eq!(after.value(IN_FLIGHT), Some(0.0));
    // The client the gateway used is the one on /metrics: one connection,
    // reused, and nothing in flight now.
    assert_eq!(
        after.value("gormic_gateway_upstream_connections_opened_total"),
        Some(1.0)
    );
    assert_eq!(
        after.value("gormic_gateway_upstream_requests_active"),
        Some(0.0)
    );
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_gateway_retry_is_counted_with_each_of_its_upstream_requests() {
    let upstream = FakeUpstream::start().await;
    let metrics = Metrics::default();
    let mut gateway = observed_gateway(&upstream, &metrics, Tracer::disabled(), 10).await;
    let admin = AdminServer::start(metrics.clone(), Readiness::new()).await;
    let before = admin.scrape().await;

    upstream.respond_in_order(vec![
        Scripted::raw(503, "busy"),
        Scripted::ok(json!({"success": true})),
    ]);
    let response = gateway
        .client
        .update_invoice(authed(update("inv-1")))
        .await
        .expect("the retry succeeds");
    assert!(response.into_inner().success);
    assert_eq!(upstream.requests().len(), 2);

    let after = admin.scrape().await;
    assert_eq!(after.delta(&before, &retries(UPDATE, "http_503")), 1.0);
    assert_eq!(
        total_delta(&after, &before, "gormic_gateway_upstream_retries_total"),
        1.0
    );
    assert_eq!(after.delta(&before, &upstream_requests(UPDATE, 503)), 1.0);
    assert_eq!(after.delta(&before, &upstream_requests(UPDATE, 200)), 1.0);
    assert_eq!(after.delta(&before, &upstream_latency_count(UPDATE)), 2.0);
    assert_eq!(after.delta(&before, &calls(UPDATE, Code::Ok)), 1.0);
    assert_eq!(
        total_delta(&after, &before, "gormic_gateway_calls_total"),
        1.0,
        "one call, however many attempts"
    );
    assert_eq!(after.delta(&before, &call_latency_count(UPDATE)), 1.0);
}

#[tokio::test]
async fn a_call_cancelled_by_its_caller_is_counted_once_as_cancelled() {
    let logs = logs();
    let upstream = FakeUpstream::start().await;
    let metrics = Metrics::default();
    let gateway = observed_gateway(&upstream, &metrics, Tracer::disabled(), 10).await;
    let admin = AdminServer::start(metrics.clone(), Readiness::new()).await;
    let before = admin.scrape().await;

    upstream.respond(Scripted::ok(closed()));
    upstream.hold_answers();
    let mut client = gateway.client.clone();
    let call = tokio::spawn(async move {
        let request = with_metadata(
            close("inv-1"),
            &[
                ("api-key", API_KEY),
                ("organization-id", ORGANIZATION),
                ("x-request-id", "obs-cancelled-1"),
            ],
        );
        client.close_invoice(request).await
    });
    upstream.wait_for_requests(1).await;
    assert_eq!(admin.scrape().await.value(IN_FLIGHT), Some(1.0));

    // The caller goes away (RST_STREAM): the gateway drops the call.
    call.abort();
    logs.wait_for_line("saying the call was cancelled by its caller", |l| {
        l.contains("\"request_id\":\"obs-cancelled-1\"")
            && l.contains("call cancelled by the caller")
    })
    .await;
    // Counted as the call's future is dropped, on the gateway's worker
    // thread, right after that line: no event marks it.
    let after = scrape_until(admin.addr, |s| s.value(IN_FLIGHT) == Some(0.0)).await;
    assert_eq!(after.delta(&before, &calls(CLOSE, Code::Cancelled)), 1.0);
    assert_eq!(
        total_delta(&after, &before, "gormic_gateway_calls_total"),
        1.0
    );
    assert_eq!(after.delta(&before, &call_latency_count(CLOSE)), 1.0);
    // The abandoned attempt reached the upstream: it is counted too.
    let abandoned = format!(
        r#"gormic_gateway_upstream_requests_total{{rpc_method="{CLOSE}",http_response_status_code="",error_type="cancelled"}}"#
    );
    assert_eq!(after.delta(&before, &abandoned), 1.0);
    upstream.release_answers();
}

#[tokio::test]
async fn the_binarys_metrics_count_its_calls_and_its_upstream_pool() {
    let serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--sandbox",
        "--admin-listen",
        "127.0.0.1:0",
        "--worker-threads",
        "2",
        "--upstream-max-connections",
        "8",
        "--log-format",
        "json",
    ])
    .await;
    let admin = serving.admin_addr();
    let before = scrape(admin).await;
    // The commit is whatever GORMIC_GIT_COMMIT was at build time.
    let build_info = format!(
        r#"gormic_gateway_build_info{{version="{}",git_commit="{}"}}"#,
        env!("CARGO_PKG_VERSION"),
        gormic_gateway::metrics::GIT_COMMIT
    );
    assert_eq!(before.value(&build_info), Some(1.0), "{}", before.text());

    let mut client = InvoiceServiceClient::new(connect(serving.grpc_addr()).await);
    client
        .create_invoice(as_org("org-1", ready_invoice()))
        .await
        .expect("created");
    let status = client
        .create_invoice(as_org(
            "org-1",
            pb::CreateInvoiceRequest {
                order_id: "ord-canceled".into(),
                ..ready_invoice()
            },
        ))
        .await
        .expect_err("ORDER_CANCELED");
    assert_eq!(status.code(), Code::FailedPrecondition);

    let after = scrape(admin).await;
    let create = "CreateInvoice";
    assert_eq!(after.delta(&before, &calls(create, Code::Ok)), 1.0);
    assert_eq!(
        after.delta(&before, &calls(create, Code::FailedPrecondition)),
        1.0
    );
    assert_eq!(after.delta(&before, &upstream_requests(create, 200)), 1.0);
    assert_eq!(after.delta(&before, &upstream_requests(create, 400)), 1.0);
    assert_eq!(after.delta(&before, &call_latency_count(create)), 2.0);
    assert_eq!(after.delta(&before, &upstream_latency_count(create)), 2.0);
    assert_eq!(after.value(IN_FLIGHT), Some(0.0));
    // The client of the real binary: both calls on one connection.
    assert_eq!(
        after.value("gormic_gateway_upstream_requests_limit"),
        Some(8.0)
    );
    assert_eq!(
        after.value("gormic_gateway_upstream_connections_opened_total"),
        Some(1.0)
    );
    assert_eq!(
        after.value("gormic_gateway_upstream_requests_active"),
        Some(0.0)
    );
    assert!(after.value("process_resident_memory_bytes").unwrap_or(0.0) > 0.0);

    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
}
