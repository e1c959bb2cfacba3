//! The REST exchange with Gormic: sends one call's request ([`Operation`])
//! and turns the answer into a proto response or an [`UpstreamError`].
//!
//! One call's exchange, in order: the circuit breaker lets it through
//! ([`breaker`]); then each attempt takes a slot of the connection cap
//! ([`limit`]), goes out on this worker's reqwest client ([`client`]) and
//! reads the answer whole; a failure is tried again when [`retry`] allows,
//! all within the call's [`Deadline`]. Whether a request may have left is
//! tracked by its body ([`sent`]) and classified with the failure
//! ([`error`]). The JSON shapes live in `wire`, private to this module.

mod args;
mod breaker;
mod client;
mod error;
mod limit;
mod operation;
mod retry;
mod sent;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONTENT_TYPE, HeaderName, RETRY_AFTER};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::time::Instant;
use url::Url;

pub use args::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING,
    ProxySetting, ProxyUrl, UpstreamArgs, UpstreamOptions,
};
pub use breaker::BreakerArgs;
pub use error::{Fault, Rejection, RetryAfter, UpstreamError};
pub use limit::UpstreamGauges;
pub use operation::{
    CloseInvoice, CreateInvoice, DeleteInvoice, Operation, SendInvoice, Undecodable, UpdateInvoice,
};
pub use retry::RetryArgs;

