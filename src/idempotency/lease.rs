//! The right to act on a new key: whoever holds the [`Lease`] forwards the
//! call and then records what happened. A lease dropped without a verdict
//! (the call's future was cancelled mid-flight) records "outcome unknown",
//! because the request may have reached the upstream.

use std::fmt;

use super::verdict::{Pending, Recorded, UnknownCause};
use super::{Claim, MAX_OUTCOME_BYTES, Outcome, StoreError};

/// Ownership of an in-progress record. Finish it with exactly one of
/// [`complete`](Lease::complete), [`release`](Lease::release) or
/// [`unknown`](Lease::unknown); each acts only while the record is still
/// this lease's (owner token compared atomically in the store).
#[must_use = "a dropped lease records the outcome as unknown"]
pub struct Lease {
    claim: Option<Claim>,
    pending: Pending,
}

impl Lease {
    pub(crate) fn new(claim: Claim) -> Self {
        Self {
            claim: Some(claim),
            pending: Pending::Unknown,
        }
    }

    /// Records a definitive outcome, replayed to every repeat for the TTL.
    /// An outcome over [`MAX_OUTCOME_BYTES`] is recorded as unknown instead
    /// and the result says so (and a warning is logged).
    pub async fn complete(self, outcome: Outcome) -> Result<Recorded, StoreError> {
        let bytes = outcome.encoded_len();
        if bytes > MAX_OUTCOME_BYTES {
            tracing::warn!(
                bytes,
                limit = MAX_OUTCOME_BYTES,
                "idempotency: outcome too large to record; the key is marked outcome unknown"
            );
            return Ok(match self.finish(Pending::Unknown).await? {
                Recorded::Done => Recorded::AsUnknown(UnknownCause::TooLarge { bytes }),
                other => other,
            });
        }
        self.finish(Pending::Complete(outcome)).await
    }

    /// The request provably never reached the upstream: deletes the record
    /// so that a retry with the same key proceeds.
    pub async fn release(self) -> Result<Recorded, StoreError> {
        self.finish(Pending::Release).await
    }

    /// The request went out and no definitive answer came back: repeats get
    /// `Begin::OutcomeUnknown` for the TTL.
    pub async fn unknown(self) -> Result<Recorded, StoreError> {
        self.finish(Pending::Unknown).await
    }

    async fn finish(mut self, pending: Pending) -> Result<Recorded, StoreError> {
        self.pending = pending;
        let result = match &self.claim {
            Some(claim) => claim.finish(&self.pending).await,
            None => Ok(Recorded::NotOwner),
        };
        // One attempt: if it failed, the record stays in progress and turns
        // into "outcome unknown" when its lease ends, which is safe.
        self.claim = None;
        if let Ok(Recorded::AsUnknown(UnknownCause::NoRoom)) = result {
            tracing::warn!(
                "idempotency: no room in the memory store for the outcome; \
                 the key is marked outcome unknown"
            );
        }
        result
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        let pending = std::mem::replace(&mut self.pending, Pending::Unknown);
        claim.finish_detached(pending);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = self.claim.as_ref().map_or("finished", Claim::store_name);
        f.debug_struct("Lease").field("store", &store).finish()
    }
}
