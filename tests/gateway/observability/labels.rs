//! Bounded labels: after calls carrying distinctive caller values, no
//! series holds any of them; the organization id only behind the opt-in.

use serde_json::json;
use tonic::Code;

use gormic_gateway::admin::Readiness;
use gormic_gateway::idempotency::METADATA_KEY as IDEMPOTENCY_KEY;
use gormic_gateway::metrics::{Metrics, MetricsArgs};
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::trace::Tracer;

use super::metrics::calls;
use super::{CLOSE, UPDATE, close, closed, observed_gateway, update};
use crate::support::admin::AdminServer;
use crate::support::{FakeUpstream, Scripted, TestGateway, with_metadata};

const LEAKED_API_KEY: &str = "sk-live-obs-leak-4d1f9e";
const LEAKED_INVOICE_ID: &str = "inv-obs-leak-7731";
const LEAKED_REQUEST_ID: &str = "req-obs-leak-2290";
const LEAKED_ORGANIZATION: &str = "org-obs-leak-5512";
const LEAKED_IDEMPOTENCY_KEY: &str = "idem-obs-leak-8830";
const LEAKED_ORDER_ID: &str = "ord-obs-leak-6604";
const LEAKED_CREATED_ID: &str = "inv-obs-created-9127";
const LEAKED_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const LEAKED_UPSTREAM_CODE: &str = "ALREADY_CLOSED";

/// Every distinctive value the calls below send or receive.
const LEAKED: [&str; 9] = [
    LEAKED_API_KEY,
    LEAKED_INVOICE_ID,
    LEAKED_REQUEST_ID,
    LEAKED_ORGANIZATION,
    LEAKED_IDEMPOTENCY_KEY,
    LEAKED_ORDER_ID,
    LEAKED_CREATED_ID,
    LEAKED_TRACE_ID,
    LEAKED_UPSTREAM_CODE,
];

/// Six calls of every RPC, each carrying distinctive values: success,
/// functional error, retry, idempotency key, unauthenticated, invalid.
async fn calls_with_distinctive_values(gateway: &mut TestGateway, upstream: &FakeUpstream) {
    upstream.respond_in_order(vec![
        Scripted::ok(closed()),
        Scripted::code(LEAKED_UPSTREAM_CODE),
        Scripted::raw(503, "busy"),
        Scripted::ok(json!({"success": true})),
        Scripted::ok(json!({"id": LEAKED_CREATED_ID})),
    ]);
    let traceparent = format!("00-{LEAKED_TRACE_ID}-00f067aa0ba902b7-01");
    let all: &[(&'static str, &str)] = &[
        ("api-key", LEAKED_API_KEY),
        ("organization-id", LEAKED_ORGANIZATION),
        ("x-request-id", LEAKED_REQUEST_ID),
        ("traceparent", &traceparent),
    ];
    let client = &mut gateway.client;
    client
        .close_invoice(with_metadata(close(LEAKED_INVOICE_ID), all))
        .await
        .expect("success");
    let status = client
        .close_invoice(with_metadata(close(LEAKED_INVOICE_ID), all))
        .await
        .expect_err("functional error");
    assert_eq!(status.code(), Code::FailedPrecondition);
    client
        .update_invoice(with_metadata(update(LEAKED_INVOICE_ID), all))
        .await
        .expect("retried");
    let mut with_key = all.to_vec();
    with_key.push((IDEMPOTENCY_KEY, LEAKED_IDEMPOTENCY_KEY));
    let created = client
        .create_invoice(with_metadata(
            pb::CreateInvoiceRequest {
                order_id: LEAKED_ORDER_ID.into(),
                ..Default::default()
            },
            &with_key,
        ))
        .await
        .expect("created");
    assert_eq!(created.into_inner().id, LEAKED_CREATED_ID);
    let status = client
        .delete_invoice(with_metadata(
            pb::DeleteInvoiceRequest {
                invoice_id: LEAKED_INVOICE_ID.into(),
            },
            &all[1..],
        ))
        .await
        .expect_err("no api-key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .send_invoice(with_metadata(
            pb::SendInvoiceRequest {
                invoice_id: LEAKED_INVOICE_ID.into(),
            },
            &[("api-key", LEAKED_API_KEY)],
        ))
        .await
        .expect_err("no organization-id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(upstream.requests().len(), 5);
}

/// Whether `value` is one of the few values `label` may take.
fn bounded(series: &str, label: &str, value: &str) -> bool {
    let snake_case = |v: &str| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    match label {
        "rpc_method" => [
            "CreateInvoice",
            "UpdateInvoice",
            "DeleteInvoice",
            "CloseInvoice",
            "SendInvoice",
        ]
        .contains(&value),
        "rpc_grpc_status_code" => value.parse::<u8>().is_ok_and(|c| c <= 16),
        "http_response_status_code" => {
            value.is_empty() || value.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s))
        }
        "error_type" => [
            "",
            "timeout",
            "connect",
            "connection",
            "cancelled",
            "malformed",
        ]
        .contains(&value),
        "reason" | "result" | "file" => snake_case(value),
        // The upstream cooldowns' series.
        "source" => ["local", "replica"].contains(&value),
        "event" => [
            "published",
            "publish_failed",
            "received",
            "malformed",
            "gap",
        ]
        .contains(&value),
        "state" | "to" => ["closed", "open", "half_open"].contains(&value),
        "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
        "version" => value == env!("CARGO_PKG_VERSION"),
        "git_commit" => value.chars().all(|c| c.is_ascii_alphanumeric()),
        "organization" => {
            series == "gormic_gateway_calls_total" && ["", LEAKED_ORGANIZATION].contains(&value)
        }
        _ => false,
    }
}

