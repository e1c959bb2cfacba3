//! The idempotency step of the call path: before anything is sent, a call
//! with an `idempotency-key` takes a lease on it (or is answered from the
//! record: a replay, or a refusal); once the call has its answer, the lease
//! records what repeats will get. Both store operations run within the
//! call's deadline (each bounded by the smaller of `--idempotency-store-timeout`
//! and what is left): one round trip to take the lease, one to record.
//!
//! **When the record cannot be written in time.** The caller gets its
//! answer by its deadline whatever the store does: a record still under
//! way then is finished in the background (the call keeps its admission
//! permit until it is), while the lease, which outlives the deadline by
//! the store timeout and [`LEASE_SLACK`], keeps telling repeats
//! `IDEMPOTENCY_KEY_IN_PROGRESS`. So no repeat with the same key can send
//! the request again before the verdict is known; a record that fails for
//! good leaves the key "outcome unknown" once the lease ends.
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

use std::future::Future;
use std::time::Duration;

use prost::Message;
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::metrics::IdempotencyResult;
use super::{
    Begin, Idempotency, Lease, METADATA_KEY, Outcome, Recorded, Scope, StoreError, parse_key,
    request_digest,
};
use crate::credentials::Credentials;
use crate::deadline::Deadline;
use crate::upstream::UpstreamError;

/// Added to a call's lease beyond its deadline and the store timeout: the
/// owner records its verdict by then, and a repeat arriving in between must
/// find the call still in progress, not an unknown outcome.
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

/// Why a keyed call is answered without reaching the upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The key is not a valid `idempotency-key` (the reason).
    #[error("invalid idempotency-key: {0}")]
    InvalidKey(String),
    /// A call with the same key is still in progress.
    #[error("idempotency key in progress")]
    InProgress { retry_after: Duration },
    /// The key was used before with a different request.
    #[error("idempotency key reused")]
    Reused,
    /// A call with this key reached the upstream; its outcome is unknown.
    #[error("idempotency outcome unknown")]
    OutcomeUnknown,
    /// The store could not be reached, not within the call's deadline, or
    /// not durably (a lease too few replicas acknowledged). Nothing was sent.
    #[error("idempotency store unavailable: {}", .0.detail)]
    StoreUnavailable(StoreUnavailable),
    #[error("idempotency store full")]
    StoreFull,
}

/// Why a keyed call was refused for the store's sake, unsent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUnavailable {
    /// Names the store (password redacted), never a key.
    pub detail: String,
    /// When a retry may succeed (`RetryInfo`); `None` when none will (a
    /// stored answer that does not decode).
    pub retry_after: Option<Duration>,
    /// The lease was written but fewer replicas than
    /// `--idempotency-store-replicas` acknowledged it in time; released.
    pub wait_shortfall: bool,
}

/// What a start counts as (`gormic_gateway_idempotency_requests_total`);
/// `None` for calls without a key or with an invalid one.
pub(crate) fn metric(start: &Result<Start, Refusal>) -> Option<IdempotencyResult> {
    Some(match start {
        Ok(Start::NoKey) | Err(Refusal::InvalidKey(_)) => return None,
        Ok(Start::Fresh(_)) => IdempotencyResult::New,
        Ok(Start::Replay(_)) => IdempotencyResult::Replayed,
        Err(Refusal::InProgress { .. }) => IdempotencyResult::InProgress,
        Err(Refusal::Reused) => IdempotencyResult::Reused,
        Err(Refusal::OutcomeUnknown) => IdempotencyResult::OutcomeUnknown,
        Err(Refusal::StoreUnavailable(_) | Refusal::StoreFull) => IdempotencyResult::StoreError,
    })
}

