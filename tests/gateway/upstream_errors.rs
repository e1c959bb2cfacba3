//! Every upstream error answer becomes the right gRPC status, with
//! `ErrorInfo`, `RequestInfo` and `RetryInfo` details carrying what the
//! upstream said.

use std::time::{Duration, SystemTime};

use serde_json::json;
use tonic::Code;

use gormic_gateway::errors::{GATEWAY_DOMAIN, UPSTREAM_DOMAIN};
use gormic_gateway::proto::v1 as pb;

use crate::support::{Scripted, TestGateway, authed, details, error_info, retry_delay, spawn_app};

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Update,
    Delete,
    Close,
    Send,
}

/// Calls `op` with valid input and returns the error status.
async fn fail(gateway: &mut TestGateway, op: Op) -> tonic::Status {
    let c = &mut gateway.client;
    let id = || "inv-1".to_owned();
    let result = match op {
        Op::Create => c
            .create_invoice(authed(pb::CreateInvoiceRequest {
                order_id: "ord-1".into(),
                ..Default::default()
            }))
            .await
            .map(drop),
        Op::Update => c
            .update_invoice(authed(pb::UpdateInvoiceRequest {
                invoice_id: id(),
                order_id: "ord-1".into(),
                ..Default::default()
            }))
            .await
            .map(drop),
        Op::Delete => c
            .delete_invoice(authed(pb::DeleteInvoiceRequest { invoice_id: id() }))
            .await
            .map(drop),
        Op::Close => c
            .close_invoice(authed(pb::CloseInvoiceRequest { invoice_id: id() }))
            .await
            .map(drop),
        Op::Send => c
            .send_invoice(authed(pb::SendInvoiceRequest { invoice_id: id() }))
            .await
            .map(drop),
    };
    result.expect_err("the call fails")
}

