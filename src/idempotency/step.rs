//! The idempotency step of the call path: before anything is sent, a call
//! with an `idempotency-key` takes a lease on it (or is answered from the
//! record: a replay, or a refusal); once the call has its answer, the lease
//! records what repeats will get.
//!
//! The verdict, from what the gateway knows about the upstream:
//! - the request provably never reached the upstream (refused connection,
//!   unresolvable name, TLS handshake failure, full queue, no connection in
//!   time): **release** the key, a retry proceeds;
//! - the upstream refused it without acting (429, 503): **release**;
//! - a definitive answer (a success; a functional error code; any other
//!   4xx but 408; a 2xx the gateway could not read, which means the upstream
//!   acted): **complete**, repeats replay exactly what this call answered.
//!   The HTTP status ranks above a code in the body: a 408, 429 or 5xx
//!   naming a code is still judged by its status;
//! - it may have acted and no definitive answer came (timeout after
//!   sending, broken connection, 408, 5xx): **unknown**, repeats get
//!   `IDEMPOTENCY_OUTCOME_UNKNOWN` until the record expires.

use std::time::Duration;

use prost::Message;
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::{
    Begin, Idempotency, Lease, METADATA_KEY, Outcome, Recorded, Scope, StoreError, parse_key,
    request_digest,
};
use crate::errors::{CallError, FieldViolation};
use crate::metrics::IdempotencyResult;
use crate::upstream::{Credentials, UpstreamError};

/// Added to a call's lease beyond its budget: the owner records its verdict
/// just after the deadline, and a repeat arriving in between must find the
/// call still in progress, not an unknown outcome.
pub(crate) const LEASE_SLACK: Duration = Duration::from_secs(1);

/// Longest `RetryInfo` delay suggested to a duplicate of a call in progress.
pub(crate) const MAX_IN_PROGRESS_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Where a call stands with its key, before the upstream.
pub(crate) enum Start {
    /// No `idempotency-key`: nothing to record.
    NoKey,
    /// A new key: forward, then record the verdict on this lease.
    Fresh(Lease),
    /// A completed key: answer this, never calling the upstream.
    Replay(Outcome),
}

/// What a start counts as (`gormic_gateway_idempotency_requests_total`);
/// `None` for calls without a key or with an invalid one.
pub(crate) fn metric(start: &Result<Start, CallError>) -> Option<IdempotencyResult> {
    Some(match start {
        Ok(Start::NoKey) => return None,
        Ok(Start::Fresh(_)) => IdempotencyResult::New,
        Ok(Start::Replay(_)) => IdempotencyResult::Replayed,
        Err(CallError::IdempotencyKeyInProgress { .. }) => IdempotencyResult::InProgress,
        Err(CallError::IdempotencyKeyReused) => IdempotencyResult::Reused,
        Err(CallError::IdempotencyOutcomeUnknown) => IdempotencyResult::OutcomeUnknown,
        Err(CallError::IdempotencyStoreUnavailable(_) | CallError::IdempotencyStoreFull) => {
            IdempotencyResult::StoreError
        }
        Err(_) => return None,
    })
}

/// Reads the call's key and consults the store. `lease` is how long the
/// call may take from here (its upstream budget and the store's own time).
pub(crate) async fn start(
    store: &Idempotency,
    metadata: &MetadataMap,
    rpc: &str,
    credentials: &Credentials,
    request: &impl Message,
    lease: Duration,
) -> Result<Start, CallError> {
    let Some(value) = metadata.get(METADATA_KEY) else {
        return Ok(Start::NoKey);
    };
    let key = parse_key(value.as_bytes()).map_err(|description| {
        CallError::InvalidRequest(vec![FieldViolation {
            field: METADATA_KEY,
            description,
        }])
    })?;
    let scope = Scope::new(
        credentials.organization_id.as_bytes(),
        rpc,
        credentials.api_key.as_bytes(),
        &key,
    );
    let digest = request_digest(rpc, &request.encode_to_vec());
    match store.begin(&scope, digest, lease).await {
        Ok(Begin::Proceed(lease)) => Ok(Start::Fresh(lease)),
        Ok(Begin::Replay(outcome)) => Ok(Start::Replay(outcome)),
        // The first call usually ends within milliseconds; the rest of its
        // lease (up to the whole upstream timeout) would be a poor hint.
        Ok(Begin::InProgress { retry_after }) => Err(CallError::IdempotencyKeyInProgress {
            retry_after: retry_after.min(MAX_IN_PROGRESS_RETRY_DELAY),
        }),
        Ok(Begin::Mismatch) => Err(CallError::IdempotencyKeyReused),
        Ok(Begin::OutcomeUnknown) => Err(CallError::IdempotencyOutcomeUnknown),
        Err(StoreError::Unavailable(detail)) => Err(CallError::IdempotencyStoreUnavailable(detail)),
        Err(StoreError::Full) => Err(CallError::IdempotencyStoreFull),
    }
}

