//! Every way a call can fail, and the one table that turns each into a gRPC
//! status with `google.rpc` details (`ErrorInfo` always; `RequestInfo`,
//! `RetryInfo`, `BadRequest` when they apply). The steps of the call path
//! refuse with errors of their own (`credentials::Refusal`,
//! `idempotency::step::Refusal`, `UpstreamError`, ...), converted here
//! (`From`), so that no step depends on this table. The README reproduces
//! these tables; keep both in step.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::credentials::Refusal as CredentialsRefusal;
use crate::deadline::TimeoutBound;
use crate::idempotency::step::{
    Refusal as IdempotencyRefusal, StoreUnavailable as IdempotencyStoreUnavailable,
};
use crate::limits::{RequestTooLarge, SHED_RETRY_DELAY};
use crate::upstream::{Fault, Rejection, RetryAfter, UNREACHABLE_RETRY_DELAY, UpstreamError};
pub use crate::validation::FieldViolation;

/// `ErrorInfo.domain` of errors the upstream reported (its error codes).
pub const UPSTREAM_DOMAIN: &str = "om.gormic.com";
/// `ErrorInfo.domain` of errors the gateway itself found.
pub const GATEWAY_DOMAIN: &str = "gateway.om.gormic.com";

/// `ErrorInfo.reason` values of gateway-originated errors.
pub mod reason {
    /// No `api-key` in the call metadata.
    pub const MISSING_API_KEY: &str = "MISSING_API_KEY";
    /// No `organization-id` in the call metadata.
    pub const MISSING_ORGANIZATION_ID: &str = "MISSING_ORGANIZATION_ID";
    /// A request field is empty or invalid; see `BadRequest`.
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    /// The upstream answered an HTTP error without an error code.
    pub const UPSTREAM_HTTP_ERROR: &str = "UPSTREAM_HTTP_ERROR";
    /// A 2xx answer the gateway could not read.
    pub const MALFORMED_UPSTREAM_RESPONSE: &str = "MALFORMED_UPSTREAM_RESPONSE";
    /// No answer before the caller's deadline or `--upstream-timeout`.
    pub const UPSTREAM_TIMEOUT: &str = "UPSTREAM_TIMEOUT";
    /// Connection refused, timed out or reset, name resolution, TLS or the
    /// proxy failed, or the circuit breaker is open (metadata `breaker`).
    pub const UPSTREAM_UNAVAILABLE: &str = "UPSTREAM_UNAVAILABLE";
    /// The gateway could not build the upstream request; nothing was sent.
    pub const GATEWAY_INTERNAL: &str = "GATEWAY_INTERNAL";
    /// `--max-in-flight` calls were already in flight; nothing was sent.
    pub const OVERLOADED: &str = "OVERLOADED";
    /// The request message exceeds `--max-request-bytes`; nothing was sent.
    pub const REQUEST_TOO_LARGE: &str = "REQUEST_TOO_LARGE";
    /// Every upstream connection was busy and the queue for one was full;
    /// nothing was sent.
    pub const UPSTREAM_QUEUE_FULL: &str = "UPSTREAM_QUEUE_FULL";
    /// The call's deadline passed while it waited for its turn at
    /// `--upstream-max-connections`; nothing was sent.
    pub const UPSTREAM_CONNECTION_TIMEOUT: &str = "UPSTREAM_CONNECTION_TIMEOUT";
    /// With `--credentials`: the caller's certificate names no mapped
    /// identity; nothing was sent.
    pub const CALLER_NOT_ALLOWED: &str = "CALLER_NOT_ALLOWED";
    /// With `--credentials`: the caller asked for another organization than
    /// its mapping names; nothing was sent.
    pub const ORGANIZATION_NOT_ALLOWED: &str = "ORGANIZATION_NOT_ALLOWED";
    /// The `idempotency-key` was used before with a different request.
    pub const IDEMPOTENCY_KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";
    /// A call with the same `idempotency-key` is still in progress.
    pub const IDEMPOTENCY_KEY_IN_PROGRESS: &str = "IDEMPOTENCY_KEY_IN_PROGRESS";
    /// A call with this `idempotency-key` reached the upstream and its
    /// outcome is unknown: reconcile, then use a new key.
    pub const IDEMPOTENCY_OUTCOME_UNKNOWN: &str = "IDEMPOTENCY_OUTCOME_UNKNOWN";
    /// The idempotency store could not be reached; nothing was sent.
    pub const IDEMPOTENCY_STORE_UNAVAILABLE: &str = "IDEMPOTENCY_STORE_UNAVAILABLE";
    /// The idempotency store is full; nothing was sent.
    pub const IDEMPOTENCY_STORE_FULL: &str = "IDEMPOTENCY_STORE_FULL";
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("missing api-key metadata")]
    MissingApiKey,
    #[error("missing organization-id metadata")]
    MissingOrganizationId,
    #[error("invalid request")]
    InvalidRequest(Vec<FieldViolation>),
    #[error("overloaded")]
    Overloaded { max_in_flight: usize },
    #[error("caller not allowed")]
    CallerNotAllowed { identity: Option<String> },
    #[error("organization not allowed")]
    OrganizationNotAllowed { identity: String },
    #[error("idempotency key reused")]
    IdempotencyKeyReused,
    #[error("idempotency key in progress")]
    IdempotencyKeyInProgress { retry_after: Duration },
    #[error("idempotency outcome unknown")]
    IdempotencyOutcomeUnknown,
    #[error("idempotency store unavailable")]
    IdempotencyStoreUnavailable(IdempotencyStoreUnavailable),
    #[error("idempotency store full")]
    IdempotencyStoreFull,
    #[error("request too large")]
    RequestTooLarge(RequestTooLarge),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl From<CredentialsRefusal> for CallError {
    fn from(refusal: CredentialsRefusal) -> Self {
        match refusal {
            CredentialsRefusal::MissingApiKey => Self::MissingApiKey,
            CredentialsRefusal::MissingOrganizationId => Self::MissingOrganizationId,
            CredentialsRefusal::CallerNotAllowed { identity } => {
                Self::CallerNotAllowed { identity }
            }
            CredentialsRefusal::OrganizationNotAllowed { identity } => {
                Self::OrganizationNotAllowed { identity }
            }
        }
    }
}

