//! The REST side of the gateway: one pooled HTTP client that sends each RPC to
//! the Gormic invoices API and turns the answer into a proto response or an
//! [`UpstreamError`]. The JSON shapes live in [`wire`], private to this module.

mod wire;

use std::time::Duration;

use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Url;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::proto::v1 as pb;
use crate::routes::{self, Route};

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

/// Characters of an upstream body quoted in an error when it carries no code.
const EXCERPT_CHARS: usize = 256;

/// The Gormic REST API, reached through one shared connection pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    /// Scheme, host and port, parsed once: each call only sets the path.
    base: Url,
    /// The base URL's path prefix without its trailing `/`; routes start with `/`.
    base_path: String,
    timeout: Duration,
    deadline_margin: Duration,
}

/// Per-call headers taken from the gRPC metadata.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Marked sensitive so that no `Debug` output shows it.
    pub api_key: HeaderValue,
    pub organization_id: HeaderValue,
    /// The caller's `x-request-id`, forwarded for correlation.
    pub request_id: Option<HeaderValue>,
}

/// What a call carries besides its request message.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub credentials: Credentials,
    /// The caller's gRPC deadline (`grpc-timeout`), when it set one.
    pub caller_timeout: Option<Duration>,
}

/// The body of the RPCs whose `google.api.http` option has none.
const NO_BODY: Option<&()> = None;

/// A successful upstream answer, with the HTTP status for the call log.
#[derive(Debug)]
pub struct Reply<T> {
    pub message: T,
    pub http_status: u16,
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
    },
    /// The upstream could not be reached or the connection broke.
    #[error("upstream unreachable: {detail}")]
    Unreachable {
        detail: String,
        /// False when the connection failed before the request went out, so
        /// a retry cannot repeat a side effect.
        request_sent: bool,
    },
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
            Self::Timeout { .. } | Self::Unreachable { .. } | Self::Internal { .. } => None,
        }
    }
}

