//! The gateway's own `ErrorInfo.reason`s (domain `gateway.om.gormic.com`),
//! each declared once, with the gRPC status it comes with: the status table
//! builds its failures from these, clients and tests match on the names in
//! [`reason`], and a test holds docs/errors.md to this list.

use tonic::Code;

/// One of the gateway's own reasons and the status it comes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayReason {
    pub name: &'static str,
    pub code: ReasonCode,
}

/// The gRPC status a gateway reason comes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonCode {
    Always(Code),
    /// The upstream's HTTP status decides (`upstream_codes::http_status_code`).
    ByHttpStatus,
}

/// Declares each reason once: its name in [`reason`], its
/// [`GatewayReason`] constant, and its place in [`GatewayReason::ALL`].
macro_rules! gateway_reasons {
    ($( $(#[doc = $doc:literal])+ $name:ident => $($code:ident)+ ; )+) => {
        /// `ErrorInfo.reason` values of gateway-originated errors.
        pub mod reason {
            $( $(#[doc = $doc])+ pub const $name: &str = stringify!($name); )+
        }

        impl GatewayReason {
            $( $(#[doc = $doc])+ pub const $name: Self = Self {
                name: reason::$name,
                code: reason_code!($($code)+),
            }; )+

            /// Every reason of the gateway's own, in the order of the docs.
            pub const ALL: &[Self] = &[$(Self::$name),+];
        }
    };
}

macro_rules! reason_code {
    (by HTTP status) => {
        ReasonCode::ByHttpStatus
    };
    ($code:ident) => {
        ReasonCode::Always(Code::$code)
    };
}

// In the order a call meets them: admission, size, credentials, validation,
// fair share, quotas, idempotency key, upstream.
gateway_reasons! {
    /// `--max-in-flight` calls were already in flight; nothing was sent.
    OVERLOADED => ResourceExhausted;
    /// The request message exceeds `--max-request-bytes`; nothing was sent.
    REQUEST_TOO_LARGE => ResourceExhausted;
    /// No `api-key` in the call metadata.
    MISSING_API_KEY => Unauthenticated;
    /// With `--credentials`: the caller's certificate names no mapped
    /// identity; nothing was sent.
    CALLER_NOT_ALLOWED => PermissionDenied;
    /// With `--credentials`: the caller asked for another organization than
    /// its mapping names; nothing was sent.
    ORGANIZATION_NOT_ALLOWED => PermissionDenied;
    /// No `organization-id` in the call metadata.
    MISSING_ORGANIZATION_ID => InvalidArgument;
    /// A request field (or the `idempotency-key`) is empty or invalid; see
    /// `BadRequest`.
    INVALID_REQUEST => InvalidArgument;
    /// The gateway is contended and the call's tenant already holds its
    /// fair share of `--max-in-flight`; nothing was sent.
    TENANT_OVER_SHARE => ResourceExhausted;
    /// A quota of `--quotas` (the caller's or the organization's) has no
    /// call left now; nothing was sent. See `QuotaFailure` and `RetryInfo`.
    QUOTA_EXCEEDED => ResourceExhausted;
    /// The `idempotency-key` was used before with a different request.
    IDEMPOTENCY_KEY_REUSED => InvalidArgument;
    /// A call with the same `idempotency-key` is still in progress.
    IDEMPOTENCY_KEY_IN_PROGRESS => Aborted;
    /// A call with this `idempotency-key` reached the upstream and its
    /// outcome is unknown: reconcile, then use a new key.
    IDEMPOTENCY_OUTCOME_UNKNOWN => FailedPrecondition;
    /// The idempotency store could not be reached; nothing was sent.
    IDEMPOTENCY_STORE_UNAVAILABLE => Unavailable;
    /// The idempotency store is full; nothing was sent.
    IDEMPOTENCY_STORE_FULL => ResourceExhausted;
    /// The upstream rate-limited this api-key and organization-id (a 429,
    /// or a 503 with `Retry-After`) and the cooldown has not ended; nothing
    /// was sent, `RetryInfo` is the time left.
    UPSTREAM_RATE_LIMITED => ResourceExhausted;
    /// Every upstream connection was busy and the queue for one was full;
    /// nothing was sent.
    UPSTREAM_QUEUE_FULL => ResourceExhausted;
    /// The call's deadline passed while it waited for its turn at
    /// `--upstream-max-connections`; nothing was sent.
    UPSTREAM_CONNECTION_TIMEOUT => DeadlineExceeded;
    /// No answer before the caller's deadline or `--upstream-timeout`.
    UPSTREAM_TIMEOUT => DeadlineExceeded;
    /// Connection refused, timed out or reset, name resolution, TLS or the
    /// proxy failed, or the circuit breaker is open (metadata `breaker`).
    UPSTREAM_UNAVAILABLE => Unavailable;
    /// The gateway could not build the upstream request; nothing was sent.
    GATEWAY_INTERNAL => Internal;
    /// A 2xx answer the gateway could not read.
    MALFORMED_UPSTREAM_RESPONSE => Internal;
    /// The upstream answered an HTTP error without an error code.
    UPSTREAM_HTTP_ERROR => by HTTP status;
}
