//! The REST exchange with Gormic: sends one call's request ([`Operation`])
//! and turns the answer into a proto response or an [`UpstreamError`]. It
//! owns everything between the call path and the network: the client, the
//! proxy, the connection cap, the circuit breaker and the retries.
//!
//! One call's exchange ([`Upstream::send`]), in order:
//!
//! 1. `request`: the URL and JSON body, built once (`wire` holds the
//!    JSON shapes, `operation` which RPC uses which);
//! 2. `exchange`: a credential the upstream rate-limited is refused while
//!    its cooldown runs (`cooldown`, shared by the replicas through the
//!    store); the circuit breaker (`breaker`) lets the call through, then
//!    attempts follow one another while `retry` allows (never into a
//!    cooldown), all within the call's
//!    [`Deadline`](crate::deadline::Deadline);
//! 3. `attempt`: each attempt takes a slot of the connection cap
//!    (`limit`, in its tenant's turn) and goes out on this worker's
//!    reqwest client (`client`), through the proxy if any (`proxy`); its
//!    guard records its metric and span;
//! 4. `answer`: the answer, read whole, becomes a [`Reply`] or an
//!    [`UpstreamError`] (`error`); a failure without an answer is
//!    classified by `transport`, and whether its request may have left is
//!    told by the request's body (`sent`).
//!
//! The flags are read in `args` (and `retry`, `breaker`); the upstream's
//! metric series are declared in `metrics` (the cooldowns' in `cooldown`).

mod answer;
mod args;
mod attempt;
mod breaker;
mod client;
mod cooldown;
mod error;
mod exchange;
mod limit;
mod metrics;
mod operation;
mod proxy;
mod request;
mod retry;
mod sent;
mod transport;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use url::Url;

pub use answer::MAX_BODY_BYTES;
pub use args::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING,
    UpstreamArgs, UpstreamOptions,
};
pub use breaker::BreakerArgs;
pub use cooldown::{DEFAULT_COOLDOWN, DEFAULT_COOLDOWN_MAX};
pub use error::{Fault, Rejection, RetryAfter, UpstreamError};
pub use limit::UpstreamGauges;
pub use metrics::{BreakerState, UpstreamMetrics, UpstreamResult};
pub use operation::{
    CloseInvoice, CreateInvoice, DeleteInvoice, Operation, SendInvoice, Undecodable, UpdateInvoice,
};
pub use proxy::{ProxySetting, ProxyUrl};
pub use retry::RetryArgs;

use breaker::Breaker;
use client::{Clients, Protocol, Settings};
use cooldown::{CooldownSeries, Cooldowns};
use limit::ConnectionLimit;
use proxy::Proxy;
use retry::RetryPolicy;

use crate::credentials::Credentials;
use crate::deadline::Deadline;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tenant::TenantId;
use crate::trace::CallSpan;

/// `RetryInfo` of a call that could not reach the upstream (with the
/// breaker still closed): soon enough for a transient fault, late enough
/// not to hammer a dead address.
pub const UNREACHABLE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The Gormic REST API; cheap to clone, all clones share the clients, the
/// connection cap and the breaker.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
    /// Each attempt, retry and breaker transition is counted here.
    metrics: Arc<UpstreamMetrics>,
}

struct Shared {
    clients: Arc<Clients>,
    /// The base URL, whose path is replaced by each request's.
    base: Url,
    /// The base URL's path prefix without its trailing `/`; routes start with `/`.
    base_path: String,
    limit: ConnectionLimit,
    breaker: Breaker,
    retry: RetryPolicy,
    /// The credentials the upstream rate-limited, until their cooldowns end.
    cooldowns: Arc<Cooldowns>,
    /// The proxy's name and secrets, and its refusals.
    proxy: Proxy,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.shared.base.as_str())
            .field("proxy", &self.shared.proxy.shown())
            .finish_non_exhaustive()
    }
}