impl From<IdempotencyRefusal> for CallError {
    fn from(refusal: IdempotencyRefusal) -> Self {
        match refusal {
            IdempotencyRefusal::InvalidKey(description) => {
                Self::InvalidRequest(vec![FieldViolation {
                    field: crate::idempotency::METADATA_KEY,
                    description,
                }])
            }
            IdempotencyRefusal::InProgress { retry_after } => {
                Self::IdempotencyKeyInProgress { retry_after }
            }
            IdempotencyRefusal::Reused => Self::IdempotencyKeyReused,
            IdempotencyRefusal::OutcomeUnknown => Self::IdempotencyOutcomeUnknown,
            IdempotencyRefusal::StoreUnavailable(refusal) => {
                Self::IdempotencyStoreUnavailable(refusal)
            }
            IdempotencyRefusal::StoreFull => Self::IdempotencyStoreFull,
        }
    }
}

/// The status of each upstream error code, and the words that describe it.
/// A code listed here decides the status whatever HTTP status came with it.
/// A code not listed, arriving in a 400 body, is FAILED_PRECONDITION.
fn upstream_code(code: &str) -> Option<(Code, &'static str)> {
    Some(match code {
        // ---- the resource the call names does not exist
        "NotFound" => (Code::NotFound, "not found"),
        "INVOICE_NOT_FOUND" => (Code::NotFound, "invoice not found"),
        "REF_INVOICE_NOT_FOUND" => (Code::NotFound, "reference invoice not found"),
        // ---- the request asks for something the API does not support
        "TYPE_NOT_SUPPORTED" => (Code::InvalidArgument, "invoice type not supported"),
        // ---- the caller may not do this
        "NOT_ALLOWED" => (Code::PermissionDenied, "operation not allowed"),
        // ---- the invoice or order is not in a state that allows the call
        "NoChanges" => (Code::FailedPrecondition, "nothing to change"),
        "NON_STANDARD_REF_INVOICE" => (
            Code::FailedPrecondition,
            "reference invoice is not a standard invoice",
        ),
        "ORDER_CANCELED" => (Code::FailedPrecondition, "order is canceled"),
        "ORDER_CLOSED" => (Code::FailedPrecondition, "order is closed"),
        "ORDER_NOT_CLOSED" => (Code::FailedPrecondition, "order is not closed"),
        "REF_INVOICE_STILL_OPEN" => (Code::FailedPrecondition, "reference invoice is still open"),
        "INVOICE_CLOSED" => (Code::FailedPrecondition, "invoice is closed"),
        "INVOICE_CONTAIN_LINES" => (Code::FailedPrecondition, "invoice contains lines"),
        "ALREADY_CLOSED" => (Code::FailedPrecondition, "invoice is already closed"),
        "CUSTOMER_REQUIRED" => (Code::FailedPrecondition, "order has no customer"),
        "DRAFT_LINES_EXISTS" => (Code::FailedPrecondition, "order has draft lines"),
        "GIFT_CARD_RECIPIENT_NOT_EXIST" => (
            Code::FailedPrecondition,
            "gift card recipient does not exist",
        ),
        "INVALID_GIFT_CARD_RECIPIENT_PHONE" => (
            Code::FailedPrecondition,
            "gift card recipient phone is invalid",
        ),
        "INVOICE_EMPTY" => (Code::FailedPrecondition, "invoice is empty"),
        "MISSING_GIFT_CARD_RECIPIENT" => {
            (Code::FailedPrecondition, "gift card recipient is missing")
        }
        "PAYMENT_NOT_COMPLETE" => (Code::FailedPrecondition, "payment is not complete"),
        "EMAIL_NOT_DEFINED" => (Code::FailedPrecondition, "customer has no e-mail address"),
        "INVOICE_NOT_CLOSED" => (Code::FailedPrecondition, "invoice is not closed"),
        "INVOICE_NOT_GENERATED" => (
            Code::FailedPrecondition,
            "invoice document is not generated",
        ),
        _ => return None,
    })
}

