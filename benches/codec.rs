//! Micro-benchmarks of the gateway's pure work per call, without the
//! network (`cargo bench --bench codec`): the proto request as the REST JSON
//! body, the REST answer as the proto response, an upstream refusal as a
//! gRPC status with its details, and the fairness step (tenant and share).
//! A regression here shows without the machine's scheduling noise that the
//! end-to-end `scripts/bench` carries.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

use gormic_gateway::errors::{CallError, StatusContext};
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::upstream::{
    CloseInvoice, CreateInvoice, Operation, Rejection, UpdateInvoice, UpstreamError,
};

const CLOSED: &[u8] = br#"{"app":"om","service":"invoices","warnings":[],"instanceId":"i-1","requestId":"r-1","data":{"invoiceNumber":1043,"invoiceSource":"POS","invoicedAt":"2026-11-25T10:00:00Z"}}"#;
const CREATED: &[u8] = br#"{"app":"om","service":"invoices","warnings":[{"code":"W1","detail":"x"}],"instanceId":"i-1","requestId":"r-1","data":{"id":"inv-1"}}"#;

fn request_to_json(c: &mut Criterion) {
    let create = pb::CreateInvoiceRequest {
        order_id: "ord-0001".into(),
        r#type: pb::InvoiceType::Standard as i32,
        reference_invoice_id: Some("inv-0000".into()),
        apply_expires_at: None,
    };
    let update = pb::UpdateInvoiceRequest {
        invoice_id: "inv-1".into(),
        order_id: "ord-0001".into(),
        ..Default::default()
    };
    c.bench_function("request to JSON: CreateInvoice", |b| {
        b.iter(|| CreateInvoice::body(black_box(&create)))
    });
    c.bench_function("request to JSON: UpdateInvoice", |b| {
        b.iter(|| UpdateInvoice::body(black_box(&update)))
    });
}

fn json_to_response(c: &mut Criterion) {
    c.bench_function("JSON to response: CloseInvoice", |b| {
        b.iter(|| CloseInvoice::decode(black_box(CLOSED)).map(|r| r.invoice_number))
    });
    c.bench_function("JSON to response: CreateInvoice (one warning)", |b| {
        b.iter(|| CreateInvoice::decode(black_box(CREATED)).map(|r| r.id.len()))
    });
}

fn error_mapping(c: &mut Criterion) {
    let refused = CallError::Upstream(UpstreamError::Rejected(Box::new(Rejection {
        http_status: 400,
        code: Some("ALREADY_CLOSED".into()),
        request_id: Some("req-1".into()),
        ..Default::default()
    })));
    let context = StatusContext {
        rpc: "CloseInvoice",
        request_id: Some("caller-1"),
        attempts: Some(1),
    };
    c.bench_function("error to status: ALREADY_CLOSED with details", |b| {
        b.iter(|| black_box(&refused).to_status(black_box(&context)))
    });
}

/// The fairness step of an uncontended call: its tenant (a SipHash of the
/// organization, and, without `--credentials`, a look-up in the trusted
/// set), then its place in its tenant's share, taken and given back.
fn fair_share(c: &mut Criterion) {
    use gormic_gateway::credentials::Credentials;
    use gormic_gateway::limits::InFlightLimit;
    use gormic_gateway::tenant::{TenantKey, Tenants};

    let credentials = Credentials {
        api_key: http::HeaderValue::from_static("k"),
        organization_id: http::HeaderValue::from_static("org-0001"),
    };
    let limit = InFlightLimit::new(10_000);
    let tenants = Tenants::new(TenantKey::Organization);
    let trusted = tenants.identify(&credentials, None, false);
    tenants.answered(&trusted, 200);
    let _admitted = limit.try_admit();
    c.bench_function("fair share: tenant and share, trusted set", |b| {
        b.iter(|| {
            let tenant = tenants.identify(black_box(&credentials), None, false);
            drop(black_box(limit.fair_share(tenant.id)));
        })
    });
    c.bench_function("fair share: tenant and share, --credentials", |b| {
        b.iter(|| {
            let tenant = tenants.identify(black_box(&credentials), None, true);
            drop(black_box(limit.fair_share(tenant.id)));
        })
    });
}

criterion_group!(
    benches,
    request_to_json,
    json_to_response,
    error_mapping,
    fair_share
);
criterion_main!(benches);