/// What a call carries besides its request message.
#[derive(Debug)]
pub struct CallContext<'a> {
    pub credentials: &'a Credentials,
    /// The call's `x-request-id` (the caller's, or generated), sent upstream.
    pub request_id: HeaderValue,
    /// The call's span: each attempt is a child span, whose id goes upstream
    /// in `traceparent`.
    pub span: Option<&'a CallSpan>,
    /// The call's deadline, from its arrival.
    pub deadline: Deadline,
    /// Whose turn the call waits for when every upstream slot is taken.
    pub tenant: TenantId,
}

/// A successful upstream answer, with the HTTP status for the call log.
#[derive(Debug)]
pub struct Reply<T> {
    pub message: T,
    pub http_status: u16,
}

/// What one call's upstream exchange came to, over all its attempts.
#[derive(Debug)]
pub struct Exchange<T> {
    pub result: Result<Reply<T>, UpstreamError>,
    /// Requests made (1 + retries); 0 when none could be made.
    pub attempts: u32,
    /// Whether any attempt's request may have reached the upstream. `false`
    /// means provably not: the upstream did nothing.
    pub sent: bool,
}

/// Why the upstream client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--upstream {0}")]
    Url(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl Upstream {
    /// Builds the client. `base` may carry a path prefix
    /// (`http://host/api/gormic` → `/api/gormic/v1/om/invoices`).
    pub fn new(base: &Url, options: UpstreamOptions) -> Result<Self, BuildError> {
        if base.host().is_none() {
            return Err(BuildError::Url("has no host".into()));
        }
        let https = base.scheme() == "https";
        let tls = match &options.tls {
            Some(config) => (**config).clone(),
            None => (*crate::tls::upstream_client_config(&crate::tls::TlsArgs::default())
                .map_err(|e| BuildError::Url(e.to_string()))?)
            .clone(),
        };
        let protocol = match (options.http2, https) {
            (true, _) => Protocol::Http2,
            (false, true) => Protocol::Negotiated,
            (false, false) => Protocol::Http1,
        };
        let (proxying, proxy) = Proxy::set_up(&options.proxy, base)?;
        let limit = ConnectionLimit::new(
            options.max_connections,
            options.max_pending,
            options.workers,
        );
        let retry = RetryPolicy::new(&options.retry);
        let budgets = retry.clone();
        let clients = Clients::new(
            Settings {
                tls,
                protocol,
                proxy: proxying,
                connect_timeout: options.connect_timeout,
                idle_timeout: options.idle_timeout,
                resolve: options.resolve.clone(),
                gauges: limit.gauges(),
            },
            move || budgets.budget(),
        )
        .map_err(|e| BuildError::Client(proxy.scrub(e.to_string())))?;
        Ok(Self {
            shared: Arc::new(Shared {
                clients,
                base_path: base.path().trim_end_matches('/').to_owned(),
                base: base.clone(),
                limit,
                breaker: Breaker::new(&options.breaker),
                retry,
                cooldowns: Cooldowns::new(options.cooldown_max),
                proxy,
            }),
            metrics: Metrics::default().series(),
        })
    }

    /// Counts attempts, retries and breaker transitions in `metrics`, and
    /// shows the cooldowns there.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics.series();
        metrics
            .series::<CooldownSeries>()
            .watch(&self.shared.cooldowns);
        self
    }

    /// Shares the upstream rate-limit cooldowns with every replica using
    /// `store`: those this gateway opens are published, those the others
    /// publish are applied (`cooldown`). Once, inside the runtime; nothing
    /// with cooldowns off (`--upstream-cooldown-max 0s`).
    pub fn share_cooldowns(&self, store: &Store) {
        self.shared.cooldowns.share(store);
    }

    /// The connection cap's gauges, for the metrics.
    pub fn gauges(&self) -> Arc<UpstreamGauges> {
        self.shared.limit.gauges()
    }

    /// The proxy requests go through (`scheme://host:port`, no password),
    /// or `None`.
    pub fn proxy(&self) -> Option<&str> {
        self.shared.proxy.shown()
    }
}
