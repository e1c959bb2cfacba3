//! The right to act on a new key: whoever holds the [`Lease`] forwards the
//! call and then records what happened. A lease dropped without a verdict
//! (the call's future was cancelled mid-flight) records "outcome unknown",
//! because the request may have reached the upstream.

use std::fmt;
use std::sync::Arc;

use super::memory::MemoryStore;
use super::record::IN_PROGRESS_LEN;
use super::redis::{RedisKey, RedisStore};
use super::{Digest, MAX_OUTCOME_BYTES, Outcome, Scope, StoreError};

/// What a lease's verdict left in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// As asked: the outcome is recorded, the key is marked unknown, or
    /// (release) the record is gone.
    Done,
    /// `complete` could not keep the outcome; the key is marked "outcome
    /// unknown" instead, so a repeat is told to reconcile rather than given
    /// a wrong answer or a second attempt.
    AsUnknown(UnknownCause),
    /// The record was no longer this lease's (it outlived the TTL and was
    /// taken afresh, or it vanished): nothing was changed.
    NotOwner,
}

/// Why an outcome was recorded as unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownCause {
    /// Larger than [`MAX_OUTCOME_BYTES`].
    TooLarge { bytes: usize },
    /// The memory store's byte bound had no room for it.
    NoRoom,
}

/// Ownership of an in-progress record. Finish it with exactly one of
/// [`complete`](Lease::complete), [`release`](Lease::release) or
/// [`unknown`](Lease::unknown); each acts only while the record is still
/// this lease's (owner token compared atomically in the store).
#[must_use = "a dropped lease records the outcome as unknown"]
pub struct Lease {
    claim: Option<Claim>,
    pending: Pending,
}

/// What identifies the record this lease owns, per store.
pub(crate) enum Claim {
    Memory {
        store: Arc<MemoryStore>,
        scope: Scope,
        token: u64,
    },
    Redis {
        store: Arc<RedisStore>,
        key: RedisKey,
        /// The exact value this lease wrote: it holds a unique owner token,
        /// so "the stored value is still this" is the ownership check.
        held: [u8; IN_PROGRESS_LEN],
        digest: Digest,
    },
}

/// The verdict being recorded; kept in the lease so that a cancelled
/// verdict is still carried out by `Drop`.
pub(crate) enum Pending {
    Unknown,
    Release,
    Complete(Outcome),
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

impl Claim {
    async fn finish(&self, pending: &Pending) -> Result<Recorded, StoreError> {
        match self {
            Self::Memory {
                store,
                scope,
                token,
            } => Ok(store.finish(scope, *token, pending)),
            Self::Redis {
                store,
                key,
                held,
                digest,
            } => store.finish(key, held, digest, pending).await,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        let pending = std::mem::replace(&mut self.pending, Pending::Unknown);
        match claim {
            // A short critical section under a mutex: nothing to wait for.
            Claim::Memory {
                store,
                scope,
                token,
            } => {
                store.finish(&scope, token, &pending);
            }
            Claim::Redis {
                store,
                key,
                held,
                digest,
            } => RedisStore::finish_detached(store, key, held, digest, pending),
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = match &self.claim {
            Some(Claim::Memory { .. }) => "memory",
            Some(Claim::Redis { .. }) => "redis",
            None => "finished",
        };
        f.debug_struct("Lease").field("store", &store).finish()
    }
}
