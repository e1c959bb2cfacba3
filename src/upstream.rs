//! The REST side of the gateway: sends each RPC ([`Operation`]) to the
//! Gormic invoices API and turns the answer into a proto response or an
//! [`UpstreamError`]. The exchange runs on a per-worker connection pool
//! ([`pool`]) built on hyper's client connections, with the gateway's own
//! retries ([`crate::retry`]) inside the caller's deadline. The JSON shapes
//! live in `wire`, private to this module.

mod connect;
mod operation;
mod pool;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HOST, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use http_body_util::{BodyExt, Full};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::time::Instant;
use url::Url;

pub use operation::{
    CloseInvoice, CreateInvoice, DeleteInvoice, Operation, SendInvoice, Undecodable, UpdateInvoice,
};
pub use pool::PoolGauges;

impl crate::metrics::PoolGauges for PoolGauges {
    fn idle(&self) -> u64 {
        self.idle.load(Ordering::Relaxed)
    }
    fn busy(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }
    fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
    fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
    fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }
}
use pool::{Pool, PoolLimits, SendError};

use crate::metrics::{Metrics, UpstreamResult};
use crate::retry::{Decision, RetryArgs, RetryPolicy};
use crate::routes::Route;
use crate::trace::{CallSpan, UpstreamSpan};

/// Largest upstream body the gateway reads; a larger one is a malformed answer
/// (the known answers are a few hundred bytes, this bounds memory per call).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Everything but RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) is
/// percent-encoded, so an id is always exactly one path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Default of `--deadline-margin`.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_millis(100);
/// Default of `--upstream-max-connections`: Envoy's default circuit-breaker
/// value; at ~20 KiB per HTTP/1.1 connection it is 20 MiB at most.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of `--upstream-max-pending`: as many as may be in flight, so that
/// every admitted call may wait for a connection within its own deadline.
pub const DEFAULT_MAX_PENDING: usize = crate::limits::DEFAULT_MAX_IN_FLIGHT;
/// Default of `--upstream-idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Characters of an upstream body quoted in an error when it carries no code.
const EXCERPT_CHARS: usize = 256;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const API_KEY: HeaderName = HeaderName::from_static("api-key");
const ORGANIZATION_ID: HeaderName = HeaderName::from_static("organization-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const AGENT: HeaderValue =
    HeaderValue::from_static(concat!("gormic-gateway/", env!("CARGO_PKG_VERSION")));

/// How the upstream client behaves (the flags).
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Upper bound on each upstream request (`--upstream-timeout`).
    pub timeout: Duration,
    /// How much earlier than the caller's deadline the gateway gives up.
    pub deadline_margin: Duration,
    pub max_connections: usize,
    pub max_pending: usize,
    pub idle_timeout: Duration,
    /// Connection pools, one per worker thread.
    pub shards: usize,
    pub retry: RetryArgs,
    /// TLS client configuration for an `https://` upstream
    /// (`crate::tls::UpstreamTls::client_config`); `None` uses the
    /// compiled-in public roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            deadline_margin: DEFAULT_DEADLINE_MARGIN,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: DEFAULT_MAX_PENDING,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shards: 1,
            retry: RetryArgs::default(),
            tls: None,
        }
    }
}

/// The Gormic REST API; cheap to clone, all clones share the pools.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
    /// Each attempt and retry is counted here.
    metrics: Metrics,
}

struct Inner {
    pool: Pool,
    /// The base URL's path prefix without its trailing `/`; routes start with `/`.
    base_path: String,
    /// `Host` of every request.
    host: HeaderValue,
    timeout: Duration,
    deadline_margin: Duration,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.inner.host)
            .field("base_path", &self.inner.base_path)
            .finish_non_exhaustive()
    }
}

/// Per-call headers taken from the gRPC metadata.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Marked sensitive so that no `Debug` output shows it.
    pub api_key: HeaderValue,
    pub organization_id: HeaderValue,
}

