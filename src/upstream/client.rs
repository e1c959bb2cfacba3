//! The HTTP client towards the upstream: one `reqwest::Client` per worker
//! thread, built on first use on that thread, so that its connections are
//! driven by the thread that serves the calls (thread-per-core: no call
//! hops threads). reqwest (on hyper-util) brings what the exchange needs:
//! the connection pool with an idle timeout and a reaper, a connect timeout
//! shared out between a name's addresses with Happy Eyeballs between IPv6
//! and IPv4 (RFC 8305), proxies with CONNECT tunnels, TCP keep-alive,
//! HTTP/2 by ALPN or prior knowledge, and the retry of a request that a
//! pooled connection closed before taking.
//!
//! Configured deliberately: the project's rustls configuration (roots,
//! `--upstream-ca`, client certificate, reloads), no redirects (the api-key
//! must not follow one), no retries of its own (`super::retry` decides),
//! `TCP_NODELAY`.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::atomic::AtomicU8;

use http::HeaderValue;
use http::header::{ACCEPT, HeaderMap, USER_AGENT};
use tokio::sync::Notify;
use tower::retry::budget::TpsBudget;

use super::limit::UpstreamGauges;
use super::proxy::Proxying;

/// HTTP/2 PINGs keep a multiplexed upstream connection honest.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// TCP keep-alive on every connection: an idle pooled connection whose peer
/// vanished without a word (a NAT entry dropped, a host gone) is found
/// within about a minute (30 s idle, then 3 probes 10 s apart) rather than
/// by the next call.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// Which HTTP the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// `http://` upstream: HTTP/1.1.
    Http1,
    /// `https://` upstream: whatever ALPN picks (`h2`, else `http/1.1`).
    Negotiated,
    /// `--upstream-http2`: HTTP/2 only (prior knowledge over `http://`,
    /// ALPN `h2` alone over TLS).
    Http2,
}

/// Everything a worker's client is built from.
pub(super) struct Settings {
    pub tls: rustls::ClientConfig,
    pub protocol: Protocol,
    pub proxy: Proxying,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Names resolved to these addresses instead of by DNS.
    pub resolve: Vec<(String, Vec<SocketAddr>)>,
    pub gauges: Arc<UpstreamGauges>,
}

/// What one worker thread uses for its calls.
pub(super) struct Worker {
    /// The client of the configured protocol.
    client: reqwest::Client,
    /// With `Protocol::Negotiated`: an HTTP/2-only client, used once the
    /// upstream is known to speak HTTP/2 ([`Alpn`]).
    http2: Option<reqwest::Client>,
    alpn: Option<Arc<Alpn>>,
    /// The worker's own retry budget (see `super::retry`).
    pub budget: TpsBudget,
    /// Its share of the connection cap (`super::limit`), by the order in
    /// which the worker threads first called.
    pub share: usize,
}

/// The per-thread clients of one upstream.
pub(super) struct Clients {
    settings: Settings,
    budget: Box<dyn Fn() -> TpsBudget + Send + Sync>,
    /// Workers built so far: the next one's share.
    workers: std::sync::atomic::AtomicUsize,
}

thread_local! {
    /// This thread's worker of each live upstream (one in production;
    /// tests build several).
    static WORKERS: RefCell<Vec<(Weak<Clients>, Arc<Worker>)>> = const { RefCell::new(Vec::new()) };
}

impl Clients {
    /// Checks that a client can be built from `settings` (so that a bad
    /// configuration stops the start, not the first call).
    pub(super) fn new(
        settings: Settings,
        budget: impl Fn() -> TpsBudget + Send + Sync + 'static,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let clients = Self {
            settings,
            budget: Box::new(budget),
            workers: std::sync::atomic::AtomicUsize::new(0),
        };
        clients.build(clients.settings.protocol)?;
        Ok(Arc::new(clients))
    }

    /// The calling thread's worker, built on its first call.
    pub(super) fn this_thread(self: &Arc<Self>) -> Result<Arc<Worker>, reqwest::Error> {
        WORKERS.with(|workers| {
            let mut workers = workers.borrow_mut();
            let me = Arc::as_ptr(self);
            if let Some((_, worker)) = workers.iter().find(|(c, _)| c.as_ptr() == me) {
                return Ok(worker.clone());
            }
            workers.retain(|(clients, _)| clients.strong_count() > 0);
            let negotiated = self.settings.protocol == Protocol::Negotiated;
            let worker = Arc::new(Worker {
                client: self.build(self.settings.protocol)?,
                http2: match negotiated {
                    true => Some(self.build(Protocol::Http2)?),
                    false => None,
                },
                alpn: negotiated.then(|| Arc::new(Alpn::new())),
                budget: (self.budget)(),
                share: self.workers.fetch_add(1, Ordering::Relaxed),
            });
            workers.push((Arc::downgrade(self), worker.clone()));
            Ok(worker)
        })
    }

    fn build(&self, protocol: Protocol) -> Result<reqwest::Client, reqwest::Error> {
        let s = &self.settings;
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("gormic-gateway/", env!("CARGO_PKG_VERSION"))),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let mut tls = s.tls.clone();
        tls.alpn_protocols = match protocol {
            Protocol::Http1 => vec![b"http/1.1".to_vec()],
            Protocol::Negotiated => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Protocol::Http2 => vec![b"h2".to_vec()],
        };
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .default_headers(headers)
            .connect_timeout(s.connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(TCP_KEEPALIVE)
            .tcp_keepalive_interval(TCP_KEEPALIVE_INTERVAL)
            .tcp_keepalive_retries(TCP_KEEPALIVE_RETRIES)
            .pool_idle_timeout(s.idle_timeout)
            .http2_keep_alive_interval(H2_KEEPALIVE)
            .http2_keep_alive_timeout(H2_KEEPALIVE)
            .connector_layer(CountConnections(s.gauges.clone()));
        builder = match protocol {
            Protocol::Http1 => builder.http1_only(),
            Protocol::Negotiated => builder,
            Protocol::Http2 => builder.http2_prior_knowledge(),
        };
        builder = match &s.proxy {
            Proxying::Environment => builder,
            Proxying::Off => builder.no_proxy(),
            Proxying::Through(proxy) => builder.proxy((**proxy).clone()),
        };
        for (name, addresses) in &s.resolve {
            builder = builder.resolve_to_addrs(name, addresses);
        }
        builder.build()
    }
}