/// The spec's 30 (operation, code) pairs with the status and ErrorInfo
/// reason a caller must get. Written out here, independently of the code.
const SPEC_CODES: [(Op, &str, Code, &str); 30] = [
    (
        Op::Create,
        "NON_STANDARD_REF_INVOICE",
        Code::FailedPrecondition,
        "NON_STANDARD_REF_INVOICE",
    ),
    (
        Op::Create,
        "ORDER_CANCELED",
        Code::FailedPrecondition,
        "ORDER_CANCELED",
    ),
    (
        Op::Create,
        "ORDER_CLOSED",
        Code::FailedPrecondition,
        "ORDER_CLOSED",
    ),
    (
        Op::Create,
        "REF_INVOICE_NOT_FOUND",
        Code::NotFound,
        "REF_INVOICE_NOT_FOUND",
    ),
    (
        Op::Create,
        "REF_INVOICE_STILL_OPEN",
        Code::FailedPrecondition,
        "REF_INVOICE_STILL_OPEN",
    ),
    (
        Op::Create,
        "TYPE_NOT_SUPPORTED",
        Code::InvalidArgument,
        "TYPE_NOT_SUPPORTED",
    ),
    (
        Op::Delete,
        "INVOICE_CLOSED",
        Code::FailedPrecondition,
        "INVOICE_CLOSED",
    ),
    (
        Op::Delete,
        "INVOICE_CONTAIN_LINES",
        Code::FailedPrecondition,
        "INVOICE_CONTAIN_LINES",
    ),
    (
        Op::Delete,
        "INVOICE_NOT_FOUND",
        Code::NotFound,
        "INVOICE_NOT_FOUND",
    ),
    (
        Op::Delete,
        "NOT_ALLOWED",
        Code::PermissionDenied,
        "NOT_ALLOWED",
    ),
    (Op::Delete, "NotFound", Code::NotFound, "NOT_FOUND"),
    (
        Op::Delete,
        "ORDER_CANCELED",
        Code::FailedPrecondition,
        "ORDER_CANCELED",
    ),
    (
        Op::Delete,
        "ORDER_CLOSED",
        Code::FailedPrecondition,
        "ORDER_CLOSED",
    ),
    (
        Op::Update,
        "NoChanges",
        Code::FailedPrecondition,
        "NO_CHANGES",
    ),
    (Op::Update, "NotFound", Code::NotFound, "NOT_FOUND"),
    (
        Op::Close,
        "ALREADY_CLOSED",
        Code::FailedPrecondition,
        "ALREADY_CLOSED",
    ),
    (
        Op::Close,
        "CUSTOMER_REQUIRED",
        Code::FailedPrecondition,
        "CUSTOMER_REQUIRED",
    ),
    (
        Op::Close,
        "DRAFT_LINES_EXISTS",
        Code::FailedPrecondition,
        "DRAFT_LINES_EXISTS",
    ),
    (
        Op::Close,
        "GIFT_CARD_RECIPIENT_NOT_EXIST",
        Code::FailedPrecondition,
        "GIFT_CARD_RECIPIENT_NOT_EXIST",
    ),
    (
        Op::Close,
        "INVALID_GIFT_CARD_RECIPIENT_PHONE",
        Code::FailedPrecondition,
        "INVALID_GIFT_CARD_RECIPIENT_PHONE",
    ),
    (
        Op::Close,
        "INVOICE_EMPTY",
        Code::FailedPrecondition,
        "INVOICE_EMPTY",
    ),
    (
        Op::Close,
        "MISSING_GIFT_CARD_RECIPIENT",
        Code::FailedPrecondition,
        "MISSING_GIFT_CARD_RECIPIENT",
    ),
    (
        Op::Close,
        "ORDER_CANCELED",
        Code::FailedPrecondition,
        "ORDER_CANCELED",
    ),
    (
        Op::Close,
        "ORDER_CLOSED",
        Code::FailedPrecondition,
        "ORDER_CLOSED",
    ),
    (
        Op::Close,
        "ORDER_NOT_CLOSED",
        Code::FailedPrecondition,
        "ORDER_NOT_CLOSED",
    ),
    (
        Op::Close,
        "PAYMENT_NOT_COMPLETE",
        Code::FailedPrecondition,
        "PAYMENT_NOT_COMPLETE",
    ),
    (
        Op::Send,
        "EMAIL_NOT_DEFINED",
        Code::FailedPrecondition,
        "EMAIL_NOT_DEFINED",
    ),
    (
        Op::Send,
        "INVOICE_NOT_CLOSED",
        Code::FailedPrecondition,
        "INVOICE_NOT_CLOSED",
    ),
    (
        Op::Send,
        "INVOICE_NOT_FOUND",
        Code::NotFound,
        "INVOICE_NOT_FOUND",
    ),
    (
        Op::Send,
        "INVOICE_NOT_GENERATED",
        Code::FailedPrecondition,
        "INVOICE_NOT_GENERATED",
    ),
];

#[tokio::test]
async fn each_of_the_30_spec_codes_maps_to_its_status_with_full_details() {
    let (upstream, mut gateway) = spawn_app().await;
    for (op, code, expected, reason) in SPEC_CODES {
        upstream.respond(Scripted::code(code));
        let status = fail(&mut gateway, op).await;
        let context = format!("{op:?} {code}");
        assert_eq!(status.code(), expected, "{context}");
        assert!(
            status.message().ends_with(&format!("({code})")),
            "{context}: {}",
            status.message()
        );
        let info = error_info(&status);
        assert_eq!(info.reason, reason, "{context}");
        assert_eq!(info.domain, UPSTREAM_DOMAIN, "{context}");
        assert_eq!(
            info.metadata.get("upstream_code").map(String::as_str),
            Some(code),
            "{context}"
        );
        assert_eq!(
            info.metadata.get("http_status").map(String::as_str),
            Some("400"),
            "{context}"
        );
        let request_info = details(&status)
            .request_info()
            .cloned()
            .expect("RequestInfo");
        assert_eq!(request_info.request_id, "req-upstream-1", "{context}");
    }
}

