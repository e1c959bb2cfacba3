//! Every way a call can fail ([`CallError`]), and its gRPC status with
//! `google.rpc` details. The steps of the call path refuse with errors of
//! their own (`credentials::Refusal`, `idempotency::step::Refusal`,
//! `UpstreamError`), wrapped here as they are, so that no step depends on
//! this module. Each failure becomes one value ([`Failure`], the one table
//! in `table.rs`), rendered into a status in one function
//! ([`Failure::into_status`]). docs/errors.md lists every reason and code;
//! `docs_check` fails when it and the code differ.

mod failure;
mod reasons;
mod table;
mod upstream_codes;

#[cfg(test)]
mod docs_check;

use std::borrow::Cow;

use tonic::Status;

pub use self::failure::Failure;
pub use self::reasons::{GatewayReason, ReasonCode, reason};
pub use self::upstream_codes::reason_of;
use crate::limits::RequestTooLarge;
use crate::limits::{OverShare, ShedReason};
use crate::upstream::UpstreamError;
pub use crate::validation::FieldViolation;
use crate::{credentials, idempotency, quota};

/// `ErrorInfo.domain` of errors the upstream reported (its error codes).
pub const UPSTREAM_DOMAIN: &str = "om.gormic.com";
/// `ErrorInfo.domain` of errors the gateway itself found.
pub const GATEWAY_DOMAIN: &str = "gateway.om.gormic.com";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("overloaded")]
    Overloaded { max_in_flight: usize },
    #[error("request too large")]
    RequestTooLarge(RequestTooLarge),
    #[error(transparent)]
    Credentials(#[from] credentials::Refusal),
    #[error("invalid request")]
    InvalidRequest(Vec<FieldViolation>),
    #[error(transparent)]
    TenantOverShare(#[from] OverShare),
    #[error(transparent)]
    Quota(#[from] quota::QuotaExceeded),
    #[error(transparent)]
    Idempotency(#[from] idempotency::step::Refusal),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
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
    pub fn shed_reason(&self) -> Option<ShedReason> {
        match self {
            Self::Overloaded { .. } => Some(ShedReason::InFlightLimit),
            Self::Upstream(UpstreamError::QueueFull) => Some(ShedReason::UpstreamQueueFull),
            Self::Upstream(UpstreamError::RateLimited { .. }) => {
                Some(ShedReason::UpstreamRateLimited)
            }
            Self::TenantOverShare(_) => Some(ShedReason::FairShare),
            Self::Quota(_) => Some(ShedReason::Quota),
            _ => None,
        }
    }

    /// The gRPC status for this error.
    pub fn to_status(&self, call: &StatusContext<'_>) -> Status {
        self.failure(call.rpc)
            .into_status(call.request_id, call.attempts)
    }

    /// The gRPC status for this error and its `ErrorInfo.reason` (for the
    /// call's log line and metrics; borrowed unless the upstream's code had
    /// to be rewritten).
    pub fn to_status_and_reason(&self, call: &StatusContext<'_>) -> (Status, Cow<'_, str>) {
        let failure = self.failure(call.rpc);
        let reason = failure.reason.clone();
        (failure.into_status(call.request_id, call.attempts), reason)
    }
}