/// The status of an upstream answer that has no recognised error code.
fn http_status_code(status: u16) -> Code {
    match status {
        // the request was refused without saying why
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        // the upstream gave up waiting for our request
        408 => Code::DeadlineExceeded,
        409 => Code::Aborted,
        412 => Code::FailedPrecondition,
        422 => Code::InvalidArgument,
        429 => Code::ResourceExhausted,
        // client closed request (nginx)
        499 => Code::Cancelled,
        500 => Code::Internal,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        // redirects are never followed: the upstream URL is misconfigured
        s if (300..400).contains(&s) => Code::Internal,
        // any other refusal: retrying the same request will not help
        s if (400..500).contains(&s) => Code::FailedPrecondition,
        // any other server fault
        s if (500..600).contains(&s) => Code::Internal,
        // 1xx, or a 2xx error body without a code
        _ => Code::Unknown,
    }
}

/// `NoChanges` → `NO_CHANGES`, `NotFound` → `NOT_FOUND`; codes already in
/// UPPER_SNAKE_CASE are unchanged; other characters become `_`, and a code
/// that does not start with a letter gets a `CODE_` prefix, as
/// `ErrorInfo.reason` must.
pub fn reason_of(code: &str) -> String {
    let mut out = String::with_capacity(code.len() + 8);
    if !code.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.push_str("CODE_");
    }
    let mut previous: Option<char> = None;
    for c in code.chars() {
        if c.is_ascii_uppercase()
            && previous.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit())
        {
            out.push('_');
        }
        out.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
        previous = Some(c);
    }
    out
}

/// What the status of a failed call needs to know about the call.
#[derive(Debug, Clone, Copy)]
pub struct StatusContext<'a> {
    pub rpc: &'a str,
    /// The call's `x-request-id`, reported when the upstream gave none.
    pub request_id: Option<&'a str>,
    /// Upstream requests made, when any was tried (`ErrorInfo.metadata.attempts`).
    pub attempts: Option<u32>,
}

impl CallError {
    /// Why the call counts as shed (refused for lack of capacity), if it does.
    pub fn shed_reason(&self) -> Option<crate::metrics::ShedReason> {
        match self {
            Self::Overloaded { .. } => Some(crate::metrics::ShedReason::InFlightLimit),
            Self::Upstream(UpstreamError::QueueFull) => {
                Some(crate::metrics::ShedReason::UpstreamQueueFull)
            }
            _ => None,
        }
    }

    /// The gRPC status for this error.
    pub fn to_status(&self, call: &StatusContext<'_>) -> Status {
        self.to_status_and_reason(call).0
    }

