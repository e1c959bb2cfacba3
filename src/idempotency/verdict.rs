//! What a lease's holder asks the store to record, and what came of it:
//! shared by the lease and both stores, so that neither store imports the
//! lease's module nor the lease a store's.

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
    /// Larger than [`MAX_OUTCOME_BYTES`](super::MAX_OUTCOME_BYTES).
    TooLarge { bytes: usize },
    /// The memory store's byte bound had no room for it.
    NoRoom,
}

/// The verdict being recorded; kept in the lease so that a cancelled
/// verdict is still carried out by `Drop`.
pub(crate) enum Pending {
    Unknown,
    Release,
    Complete(super::Outcome),
}
