//! Test harness: a scripted fake upstream (a real HTTP server on loopback)
//! and a gateway started in-process on an ephemeral port ([`spawn_app`],
//! [`TestGateway::builder`]), driven by the tonic client generated from our
//! proto; bounded waits ([`within`], [`until`]) and the idempotency stores a
//! case runs against ([`stores`]). Each helper's self-tests are in a
//! `mod tests` at the end of its file (`cargo test --test gateway support::`).

pub mod admin;
pub mod binary;
pub mod blackhole;
pub mod certs;
pub mod delay_proxy;
pub mod fake_upstream;
pub mod gateway;
pub mod hanging_up;
pub mod idle_closing;
pub mod logs;
pub mod otlp;
pub mod redis;
pub mod redis_cluster;
pub mod redis_command;
pub mod redis_sentinel;
pub mod refusing_streams;
pub mod sandbox;
pub mod secure;
pub mod stores;
pub mod switch_proxy;
pub mod tinyproxy;
pub mod wait;

use std::time::Duration;

use serde_json::json;
use tonic::metadata::MetadataMap;
use tonic_types::{ErrorDetails, StatusExt};

use gormic_gateway::idempotency::{METADATA_KEY, REPLAYED_METADATA_KEY};
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::upstream::{ProxySetting, UpstreamOptions};

pub use fake_upstream::{FakeUpstream, Scripted};
pub use gateway::{TestGateway, spawn_app};
pub use logs::logs;
pub use sandbox::as_org;
pub use wait::{PATIENCE, until, within};

pub const API_KEY: &str = "test-api-key-5f2c9a";
pub const ORGANIZATION: &str = "org-1";

/// The command line's upstream options, but never through a proxy the
/// developer's environment names (`HTTP_PROXY` and the like): tests that
/// need a proxy say so.
pub fn no_proxy() -> UpstreamOptions {
    UpstreamOptions {
        proxy: ProxySetting::Off,
        ..UpstreamOptions::default()
    }
}

/// A reqwest client builder for test clients, each request bounded by
/// [`PATIENCE`] unless the test sets its own timeout. The crate builds
/// reqwest without a default TLS provider (the gateway hands it its own
/// rustls configuration), so tests install ring, the project's provider,
/// first.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(PATIENCE)
}

/// A request with exactly these metadata entries.
pub fn with_metadata<T>(message: T, entries: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (key, value) in entries {
        request
            .metadata_mut()
            .insert(*key, value.parse().expect("ASCII metadata value"));
    }
    request
}

/// A request with both required metadata entries.
pub fn authed<T>(message: T) -> tonic::Request<T> {
    with_metadata(
        message,
        &[("api-key", API_KEY), ("organization-id", ORGANIZATION)],
    )
}

/// The `google.rpc` details of a status; fails the test if they do not decode.
pub fn details(status: &tonic::Status) -> ErrorDetails {
    status
        .check_error_details()
        .expect("grpc-status-details-bin decodes as google.rpc.Status")
}

/// `(reason, domain, metadata)` of the status's `ErrorInfo`.
pub fn error_info(status: &tonic::Status) -> tonic_types::ErrorInfo {
    details(status)
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

/// The delay of the status's `RetryInfo`; fails the test if there is none.
pub fn retry_delay(status: &tonic::Status) -> Duration {
    details(status)
        .retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"))
}

// ---- messages --------------------------------------------------------------

/// A CreateInvoice of `order`, nothing else set.
pub fn create(order: &str) -> pb::CreateInvoiceRequest {
    pb::CreateInvoiceRequest {
        order_id: order.into(),
        ..Default::default()
    }
}

/// A CloseInvoice of `inv-1`.
pub fn close() -> pb::CloseInvoiceRequest {
    pb::CloseInvoiceRequest {
        invoice_id: "inv-1".into(),
    }
}

/// The `data` of a CloseInvoice answer.
pub fn closed() -> serde_json::Value {
    json!({"invoiceNumber": 1, "invoiceSource": "POS", "invoicedAt": "2026-11-25T10:00:00Z"})
}

// ---- keyed calls -----------------------------------------------------------

/// A request with the caller's credentials and `idempotency-key: key`.
pub fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    keyed_as(message, key, ORGANIZATION, API_KEY)
}

/// A request with these credentials and `idempotency-key: key`.
pub fn keyed_as<T>(message: T, key: &str, organization: &str, api_key: &str) -> tonic::Request<T> {
    with_metadata(
        message,
        &[
            ("api-key", api_key),
            ("organization-id", organization),
            (METADATA_KEY, key),
        ],
    )
}

/// Whether the answer says it was replayed; anything but absent or `true`
/// fails the test.
pub fn replayed_in(metadata: &MetadataMap) -> bool {
    match metadata.get(REPLAYED_METADATA_KEY) {
        None => false,
        Some(value) if value == "true" => true,
        Some(other) => panic!("{REPLAYED_METADATA_KEY}: {other:?}"),
    }
}

/// [`replayed_in`] the response's metadata.
pub fn replayed<T>(response: &tonic::Response<T>) -> bool {
    replayed_in(response.metadata())
}

/// Whether the answer's replay header is `true`; any other value, or none,
/// counts as not replayed.
pub fn says_replayed(metadata: &MetadataMap) -> bool {
    metadata
        .get(REPLAYED_METADATA_KEY)
        .is_some_and(|v| v == "true")
}