    /// The gRPC status for this error and its `ErrorInfo.reason`.
    pub fn to_status_and_reason(&self, call: &StatusContext<'_>) -> (Status, String) {
        let rpc = call.rpc;
        let mut details = ErrorDetails::new();
        let mut request_id = call.request_id.map(str::to_owned);
        let (code, message) = match self {
            Self::MissingApiKey => {
                details.set_error_info(reason::MISSING_API_KEY, GATEWAY_DOMAIN, HashMap::new());
                (Code::Unauthenticated, "missing api-key metadata".to_owned())
            }
            Self::MissingOrganizationId => {
                details.set_error_info(
                    reason::MISSING_ORGANIZATION_ID,
                    GATEWAY_DOMAIN,
                    HashMap::new(),
                );
                (
                    Code::InvalidArgument,
                    "missing organization-id metadata".to_owned(),
                )
            }
            Self::InvalidRequest(violations) => {
                details.set_error_info(reason::INVALID_REQUEST, GATEWAY_DOMAIN, HashMap::new());
                let mut message = String::from("invalid request:");
                for (i, v) in violations.iter().enumerate() {
                    details.add_bad_request_violation(v.field, &v.description);
                    message.push_str(if i == 0 { " " } else { "; " });
                    message.push_str(v.field);
                    message.push(' ');
                    message.push_str(&v.description);
                }
                (Code::InvalidArgument, message)
            }
            Self::Overloaded { max_in_flight } => {
                let metadata =
                    HashMap::from([("max_in_flight".to_owned(), max_in_flight.to_string())]);
                details.set_error_info(reason::OVERLOADED, GATEWAY_DOMAIN, metadata);
                details.set_retry_info(Some(SHED_RETRY_DELAY));
                (
                    Code::ResourceExhausted,
                    format!(
                        "gateway overloaded: {max_in_flight} calls in flight (--max-in-flight)"
                    ),
                )
            }
            Self::CallerNotAllowed { identity } => {
                let mut metadata = HashMap::new();
                let message = match identity {
                    Some(identity) => {
                        metadata.insert("caller".to_owned(), identity.clone());
                        format!("caller {identity} is not in --credentials")
                    }
                    None => "the client certificate names no caller identity".to_owned(),
                };
                details.set_error_info(reason::CALLER_NOT_ALLOWED, GATEWAY_DOMAIN, metadata);
                (Code::PermissionDenied, message)
            }
            Self::OrganizationNotAllowed { identity } => {
                let metadata = HashMap::from([("caller".to_owned(), identity.clone())]);
                details.set_error_info(reason::ORGANIZATION_NOT_ALLOWED, GATEWAY_DOMAIN, metadata);
                (
                    Code::PermissionDenied,
                    format!("caller {identity} may not act for this organization-id"),
                )
            }
            Self::IdempotencyKeyReused => {
                details.set_error_info(
                    reason::IDEMPOTENCY_KEY_REUSED,
                    GATEWAY_DOMAIN,
                    HashMap::new(),
                );
                details.add_bad_request_violation(
                    crate::idempotency::METADATA_KEY,
                    "was used before with a different request",
                );
                (
                    Code::InvalidArgument,
                    format!(
                        "idempotency-key was used before for another {rpc} request; nothing was sent"
                    ),
                )
            }
            Self::IdempotencyKeyInProgress { retry_after } => {
                details.set_error_info(
                    reason::IDEMPOTENCY_KEY_IN_PROGRESS,
                    GATEWAY_DOMAIN,
                    HashMap::new(),
                );
                details.set_retry_info(Some(*retry_after));
                (
                    Code::Aborted,
                    "a call with this idempotency-key is still in progress; retry after the delay"
                        .to_owned(),
                )
            }
            Self::IdempotencyOutcomeUnknown => {
                details.set_error_info(
                    reason::IDEMPOTENCY_OUTCOME_UNKNOWN,
                    GATEWAY_DOMAIN,
                    HashMap::new(),
                );
                (
                    Code::FailedPrecondition,
                    "an earlier call with this idempotency-key reached the upstream and its outcome \
                     is unknown: check the invoice's state, then use a new key"
                        .to_owned(),
                )
            }
            Self::IdempotencyStoreUnavailable(refusal) => {
                let detail = &refusal.detail;
                let mut metadata = HashMap::from([
                    ("detail".to_owned(), detail.clone()),
                    ("request_sent".to_owned(), "false".to_owned()),
                ]);
                if refusal.wait_shortfall {
                    metadata.insert("wait_shortfall".to_owned(), "true".to_owned());
                }
                details.set_error_info(
                    reason::IDEMPOTENCY_STORE_UNAVAILABLE,
                    GATEWAY_DOMAIN,
                    metadata,
                );
                if let Some(retry_after) = refusal.retry_after {
                    details.set_retry_info(Some(retry_after));
                }
                (
                    Code::Unavailable,
                    format!("idempotency store unavailable: {detail}; nothing was sent"),
                )
            }
            Self::IdempotencyStoreFull => {
                details.set_error_info(
                    reason::IDEMPOTENCY_STORE_FULL,
                    GATEWAY_DOMAIN,
                    HashMap::new(),
                );
                details.set_retry_info(Some(SHED_RETRY_DELAY));
                (
                    Code::ResourceExhausted,
                    "idempotency store full; nothing was sent".to_owned(),
                )
            }
            Self::RequestTooLarge(RequestTooLarge { declared, limit }) => {
                let metadata = HashMap::from([
                    ("size".to_owned(), declared.to_string()),
                    ("limit".to_owned(), limit.to_string()),
                ]);
                details.set_error_info(reason::REQUEST_TOO_LARGE, GATEWAY_DOMAIN, metadata);
                (
                    Code::ResourceExhausted,
                    format!(
                        "request message of {declared} bytes exceeds the limit of {limit} bytes \
                         (--max-request-bytes)"
                    ),
                )
            }
            Self::Upstream(UpstreamError::QueueFull) => {
                details.set_error_info(reason::UPSTREAM_QUEUE_FULL, GATEWAY_DOMAIN, HashMap::new());
                details.set_retry_info(Some(SHED_RETRY_DELAY));
                (
                    Code::ResourceExhausted,
                    "every upstream connection is busy and the queue for one is full \
                     (--upstream-max-connections, --upstream-max-pending)"
                        .to_owned(),
                )
            }
            Self::Upstream(UpstreamError::Timeout {
                after,
                bound,
                request_sent: false,
            }) => {
                let metadata = HashMap::from([
                    ("bound".to_owned(), bound.as_str().to_owned()),
                    ("timeout_ms".to_owned(), after.as_millis().to_string()),
                    ("request_sent".to_owned(), "false".to_owned()),
                ]);
                details.set_error_info(
                    reason::UPSTREAM_CONNECTION_TIMEOUT,
                    GATEWAY_DOMAIN,
                    metadata,
                );
                (
                    Code::DeadlineExceeded,
                    format!(
                        "no upstream connection became available for {rpc} within {}; \
                         nothing was sent",
                        millis(*after)
                    ),
                )
            }
            Self::Upstream(UpstreamError::Rejected(rejection)) => {
                if rejection.request_id.is_some() {
                    request_id.clone_from(&rejection.request_id);
                }
                rejected(rejection, &mut details)
            }
            Self::Upstream(UpstreamError::Malformed {
                http_status,
                detail,
                request_id: upstream_id,
            }) => {
                if upstream_id.is_some() {
                    request_id.clone_from(upstream_id);
                }
                let metadata = HashMap::from([
                    ("http_status".to_owned(), http_status.to_string()),
                    ("detail".to_owned(), detail.clone()),
                ]);
                details.set_error_info(
                    reason::MALFORMED_UPSTREAM_RESPONSE,
                    GATEWAY_DOMAIN,
                    metadata,
                );
                (
                    Code::Internal,
                    format!("malformed upstream answer to {detail}"),
                )
            }
            Self::Upstream(UpstreamError::Timeout { after, bound, .. }) => {
                let message = match bound {
                    TimeoutBound::CallerDeadline => format!(
                        "upstream did not answer {rpc} within the caller's deadline of {}",
                        millis(*after)
                    ),
                    TimeoutBound::UpstreamTimeout => format!(
                        "upstream did not answer {rpc} within {} (--upstream-timeout)",
                        millis(*after)
                    ),
                };
                let metadata = HashMap::from([
                    ("bound".to_owned(), bound.as_str().to_owned()),
                    ("timeout_ms".to_owned(), after.as_millis().to_string()),
                    ("request_sent".to_owned(), "true".to_owned()),
                ]);
                details.set_error_info(reason::UPSTREAM_TIMEOUT, GATEWAY_DOMAIN, metadata);
                (Code::DeadlineExceeded, message)
            }
            Self::Upstream(UpstreamError::Unreachable {
                detail,
                fault,
                request_sent,
            }) => {
                let metadata = HashMap::from([
                    ("detail".to_owned(), detail.clone()),
                    ("request_sent".to_owned(), request_sent.to_string()),
                ]);
                details.set_error_info(reason::UPSTREAM_UNAVAILABLE, GATEWAY_DOMAIN, metadata);
                // Nothing was sent: a retry cannot repeat a side effect.
                if !request_sent {
                    details.set_retry_info(Some(UNREACHABLE_RETRY_DELAY));
                }
                let message = match fault {
                    Fault::Deadline => format!("upstream unreachable in time: {detail}"),
                    _ => format!("upstream unreachable: {detail}"),
                };
                (Code::Unavailable, message)
            }
            Self::Upstream(UpstreamError::CircuitOpen { retry_after }) => {
                let metadata = HashMap::from([
                    ("breaker".to_owned(), "open".to_owned()),
                    ("request_sent".to_owned(), "false".to_owned()),
                ]);
                details.set_error_info(reason::UPSTREAM_UNAVAILABLE, GATEWAY_DOMAIN, metadata);
                details.set_retry_info(Some((*retry_after).max(Duration::from_millis(1))));
                (
                    Code::Unavailable,
                    format!(
                        "upstream unreachable: the circuit breaker is open after consecutive \
                         failures to reach it; nothing was sent, next probe in {}",
                        millis(*retry_after)
                    ),
                )
            }
            Self::Upstream(UpstreamError::Internal { detail }) => {
                let metadata = HashMap::from([("detail".to_owned(), detail.clone())]);
                details.set_error_info(reason::GATEWAY_INTERNAL, GATEWAY_DOMAIN, metadata);
                (Code::Internal, format!("gateway error in {rpc}: {detail}"))
            }
        };
        if let Some(id) = request_id {
            details.set_request_info(id, "");
        }
        if let (Some(attempts), Some(info)) = (call.attempts, details.error_info().cloned()) {
            let mut metadata = info.metadata;
            metadata.insert("attempts".to_owned(), attempts.to_string());
            details.set_error_info(info.reason, info.domain, metadata);
        }
        let reason = details
            .error_info()
            .map(|info| info.reason.clone())
            .unwrap_or_default();
        (Status::with_error_details(code, message, details), reason)
    }
}