/// What a call carries besides its request message.
#[derive(Debug)]
pub struct CallContext<'a> {
    pub credentials: Credentials,
    /// The call's `x-request-id` (the caller's, or generated), sent upstream.
    pub request_id: HeaderValue,
    /// The caller's gRPC deadline (`grpc-timeout`), when it set one.
    pub caller_timeout: Option<Duration>,
    /// The call's span: each attempt is a child span, whose id goes upstream
    /// in `traceparent`.
    pub span: &'a CallSpan,
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

impl<T> Exchange<T> {
    /// A failed exchange. When an earlier attempt's request may have reached
    /// the upstream, the last error says so too (`request_sent`): the
    /// caller must know the whole exchange, not only its last attempt.
    fn failed(error: UpstreamError, attempts: u32, sent: bool) -> Self {
        let error = match error {
            UpstreamError::Unreachable {
                detail,
                request_sent,
            } => UpstreamError::Unreachable {
                detail,
                request_sent: request_sent || sent,
            },
            UpstreamError::Timeout {
                after,
                bound,
                request_sent,
            } => UpstreamError::Timeout {
                after,
                bound,
                request_sent: request_sent || sent,
            },
            other => other,
        };
        Self {
            result: Err(error),
            attempts,
            sent,
        }
    }
}

/// Which limit ended a call that took too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutBound {
    /// The deadline the caller set on the gRPC call.
    CallerDeadline,
    /// The gateway's `--upstream-timeout`.
    UpstreamTimeout,
}

/// Why an upstream call did not produce a response message.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream answered with an error: a non-2xx status, or a body
    /// carrying `{"error": {"code": …}}`.
    #[error("upstream answered HTTP {}", .0.http_status)]
    Rejected(Box<Rejection>),
    /// A 2xx answer the gateway cannot read (bad JSON, a missing field).
    #[error("malformed upstream answer: {detail}")]
    Malformed {
        http_status: u16,
        detail: String,
        request_id: Option<String>,
    },
    /// No complete answer before the deadline; the request was dropped.
    #[error("upstream did not answer within {after:?}")]
    Timeout {
        after: Duration,
        bound: TimeoutBound,
        /// `false`: the call was still waiting for a connection.
        request_sent: bool,
    },
    /// The upstream could not be reached or the connection broke.
    #[error("upstream unreachable: {detail}")]
    Unreachable {
        detail: String,
        /// False when the connection failed before the request went out, so
        /// a retry cannot repeat a side effect.
        request_sent: bool,
    },
    /// Every upstream connection was busy and the queue for one was full.
    #[error("upstream connection queue full")]
    QueueFull,
    /// The gateway could not build the request (a bug, not a fault of the
    /// caller or the upstream); nothing was sent.
    #[error("cannot build the upstream request: {detail}")]
    Internal { detail: String },
}

/// An error answer of the upstream, with everything it said.
#[derive(Debug, Clone, Default)]
pub struct Rejection {
    pub http_status: u16,
    /// `error.code`, verbatim, when the body has one.
    pub code: Option<String>,
    /// `error.message`, when the body has one.
    pub message: Option<String>,
    /// `requestId` of the body, or the `x-request-id` response header.
    pub request_id: Option<String>,
    /// The `Retry-After` header.
    pub retry_after: Option<RetryAfter>,
    /// The start of a body that carries no code (an HTML error page, say).
    pub body_excerpt: Option<String>,
}

/// A `Retry-After` header: delay seconds, or a form the gateway keeps verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAfter {
    Delay(Duration),
    Other(String),
}

impl UpstreamError {
    /// The HTTP status of the upstream answer, when there was one.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::Rejected(rejection) => Some(rejection.http_status),
            Self::Malformed { http_status, .. } => Some(*http_status),
            Self::Timeout { .. }
            | Self::Unreachable { .. }
            | Self::QueueFull
            | Self::Internal { .. } => None,
        }
    }

    /// The metric label of a failure without an answer.
    pub fn error_type(&self) -> Option<&'static str> {
        match self {
            Self::Rejected(_) => None,
            Self::Malformed { .. } => Some("malformed"),
            Self::Timeout { .. } => Some("timeout"),
            Self::Unreachable {
                request_sent: false,
                ..
            } => Some("connect"),
            Self::Unreachable { .. } => Some("connection"),
            Self::QueueFull => Some("queue_full"),
            Self::Internal { .. } => Some("internal"),
        }
    }
}