impl Upstream {
    /// Builds the client. `base` may carry a path prefix
    /// (`http://host/api/gormic` → `/api/gormic/v1/om/invoices`).
    pub fn new(base: &Url, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A redirect would carry the api-key to whatever host it names.
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("gormic-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            base_path: base.path().trim_end_matches('/').to_owned(),
            base: {
                let mut origin = base.clone();
                origin.set_query(None);
                origin.set_fragment(None);
                origin
            },
            timeout,
            deadline_margin: DEFAULT_DEADLINE_MARGIN,
        })
    }

    /// How much earlier than the caller's deadline the gateway gives up, so
    /// that its DEADLINE_EXCEEDED (with details) reaches the caller before
    /// the caller's own timer fires. Capped at a tenth of the deadline.
    pub fn with_deadline_margin(mut self, margin: Duration) -> Self {
        self.deadline_margin = margin;
        self
    }

    pub async fn create_invoice(
        &self,
        call: &CallContext,
        request: &pb::CreateInvoiceRequest,
    ) -> Result<Reply<pb::CreateInvoiceResponse>, UpstreamError> {
        let body = wire::create_body(request);
        self.forward(call, &routes::CREATE_INVOICE, None, Some(&body), |e| {
            Ok(wire::create_response(e))
        })
        .await
    }

    pub async fn update_invoice(
        &self,
        call: &CallContext,
        request: &pb::UpdateInvoiceRequest,
    ) -> Result<Reply<pb::UpdateInvoiceResponse>, UpstreamError> {
        let body = wire::update_body(request);
        let id = Some(request.invoice_id.as_str());
        self.forward(call, &routes::UPDATE_INVOICE, id, Some(&body), |e| {
            Ok(wire::update_response(e))
        })
        .await
    }

    pub async fn delete_invoice(
        &self,
        call: &CallContext,
        request: &pb::DeleteInvoiceRequest,
    ) -> Result<Reply<pb::DeleteInvoiceResponse>, UpstreamError> {
        let id = Some(request.invoice_id.as_str());
        self.forward(call, &routes::DELETE_INVOICE, id, NO_BODY, |e| {
            Ok(wire::delete_response(e))
        })
        .await
    }

    pub async fn close_invoice(
        &self,
        call: &CallContext,
        request: &pb::CloseInvoiceRequest,
    ) -> Result<Reply<pb::CloseInvoiceResponse>, UpstreamError> {
        let id = Some(request.invoice_id.as_str());
        self.forward(
            call,
            &routes::CLOSE_INVOICE,
            id,
            NO_BODY,
            wire::close_response,
        )
        .await
    }

    pub async fn send_invoice(
        &self,
        call: &CallContext,
        request: &pb::SendInvoiceRequest,
    ) -> Result<Reply<pb::SendInvoiceResponse>, UpstreamError> {
        let id = Some(request.invoice_id.as_str());
        self.forward(call, &routes::SEND_INVOICE, id, NO_BODY, |e| {
            Ok(wire::send_response(e))
        })
        .await
    }

    /// One RPC: the exchange, then `convert` from the envelope to the proto
    /// response; a conversion failure is a malformed answer.
    async fn forward<D: DeserializeOwned, R>(
        &self,
        call: &CallContext,
        route: &Route,
        invoice_id: Option<&str>,
        body: Option<&impl serde::Serialize>,
        convert: fn(wire::Envelope<D>) -> Result<R, wire::Unreadable>,
    ) -> Result<Reply<R>, UpstreamError> {
        let reply = self.call::<D>(route, invoice_id, body, call).await?;
        let http_status = reply.http_status;
        match convert(reply.message) {
            Ok(message) => Ok(Reply {
                message,
                http_status,
            }),
            Err(unreadable) => Err(UpstreamError::Malformed {
                http_status,
                detail: format!("{}: {}", route.rpc, unreadable.detail),
                request_id: unreadable.request_id,
            }),
        }
    }

    /// Sends one request and reads its answer, bounded by the shorter of the
    /// caller's deadline and `--upstream-timeout`. On expiry the request
    /// future is dropped, which closes its connection.
    async fn call<D: DeserializeOwned>(
        &self,
        route: &Route,
        invoice_id: Option<&str>,
        body: Option<&impl serde::Serialize>,
        call: &CallContext,
    ) -> Result<Reply<wire::Envelope<D>>, UpstreamError> {
        let (after, bound) = self.budget(call.caller_timeout);
        let deadline = Instant::now() + after;
        let exchange = self.exchange(route, invoice_id, body, &call.credentials);
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout { after, bound }),
        }
    }

    async fn exchange<D: DeserializeOwned>(
        &self,
        route: &Route,
        invoice_id: Option<&str>,
        body: Option<&impl serde::Serialize>,
        credentials: &Credentials,
    ) -> Result<Reply<wire::Envelope<D>>, UpstreamError> {
        debug_assert_eq!(
            body.is_some(),
            route.has_body,
            "{}: body vs google.api.http",
            route.rpc
        );
        let url = self.url(route, invoice_id);
        let mut request = self
            .client
            .request(route.method.clone(), url)
            .header("api-key", credentials.api_key.clone())
            .header("organization-id", credentials.organization_id.clone())
            .header(ACCEPT, "application/json");
        if let Some(request_id) = &credentials.request_id {
            request = request.header("x-request-id", request_id.clone());
        }
        if let Some(body) = body {
            let json = serde_json::to_vec(body).map_err(|e| UpstreamError::Internal {
                detail: format!("cannot encode the request body: {e}"),
            })?;
            request = request.header(CONTENT_TYPE, "application/json").body(json);
        }

        let mut response = request.send().await.map_err(transport_fault)?;
        let http_status = response.status().as_u16();
        let header_request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .map(|v| parse_retry_after(v.as_bytes()));
        let bytes = read_body(&mut response, http_status).await?;

        // A 2xx is a success when its body is the envelope; otherwise, and
        // for every other status, the body is read as an error answer.
        let unreadable = if response.status().is_success() {
            match serde_json::from_slice::<wire::Envelope<D>>(&bytes) {
                Ok(envelope) => {
                    return Ok(Reply {
                        message: envelope,
                        http_status,
                    });
                }
                Err(error) => Some(error),
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
                detail: format!("{}: {error}", route.rpc),
                request_id: header_request_id,
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
            request_id: parsed.request_id.or(header_request_id),
            retry_after,
            body_excerpt,
        })))
    }

    /// How long the upstream exchange may take, and which limit that is: the
    /// caller's deadline less the margin (at most a tenth of it), or
    /// `--upstream-timeout`, whichever is shorter.
    fn budget(&self, caller_timeout: Option<Duration>) -> (Duration, TimeoutBound) {
        let caller_budget =
            caller_timeout.map(|caller| caller - self.deadline_margin.min(caller / 10));
        match caller_budget {
            Some(budget) if budget < self.timeout => (budget, TimeoutBound::CallerDeadline),
            _ => (self.timeout, TimeoutBound::UpstreamTimeout),
        }
    }

    /// `base + route`, with the id as one percent-encoded segment.
    fn url(&self, route: &Route, invoice_id: Option<&str>) -> Url {
        let mut path = String::with_capacity(self.base_path.len() + route.template.len() + 32);
        path.push_str(&self.base_path);
        path.push_str(route.before_id);
        if let (Some(id), Some(after)) = (invoice_id, route.after_id) {
            path.extend(utf8_percent_encode(id, PATH_SEGMENT));
            path.push_str(after);
        }
        let mut url = self.base.clone();
        url.set_path(&path);
        url
    }
}

/// Reads the body chunk by chunk so that an oversized answer is refused
/// before it is held in memory.
async fn read_body(
    response: &mut reqwest::Response,
    http_status: u16,
) -> Result<Vec<u8>, UpstreamError> {
    let mut body = Vec::with_capacity(
        response
            .content_length()
            .map_or(512, |n| n.min(MAX_BODY_BYTES as u64) as usize),
    );
    while let Some(chunk) = response.chunk().await.map_err(transport_fault)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(UpstreamError::Malformed {
                http_status,
                detail: format!("answer larger than {MAX_BODY_BYTES} bytes"),
                request_id: None,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error: the connection failed, or broke during the exchange.
fn transport_fault(error: reqwest::Error) -> UpstreamError {
    // The URL holds no secret, but the status message is for callers: name
    // the fault, not our topology.
    let request_sent = !error.is_connect();
    let error = error.without_url();
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(&error);
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

    fn upstream(base: &str) -> Upstream {
        let url = Url::parse(base).unwrap();
        Upstream::new(&url, Duration::from_secs(1)).unwrap()
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
            let url = up.url(&routes::CLOSE_INVOICE, Some(id));
            assert_eq!(url.path(), path, "id {id:?}");
            assert_eq!(url.query(), None);
            assert_eq!(url.fragment(), None);
        }
    }

    #[test]
    fn create_has_no_id_segment() {
        let url = upstream("https://h").url(&routes::CREATE_INVOICE, None);
        assert_eq!(url.as_str(), "https://h/v1/om/invoices");
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
        let wide = upstream("http://h").with_deadline_margin(ms(5000));
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
