//! Micro-benchmarks of the gateway's pure work per call, without the
//! network (`cargo bench --bench codec`): the proto request as the REST JSON
//! body, the REST answer as the proto response, and an upstream refusal as a
//! gRPC status with its details. A regression here shows without the
//! machine's scheduling noise that the end-to-end `scripts/bench` carries.

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

criterion_group!(benches, request_to_json, json_to_response, error_mapping);
criterion_main!(benches);