/// Counts the connections opened (`gormic_gateway_upstream_connections_opened_total`).
#[derive(Clone)]
struct CountConnections(Arc<UpstreamGauges>);

impl<S> tower::Layer<S> for CountConnections {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted {
            inner,
            gauges: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Counted<S> {
    inner: S,
    gauges: Arc<UpstreamGauges>,
}

impl<S, R> tower::Service<R> for Counted<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let connecting = self.inner.call(request);
        let gauges = self.gauges.clone();
        // Boxed: connecting is rare next to calls.
        Box::pin(async move {
            let connected = connecting.await;
            if connected.is_ok() {
                gauges.opened_total.fetch_add(1, Ordering::Relaxed);
            }
            connected
        })
    }
}

/// Which protocol a worker's `https://` upstream speaks, learnt from its
/// answers (`Protocol::Negotiated`). Until a connection has taken a
/// request, one call probes and the others wait for it (at most until the
/// probe's connection is up or has failed), so that a burst of calls after
/// a start opens one connection to an HTTP/2 upstream rather than one each.
/// Once the upstream answered over HTTP/2, the worker's HTTP/2-only client
/// is used, whose pool opens a single connection at a time (hyper-util's
/// HTTP/2 connecting lock), so a burst after a GOAWAY shares one new
/// connection too.
pub(super) struct Alpn {
    state: AtomicU8,
    changed: Notify,
}

const UNKNOWN: u8 = 0;
/// One attempt is connecting; the others wait.
const PROBING: u8 = 1;
/// The probe's connection took its request, or could not be opened:
/// attempts go on side by side until one is answered.
const OPEN: u8 = 2;
const HTTP1: u8 = 3;
const HTTP2: u8 = 4;

/// An attempt that tells [`Alpn`] the protocol of its answer; the probe
/// among them also lets the waiting attempts go when it is dropped.
pub(super) struct Learner {
    alpn: Arc<Alpn>,
    probe: bool,
}

impl Alpn {
    fn new() -> Self {
        Self {
            state: AtomicU8::new(UNKNOWN),
            changed: Notify::new(),
        }
    }

    /// `from` → `to`; waiters look again.
    fn advance(&self, from: u8, to: u8) {
        if self
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.changed.notify_waiters();
        }
    }

    /// A connection took the probe's request (see `super::sent`).
    pub(super) fn probe_sent(&self) {
        self.advance(PROBING, OPEN);
    }
}

impl Learner {
    /// The upstream answered over `version`.
    pub(super) fn answered(&self, version: http::Version) {
        let learnt = if version == http::Version::HTTP_2 {
            HTTP2
        } else {
            HTTP1
        };
        self.alpn.advance(PROBING, learnt);
        self.alpn.advance(OPEN, learnt);
    }

    /// The probe's, for its request body, which tells when a connection
    /// took it.
    pub(super) fn probe(&self) -> Option<Arc<Alpn>> {
        self.probe.then(|| self.alpn.clone())
    }
}

impl Drop for Learner {
    fn drop(&mut self) {
        if self.probe {
            // No connection took it (refused, timed out, cancelled): the
            // others go on side by side.
            self.alpn.advance(PROBING, OPEN);
        }
    }
}

impl Worker {
    /// The client for an attempt and, while the protocol is being learnt,
    /// the [`Learner`] to tell; waits (until `deadline`) while another
    /// attempt probes. `None` when the deadline passed first.
    pub(super) async fn choose(
        &self,
        deadline: tokio::time::Instant,
    ) -> Option<(&reqwest::Client, Option<Learner>)> {
        let Some((alpn, h2)) = self.alpn.as_ref().zip(self.http2.as_ref()) else {
            return Some((&self.client, None));
        };
        let learner = |probe| Learner {
            alpn: alpn.clone(),
            probe,
        };
        loop {
            let changed = alpn.changed.notified();
            match alpn.state.load(Ordering::Acquire) {
                HTTP2 => return Some((h2, None)),
                HTTP1 => return Some((&self.client, None)),
                OPEN => return Some((&self.client, Some(learner(false)))),
                UNKNOWN => {
                    if alpn
                        .state
                        .compare_exchange(UNKNOWN, PROBING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return Some((&self.client, Some(learner(true))));
                    }
                }
                _ => {
                    // Registered before the state was read: no wake is lost.
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// An attempt on the HTTP/2-only client could not connect: the upstream
    /// may have stopped offering `h2`; learn the protocol again.
    pub(super) fn http2_refused(&self) {
        if let Some(alpn) = &self.alpn {
            let _ =
                alpn.state
                    .compare_exchange(HTTP2, UNKNOWN, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}
