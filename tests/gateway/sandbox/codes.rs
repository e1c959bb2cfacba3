//! One test per (operation, error code) pair of the spec, each from a fresh
//! sandbox with the default fixture, following the scenario that
//! docs/sandbox.md gives for it. The gRPC code is the one src/errors.rs
//! assigns; the reason is the spec code in UPPER_SNAKE_CASE.

use tonic::Code::{FailedPrecondition, InvalidArgument, NotFound, PermissionDenied};

use gormic_gateway::proto::v1::InvoiceType::{CreditNote, DebitNote, Prepayment, Standard};

use super::client::{Org, assert_refused};
use crate::support::TestGateway;
use crate::support::sandbox::sandbox_app;

async fn start() -> (TestGateway, Org) {
    let gateway = sandbox_app().await;
    let org = Org::new(gateway.client.clone(), "org-codes");
    (gateway, org)
}

// ---- CreateInvoice -----------------------------------------------------------

#[tokio::test]
async fn create_non_standard_ref_invoice() {
    let (_gateway, mut org) = start().await;
    let result = org
        .create("ord-open", CreditNote, Some("inv-prepayment-closed"))
        .await;
    assert_refused(result, FailedPrecondition, "NON_STANDARD_REF_INVOICE");
}

#[tokio::test]
async fn create_order_canceled() {
    let (_gateway, mut org) = start().await;
    let result = org.create("ord-canceled", Standard, None).await;
    assert_refused(result, FailedPrecondition, "ORDER_CANCELED");
}

#[tokio::test]
async fn create_order_closed() {
    let (_gateway, mut org) = start().await;
    let result = org.create("ord-ready", Prepayment, None).await;
    assert_refused(result, FailedPrecondition, "ORDER_CLOSED");
}

#[tokio::test]
async fn create_ref_invoice_not_found() {
    let (_gateway, mut org) = start().await;
    let result = org.create("ord-ready", CreditNote, Some("inv-nope")).await;
    assert_refused(result, NotFound, "REF_INVOICE_NOT_FOUND");
}

#[tokio::test]
async fn create_ref_invoice_still_open() {
    let (_gateway, mut org) = start().await;
    let result = org.create("ord-ready", DebitNote, Some("inv-open")).await;
    assert_refused(result, FailedPrecondition, "REF_INVOICE_STILL_OPEN");
}

#[tokio::test]
async fn create_type_not_supported() {
    let (_gateway, mut org) = start().await;
    let result = org.create("ord-pos", Prepayment, None).await;
    assert_refused(result, InvalidArgument, "TYPE_NOT_SUPPORTED");
}

// ---- DeleteInvoice -----------------------------------------------------------

#[tokio::test]
async fn delete_invoice_closed() {
    let (_gateway, mut org) = start().await;
    let result = org.delete("inv-closed").await;
    assert_refused(result, FailedPrecondition, "INVOICE_CLOSED");
}

#[tokio::test]
async fn delete_invoice_contain_lines() {
    let (_gateway, mut org) = start().await;
    let id = org.invoice("ord-open").await;
    let result = org.delete(&id).await;
    assert_refused(result, FailedPrecondition, "INVOICE_CONTAIN_LINES");
}

#[tokio::test]
async fn delete_invoice_not_found() {
    let (_gateway, mut org) = start().await;
    let id = org.invoice("ord-empty").await;
    assert!(org.delete(&id).await.expect("first delete").succeed);
    let result = org.delete(&id).await;
    assert_refused(result, NotFound, "INVOICE_NOT_FOUND");
}

#[tokio::test]
async fn delete_not_allowed() {
    let (_gateway, mut org) = start().await;
    let result = org.delete("inv-pos").await;
    assert_refused(result, PermissionDenied, "NOT_ALLOWED");
}

#[tokio::test]
async fn delete_not_found() {
    let (_gateway, mut org) = start().await;
    let result = org.delete("inv-nope").await;
    assert_refused(result, NotFound, "NOT_FOUND");
}

#[tokio::test]
async fn delete_order_canceled() {
    let (_gateway, mut org) = start().await;
    let result = org.delete("inv-canceled-order").await;
    assert_refused(result, FailedPrecondition, "ORDER_CANCELED");
}

#[tokio::test]
async fn delete_order_closed() {
    let (_gateway, mut org) = start().await;
    let result = org.delete("inv-open").await;
    assert_refused(result, FailedPrecondition, "ORDER_CLOSED");
}

// ---- UpdateInvoice -----------------------------------------------------------

#[tokio::test]
async fn update_no_changes() {
    let (_gateway, mut org) = start().await;
    let result = org.update("inv-open", "ord-ready", None, None).await;
    assert_refused(result, FailedPrecondition, "NO_CHANGES");
}

#[tokio::test]
async fn update_not_found() {
    let (_gateway, mut org) = start().await;
    let result = org
        .update("inv-nope", "ord-ready", None, Some("2030-01-01T00:00:00Z"))
        .await;
    assert_refused(result, NotFound, "NOT_FOUND");
}

// ---- CloseInvoice ------------------------------------------------------------

/// Creates a standard invoice for `order_id` and closes it.
async fn close_new(org: &mut Org, order_id: &str) -> Result<(), tonic::Status> {
    let id = org.invoice(order_id).await;
    org.close(&id).await.map(drop)
}