#[tokio::test]
async fn no_api_key_invoice_id_request_id_or_other_caller_value_appears_in_any_series() {
    let upstream = FakeUpstream::start().await;
    let metrics = Metrics::default();
    let mut gateway = observed_gateway(&upstream, &metrics, Tracer::disabled(), 10).await;
    let admin = AdminServer::start(metrics.clone(), Readiness::new()).await;
    calls_with_distinctive_values(&mut gateway, &upstream).await;

    let text = admin.scrape().await;
    for value in LEAKED {
        assert!(
            !text.text().contains(value),
            "{value} reached /metrics:\n{}",
            text.text()
        );
    }
    assert!(!text.text().contains("organization"));
    for (series, labels) in text.samples() {
        for (label, value) in &labels {
            assert!(
                bounded(&series, label, value) && label != "organization",
                "{series}: {label}={value:?} is not a bounded label"
            );
        }
    }
    // The calls were counted: this is the exposition of those calls.
    assert_eq!(
        text.value(&calls("DeleteInvoice", Code::Unauthenticated)),
        Some(1.0)
    );
    assert_eq!(
        text.value(&calls("SendInvoice", Code::InvalidArgument)),
        Some(1.0)
    );
    assert_eq!(
        text.value(r#"gormic_gateway_idempotency_requests_total{result="new"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_organization_label_appears_only_with_the_opt_in_flag() {
    let upstream = FakeUpstream::start().await;
    let metrics = Metrics::new(&MetricsArgs {
        metrics_organization_label: true,
    });
    let mut gateway = observed_gateway(&upstream, &metrics, Tracer::disabled(), 10).await;
    let admin = AdminServer::start(metrics.clone(), Readiness::new()).await;
    calls_with_distinctive_values(&mut gateway, &upstream).await;

    let text = admin.scrape().await;
    let by_organization = |rpc: &str, code: Code| {
        text.value(&format!(
            r#"gormic_gateway_calls_total{{rpc_method="{rpc}",rpc_grpc_status_code="{}",organization="{LEAKED_ORGANIZATION}"}}"#,
            code as i32
        ))
    };
    assert_eq!(by_organization(CLOSE, Code::Ok), Some(1.0));
    assert_eq!(by_organization(CLOSE, Code::FailedPrecondition), Some(1.0));
    assert_eq!(by_organization(UPDATE, Code::Ok), Some(1.0));
    assert_eq!(by_organization("CreateInvoice", Code::Ok), Some(1.0));
    // A caller that did not authenticate could claim any organization.
    assert_eq!(
        text.value(
            r#"gormic_gateway_calls_total{rpc_method="DeleteInvoice",rpc_grpc_status_code="16",organization=""}"#
        ),
        Some(1.0)
    );
    for value in LEAKED.iter().filter(|v| **v != LEAKED_ORGANIZATION) {
        assert!(!text.text().contains(value), "{value} reached /metrics");
    }
    for (series, labels) in text.samples() {
        for (label, value) in &labels {
            assert!(
                bounded(&series, label, value),
                "{series}: {label}={value:?} is not a bounded label"
            );
        }
    }
}