/// An error answer: the code table first, the HTTP status otherwise.
fn rejected(rejection: &Rejection, details: &mut ErrorDetails) -> (Code, String) {
    let http = rejection.http_status;
    let mut metadata = HashMap::from([("http_status".to_owned(), http.to_string())]);
    if let Some(message) = &rejection.message {
        metadata.insert("upstream_message".to_owned(), message.clone());
    }
    if let Some(excerpt) = &rejection.body_excerpt {
        metadata.insert("upstream_body".to_owned(), excerpt.clone());
    }
    match &rejection.retry_after {
        Some(RetryAfter::Delay(delay)) => {
            details.set_retry_info(Some(*delay));
        }
        Some(RetryAfter::Other(value)) => {
            metadata.insert("retry_after".to_owned(), value.clone());
        }
        None => {}
    }

    let Some(code) = &rejection.code else {
        let code = http_status_code(http);
        let message = match http_reason(http) {
            Some(text) => format!("upstream answered HTTP {http} {text}"),
            None => format!("upstream answered HTTP {http}"),
        };
        details.set_error_info(reason::UPSTREAM_HTTP_ERROR, GATEWAY_DOMAIN, metadata);
        return (code, message);
    };

    metadata.insert("upstream_code".to_owned(), code.clone());
    let (status, words) = match upstream_code(code) {
        Some(known) => known,
        // A code the table does not know yet: the upstream's own words, if any.
        None => (
            if http == 400 {
                Code::FailedPrecondition
            } else {
                http_status_code(http)
            },
            rejection
                .message
                .as_deref()
                .unwrap_or("upstream refused the request"),
        ),
    };
    details.set_error_info(reason_of(code), UPSTREAM_DOMAIN, metadata);
    (status, format!("{words} ({code})"))
}

fn http_reason(status: u16) -> Option<&'static str> {
    http::StatusCode::from_u16(status).ok()?.canonical_reason()
}

fn millis(duration: Duration) -> String {
    crate::units::format_millis(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_upper_snake_case() {
        assert_eq!(reason_of("NoChanges"), "NO_CHANGES");
        assert_eq!(reason_of("NotFound"), "NOT_FOUND");
        assert_eq!(reason_of("ORDER_CLOSED"), "ORDER_CLOSED");
        assert_eq!(reason_of("INVOICE_NOT_FOUND"), "INVOICE_NOT_FOUND");
        assert_eq!(reason_of("rate-limited"), "RATE_LIMITED");
        assert_eq!(reason_of("42-x"), "CODE_42_X");
    }
}