#[tokio::test]
async fn close_already_closed() {
    let (_gateway, mut org) = start().await;
    let result = org.close("inv-closed").await;
    assert_refused(result, FailedPrecondition, "ALREADY_CLOSED");
}

#[tokio::test]
async fn close_customer_required() {
    let (_gateway, mut org) = start().await;
    let result = close_new(&mut org, "ord-no-customer").await;
    assert_refused(result, FailedPrecondition, "CUSTOMER_REQUIRED");
}

#[tokio::test]
async fn close_draft_lines_exists() {
    let (_gateway, mut org) = start().await;
    let result = close_new(&mut org, "ord-draft-lines").await;
    assert_refused(result, FailedPrecondition, "DRAFT_LINES_EXISTS");
}

#[tokio::test]
async fn close_gift_card_recipient_not_exist() {
    let (_gateway, mut org) = start().await;
    let result = close_new(&mut org, "ord-gift-unknown-recipient").await;
    assert_refused(result, FailedPrecondition, "GIFT_CARD_RECIPIENT_NOT_EXIST");
}

#[tokio::test]
async fn close_invalid_gift_card_recipient_phone() {
    let (_gateway, mut org) = start().await;
    let result = close_new(&mut org, "ord-gift-bad-phone").await;
    assert_refused(
        result,
        FailedPrecondition,
        "INVALID_GIFT_CARD_RECIPIENT_PHONE",
    );
}

#[tokio::test]
async fn close_invoice_empty() {
    let (_gateway, mut org) = start().await;
    let id = org
        .create("ord-empty", Prepayment, None)
        .await
        .expect("create");
    let result = org.close(&id).await;
    assert_refused(result, FailedPrecondition, "INVOICE_EMPTY");
}

#[tokio::test]
async fn close_missing_gift_card_recipient() {
    let (_gateway, mut org) = start().await;
    let result = close_new(&mut org, "ord-gift-no-recipient").await;
    assert_refused(result, FailedPrecondition, "MISSING_GIFT_CARD_RECIPIENT");
}

#[tokio::test]
async fn close_order_canceled() {
    let (_gateway, mut org) = start().await;
    let result = org.close("inv-canceled-order").await;
    assert_refused(result, FailedPrecondition, "ORDER_CANCELED");
}

#[tokio::test]
async fn close_order_closed() {
    let (_gateway, mut org) = start().await;
    let result = org.close("inv-prepayment-open").await;
    assert_refused(result, FailedPrecondition, "ORDER_CLOSED");
}

#[tokio::test]
async fn close_order_not_closed() {
    let (_gateway, mut org) = start().await;
    let result = close_new(&mut org, "ord-open").await;
    assert_refused(result, FailedPrecondition, "ORDER_NOT_CLOSED");
}

#[tokio::test]
async fn close_payment_not_complete() {
    let (_gateway, mut org) = start().await;
    let result = close_new(&mut org, "ord-unpaid").await;
    assert_refused(result, FailedPrecondition, "PAYMENT_NOT_COMPLETE");
}

// ---- SendInvoice -------------------------------------------------------------

#[tokio::test]
async fn send_email_not_defined() {
    let (_gateway, mut org) = start().await;
    let id = org.invoice("ord-no-email").await;
    org.close(&id).await.expect("close");
    let result = org.send(&id).await;
    assert_refused(result, FailedPrecondition, "EMAIL_NOT_DEFINED");
}

#[tokio::test]
async fn send_invoice_not_closed() {
    let (_gateway, mut org) = start().await;
    let result = org.send("inv-open").await;
    assert_refused(result, FailedPrecondition, "INVOICE_NOT_CLOSED");
}

#[tokio::test]
async fn send_invoice_not_found() {
    let (_gateway, mut org) = start().await;
    let result = org.send("inv-nope").await;
    assert_refused(result, NotFound, "INVOICE_NOT_FOUND");
}

#[tokio::test]
async fn send_invoice_not_generated() {
    let (_gateway, mut org) = start().await;
    let result = org.send("inv-not-generated").await;
    assert_refused(result, FailedPrecondition, "INVOICE_NOT_GENERATED");
}

// ---- errors the spec has no code for -------------------------------------------

#[tokio::test]
async fn closing_an_unknown_invoice_is_not_found_without_a_spec_code() {
    let (_gateway, mut org) = start().await;
    let result = org.close("inv-nope").await;
    let message = result.as_ref().err().map(|s| s.message().to_owned());
    assert_refused(result, NotFound, "UPSTREAM_HTTP_ERROR");
    // The sandbox's words reach the message, not only the details.
    assert_eq!(
        message.as_deref(),
        Some(r#"upstream answered HTTP 404 Not Found: invoice "inv-nope" not found"#)
    );
}

#[tokio::test]
async fn creating_for_an_unknown_order_is_not_found_without_a_spec_code() {
    let (_gateway, mut org) = start().await;
    let result = org.create("ord-nope", Standard, None).await;
    let message = result.as_ref().err().map(|s| s.message().to_owned());
    assert_refused(result, NotFound, "UPSTREAM_HTTP_ERROR");
    assert_eq!(
        message.as_deref(),
        Some(r#"upstream answered HTTP 404 Not Found: order "ord-nope" not found"#)
    );
}