impl crate::metrics::ConnectionGauges for UpstreamGauges {
    fn active(&self) -> u64 {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn pending(&self) -> u64 {
        self.pending.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn limit(&self) -> u64 {
        self.limit
    }
    fn opened_total(&self) -> u64 {
        self.opened_total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

use breaker::{Breaker, Outcome};
use client::{Clients, Learner, Protocol, Proxying, Settings, Worker};
use limit::{ConnectionLimit, Refused};
use retry::{Decision, RetryPolicy};
use sent::{SentFlag, TrackedBody};
use tower::retry::budget::Budget as _;

use crate::credentials::Credentials;
use crate::deadline::Deadline;
use crate::metrics::{Metrics, UpstreamResult};
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

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const API_KEY: HeaderName = HeaderName::from_static("api-key");
const ORGANIZATION_ID: HeaderName = HeaderName::from_static("organization-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

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
    metrics: Metrics,
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
    /// Proxy credentials, cut out of every error text.
    secrets: Vec<String>,
    /// The proxy requests go through, without its password (start-up log).
    proxy: Option<String>,
    /// Plain-HTTP requests go through `proxy`, which answers them itself
    /// when it refuses them (`407`); over TLS it can only refuse the tunnel.
    proxied_in_clear: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.shared.base.as_str())
            .field("proxy", &self.shared.proxy)
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
    fn not_made(error: UpstreamError) -> Self {
        Self {
            result: Err(error),
            attempts: 0,
            sent: false,
        }
    }
}

/// Why the upstream client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--upstream {0}")]
    Url(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A request ready to be sent, as many times as the retries need.
struct Prepared {
    route: &'static Route,
    url: Url,
    body: Option<Bytes>,
}

/// One attempt's result, and whether it got as far as a request.
struct Attempted<T> {
    result: Result<Reply<T>, UpstreamError>,
    /// A slot was granted and the request handed to the client.
    made: bool,
    /// A connection took the request.
    sent: bool,
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
        let (proxy, secrets, shown) = proxying(&options.proxy, base)?;
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
                proxy,
                connect_timeout: options.connect_timeout,
                idle_timeout: options.idle_timeout,
                resolve: options.resolve.clone(),
                gauges: limit.gauges(),
            },
            move || budgets.budget(),
        )
        .map_err(|e| BuildError::Client(error::scrub(e.to_string(), &secrets)))?;
        Ok(Self {
            shared: Arc::new(Shared {
                clients,
                base_path: base.path().trim_end_matches('/').to_owned(),
                base: base.clone(),
                limit,
                breaker: Breaker::new(&options.breaker),
                retry,
                secrets,
                proxied_in_clear: shown.is_some() && !https,
                proxy: shown,
            }),
            metrics: Metrics::default(),
        })
    }

    /// Counts attempts, retries and breaker transitions in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The connection cap's gauges, for the metrics.
    pub fn gauges(&self) -> Arc<UpstreamGauges> {
        self.shared.limit.gauges()
    }

    /// The proxy requests go through (`scheme://host:port`, no password),
    /// or `None`.
    pub fn proxy(&self) -> Option<&str> {
        self.shared.proxy.as_deref()
    }

    /// Sends one call's request, retrying what [`retry`] allows, within the
    /// call's deadline.
    pub async fn send<Op: Operation>(
        &self,
        call: &CallContext<'_>,
        request: &Op::Request,
    ) -> Exchange<Op::Response> {
        let shared = &*self.shared;
        let prepared = match self.prepare::<Op>(request) {
            Ok(prepared) => prepared,
            Err(error) => return Exchange::not_made(error),
        };
        let worker = match shared.clients.this_thread() {
            Ok(worker) => worker,
            Err(error) => {
                return Exchange::not_made(UpstreamError::Internal {
                    detail: error::scrub(
                        format!("cannot build the HTTP client: {error}"),
                        &shared.secrets,
                    ),
                });
            }
        };
        let ticket = match shared.breaker.admit(&self.metrics) {
            Ok(ticket) => ticket,
            Err(retry_after) => {
                return Exchange::not_made(UpstreamError::CircuitOpen { retry_after });
            }
        };
        worker.budget.deposit();

        let mut attempts = 0;
        let mut sent = false;
        let mut answered = false;
        let mut earlier: Option<UpstreamError> = None;
        let result = loop {
            let attempt = self.attempt::<Op>(&worker, &prepared, call).await;
            attempts += u32::from(attempt.made);
            sent |= attempt.sent;
            let error = match attempt.result {
                Ok(reply) => break Ok(reply),
                Err(error) => error,
            };
            answered |= error.http_status().is_some();
            if !attempt.made
                && let Some(earlier) = earlier.take()
            {
                // This attempt never got a slot: the earlier failure says more.
                break Err(earlier);
            }
            let remaining = call.deadline.remaining();
            match shared.retry.decide(
                &worker.budget,
                Op::REPEATABLE,
                &error,
                attempts.max(1),
                remaining,
            ) {
                Decision::Retry { delay, reason } => {
                    self.metrics.retry(Op::ROUTE, reason);
                    tracing::debug!(
                        rpc = Op::ROUTE.rpc,
                        attempt = attempts,
                        reason,
                        delay_ms = delay.as_millis() as u64,
                        "retrying the upstream request"
                    );
                    let _ = tokio::time::timeout_at(call.deadline.at(), tokio::time::sleep(delay))
                        .await;
                    earlier = Some(error);
                }
                Decision::Stop => break Err(error),
            }
        };
        ticket.record(breaker_outcome(&result, answered), &self.metrics);
        Exchange {
            result: result.map_err(|error| error.sent_earlier(sent)),
            attempts,
            sent,
        }
    }

    /// One attempt: a slot, the request, the whole answer.
    async fn attempt<Op: Operation>(
        &self,
        worker: &Worker,
        prepared: &Prepared,
        call: &CallContext<'_>,
    ) -> Attempted<Op::Response> {
        let deadline = &call.deadline;
        let not_made = |error| Attempted {
            result: Err(error),
            made: false,
            sent: false,
        };
        let slot = match self.shared.limit.acquire(worker.share, deadline.at()).await {
            Ok(slot) => slot,
            Err(Refused::QueueFull) => return not_made(UpstreamError::QueueFull),
            Err(Refused::Deadline) => {
                return not_made(UpstreamError::Timeout {
                    after: deadline.budget(),
                    bound: deadline.bound(),
                    request_sent: false,
                });
            }
        };
        let Some((client, learner)) = worker.choose(deadline.at()).await else {
            // Waited for another call's connection past the deadline.
            return not_made(connection_not_in_time(deadline));
        };
        let sent = SentFlag::probing(learner.as_ref().and_then(Learner::probe));
        let mut attempt = AttemptGuard {
            metrics: &self.metrics,
            route: Op::ROUTE,
            started: Instant::now(),
            span: call
                .span
                .map(|span| span.upstream(&Op::ROUTE.method, Op::ROUTE.template)),
            sent: sent.clone(),
            finished: false,
        };
        let exchange = self.exchange::<Op>(client, prepared, call, &attempt, &sent, learner);
        let result = match tokio::time::timeout_at(deadline.at(), exchange).await {
            Ok(result) => result,
            Err(_) if sent.is_set() => Err(UpstreamError::Timeout {
                after: deadline.budget(),
                bound: deadline.bound(),
                request_sent: true,
            }),
            Err(_) => Err(connection_not_in_time(deadline)),
        };
        if let Err(UpstreamError::Unreachable {
            fault: Fault::Connect,
            ..
        }) = &result
        {
            worker.http2_refused();
        }
        drop(slot);
        attempt.finish(&result);
        // A connection took the request, unless the failure proves it went
        // no further (a proxy's 407, an HTTP/2 stream refused unprocessed).
        let sent = sent.is_set()
            && result
                .as_ref()
                .err()
                .is_none_or(UpstreamError::request_sent);
        Attempted {
            result,
            made: true,
            sent,
        }
    }

    /// The request on the wire and its answer read whole.
    async fn exchange<Op: Operation>(
        &self,
        client: &reqwest::Client,
        prepared: &Prepared,
        call: &CallContext<'_>,
        attempt: &AttemptGuard<'_>,
        sent: &SentFlag,
        learner: Option<Learner>,
    ) -> Result<Reply<Op::Response>, UpstreamError> {
        let secrets = &self.shared.secrets;
        let mut request =
            reqwest::Request::new(prepared.route.method.clone(), prepared.url.clone());
        let headers = request.headers_mut();
        headers.reserve(6);
        if prepared.body.is_some() {
            headers.insert(CONTENT_TYPE, JSON);
        }
        headers.insert(API_KEY, call.credentials.api_key.clone());
        headers.insert(ORGANIZATION_ID, call.credentials.organization_id.clone());
        headers.insert(REQUEST_ID, call.request_id.clone());
        if let Some(span) = &attempt.span {
            headers.insert(TRACEPARENT, span.traceparent());
            if let Some(tracestate) = span.tracestate() {
                headers.insert(TRACESTATE, tracestate);
            }
        }
        *request.body_mut() = Some(reqwest::Body::wrap(TrackedBody::new(
            prepared.body.clone(),
            sent.clone(),
        )));

        let mut response = client.execute(request).await.map_err(|e| {
            let proxy = self.shared.proxy.as_deref();
            error::transport(&e, sent.is_set(), proxy, secrets)
        })?;
        if response.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED
            && self.shared.proxied_in_clear
        {
            return Err(proxy_refused(self.shared.proxy.as_deref()));
        }
        if let Some(learner) = learner {
            learner.answered(response.version());
        }
        let status = response.status();
        let http_status = status.as_u16();
        let bytes = read_body(&mut response, http_status, secrets).await?;

        // A 2xx is a success when its body is the envelope; otherwise, and
        // for every other status, the body is read as an error answer.
        let header_request_id = || {
            response
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let unreadable = if status.is_success() {
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
            None => error::excerpt(&bytes),
        };
        Err(UpstreamError::Rejected(Box::new(Rejection {
            http_status,
            code: parsed.code,
            message: parsed.message,
            request_id: parsed.request_id.or_else(header_request_id),
            retry_after: response
                .headers()
                .get(RETRY_AFTER)
                .map(|v| error::parse_retry_after(v.as_bytes())),
            body_excerpt,
        })))
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
        let mut url = self.shared.base.clone();
        url.set_path(&self.path(route, Op::invoice_id(request)));
        Ok(Prepared { route, url, body })
    }

    /// `base path + route`, with the id as one percent-encoded segment.
    fn path(&self, route: &Route, invoice_id: Option<&str>) -> String {
        let base = &self.shared.base_path;
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

/// The proxy set-up for `base`: what the client is told, the secrets to cut
/// out of texts, and what the start-up log shows.
fn proxying(
    setting: &ProxySetting,
    base: &Url,
) -> Result<(Proxying, Vec<String>, Option<String>), BuildError> {
    match setting {
        ProxySetting::Off => Ok((Proxying::Off, Vec::new(), None)),
        ProxySetting::Url(url) => {
            let proxy = reqwest::Proxy::all(url.expose()).map_err(|_| {
                BuildError::Client("--upstream-proxy is not a usable proxy URL".into())
            })?;
            Ok((
                Proxying::Through(Box::new(proxy)),
                url.secrets(),
                Some(url.to_string()),
            ))
        }
        ProxySetting::Environment => {
            // reqwest reads the same variables with the same matcher
            // (hyper-util's); read here only to log it and learn its secret.
            let uri: http::Uri = base
                .as_str()
                .parse()
                .map_err(|e| BuildError::Url(format!("is not a URI: {e}")))?;
            let matcher = hyper_util::client::proxy::matcher::Matcher::from_env();
            let Some(intercept) = matcher.intercept(&uri) else {
                return Ok((Proxying::Environment, Vec::new(), None));
            };
            let shown = Url::parse(&intercept.uri().to_string())
                .map(|u| args::redacted(&u))
                .unwrap_or_else(|_| "(unreadable proxy URL)".into());
            Ok((Proxying::Environment, environment_secrets(), Some(shown)))
        }
    }
}

/// The passwords of every proxy variable set (the matcher keeps an HTTP
/// proxy's credentials as a ready-made header, not as text to scrub).
fn environment_secrets() -> Vec<String> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .filter_map(|value| Url::parse(&value).ok())
    .flat_map(|url| args::secrets_of(&url))
    .collect()
}

/// How the breaker should see a call's exchange: an answer, 502-504, no
/// connection, or nothing about the upstream.
fn breaker_outcome<T>(result: &Result<Reply<T>, UpstreamError>, answered: bool) -> Outcome {
    match result {
        Ok(_) => Outcome::Answered,
        Err(UpstreamError::Rejected(rejection)) if matches!(rejection.http_status, 502..=504) => {
            Outcome::GatewayError
        }
        Err(UpstreamError::Rejected(_) | UpstreamError::Malformed { .. }) => Outcome::Answered,
        Err(_) if answered => Outcome::Answered,
        Err(UpstreamError::Unreachable {
            fault: Fault::Connect | Fault::ConnectTimeout,
            ..
        }) => Outcome::Unreachable,
        Err(UpstreamError::Unreachable {
            fault: Fault::NotProcessed,
            ..
        }) => Outcome::Answered,
        Err(_) => Outcome::Neutral,
    }
}

/// One attempt's metric and span: recorded by [`AttemptGuard::finish`], or,
/// when the call is dropped mid-attempt (the caller went away) while the
/// request may have been with the upstream, counted as cancelled.
struct AttemptGuard<'a> {
    metrics: &'a Metrics,
    route: &'static Route,
    started: Instant,
    /// Taken by `finish`; a span dropped unfinished ends as cancelled.
    span: Option<UpstreamSpan>,
    sent: SentFlag,
    finished: bool,
}

impl AttemptGuard<'_> {
    fn finish<T>(&mut self, result: &Result<Reply<T>, UpstreamError>) {
        self.finished = true;
        let span = self.span.take();
        let (outcome, code) = match result {
            Ok(reply) => (UpstreamResult::Status(reply.http_status), None),
            Err(UpstreamError::Rejected(rejection)) => (
                UpstreamResult::Status(rejection.http_status),
                rejection.code.as_deref(),
            ),
            Err(UpstreamError::Malformed { http_status, .. }) => {
                (UpstreamResult::Malformed(Some(*http_status)), None)
            }
            Err(
                UpstreamError::Timeout { .. }
                | UpstreamError::Unreachable {
                    fault: Fault::Deadline,
                    ..
                },
            ) => (UpstreamResult::Timeout, None),
            Err(UpstreamError::Unreachable {
                request_sent: false,
                ..
            }) => (UpstreamResult::Connect, None),
            Err(UpstreamError::Unreachable { .. }) => (UpstreamResult::Connection, None),
            Err(
                UpstreamError::QueueFull
                | UpstreamError::CircuitOpen { .. }
                | UpstreamError::Internal { .. },
            ) => return,
        };
        self.metrics
            .upstream_request(self.route, outcome, self.started.elapsed());
        if let Some(span) = span {
            span.end(outcome.status(), outcome.error_type(), code);
        }
    }
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        if !self.finished && self.sent.is_set() {
            self.metrics.upstream_request(
                self.route,
                UpstreamResult::Cancelled,
                self.started.elapsed(),
            );
        }
    }
}