/// Reads the call's key and consults the store, within the deadline. The
/// lease taken lasts what is left of the call, plus the time to record.
pub(crate) async fn start(
    store: &Idempotency,
    metadata: &MetadataMap,
    rpc: &str,
    credentials: &Credentials,
    request: &impl Message,
    deadline: &Deadline,
) -> Result<Start, Refusal> {
    let Some(value) = metadata.get(METADATA_KEY) else {
        return Ok(Start::NoKey);
    };
    let key = parse_key(value.as_bytes()).map_err(Refusal::InvalidKey)?;
    let scope = Scope::new(
        credentials.organization_id.as_bytes(),
        rpc,
        credentials.api_key.as_bytes(),
        &key,
    );
    let digest = request_digest(rpc, &request.encode_to_vec());
    let lease = deadline.remaining() + store.store_timeout() + LEASE_SLACK;
    // The store bounds each operation by its own timeout; the call's
    // deadline may be nearer. A begin cut short undoes what it may have
    // written (the store's guard), so the key stays free.
    let unavailable = |detail: String, wait_shortfall: bool| {
        Refusal::StoreUnavailable(StoreUnavailable {
            detail,
            retry_after: Some(store.retry_after()),
            wait_shortfall,
        })
    };
    let begun = tokio::time::timeout_at(
        deadline.at(),
        store.begin_within(&scope, digest, lease, Some(deadline.at())),
    )
    .await
    .map_err(|_| {
        unavailable(
            format!(
                "no answer within the call's deadline ({} in all)",
                crate::units::format_millis(deadline.budget())
            ),
            false,
        )
    })?;
    match begun {
        Ok(Begin::Proceed(lease)) => Ok(Start::Fresh(lease)),
        Ok(Begin::Replay(outcome)) => Ok(Start::Replay(outcome)),
        // The first call usually ends within milliseconds; the rest of its
        // lease (up to the whole call's time) would be a poor hint.
        Ok(Begin::InProgress { retry_after }) => Err(Refusal::InProgress {
            retry_after: retry_after.min(MAX_IN_PROGRESS_RETRY_DELAY),
        }),
        Ok(Begin::Mismatch) => Err(Refusal::Reused),
        Ok(Begin::OutcomeUnknown) => Err(Refusal::OutcomeUnknown),
        Err(StoreError::Unavailable(detail)) => Err(unavailable(detail, false)),
        Err(StoreError::NotReplicated(detail)) => Err(unavailable(detail, true)),
        Err(StoreError::Full) => Err(Refusal::StoreFull),
    }
}

/// The answer a replayed outcome gives; a record that no longer decodes is
/// a store fault (fail closed: the call is not sent).
pub(crate) fn replay<M: Message + Default>(
    outcome: &Outcome,
) -> Result<Result<M, Status>, Refusal> {
    outcome.replay::<M>().map_err(|error| {
        Refusal::StoreUnavailable(StoreUnavailable {
            detail: format!("a stored answer does not decode: {error}"),
            retry_after: None,
            wait_shortfall: false,
        })
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
            | UpstreamError::RateLimited { .. }
            | UpstreamError::CircuitOpen { .. }
            | UpstreamError::Internal { .. } => Self::Unknown,
        }
    }
}

/// Records the verdict on `lease`, with the exact answer the caller gets.
/// The future owns all it needs, so that the call path can finish it in the
/// background once the caller has been answered. A failure to record is
/// logged; the caller still gets its answer (a repeat then finds the lease
/// expired and is told the outcome is unknown).
pub(crate) fn record<M: Message>(
    lease: Lease,
    verdict: Verdict,
    answer: &Result<M, Status>,
) -> impl Future<Output = ()> + Send + 'static {
    let outcome = match (verdict, answer) {
        (Verdict::Complete, Ok(message)) => Some(Outcome::response(message)),
        (Verdict::Complete, Err(status)) => Some(Outcome::status(status)),
        _ => None,
    };
    async move {
        let recorded = match (verdict, outcome) {
            (Verdict::Complete, Some(outcome)) => lease.complete(outcome).await,
            (Verdict::Release, _) => lease.release().await,
            _ => lease.unknown().await,
        };
        match recorded {
            Ok(Recorded::Done) => {}
            Ok(other) => {
                tracing::warn!(?verdict, recorded = ?other, "idempotency record not as intended")
            }
            Err(error) => tracing::warn!(?verdict, %error, "cannot record the idempotency verdict"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::TimeoutBound;
    use crate::upstream::Rejection;

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
        let circuit_open = UpstreamError::CircuitOpen {
            retry_after: Duration::from_secs(1),
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
            (circuit_open, false, Release),
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