#[tokio::test]
async fn the_status_message_is_human_readable_and_names_the_code() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::code("ORDER_CLOSED"));
    assert_eq!(
        fail(&mut gateway, Op::Create).await.message(),
        "order is closed (ORDER_CLOSED)"
    );
}

#[tokio::test]
async fn a_code_the_spec_does_not_list_is_failed_precondition_and_kept_verbatim() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::json(
        400,
        json!({"error": {"code": "InvoiceLocked", "message": "locked by accounting"}}),
    ));
    let status = fail(&mut gateway, Op::Close).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "locked by accounting (InvoiceLocked)");
    let info = error_info(&status);
    assert_eq!(info.reason, "INVOICE_LOCKED");
    assert_eq!(info.domain, UPSTREAM_DOMAIN);
    assert_eq!(info.metadata["upstream_code"], "InvoiceLocked");
    assert_eq!(info.metadata["upstream_message"], "locked by accounting");
}

#[tokio::test]
async fn a_known_code_decides_the_status_whatever_the_http_status() {
    let (upstream, mut gateway) = spawn_app().await;
    for http in [404, 409, 500, 503] {
        upstream.respond(Scripted::json(
            http,
            json!({"error": {"code": "INVOICE_NOT_FOUND"}}),
        ));
        let status = fail(&mut gateway, Op::Send).await;
        assert_eq!(status.code(), Code::NotFound, "HTTP {http}");
        assert_eq!(
            error_info(&status).metadata["http_status"],
            http.to_string()
        );
    }
    upstream.respond(Scripted::json(
        500,
        json!({"error": {"code": "ORDER_CLOSED"}}),
    ));
    assert_eq!(
        fail(&mut gateway, Op::Create).await.code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn a_2xx_answer_carrying_an_error_code_is_a_refusal() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::json(
        200,
        json!({"error": {"code": "ALREADY_CLOSED"}}),
    ));
    let status = fail(&mut gateway, Op::Close).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).reason, "ALREADY_CLOSED");
}

#[tokio::test]
async fn answers_without_a_code_map_by_http_status() {
    let (upstream, mut gateway) = spawn_app().await;
    let rows = [
        (400, Code::InvalidArgument),
        (401, Code::Unauthenticated),
        (403, Code::PermissionDenied),
        (404, Code::NotFound),
        (408, Code::DeadlineExceeded),
        (409, Code::Aborted),
        (410, Code::FailedPrecondition),
        (422, Code::InvalidArgument),
        (500, Code::Internal),
        (501, Code::Unimplemented),
        (502, Code::Unavailable),
        (503, Code::Unavailable),
        (504, Code::DeadlineExceeded),
        (507, Code::Internal),
        (302, Code::Internal),
        // Last: a 429 opens a cooldown for the credential, which would
        // refuse the rows after it unsent (tests/gateway/cooldowns.rs).
        (429, Code::ResourceExhausted),
    ];
    for (http, expected) in rows {
        upstream.respond(
            Scripted::raw(http, "<html>bad gateway</html>").header("x-request-id", "hdr-req-9"),
        );
        let status = fail(&mut gateway, Op::Delete).await;
        assert_eq!(status.code(), expected, "HTTP {http}");
        assert!(
            status.message().contains(&format!("HTTP {http}")),
            "HTTP {http}: {}",
            status.message()
        );
        let info = error_info(&status);
        assert_eq!(info.reason, "UPSTREAM_HTTP_ERROR", "HTTP {http}");
        assert_eq!(info.domain, GATEWAY_DOMAIN, "HTTP {http}");
        assert_eq!(info.metadata["http_status"], http.to_string());
        assert_eq!(info.metadata["upstream_body"], "<html>bad gateway</html>");
        assert!(!info.metadata.contains_key("upstream_code"));
        let request_info = details(&status)
            .request_info()
            .cloned()
            .expect("RequestInfo");
        assert_eq!(
            request_info.request_id, "hdr-req-9",
            "from the x-request-id response header"
        );
    }
}

