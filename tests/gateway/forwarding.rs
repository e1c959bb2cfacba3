//! Each RPC reaches the right REST route with the right headers and exact
//! JSON body, and each answer becomes the right response message.

use serde_json::json;

use gormic_gateway::proto::v1 as pb;

use crate::support::{
    API_KEY, ORGANIZATION, Scripted, TestGateway, authed, fake_upstream::FakeUpstream, spawn_app,
};

fn create(order_id: &str) -> pb::CreateInvoiceRequest {
    pb::CreateInvoiceRequest {
        order_id: order_id.into(),
        ..Default::default()
    }
}

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
            apply_expires_at: Some("2026-12-31T00:00:00Z".into()),
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
    assert_eq!(request.query, None);
    assert_eq!(request.header("api-key"), Some(API_KEY));
    assert_eq!(request.header("organization-id"), Some(ORGANIZATION));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.json(),
        json!({"params": {
            "orderId": "ord-1",
            "type": "credit-note",
            "referenceInvoiceId": "inv-1",
            "applyExpiresAt": "2026-12-31T00:00:00Z"
        }})
    );
}

#[tokio::test]
async fn every_invoice_type_has_its_rest_value_and_unspecified_is_left_out() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-1"})));
    let cases = [
        (pb::InvoiceType::Unspecified, None),
        (pb::InvoiceType::Standard, Some("standard")),
        (pb::InvoiceType::Prepayment, Some("prepayment")),
        (pb::InvoiceType::CreditNote, Some("credit-note")),
        (pb::InvoiceType::DebitNote, Some("debit-note")),
    ];
    for (invoice_type, _) in cases {
        let mut request = create("ord-1");
        request.r#type = invoice_type as i32;
        gateway
            .client
            .create_invoice(authed(request))
            .await
            .expect("create");
    }
    let sent: Vec<_> = upstream
        .requests()
        .iter()
        .map(|r| r.json()["params"].clone())
        .collect();
    for ((invoice_type, rest), params) in cases.iter().zip(&sent) {
        match rest {
            Some(value) => assert_eq!(params["type"], json!(value), "{invoice_type:?}"),
            None => {
                assert_eq!(
                    params,
                    &json!({"orderId": "ord-1"}),
                    "{invoice_type:?}: no type key, no nulls"
                )
            }
        }
    }
}

#[tokio::test]
async fn update_patches_the_invoice_path_and_repeats_the_id_in_params() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"success": true})));

    let response = gateway
        .client
        .update_invoice(authed(pb::UpdateInvoiceRequest {
            invoice_id: "inv-9".into(),
            order_id: "ord-3".into(),
            reference_invoice_id: None,
            apply_expires_at: Some("2027-01-01".into()),
        }))
        .await
        .expect("update succeeds")
        .into_inner();

    assert!(response.success);
    let request = upstream.only_request();
    assert_eq!(request.method, "PATCH");
    assert_eq!(request.path, "/v1/om/invoices/inv-9");
    assert_eq!(
        request.json(),
        json!({"params": {"id": "inv-9", "orderId": "ord-3", "applyExpiresAt": "2027-01-01"}})
    );
}

#[tokio::test]
async fn delete_sends_no_body_and_keeps_the_upstream_spelling_succeed() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"succeed": true})));

    let response = gateway
        .client
        .delete_invoice(authed(pb::DeleteInvoiceRequest {
            invoice_id: "inv-5".into(),
        }))
        .await
        .expect("delete succeeds")
        .into_inner();

    assert!(response.succeed);
    let request = upstream.only_request();
    assert_eq!(request.method, "DELETE");
    assert_eq!(request.path, "/v1/om/invoices/inv-5");
    assert!(request.body.is_empty(), "no body: {:?}", request.body);
    assert_eq!(request.header("content-type"), None);
}

#[tokio::test]
async fn close_maps_number_source_and_time() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({
        "invoiceNumber": 1043,
        "invoiceSource": "POS",
        "invoicedAt": "2026-11-25T10:00:00Z"
    })));

    let response = gateway
        .client
        .close_invoice(authed(pb::CloseInvoiceRequest {
            invoice_id: "inv-5".into(),
        }))
        .await
        .expect("close succeeds")
        .into_inner();

    assert_eq!(response.invoice_number, 1043);
    assert_eq!(response.invoice_source, "POS");
    assert_eq!(response.invoiced_at, "2026-11-25T10:00:00Z");
    let request = upstream.only_request();
    assert_eq!(request.method, "PATCH");
    assert_eq!(request.path, "/v1/om/invoices/inv-5/close");
    assert!(request.body.is_empty());
}

#[tokio::test]
async fn close_accepts_an_integral_float_invoice_number() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({
        "invoiceNumber": 1043.0, "invoiceSource": "web", "invoicedAt": "2026-11-25T10:00:00Z"
    })));
    let response = gateway
        .client
        .close_invoice(authed(pb::CloseInvoiceRequest {
            invoice_id: "inv-5".into(),
        }))
        .await
        .expect("close succeeds")
        .into_inner();
    assert_eq!(response.invoice_number, 1043);
}