/// The answer a replayed outcome gives; a record that no longer decodes is
/// a store fault (fail closed: the call is not sent).
pub(crate) fn replay<M: Message + Default>(
    outcome: &Outcome,
) -> Result<Result<M, Status>, CallError> {
    outcome.replay::<M>().map_err(|error| {
        CallError::IdempotencyStoreUnavailable(format!("a stored answer does not decode: {error}"))
    })
}

/// What a lease records once the call has its answer (module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Complete,
    Release,
    Unknown,
}

impl Verdict {
    /// The verdict on a failed exchange; `sent` is whether any attempt may
    /// have reached the upstream.
    pub(crate) fn of_failure(error: &UpstreamError, sent: bool) -> Self {
        if !sent {
            return Self::Release;
        }
        match error {
            // The status decides before any code in the body: Gormic's
            // functional errors are 400s, while a proxy or an overloaded
            // server may put a code in a 408, 429 or 5xx too.
            UpstreamError::Rejected(rejection) => match rejection.http_status {
                429 | 503 => Self::Release,
                408 | 500..=599 => Self::Unknown,
                400..=499 => Self::Complete,
                _ if rejection.code.is_some() => Self::Complete,
                _ => Self::Unknown,
            },
            UpstreamError::Malformed { .. } => Self::Complete,
            UpstreamError::Timeout { .. }
            | UpstreamError::Unreachable { .. }
            | UpstreamError::QueueFull
            | UpstreamError::Internal { .. } => Self::Unknown,
        }
    }
}

/// Records the verdict on `lease`, with the exact answer the caller gets. A
/// failure to record is logged; the caller still gets its answer (a repeat
/// then finds the lease expired and is told the outcome is unknown).
pub(crate) async fn record<M: Message>(lease: Lease, verdict: Verdict, answer: &Result<M, Status>) {
    let recorded = match verdict {
        Verdict::Complete => {
            let outcome = match answer {
                Ok(message) => Outcome::response(message),
                Err(status) => Outcome::status(status),
            };
            lease.complete(outcome).await
        }
        Verdict::Release => lease.release().await,
        Verdict::Unknown => lease.unknown().await,
    };
    match recorded {
        Ok(Recorded::Done) => {}
        Ok(other) => {
            tracing::warn!(?verdict, recorded = ?other, "idempotency record not as intended")
        }
        Err(error) => tracing::warn!(?verdict, %error, "cannot record the idempotency verdict"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Rejection, TimeoutBound};

    fn answered(status: u16, code: Option<&str>) -> UpstreamError {
        UpstreamError::Rejected(Box::new(Rejection {
            http_status: status,
            code: code.map(str::to_owned),
            ..Default::default()
        }))
    }

    #[test]
    fn verdicts_follow_what_the_upstream_may_have_done() {
        use Verdict::*;
        let timeout = UpstreamError::Timeout {
            after: Duration::from_secs(1),
            bound: TimeoutBound::CallerDeadline,
            request_sent: true,
        };
        let cases = [
            (answered(400, Some("ORDER_CLOSED")), true, Complete),
            (answered(200, Some("ORDER_CLOSED")), true, Complete),
            (answered(429, Some("RATE_LIMITED")), true, Release),
            (answered(503, Some("SERVICE_UNAVAILABLE")), true, Release),
            (answered(408, Some("REQUEST_TIMEOUT")), true, Unknown),
            (answered(500, Some("INTERNAL_ERROR")), true, Unknown),
            (answered(504, Some("GATEWAY_TIMEOUT")), true, Unknown),
            (answered(307, None), true, Unknown),
            (answered(404, None), true, Complete),
            (answered(429, None), true, Release),
            (answered(503, None), true, Release),
            (answered(408, None), true, Unknown),
            (answered(500, None), true, Unknown),
            (answered(502, None), true, Unknown),
            (timeout, true, Unknown),
            (answered(502, None), false, Release),
            (UpstreamError::QueueFull, false, Release),
        ];
        for (error, sent, verdict) in cases {
            assert_eq!(
                Verdict::of_failure(&error, sent),
                verdict,
                "{error:?} sent={sent}"
            );
        }
    }
}