#[tokio::test]
async fn a_400_json_body_without_code_is_invalid_argument() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::json(
        400,
        json!({"message": "params.orderId is required"}),
    ));
    let status = fail(&mut gateway, Op::Create).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_info(&status).reason, "UPSTREAM_HTTP_ERROR");
}

#[tokio::test]
async fn retry_after_on_429_and_503_becomes_retry_info() {
    for (http, code) in [(429, Code::ResourceExhausted), (503, Code::Unavailable)] {
        // A gateway each: either answer opens a cooldown for the credential.
        let (upstream, mut gateway) = spawn_app().await;
        upstream.respond(Scripted::raw(http, "").header("retry-after", "17"));
        let status = fail(&mut gateway, Op::Close).await;
        assert_eq!(status.code(), code);
        assert_eq!(retry_delay(&status), Duration::from_secs(17), "HTTP {http}");
    }
}

#[tokio::test]
async fn a_retry_after_date_becomes_retry_info_and_another_form_is_kept_verbatim() {
    let (upstream, mut gateway) = spawn_app().await;
    // HTTP-dates have whole seconds: this one is 19 to 20 s away.
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
    upstream.respond(Scripted::raw(503, "").header("retry-after", &date));
    let status = fail(&mut gateway, Op::Close).await;
    let delay = retry_delay(&status);
    assert!(
        delay > Duration::from_secs(18) && delay <= Duration::from_secs(20),
        "the time until {date}: {delay:?}"
    );
    assert!(!error_info(&status).metadata.contains_key("retry_after"));

    // A gateway of its own: the 503 opened a cooldown for the credential.
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::raw(503, "").header("retry-after", "in a while"));
    let status = fail(&mut gateway, Op::Close).await;
    assert_eq!(error_info(&status).metadata["retry_after"], "in a while");
    let retry = details(&status).retry_info().cloned().expect("RetryInfo");
    assert_eq!(
        retry.retry_delay,
        Some(gormic_gateway::upstream::DEFAULT_COOLDOWN),
        "the default cooldown it opened"
    );
}

#[tokio::test]
async fn the_bodys_request_id_wins_over_the_header() {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::code("INVOICE_EMPTY").header("x-request-id", "from-header"));
    let status = fail(&mut gateway, Op::Close).await;
    assert_eq!(
        details(&status)
            .request_info()
            .expect("RequestInfo")
            .request_id,
        "req-upstream-1"
    );
}

// ---- malformed answers ----------------------------------------------------

async fn malformed(body: Scripted, op: Op) -> tonic::Status {
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(body);
    fail(&mut gateway, op).await
}

fn assert_malformed(status: &tonic::Status, mentions: &str) {
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let info = error_info(status);
    assert_eq!(info.reason, "MALFORMED_UPSTREAM_RESPONSE");
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(info.metadata["http_status"], "200");
    assert!(
        status.message().contains(mentions),
        "{:?} should mention {mentions:?}",
        status.message()
    );
}

#[tokio::test]
async fn a_2xx_that_is_not_json_is_malformed() {
    let status = malformed(Scripted::raw(200, "<html>hello</html>"), Op::Create).await;
    assert_malformed(&status, "CreateInvoice");
}

#[tokio::test]
async fn an_empty_2xx_is_malformed() {
    let status = malformed(Scripted::raw(200, ""), Op::Delete).await;
    assert_malformed(&status, "DeleteInvoice");
}

#[tokio::test]
async fn a_2xx_without_data_id_is_malformed() {
    let status = malformed(Scripted::ok(json!({"identifier": "x"})), Op::Create).await;
    assert_malformed(&status, "missing field `id`");
}