/// Why the upstream client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--upstream {0}")]
    Url(String),
}

/// A request ready to be sent, as many times as the retries need.
struct Prepared {
    route: &'static Route,
    uri: http::Uri,
    body: Option<Bytes>,
}

impl Upstream {
    /// Builds the client. `base` may carry a path prefix
    /// (`http://host/api/gormic` → `/api/gormic/v1/om/invoices`).
    pub fn new(base: &Url, options: UpstreamOptions) -> Result<Self, BuildError> {
        let tls = match (&options.tls, base.scheme()) {
            (Some(config), _) => Some(config.clone()),
            (None, "https") => Some(
                crate::tls::upstream_client_config(&crate::tls::TlsArgs::default())
                    .map_err(|e| BuildError::Url(e.to_string()))?,
            ),
            (None, _) => None,
        };
        let connector = connect::Connector::new(base, tls).map_err(BuildError::Url)?;
        let host = match (base.host_str(), base.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(BuildError::Url("has no host".into())),
        };
        let authority = http::uri::Authority::try_from(host.as_str())
            .map_err(|e| BuildError::Url(format!("host is not an authority: {e}")))?;
        let scheme = if base.scheme() == "https" {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        let host = HeaderValue::from_str(&host)
            .map_err(|e| BuildError::Url(format!("host is not a header value: {e}")))?;
        let pool = Pool::new(
            connector,
            (scheme, authority),
            PoolLimits {
                max_connections: options.max_connections,
                max_pending: options.max_pending,
                idle_timeout: options.idle_timeout,
                shards: options.shards,
            },
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                base_path: base.path().trim_end_matches('/').to_owned(),
                host,
                timeout: options.timeout,
                deadline_margin: options.deadline_margin,
                retry: RetryPolicy::new(&options.retry),
            }),
            metrics: Metrics::default(),
        })
    }

    /// Counts attempts and retries in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The pool's gauges, for the metrics.
    pub fn pool_gauges(&self) -> Arc<PoolGauges> {
        self.inner.pool.gauges()
    }

    /// Sends one call's request, retrying what [`crate::retry`] allows,
    /// within the caller's deadline.
    pub async fn send<Op: Operation>(
        &self,
        call: &CallContext<'_>,
        request: &Op::Request,
    ) -> Exchange<Op::Response> {
        let prepared = match self.prepare::<Op>(request) {
            Ok(prepared) => prepared,
            Err(error) => {
                return Exchange {
                    result: Err(error),
                    attempts: 0,
                    sent: false,
                };
            }
        };
        let started = Instant::now();
        let (budget, bound) = self.budget(call.caller_timeout);
        let deadline = started + budget;
        let retry = &self.inner.retry;
        retry.record_call();
        let mut sent = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let attempt_sent = AtomicBool::new(false);
            let span = call.span.upstream(&Op::ROUTE.method, Op::ROUTE.template);
            let attempt_started = Instant::now();
            let abandoned = Abandoned {
                metrics: &self.metrics,
                rpc: Op::ROUTE.rpc,
                started: attempt_started,
                sent: &attempt_sent,
            };
            let exchange = self.exchange::<Op>(&prepared, call, &span, &attempt_sent);
            let result = match tokio::time::timeout_at(deadline, exchange).await {
                Ok(result) => result,
                Err(_) => Err(UpstreamError::Timeout {
                    after: budget,
                    bound,
                    request_sent: attempt_sent.load(Ordering::Relaxed),
                }),
            };
            sent |= attempt_sent.load(Ordering::Relaxed);
            std::mem::forget(abandoned);
            self.observe(Op::ROUTE.rpc, &result, attempt_started.elapsed(), span);
            let error = match result {
                Ok(reply) => {
                    return Exchange {
                        result: Ok(reply),
                        attempts: attempt,
                        sent,
                    };
                }
                Err(error) => error,
            };
            let remaining = Some(deadline.saturating_duration_since(Instant::now()));
            match retry.decide(Op::REPEATABLE, &error, attempt, remaining) {
                Decision::Retry { delay, reason } => {
                    self.metrics.retry(Op::ROUTE.rpc, reason);
                    tracing::debug!(
                        rpc = Op::ROUTE.rpc,
                        attempt,
                        reason,
                        delay_ms = delay.as_millis() as u64,
                        "retrying the upstream request"
                    );
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(delay))
                        .await
                        .is_err()
                    {
                        return Exchange::failed(error, attempt, sent);
                    }
                }
                Decision::Stop => return Exchange::failed(error, attempt, sent),
            }
        }
    }

    /// One attempt's metric and span. Nothing is recorded for an attempt
    /// that never reached a connection (queue full, request not built).
    fn observe<T>(
        &self,
        rpc: &'static str,
        result: &Result<Reply<T>, UpstreamError>,
        elapsed: Duration,
        span: UpstreamSpan,
    ) {
        let (outcome, code) = match result {
            Ok(reply) => (UpstreamResult::Status(reply.http_status), None),
            Err(UpstreamError::Rejected(rejection)) => (
                UpstreamResult::Status(rejection.http_status),
                rejection.code.as_deref(),
            ),
            Err(UpstreamError::Malformed { http_status, .. }) => {
                (UpstreamResult::Malformed(Some(*http_status)), None)
            }
            Err(UpstreamError::Timeout { .. }) => (UpstreamResult::Timeout, None),
            Err(UpstreamError::Unreachable {
                request_sent: false,
                ..
            }) => (UpstreamResult::Connect, None),
            Err(UpstreamError::Unreachable { .. }) => (UpstreamResult::Connection, None),
            Err(UpstreamError::QueueFull | UpstreamError::Internal { .. }) => {
                drop(span);
                return;
            }
        };
        self.metrics.upstream_request(rpc, outcome, elapsed);
        span.end(outcome.status(), outcome.error_type(), code);
    }

    fn prepare<Op: Operation>(&self, request: &Op::Request) -> Result<Prepared, UpstreamError> {
        let route = Op::ROUTE;
        let body = Op::body(request).map_err(|e| UpstreamError::Internal {
            detail: format!("cannot encode the request body: {e}"),
        })?;
        debug_assert_eq!(
            body.is_some(),
            route.has_body,
            "{}: body vs google.api.http",
            route.rpc
        );
        let path = self.path(route, Op::invoice_id(request));
        let uri = http::Uri::try_from(path).map_err(|e| UpstreamError::Internal {
            detail: format!("cannot build the request path: {e}"),
        })?;
        Ok(Prepared { route, uri, body })
    }

    /// One attempt: a connection, the request, the whole answer.
    async fn exchange<Op: Operation>(
        &self,
        prepared: &Prepared,
        call: &CallContext<'_>,
        span: &UpstreamSpan,
        sent: &AtomicBool,
    ) -> Result<Reply<Op::Response>, UpstreamError> {
        let request = || self.request(prepared, call, span);
        let (response, mut lease) = self
            .inner
            .pool
            .send(&request, sent)
            .await
            .map_err(send_fault)?;
        let (parts, body) = response.into_parts();
        let http_status = parts.status.as_u16();
        let bytes = read_body(body, http_status).await?;
        lease.reusable();
        drop(lease);

        // A 2xx is a success when its body is the envelope; otherwise, and
        // for every other status, the body is read as an error answer.
        let header_request_id = || {
            parts
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let unreadable = if parts.status.is_success() {
            match Op::decode(&bytes) {
                Ok(message) => {
                    return Ok(Reply {
                        message,
                        http_status,
                    });
                }
                Err(Undecodable::Unreadable { detail, request_id }) => {
                    return Err(UpstreamError::Malformed {
                        http_status,
                        detail: format!("{}: {detail}", prepared.route.rpc),
                        request_id,
                    });
                }
                Err(Undecodable::NotTheEnvelope(error)) => Some(error),
            }
        } else {
            None
        };
        let parsed = wire::ErrorBody::parse(&bytes).unwrap_or_default();
        if let Some(error) = unreadable
            && parsed.code.is_none()
        {
            return Err(UpstreamError::Malformed {
                http_status,
                detail: format!("{}: {error}", prepared.route.rpc),
                request_id: header_request_id(),
            });
        }
        // A 2xx carrying `{"error": {"code": …}}` is a refusal like a 400.
        let body_excerpt = match parsed.code {
            Some(_) => None,
            None => excerpt(&bytes),
        };
        Err(UpstreamError::Rejected(Box::new(Rejection {
            http_status,
            code: parsed.code,
            message: parsed.message,
            request_id: parsed.request_id.or_else(header_request_id),
            retry_after: parts
                .headers
                .get(RETRY_AFTER)
                .map(|v| parse_retry_after(v.as_bytes())),
            body_excerpt,
        })))
    }

    fn request(
        &self,
        prepared: &Prepared,
        call: &CallContext<'_>,
        span: &UpstreamSpan,
    ) -> http::Request<Full<Bytes>> {
        let body = prepared.body.clone().unwrap_or_default();
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = prepared.route.method.clone();
        *request.uri_mut() = prepared.uri.clone();
        let headers = request.headers_mut();
        headers.reserve(10);
        headers.insert(HOST, self.inner.host.clone());
        headers.insert(USER_AGENT, AGENT);
        headers.insert(ACCEPT, JSON);
        if prepared.body.is_some() {
            headers.insert(CONTENT_TYPE, JSON);
        }
        headers.insert(API_KEY, call.credentials.api_key.clone());
        headers.insert(ORGANIZATION_ID, call.credentials.organization_id.clone());
        headers.insert(REQUEST_ID, call.request_id.clone());
        headers.insert(TRACEPARENT, span.traceparent());
        if let Some(tracestate) = span.tracestate() {
            headers.insert(TRACESTATE, tracestate);
        }
        request
    }

    /// How long a call's whole upstream exchange may take (all attempts).
    pub fn exchange_budget(&self, caller_timeout: Option<Duration>) -> Duration {
        self.budget(caller_timeout).0
    }

    /// How long the upstream exchange may take, and which limit that is: the
    /// caller's deadline less the margin (at most a tenth of it), or
    /// `--upstream-timeout`, whichever is shorter.
    fn budget(&self, caller_timeout: Option<Duration>) -> (Duration, TimeoutBound) {
        let inner = &self.inner;
        let caller_budget =
            caller_timeout.map(|caller| caller - inner.deadline_margin.min(caller / 10));
        match caller_budget {
            Some(budget) if budget < inner.timeout => (budget, TimeoutBound::CallerDeadline),
            _ => (inner.timeout, TimeoutBound::UpstreamTimeout),
        }
    }

    /// `base path + route`, with the id as one percent-encoded segment.
    fn path(&self, route: &Route, invoice_id: Option<&str>) -> String {
        let base = &self.inner.base_path;
        let mut path = String::with_capacity(base.len() + route.template.len() + 32);
        path.push_str(base);
        path.push_str(route.before_id);
        if let (Some(id), Some(after)) = (invoice_id, route.after_id) {
            path.extend(utf8_percent_encode(id, PATH_SEGMENT));
            path.push_str(after);
        }
        path
    }
}

