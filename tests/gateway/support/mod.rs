//! Test harness: a scripted fake upstream (a real HTTP server on loopback)
//! and a gateway started in-process on an ephemeral port, driven by the tonic
//! client generated from our proto. Each helper's self-tests are in a
//! `mod tests` at the end of its file (`cargo test --test gateway support::`).

pub mod admin;
pub mod binary;
pub mod blackhole;
pub mod certs;
pub mod delay_proxy;
pub mod fake_upstream;
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
pub mod switch_proxy;
pub mod tinyproxy;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_types::{ErrorDetails, StatusExt};

use gormic_gateway::deadline::DeadlineArgs;
use gormic_gateway::limits::InFlightLimit;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::server::ServerOptions;
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::upstream::{ProxySetting, Upstream, UpstreamOptions};

pub use fake_upstream::{FakeUpstream, Scripted};
pub use logs::logs;

pub const API_KEY: &str = "test-api-key-5f2c9a";
pub const ORGANIZATION: &str = "org-1";

/// A gateway serving on `127.0.0.1:<ephemeral>`.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub client: InvoiceServiceClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway in front of `upstream_url`.
    pub async fn start(upstream_url: &str, upstream_timeout: Duration) -> Self {
        Self::start_with_grace(upstream_url, upstream_timeout, Duration::from_secs(5)).await
    }

    pub async fn start_with_grace(
        upstream_url: &str,
        upstream_timeout: Duration,
        grace: Duration,
    ) -> Self {
        let options = gormic_gateway::server::ServerOptions {
            grace,
            ..Default::default()
        };
        Self::start_with_options(upstream_url, upstream_timeout, options).await
    }

    /// Starts a gateway with explicit server options (grace, CORS).
    pub async fn start_with_options(
        upstream_url: &str,
        upstream_timeout: Duration,
        options: gormic_gateway::server::ServerOptions,
    ) -> Self {
        let url = url::Url::parse(upstream_url).expect("test upstream URL");
        let upstream = Upstream::new(&url, no_proxy()).expect("HTTP client");
        let gateway = InvoiceGateway::new(upstream)
            .expect("in-memory idempotency store")
            .with_deadlines(DeadlineArgs {
                upstream_timeout,
                ..Default::default()
            });
        Self::start_with_gateway(gateway, options).await
    }

    /// Starts a gateway in front of `upstream_url` with every knob chosen by
    /// the test.
    pub async fn start_configured(upstream_url: &str, config: GatewayConfig) -> Self {
        let url = url::Url::parse(upstream_url).expect("test upstream URL");
        let upstream = Upstream::new(&url, config.upstream).expect("HTTP client");
        let gateway = InvoiceGateway::new(upstream)
            .expect("in-memory idempotency store")
            .with_in_flight_limit(InFlightLimit::new(config.max_in_flight))
            .with_deadlines(config.deadlines);
        Self::start_with_gateway(gateway, config.server).await
    }

    /// Starts a server around a gateway configured by the test.
    pub async fn start_with_gateway(
        gateway: InvoiceGateway,
        options: gormic_gateway::server::ServerOptions,
    ) -> Self {
        let listener =
            gormic_gateway::server::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            gormic_gateway::server::run(listener, gateway, shutdown, options)
                .await
                .expect("server run");
        });
        // The listener is bound before the task starts: connecting needs no wait.
        let client = InvoiceServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to gateway");
        Self {
            addr,
            client,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Asks the server to shut down (as SIGTERM does in the binary).
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect_lazy()
    }
}

/// Every knob of a test gateway; `Default` is the command line's defaults
/// (with one worker thread).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub upstream: UpstreamOptions,
    pub deadlines: DeadlineArgs,
    pub server: ServerOptions,
    pub max_in_flight: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            upstream: no_proxy(),
            deadlines: DeadlineArgs::default(),
            server: ServerOptions::default(),
            max_in_flight: gormic_gateway::limits::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// The command line's upstream options, but never through a proxy the
/// developer's environment names (`HTTP_PROXY` and the like): tests that
/// need a proxy say so.
pub fn no_proxy() -> UpstreamOptions {
    UpstreamOptions {
        proxy: ProxySetting::Off,
        ..UpstreamOptions::default()
    }
}

/// A reqwest client builder for test clients. The crate builds reqwest
/// without a default TLS provider (the gateway hands it its own rustls
/// configuration), so tests install ring, the project's provider, first.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// The fake upstream and a gateway in front of it (10 s upstream timeout).
pub async fn spawn_app() -> (FakeUpstream, TestGateway) {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start(&upstream.url(), Duration::from_secs(10)).await;
    (upstream, gateway)
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