#[tokio::test]
async fn a_2xx_without_data_is_malformed() {
    let mut body = crate::support::fake_upstream::envelope(json!(null));
    body.as_object_mut().unwrap().remove("data");
    let status = malformed(Scripted::json(200, body), Op::Update).await;
    assert_malformed(&status, "missing field `data`");
}

#[tokio::test]
async fn a_fractional_invoice_number_is_malformed() {
    let data = json!({"invoiceNumber": 1043.5, "invoiceSource": "POS", "invoicedAt": "t"});
    let status = malformed(Scripted::ok(data), Op::Close).await;
    assert_malformed(&status, "invoiceNumber is not an integer");
}

#[tokio::test]
async fn a_string_invoice_number_is_malformed() {
    let data = json!({"invoiceNumber": "1043", "invoiceSource": "POS", "invoicedAt": "t"});
    let status = malformed(Scripted::ok(data), Op::Close).await;
    assert_malformed(&status, "CloseInvoice");
}

#[tokio::test]
async fn a_wrongly_typed_field_is_malformed() {
    let status = malformed(Scripted::ok(json!({"success": "yes"})), Op::Send).await;
    assert_malformed(&status, "SendInvoice");
}

#[tokio::test]
async fn an_oversized_answer_is_refused_not_buffered() {
    let big = "x".repeat(gormic_gateway::upstream::MAX_BODY_BYTES + 1);
    let status = malformed(Scripted::ok(json!({"id": big})), Op::Create).await;
    assert_malformed(&status, "larger than");
}

#[tokio::test]
async fn hostile_upstream_bodies_give_a_status_and_never_crash_the_gateway() {
    let (upstream, mut gateway) = spawn_app().await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies: Vec<Vec<u8>> = vec![
        deep.clone().into_bytes(),
        format!(r#"{{"data": {deep}}}"#).into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x80],
        b"null".to_vec(),
        b"[]".to_vec(),
        br#"{"data": null}"#.to_vec(),
        br#"{"data": {"invoiceNumber": null, "invoiceSource": null, "invoicedAt": null}}"#.to_vec(),
        br#"{"data": {"invoiceNumber": 1e400, "invoiceSource": "x", "invoicedAt": "y"}}"#.to_vec(),
        br#"{"data": {"invoiceNumber": -9223372036854775809, "invoiceSource": "x", "invoicedAt": "y"}}"#.to_vec(),
        br#"{"error": {"code": {"nested": [1, 2]}}, "requestId": 17}"#.to_vec(),
        br#"{"error": "ORDER_CLOSED"}"#.to_vec(),
        br#"{"error": {"code": ""}}"#.to_vec(),
        br#"{"warnings": "not a list", "data": {"invoiceNumber": 1, "invoiceSource": "x", "invoicedAt": "y"}}"#.to_vec(),
    ];
    for status in [200, 400, 500] {
        for body in &bodies {
            upstream.respond(Scripted {
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: body.clone(),
                delay: None,
            });
            let error = fail(&mut gateway, Op::Close).await;
            let context = format!(
                "HTTP {status}, body {:?}",
                String::from_utf8_lossy(&body[..body.len().min(60)])
            );
            assert_ne!(error.code(), Code::Ok, "{context}");
            assert!(
                details(&error).error_info().is_some(),
                "{context}: {error:?}"
            );
            if status == 200 {
                assert_eq!(error.code(), Code::Internal, "{context}: {error:?}");
            }
        }
    }
    // Still serving after all of that.
    upstream.respond(Scripted::ok(
        json!({"invoiceNumber": 5, "invoiceSource": "x", "invoicedAt": "y"}),
    ));
    let ok = gateway
        .client
        .close_invoice(authed(pb::CloseInvoiceRequest {
            invoice_id: "inv-1".into(),
        }))
        .await
        .expect("the gateway still serves");
    assert_eq!(ok.into_inner().invoice_number, 5);
}
