//! Calls the gateway refuses before anything is sent upstream: missing
//! metadata and invalid fields.

use tonic::Code;

use gormic_gateway::errors::GATEWAY_DOMAIN;
use gormic_gateway::proto::v1 as pb;

use crate::support::{
    API_KEY, ORGANIZATION, Scripted, authed, details, error_info, spawn_app, with_metadata,
};

fn close(id: &str) -> pb::CloseInvoiceRequest {
    pb::CloseInvoiceRequest {
        invoice_id: id.into(),
    }
}

#[tokio::test]
async fn missing_organization_id_is_invalid_argument_and_nothing_is_sent() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(serde_json::json!({"success": true})));
    let request = with_metadata(close("inv-1"), &[("api-key", API_KEY)]);
    let status = gateway
        .client
        .close_invoice(request)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let info = error_info(&status);
    assert_eq!(info.reason, "MISSING_ORGANIZATION_ID");
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert!(status.message().contains("organization-id"));
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn missing_api_key_is_unauthenticated_and_nothing_is_sent() {
    let (upstream, mut gateway) = spawn_app().await;
    for with_org in [true, false] {
        let entries: &[_] = if with_org {
            &[("organization-id", ORGANIZATION)]
        } else {
            &[]
        };
        let request = with_metadata(close("inv-1"), entries);
        let status = gateway
            .client
            .close_invoice(request)
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "with organization-id: {with_org}"
        );
        assert_eq!(error_info(&status).reason, "MISSING_API_KEY");
        assert!(status.message().contains("api-key"));
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn empty_metadata_values_count_as_missing() {
    let (upstream, mut gateway) = spawn_app().await;
    let request = with_metadata(
        close("inv-1"),
        &[("api-key", ""), ("organization-id", ORGANIZATION)],
    );
    let status = gateway
        .client
        .close_invoice(request)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn empty_required_fields_are_named_in_bad_request() {
    let (upstream, mut gateway) = spawn_app().await;
    let c = &mut gateway.client;
    let statuses = [
        (
            c.create_invoice(authed(pb::CreateInvoiceRequest::default()))
                .await
                .expect_err("create"),
            vec!["order_id"],
        ),
        (
            c.update_invoice(authed(pb::UpdateInvoiceRequest::default()))
                .await
                .expect_err("update"),
            vec!["invoice_id", "order_id"],
        ),
        (
            c.delete_invoice(authed(pb::DeleteInvoiceRequest::default()))
                .await
                .expect_err("delete"),
            vec!["invoice_id"],
        ),
        (
            c.close_invoice(authed(close(""))).await.expect_err("close"),
            vec!["invoice_id"],
        ),
        (
            c.send_invoice(authed(pb::SendInvoiceRequest::default()))
                .await
                .expect_err("send"),
            vec!["invoice_id"],
        ),
    ];
    for (status, fields) in statuses {
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(error_info(&status).reason, "INVALID_REQUEST");
        let bad_request = details(&status).bad_request().cloned().expect("BadRequest");
        let named: Vec<_> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(named, fields, "{}", status.message());
        for field in fields {
            assert!(status.message().contains(field), "{}", status.message());
        }
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn dot_segment_ids_are_refused() {
    let (upstream, mut gateway) = spawn_app().await;
    for id in [".", ".."] {
        let status = gateway
            .client
            .close_invoice(authed(close(id)))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{id}");
        let bad_request = details(&status).bad_request().cloned().expect("BadRequest");
        assert_eq!(bad_request.field_violations[0].field, "invoice_id");
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn an_unknown_invoice_type_number_is_refused() {
    let (upstream, mut gateway) = spawn_app().await;
    let status = gateway
        .client
        .create_invoice(authed(pb::CreateInvoiceRequest {
            order_id: "o".into(),
            r#type: 99,
            ..Default::default()
        }))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let bad_request = details(&status).bad_request().cloned().expect("BadRequest");
    assert_eq!(bad_request.field_violations[0].field, "type");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn gateway_errors_echo_the_callers_request_id() {
    let (_upstream, mut gateway) = spawn_app().await;
    let request = with_metadata(close("inv-1"), &[("x-request-id", "trace-7")]);
    let status = gateway
        .client
        .close_invoice(request)
        .await
        .expect_err("refused");
    assert_eq!(
        details(&status)
            .request_info()
            .expect("RequestInfo")
            .request_id,
        "trace-7"
    );
}
