//! The gateway in-process on `127.0.0.1:<ephemeral>`, driven by the tonic
//! client generated from our proto: [`spawn_app`] for the common case (a
//! fake upstream, and a gateway with the command line's defaults in front
//! of it), [`TestGateway::builder`] for the variations, one knob a method.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use gormic_gateway::deadline::DeadlineArgs;
use gormic_gateway::idempotency::Idempotency;
use gormic_gateway::limits::InFlightLimit;
use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::quota::Quotas;
use gormic_gateway::server::ServerOptions;
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::store::Store;
use gormic_gateway::trace::Tracer;
use gormic_gateway::upstream::{Upstream, UpstreamOptions};

use super::{FakeUpstream, no_proxy};

/// Longest a test's gRPC call to a gateway may take before its client gives
/// up: longer than any call a test makes, so only reached when the gateway
/// hangs. Not sent as `grpc-timeout`: the gateway sees no deadline.
pub const CALL_PATIENCE: Duration = Duration::from_secs(60);

/// The fake upstream and a gateway in front of it, with the command line's
/// defaults (10 s upstream timeout, in-memory idempotency store).
pub async fn spawn_app() -> (FakeUpstream, TestGateway) {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::builder(&upstream.url()).start().await;
    (upstream, gateway)
}

/// A gRPC endpoint for the gateway at `addr`: plaintext HTTP/2, every call
/// bounded by [`CALL_PATIENCE`].
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a gateway URI")
        .timeout(CALL_PATIENCE)
}

/// A gateway serving on `127.0.0.1:<ephemeral>`; dropping it starts its
/// shutdown.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub client: InvoiceServiceClient<Channel>,
    pub task: Option<JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    /// The gateway's upstream client (the gateway holds a clone).
    upstream: Upstream,
    /// The gateway's cap on calls in flight (a shared handle).
    in_flight: InFlightLimit,
}

impl TestGateway {
    /// A gateway in front of `upstream_url` with the command line's
    /// defaults, never through a proxy; each method of the builder changes
    /// one knob, then [`TestGatewayBuilder::start`] starts it.
    pub fn builder(upstream_url: &str) -> TestGatewayBuilder {
        TestGatewayBuilder {
            upstream_url: upstream_url.to_owned(),
            upstream: no_proxy(),
            deadlines: DeadlineArgs::default(),
            server: ServerOptions::default(),
            max_in_flight: None,
            idempotency: None,
            metrics: None,
            tracer: None,
            cooldowns_shared_through: None,
            quotas: None,
        }
    }

    /// The upstream client the gateway uses: its connection gauges, the
    /// proxy it goes through.
    pub fn upstream_client(&self) -> &Upstream {
        &self.upstream
    }

    /// The gateway's cap on calls in flight, as it counts them now.
    pub fn in_flight_limit(&self) -> &InFlightLimit {
        &self.in_flight
    }

    /// Asks the server to shut down (as SIGTERM does in the binary).
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// A channel of its own to the gateway (for health, reflection), which
    /// connects at its first call.
    pub fn channel(&self) -> Channel {
        endpoint(self.addr).connect_lazy()
    }
}

/// The knobs of a [`TestGateway`]; what a test leaves alone keeps the
/// command line's default (`ServerOptions::default()`: one worker thread).
#[must_use = "a builder starts nothing until `.start().await`"]
pub struct TestGatewayBuilder {
    upstream_url: String,
    upstream: UpstreamOptions,
    deadlines: DeadlineArgs,
    server: ServerOptions,
    max_in_flight: Option<usize>,
    idempotency: Option<Idempotency>,
    metrics: Option<Metrics>,
    tracer: Option<Tracer>,
    cooldowns_shared_through: Option<Store>,
    quotas: Option<Quotas>,
}

impl TestGatewayBuilder {
    /// The upstream client's options (connections, breaker, TLS, proxy…);
    /// by default [`no_proxy`].
    pub fn upstream(mut self, options: UpstreamOptions) -> Self {
        self.upstream = options;
        self
    }

    /// `--upstream-timeout`.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.deadlines.upstream_timeout = timeout;
        self
    }

    /// `--upstream-timeout` and `--deadline-margin`.
    pub fn deadlines(mut self, deadlines: DeadlineArgs) -> Self {
        self.deadlines = deadlines;
        self
    }

    /// The server's options (limits, CORS, TLS handshake timeout…).
    pub fn server(mut self, options: ServerOptions) -> Self {
        self.server = options;
        self
    }

    /// `--shutdown-grace`: how long in-flight calls may finish after
    /// [`TestGateway::shutdown`].
    pub fn grace(mut self, grace: Duration) -> Self {
        self.server.grace = grace;
        self
    }

    /// `--max-in-flight`.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = Some(max);
        self
    }

    /// Keeps idempotency keys in `store` (by default a fresh memory store).
    pub fn idempotency(mut self, store: Idempotency) -> Self {
        self.idempotency = Some(store);
        self
    }

    /// Records in `metrics`, the upstream's connection gauges included, as
    /// `main` wires it.
    pub fn metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Traces (and exports, if it does) with `tracer`.
    pub fn tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = Some(tracer);
        self
    }

    /// Shares the upstream's rate-limit cooldowns with every gateway using
    /// `store`, as `main` does with a Redis store (left out by default: the
    /// subscriber connection would add to the store's traffic that other
    /// tests count).
    pub fn share_cooldowns(mut self, store: &Store) -> Self {
        self.cooldowns_shared_through = Some(store.clone());
        self
    }

    /// Checks every call against `quotas` (`--quotas`).
    pub fn quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = Some(quotas);
        self
    }

    /// Starts the gateway, wired as `main` wires it, and connects its client.
    pub async fn start(self) -> TestGateway {
        let url = url::Url::parse(&self.upstream_url).expect("test upstream URL");
        let upstream = Upstream::new(&url, self.upstream).expect("HTTP client");
        if let Some(store) = &self.cooldowns_shared_through {
            upstream.share_cooldowns(store);
        }
        if let Some(metrics) = &self.metrics {
            metrics.register_connections(upstream.gauges());
        }
        let mut gateway =
            InvoiceGateway::new(upstream.clone()).expect("in-memory idempotency store");
        if let Some(max) = self.max_in_flight {
            gateway = gateway.with_in_flight_limit(InFlightLimit::new(max));
        }
        gateway = gateway.with_deadlines(self.deadlines);
        if let Some(store) = self.idempotency {
            gateway = gateway.with_idempotency(store);
        }
        if let Some(metrics) = self.metrics {
            gateway = gateway.with_metrics(metrics);
        }
        if let Some(tracer) = self.tracer {
            gateway = gateway.with_tracer(tracer);
        }
        if let Some(quotas) = self.quotas {
            gateway = gateway.with_quotas(quotas);
        }
        let in_flight = gateway.in_flight_limit().clone();

        let listener =
            gormic_gateway::server::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let options = self.server;
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            gormic_gateway::server::run(listener, gateway, shutdown, options)
                .await
                .expect("server run");
        });
        // The listener is bound before the task starts: connecting needs no wait.
        let channel = endpoint(addr).connect().await.expect("connect to gateway");
        TestGateway {
            addr,
            client: InvoiceServiceClient::new(channel),
            task: Some(task),
            shutdown: Some(tx),
            upstream,
            in_flight,
        }
    }
}