/// Counts an attempt whose call was dropped (the caller went away) while its
/// request may have been with the upstream; the span ends by itself.
struct Abandoned<'a> {
    metrics: &'a Metrics,
    rpc: &'static str,
    started: Instant,
    sent: &'a AtomicBool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.sent.load(Ordering::Relaxed) {
            let elapsed = self.started.elapsed();
            self.metrics
                .upstream_request(self.rpc, UpstreamResult::Cancelled, elapsed);
        }
    }
}

/// Reads the body frame by frame so that an oversized answer is refused
/// before it is held in memory.
async fn read_body(
    mut body: hyper::body::Incoming,
    http_status: u16,
) -> Result<Vec<u8>, UpstreamError> {
    let expected = http_body::Body::size_hint(&body).exact();
    let mut bytes =
        Vec::with_capacity(expected.map_or(512, |n| n.min(MAX_BODY_BYTES as u64) as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| transport_fault(&e, true))?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(UpstreamError::Malformed {
                http_status,
                detail: format!("answer larger than {MAX_BODY_BYTES} bytes"),
                request_id: None,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

fn send_fault(error: SendError) -> UpstreamError {
    match error {
        SendError::QueueFull => UpstreamError::QueueFull,
        SendError::Connect(error) => UpstreamError::Unreachable {
            detail: error.0,
            request_sent: false,
        },
        SendError::Stale(error) => transport_fault(&error, false),
        SendError::Sent(error) => transport_fault(&error, true),
    }
}

/// A transport error, with its chain of causes.
fn transport_fault(error: &(dyn std::error::Error + 'static), request_sent: bool) -> UpstreamError {
    // The status message is for callers: name the fault, not our topology.
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    UpstreamError::Unreachable {
        detail,
        request_sent,
    }
}

fn parse_retry_after(value: &[u8]) -> RetryAfter {
    let text = String::from_utf8_lossy(value).trim().to_owned();
    match text.parse::<u64>() {
        Ok(seconds) => RetryAfter::Delay(Duration::from_secs(seconds)),
        Err(_) => RetryAfter::Other(text),
    }
}

fn excerpt(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(text.chars().take(EXCERPT_CHARS).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes;

    fn upstream(base: &str) -> Upstream {
        let url = Url::parse(base).unwrap();
        let options = UpstreamOptions {
            timeout: Duration::from_secs(1),
            ..Default::default()
        };
        Upstream::new(&url, options).unwrap()
    }

    #[test]
    fn hostile_ids_stay_one_segment_under_the_base_path() {
        let up = upstream("http://h:1/api/gormic/");
        let cases = [
            (
                "../orders/1",
                "/api/gormic/v1/om/invoices/..%2Forders%2F1/close",
            ),
            ("a/b", "/api/gormic/v1/om/invoices/a%2Fb/close"),
            ("x?y", "/api/gormic/v1/om/invoices/x%3Fy/close"),
            ("x#y", "/api/gormic/v1/om/invoices/x%23y/close"),
            ("é %", "/api/gormic/v1/om/invoices/%C3%A9%20%25/close"),
            ("A-z.0_9~", "/api/gormic/v1/om/invoices/A-z.0_9~/close"),
        ];
        for (id, path) in cases {
            let uri = http::Uri::try_from(up.path(&routes::CLOSE_INVOICE, Some(id))).unwrap();
            assert_eq!(uri.path(), path, "id {id:?}");
            assert_eq!(uri.query(), None);
        }
    }

    #[test]
    fn create_has_no_id_segment() {
        let path = upstream("https://h").path(&routes::CREATE_INVOICE, None);
        assert_eq!(path, "/v1/om/invoices");
    }

    #[test]
    fn the_host_header_keeps_a_non_default_port() {
        assert_eq!(upstream("http://h:8080/x").inner.host, "h:8080");
        assert_eq!(upstream("https://h/x").inner.host, "h");
        assert_eq!(upstream("http://[::1]:9/").inner.host, "[::1]:9");
    }

    #[test]
    fn the_caller_deadline_less_a_capped_margin_or_the_upstream_timeout() {
        let up = upstream("http://h"); // 1 s timeout, 100 ms margin
        let ms = Duration::from_millis;
        assert_eq!(up.budget(None), (ms(1000), TimeoutBound::UpstreamTimeout));
        assert_eq!(
            up.budget(Some(ms(600))),
            (ms(540), TimeoutBound::CallerDeadline)
        );
        assert_eq!(
            up.budget(Some(ms(1050))),
            (ms(950), TimeoutBound::CallerDeadline)
        );
        assert_eq!(
            up.budget(Some(ms(5000))),
            (ms(1000), TimeoutBound::UpstreamTimeout)
        );
        let url = Url::parse("http://h").unwrap();
        let wide = Upstream::new(
            &url,
            UpstreamOptions {
                timeout: ms(1000),
                deadline_margin: ms(5000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            wide.budget(Some(ms(800))),
            (ms(720), TimeoutBound::CallerDeadline)
        );
    }

    #[test]
    fn retry_after_seconds_and_other_forms() {
        assert_eq!(
            parse_retry_after(b" 7 "),
            RetryAfter::Delay(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"),
            RetryAfter::Other("Wed, 21 Oct 2015 07:28:00 GMT".into())
        );
    }
}
