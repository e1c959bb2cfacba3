//! Each RPC reaches the right REST route with the right headers and body,
//! and each answer becomes the right response message.

use serde_json::json;

use gormic_gateway::proto::v1 as pb;

use crate::support::{API_KEY, ORGANIZATION, Scripted, authed, spawn_app};

#[tokio::test]
async fn create_posts_params_and_returns_the_new_id() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-42"})));

    let response = gateway
        .client
        .create_invoice(authed(pb::CreateInvoiceRequest {
            order_id: "ord-1".into(),
            r#type: pb::InvoiceType::CreditNote as i32,
            reference_invoice_id: Some("inv-1".into()),
            apply_expires_at: None,
        }))
        .await
        .expect("create succeeds")
        .into_inner();

    assert_eq!(response.id, "inv-42");
    let meta = response.meta.expect("meta");
    assert_eq!(meta.request_id, "req-upstream-1");
    assert_eq!(meta.instance_id, "inst-7");
    assert_eq!(meta.app, "om");
    assert_eq!(meta.service, "invoices");

    let request = upstream.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/om/invoices");
    assert_eq!(request.header("api-key"), Some(API_KEY));
    assert_eq!(request.header("organization-id"), Some(ORGANIZATION));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.json(),
        json!({"params": {"orderId": "ord-1", "type": "credit-note", "referenceInvoiceId": "inv-1"}})
    );
}