/// Reads the body chunk by chunk so that an oversized answer is refused
/// before it is held in memory.
async fn read_body(
    response: &mut reqwest::Response,
    http_status: u16,
    secrets: &[String],
) -> Result<Vec<u8>, UpstreamError> {
    let expected = response.content_length();
    let mut bytes =
        Vec::with_capacity(expected.map_or(512, |n| n.min(MAX_BODY_BYTES as u64) as usize));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| error::body_broken(&e, secrets))?
    {
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

/// The proxy of a plain-HTTP request answered it `407 Proxy Authentication
/// Required`: the proxy's refusal (RFC 9110 §15.5.8), so the request went
/// no further and the upstream never saw it.
fn proxy_refused(proxy: Option<&str>) -> UpstreamError {
    UpstreamError::Unreachable {
        detail: format!(
            "the proxy {} refused the request: HTTP 407 Proxy Authentication Required \
             (check the credentials of --upstream-proxy or of the proxy variables)",
            proxy.unwrap_or("(unknown)")
        ),
        fault: Fault::Connect,
        request_sent: false,
    }
}

/// The call's deadline passed before a connection took the request.
fn connection_not_in_time(deadline: &Deadline) -> UpstreamError {
    UpstreamError::Unreachable {
        detail: format!(
            "no connection to the upstream took the request within the call's {} ({})",
            crate::units::format_millis(deadline.budget()),
            match deadline.bound() {
                crate::deadline::TimeoutBound::CallerDeadline => "deadline",
                crate::deadline::TimeoutBound::UpstreamTimeout => "--upstream-timeout",
            }
        ),
        fault: Fault::Deadline,
        request_sent: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes;

    fn upstream(base: &str) -> Upstream {
        let url = Url::parse(base).unwrap();
        Upstream::new(&url, UpstreamOptions::default()).unwrap()
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
            let mut url = up.shared.base.clone();
            url.set_path(&up.path(&routes::CLOSE_INVOICE, Some(id)));
            assert_eq!(url.path(), path, "id {id:?}");
            assert_eq!(url.query(), None);
        }
    }

    #[test]
    fn create_has_no_id_segment() {
        let path = upstream("https://h").path(&routes::CREATE_INVOICE, None);
        assert_eq!(path, "/v1/om/invoices");
    }

    #[test]
    fn an_explicit_proxy_is_shown_without_its_password() {
        let url = Url::parse("https://api.example.com").unwrap();
        let setting = ProxySetting::parse("http://me:hunter2@proxy:3128").unwrap();
        let (proxying, secrets, shown) = proxying(&setting, &url).unwrap();
        assert!(matches!(proxying, Proxying::Through(_)));
        assert!(secrets.contains(&"hunter2".to_owned()));
        assert_eq!(shown.as_deref(), Some("http://me:***@proxy:3128"));
    }

    #[test]
    fn the_breaker_counts_only_what_says_the_upstream_is_away() {
        let unreachable = |fault| -> Result<Reply<()>, UpstreamError> {
            Err(UpstreamError::Unreachable {
                detail: String::new(),
                fault,
                request_sent: false,
            })
        };
        let rejected = |status| -> Result<Reply<()>, UpstreamError> {
            Err(UpstreamError::Rejected(Box::new(Rejection {
                http_status: status,
                ..Default::default()
            })))
        };
        assert_eq!(
            breaker_outcome(&unreachable(Fault::Connect), false),
            Outcome::Unreachable
        );
        assert_eq!(
            breaker_outcome(&unreachable(Fault::ConnectTimeout), false),
            Outcome::Unreachable
        );
        assert_eq!(
            breaker_outcome(&unreachable(Fault::Connect), true),
            Outcome::Answered
        );
        assert_eq!(
            breaker_outcome(&unreachable(Fault::Deadline), false),
            Outcome::Neutral
        );
        assert_eq!(breaker_outcome(&rejected(400), false), Outcome::Answered);
        assert_eq!(
            breaker_outcome(&rejected(503), false),
            Outcome::GatewayError
        );
        let queue_full: Result<Reply<()>, _> = Err(UpstreamError::QueueFull);
        assert_eq!(breaker_outcome(&queue_full, false), Outcome::Neutral);
    }
}
