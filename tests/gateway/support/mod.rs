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

use tonic_types::{ErrorDetails, StatusExt};

use gormic_gateway::upstream::{ProxySetting, UpstreamOptions};

pub use fake_upstream::{FakeUpstream, Scripted};
pub use gateway::{TestGateway, spawn_app};
pub use logs::logs;
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
