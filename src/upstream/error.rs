//! Why an upstream exchange did not produce a response message: whether the
//! request may have reached the upstream (`request_sent`) is the fact
//! everything after depends on (retries, the idempotency verdict, the
//! caller's status). A transport error of the HTTP client becomes one in
//! `super::transport`; an answer, in `super::answer`.

use std::time::{Duration, SystemTime};

use crate::deadline::TimeoutBound;

/// Characters of an upstream body quoted in an error when it carries no code.
const EXCERPT_CHARS: usize = 256;

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
    /// The call's deadline passed: after the request went out (no complete
    /// answer came), or while the call waited for its turn at the connection
    /// cap (`request_sent: false`). The request, if any, was dropped.
    #[error("upstream did not answer within {after:?}")]
    Timeout {
        /// The call's whole budget ([`crate::deadline::Deadline::budget`]).
        after: Duration,
        bound: TimeoutBound,
        request_sent: bool,
    },
    /// The upstream could not be reached, or the connection broke.
    #[error("upstream unreachable: {detail}")]
    Unreachable {
        detail: String,
        fault: Fault,
        /// False when no attempt's request left the gateway, so that a retry
        /// cannot repeat a side effect.
        request_sent: bool,
    },
    /// Every slot of `--upstream-max-connections` was taken and the queue
    /// for one (`--upstream-max-pending`) was full; nothing was sent.
    #[error("upstream connection queue full")]
    QueueFull,
    /// The upstream rate-limited this call's credential (a 429, or a 503
    /// with `Retry-After`) and its cooldown has not ended
    /// (`super::cooldown`): the call fails at once; nothing was sent.
    #[error("upstream rate limit: the credential is cooling down")]
    RateLimited {
        /// What is left of the cooldown.
        retry_after: Duration,
    },
    /// The circuit breaker is open: the upstream was unreachable for the
    /// last calls, so this one fails at once; nothing was sent.
    #[error("upstream unreachable (circuit breaker open)")]
    CircuitOpen {
        /// Until the breaker lets its next probe through.
        retry_after: Duration,
    },
    /// The gateway could not build the request (a bug, not a fault of the
    /// caller or the upstream); nothing was sent.
    #[error("cannot build the upstream request: {detail}")]
    Internal { detail: String },
}

/// What kind of transport failure an [`UpstreamError::Unreachable`] is: it
/// decides whether the gateway tries again and whether the circuit breaker
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No connection: refused, name not resolved, TLS handshake or proxy
    /// failed, or a fresh connection closed before taking the request.
    /// Nothing was sent; retried, and counted by the breaker.
    Connect,
    /// `--upstream-connect-timeout` passed on every address. Nothing was
    /// sent; counted by the breaker, not retried (another attempt would
    /// most likely wait as long).
    ConnectTimeout,
    /// The call's deadline passed before a connection carried the request.
    /// Nothing was sent; neither retried nor counted (the caller's own
    /// deadline says nothing about the upstream).
    Deadline,
    /// The upstream refused the request unprocessed (HTTP/2 `REFUSED_STREAM`
    /// or a graceful `GOAWAY`, RFC 9113 §8.7). Nothing was done; retried.
    NotProcessed,
    /// The connection failed after the request was handed to it.
    Broken,
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
    /// The cooldown this answer opened for the call's credential (a 429, or
    /// a 503 with `Retry-After`; `super::cooldown`): the caller is told to
    /// retry after it, since the gateway refuses the credential until then.
    pub cooldown: Option<Duration>,
    /// The start of a body that carries no code (an HTML error page, say).
    pub body_excerpt: Option<String>,
}

/// A `Retry-After` header: a delay, or a form the gateway keeps verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAfter {
    /// delay-seconds, or an HTTP-date as the time from the answer to it
    /// (zero for a date already past).
    Delay(Duration),
    /// Neither: kept verbatim for the caller.
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
            | Self::RateLimited { .. }
            | Self::CircuitOpen { .. }
            | Self::Internal { .. } => None,
        }
    }

    /// Whether the request may have reached the upstream.
    pub fn request_sent(&self) -> bool {
        match self {
            Self::Rejected(_) | Self::Malformed { .. } => true,
            Self::Timeout { request_sent, .. } | Self::Unreachable { request_sent, .. } => {
                *request_sent
            }
            Self::QueueFull
            | Self::RateLimited { .. }
            | Self::CircuitOpen { .. }
            | Self::Internal { .. } => false,
        }
    }

    /// This failure, but saying the request may have been sent when an
    /// earlier attempt's may have: the caller must learn about the whole
    /// exchange, not only its last attempt.
    pub(super) fn sent_earlier(self, sent: bool) -> Self {
        match self {
            Self::Unreachable {
                detail,
                fault,
                request_sent,
            } => Self::Unreachable {
                detail,
                fault,
                request_sent: request_sent || sent,
            },
            Self::Timeout {
                after,
                bound,
                request_sent,
            } => Self::Timeout {
                after,
                bound,
                request_sent: request_sent || sent,
            },
            other => other,
        }
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3) read at `now`: delay-seconds,
/// or an HTTP-date (the three forms RFC 9110 allows, by `httpdate`) as the
/// time from `now` to it.
pub(super) fn parse_retry_after(value: &[u8], now: SystemTime) -> RetryAfter {
    let text = String::from_utf8_lossy(value).trim().to_owned();
    if let Ok(seconds) = text.parse::<u64>() {
        return RetryAfter::Delay(Duration::from_secs(seconds));
    }
    match httpdate::parse_http_date(&text) {
        Ok(date) => RetryAfter::Delay(date.duration_since(now).unwrap_or(Duration::ZERO)),
        Err(_) => RetryAfter::Other(text),
    }
}

pub(super) fn excerpt(bytes: &[u8]) -> Option<String> {
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

    #[test]
    fn retry_after_seconds_dates_and_other_forms() {
        // Wed, 21 Oct 2015 07:28:00 GMT
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after(b" 7 ", now),
            RetryAfter::Delay(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(b"Wed, 21 Oct 2015 07:28:30 GMT", now),
            RetryAfter::Delay(Duration::from_secs(30)),
            "an HTTP-date is the time until it"
        );
        assert_eq!(
            parse_retry_after(b"Wednesday, 21-Oct-15 07:29:00 GMT", now),
            RetryAfter::Delay(Duration::from_secs(60)),
            "the obsolete RFC 850 form too"
        );
        assert_eq!(
            parse_retry_after(b"Wed, 21 Oct 2015 07:27:00 GMT", now),
            RetryAfter::Delay(Duration::ZERO),
            "a date already past is no wait"
        );
        for garbage in ["soon", "-5", "1.5", "Wed, 32 Oct 2015 07:28:00 GMT", ""] {
            assert_eq!(
                parse_retry_after(garbage.as_bytes(), now),
                RetryAfter::Other(garbage.into()),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn an_earlier_attempt_that_was_sent_marks_the_whole_exchange_sent() {
        let refused = UpstreamError::Unreachable {
            detail: "refused".into(),
            fault: Fault::Connect,
            request_sent: false,
        };
        assert!(!refused.request_sent());
        assert!(refused.sent_earlier(true).request_sent());
        assert!(!UpstreamError::QueueFull.sent_earlier(true).request_sent());
    }
}
