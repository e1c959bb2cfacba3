//! The invoice life cycle through the gateway: the happy path with its
//! values, deletion, notes, tenant isolation and concurrent closes.

use std::collections::HashSet;

use tonic::Code::{FailedPrecondition, NotFound};

use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::InvoiceType::{CreditNote, Standard};

use super::client::{Org, assert_refused};
use crate::support::sandbox::{as_org, sandbox_app};

#[tokio::test]
async fn create_update_close_send() {
    let gateway = sandbox_app().await;
    let mut org = Org::new(gateway.client.clone(), "org-happy");

    let mut request = as_org(
        &org.id,
        pb::CreateInvoiceRequest {
            order_id: "ord-ready".into(),
            r#type: Standard as i32,
            ..Default::default()
        },
    );
    request
        .metadata_mut()
        .insert("x-request-id", "trace-42".parse().expect("ascii"));
    let created = org
        .client
        .create_invoice(request)
        .await
        .expect("create")
        .into_inner();
    let id = created.id;
    assert!(id.starts_with("inv-"), "{id}");
    let meta = created.meta.expect("meta");
    assert_eq!(
        (
            meta.app.as_str(),
            meta.service.as_str(),
            meta.instance_id.as_str()
        ),
        ("om", "invoices", "sandbox")
    );
    assert_eq!(meta.request_id, "trace-42", "x-request-id is echoed");
    assert!(meta.warnings.is_empty());

    let updated = org
        .update(&id, "ord-ready", None, Some("2030-01-01T00:00:00Z"))
        .await
        .expect("update");
    assert!(updated.success);
    let first_id = updated.meta.expect("meta").request_id;
    assert!(!first_id.is_empty());
    // The same change again changes nothing.
    let again = org
        .update(&id, "ord-ready", None, Some("2030-01-01T00:00:00Z"))
        .await;
    assert_refused(again, FailedPrecondition, "NO_CHANGES");

    let closed = org.close(&id).await.expect("close");
    assert_eq!(closed.invoice_number, 1001);
    assert_eq!(closed.invoice_source, "sandbox");
    humantime::parse_rfc3339(&closed.invoiced_at)
        .unwrap_or_else(|e| panic!("invoicedAt {:?}: {e}", closed.invoiced_at));
    assert_ne!(
        closed.meta.expect("meta").request_id,
        first_id,
        "request ids are unique"
    );

    let sent = org.send(&id).await.expect("send");
    assert!(sent.success);
    let message_id = sent.message_id.expect("messageId");
    assert!(message_id.starts_with("msg-"), "{message_id}");
    let second = org.send(&id).await.expect("send again");
    assert_ne!(second.message_id, Some(message_id));

    // The closed invoice is now final.
    assert_refused(org.close(&id).await, FailedPrecondition, "ALREADY_CLOSED");
    assert_refused(org.delete(&id).await, FailedPrecondition, "INVOICE_CLOSED");
}

#[tokio::test]
async fn open_invoices_of_open_orders_without_lines_can_be_deleted() {
    let gateway = sandbox_app().await;
    let mut org = Org::new(gateway.client.clone(), "org-delete");
    let id = org.invoice("ord-empty").await;
    assert!(org.delete(&id).await.expect("delete").succeed);
    assert_refused(org.send(&id).await, NotFound, "INVOICE_NOT_FOUND");
}

#[tokio::test]
async fn credit_notes_reference_closed_standard_invoices() {
    let gateway = sandbox_app().await;
    let mut org = Org::new(gateway.client.clone(), "org-notes");
    let standard = org.invoice("ord-ready").await;
    // Still open: not yet a valid reference.
    let early = org.create("ord-ready", CreditNote, Some(&standard)).await;
    assert_refused(early, FailedPrecondition, "REF_INVOICE_STILL_OPEN");
    assert_eq!(
        org.close(&standard).await.expect("close").invoice_number,
        1001
    );
    let note = org
        .create("ord-ready", CreditNote, Some(&standard))
        .await
        .expect("credit note");
    assert_eq!(org.close(&note).await.expect("close").invoice_number, 1002);
}

#[tokio::test]
async fn organizations_never_see_each_other() {
    let gateway = sandbox_app().await;
    let mut alpha = Org::new(gateway.client.clone(), "org-alpha");
    let mut beta = Org::new(gateway.client.clone(), "org-beta");

    let id = alpha.invoice("ord-ready").await;
    let expiry = Some("2030-01-01T00:00:00Z");
    assert_refused(
        beta.update(&id, "ord-ready", None, expiry).await,
        NotFound,
        "NOT_FOUND",
    );
    assert_refused(beta.delete(&id).await, NotFound, "NOT_FOUND");
    assert_refused(beta.close(&id).await, NotFound, "UPSTREAM_HTTP_ERROR");
    assert_refused(beta.send(&id).await, NotFound, "INVOICE_NOT_FOUND");

    // Each organization numbers its own invoices from the fixture on.
    assert_eq!(alpha.close(&id).await.expect("close").invoice_number, 1001);
    let own = beta.invoice("ord-ready").await;
    assert_ne!(own, id);
    assert_eq!(beta.close(&own).await.expect("close").invoice_number, 1001);

    // A change to alpha's copy of a fixture invoice leaves beta's alone.
    alpha
        .update("inv-open", "ord-ready", None, expiry)
        .await
        .expect("alpha update");
    beta.update("inv-open", "ord-ready", None, expiry)
        .await
        .expect("beta's copy still has no expiry");
    let empty = alpha.invoice("ord-empty").await;
    alpha.delete(&empty).await.expect("delete");
    assert_refused(
        alpha.close("inv-closed").await,
        FailedPrecondition,
        "ALREADY_CLOSED",
    );
}

#[tokio::test]
async fn parallel_closes_get_distinct_consecutive_numbers() {
    const N: usize = 100;
    let gateway = sandbox_app().await;
    let org = Org::new(gateway.client.clone(), "org-busy");

    let creates: Vec<_> = (0..N)
        .map(|_| {
            let mut org = org.clone();
            tokio::spawn(async move { org.invoice("ord-ready").await })
        })
        .collect();
    let mut ids = Vec::with_capacity(N);
    for create in creates {
        ids.push(create.await.expect("create task"));
    }
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        N,
        "ids are unique"
    );

    let closes: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let mut org = org.clone();
            tokio::spawn(async move { org.close(&id).await.expect("close").invoice_number })
        })
        .collect();
    let mut numbers = Vec::with_capacity(N);
    for close in closes {
        numbers.push(close.await.expect("close task"));
    }
    numbers.sort_unstable();
    let expected: Vec<i64> = (1001..1001 + N as i64).collect();
    assert_eq!(numbers, expected);
}