#[tokio::test]
async fn send_posts_to_send_and_maps_the_message_id_when_present() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"success": true, "messageId": "msg-1"})));
    let with_id = gateway
        .client
        .send_invoice(authed(pb::SendInvoiceRequest {
            invoice_id: "inv-5".into(),
        }))
        .await
        .expect("send succeeds")
        .into_inner();
    assert!(with_id.success);
    assert_eq!(with_id.message_id.as_deref(), Some("msg-1"));

    upstream.respond(Scripted::ok(json!({"success": false})));
    let without_id = gateway
        .client
        .send_invoice(authed(pb::SendInvoiceRequest {
            invoice_id: "inv-5".into(),
        }))
        .await
        .expect("send succeeds")
        .into_inner();
    assert!(!without_id.success);
    assert_eq!(without_id.message_id, None);

    let requests = upstream.requests();
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/v1/om/invoices/inv-5/send");
}

#[tokio::test]
async fn warnings_are_kept_in_order_and_non_objects_are_wrapped() {
    let (upstream, mut gateway) = spawn_app().await;
    let mut body = crate::support::fake_upstream::envelope(json!({"id": "inv-1"}));
    body["warnings"] = json!([{"code": "W1", "count": 2}, "plain text", 7]);
    upstream.respond(Scripted::json(200, body));

    let meta = gateway
        .client
        .create_invoice(authed(create("ord-1")))
        .await
        .expect("create")
        .into_inner()
        .meta
        .expect("meta");

    let as_json: Vec<serde_json::Value> = meta.warnings.iter().map(struct_to_json).collect();
    assert_eq!(
        as_json,
        vec![
            json!({"code": "W1", "count": 2.0}),
            json!({"value": "plain text"}),
            json!({"value": 7.0})
        ]
    );
}

#[tokio::test]
async fn unknown_fields_in_answers_are_ignored() {
    let (upstream, mut gateway) = spawn_app().await;
    let mut body =
        crate::support::fake_upstream::envelope(json!({"id": "inv-1", "newField": {"x": 1}}));
    body["pagination"] = json!({"next": null});
    upstream.respond(Scripted::json(200, body));
    let response = gateway
        .client
        .create_invoice(authed(create("ord-1")))
        .await
        .expect("create");
    assert_eq!(response.into_inner().id, "inv-1");
}

#[tokio::test]
async fn any_2xx_with_a_valid_body_is_a_success() {
    let (upstream, mut gateway) = spawn_app().await;
    for status in [201, 202, 203] {
        upstream.respond(Scripted::json(
            status,
            crate::support::fake_upstream::envelope(json!({"id": format!("inv-{status}")})),
        ));
        let response = gateway.client.create_invoice(authed(create("ord-1"))).await;
        assert_eq!(
            response.expect("2xx is a success").into_inner().id,
            format!("inv-{status}")
        );
    }
}

#[tokio::test]
async fn the_callers_request_id_is_forwarded() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-1"})));
    let mut request = authed(create("ord-1"));
    request
        .metadata_mut()
        .insert("x-request-id", "trace-abc".parse().unwrap());
    gateway
        .client
        .create_invoice(request)
        .await
        .expect("create");
    assert_eq!(
        upstream.only_request().header("x-request-id"),
        Some("trace-abc")
    );
}

#[tokio::test]
async fn a_path_prefix_in_the_upstream_url_is_kept() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({"succeed": true})));
    let mut gateway = TestGateway::builder(&format!("{}/api/gormic/", upstream.url()))
        .start()
        .await;
    gateway
        .client
        .delete_invoice(authed(pb::DeleteInvoiceRequest {
            invoice_id: "inv-1".into(),
        }))
        .await
        .expect("delete");
    assert_eq!(
        upstream.only_request().path,
        "/api/gormic/v1/om/invoices/inv-1"
    );
}

#[tokio::test]
async fn hostile_invoice_ids_stay_one_path_segment() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"success": true})));
    let cases = [
        ("../orders/1", "/v1/om/invoices/..%2Forders%2F1/send"),
        ("a/b", "/v1/om/invoices/a%2Fb/send"),
        ("x?y", "/v1/om/invoices/x%3Fy/send"),
        ("x#y", "/v1/om/invoices/x%23y/send"),
        ("%2e%2e", "/v1/om/invoices/%252e%252e/send"),
        ("ü ;=", "/v1/om/invoices/%C3%BC%20%3B%3D/send"),
    ];
    for (id, _) in cases {
        gateway
            .client
            .send_invoice(authed(pb::SendInvoiceRequest {
                invoice_id: id.into(),
            }))
            .await
            .unwrap_or_else(|s| panic!("send {id:?}: {s:?}"));
    }
    let requests = upstream.requests();
    for ((id, path), request) in cases.iter().zip(&requests) {
        assert_eq!(&request.path, path, "id {id:?}");
        assert_eq!(request.query, None, "id {id:?}");
    }
}

fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
    }
}
