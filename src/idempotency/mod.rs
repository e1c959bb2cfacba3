//! Idempotency keys (issue 9): a caller that retries a mutating call with
//! the same `idempotency-key` gets the first call's answer again instead of
//! a second invoice, on whichever replica the retry lands. This module owns
//! the protocol and its two stores, [`memory`] (one replica) and [`redis`]
//! (shared across replicas, through [`crate::store`]); the call path decides
//! when to begin and how to finish.
//!
//! # Protocol
//! A record is found by its [`Scope`] (organization, RPC, api-key, key; all
//! hashed) and remembers the [`Digest`] of the request it was first used
//! with. [`Idempotency::begin`] answers, atomically:
//! - no live record: one is written "in progress", owned by the returned
//!   [`Lease`] until `lease` from now; the caller forwards the request
//!   ([`Begin::Proceed`]);
//! - a record with another digest: [`Begin::Mismatch`], nothing is sent;
//! - a completed record: [`Begin::Replay`] of the recorded [`Outcome`];
//! - in progress, lease live: [`Begin::InProgress`], retry after the rest of
//!   the lease;
//! - marked unknown, or in progress past its lease (its owner vanished while
//!   the request may have reached the upstream): [`Begin::OutcomeUnknown`],
//!   never "free".
//!
//! The lease holder then records one verdict: `complete(outcome)`,
//! `release()` (nothing was sent: the record is deleted and a retry
//! proceeds) or `unknown()`. Completed and unknown records live
//! `--idempotency-ttl` from the verdict; an in-progress record lives the TTL
//! (or its lease, if longer) from `begin`. When the TTL has passed the key
//! is free again. Store trouble is [`StoreError`]: a call with a key then
//! fails, never proceeds without a record (fail closed).

mod args;
mod key;
mod lease;
pub mod memory;
mod metrics;
mod outcome;
mod record;
pub mod redis;
pub(crate) mod step;
mod verdict;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use args::{IdempotencyArgs, StoreLocation, parse_store};
pub use key::{Digest, IdempotencyKey, MAX_KEY_BYTES, Scope, parse_key, request_digest};
pub use lease::Lease;
pub use memory::Usage;
pub use metrics::{IdempotencyMetrics, IdempotencyResult};
pub use outcome::{MAX_OUTCOME_BYTES, Outcome};
pub use verdict::{Recorded, UnknownCause};

use crate::store::StoreArgs;
use verdict::Pending;

/// The call metadata that carries the key.
pub const METADATA_KEY: &str = "idempotency-key";
/// Response metadata set to `true` on a replayed answer.
pub const REPLAYED_METADATA_KEY: &str = "idempotent-replayed";

/// Longest lease honoured: a call's budget is seconds; this only keeps
/// deadline arithmetic far from overflow whatever a caller passes.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// What to do with a call that carries a key.
#[derive(Debug)]
pub enum Begin {
    /// The key is new: forward the request, then finish the lease.
    Proceed(Lease),
    /// Completed earlier: answer exactly this, without calling the upstream.
    Replay(Outcome),
    /// Another call holds the key and its lease is live.
    InProgress { retry_after: Duration },
    /// The key was used with another request.
    Mismatch,
    /// The first call's request may have reached the upstream and no
    /// definitive answer was recorded (or its owner vanished mid-call).
    OutcomeUnknown,
}

/// The store could not answer; the call must fail (never proceed unrecorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Unreachable, too slow, or holding a record this gateway cannot read.
    /// The text names the store (password redacted), never a key.
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
    /// No room for a new record (memory store bounds; Redis out of memory).
    #[error("idempotency store full")]
    Full,
    /// Fewer replicas than `--idempotency-store-replicas` acknowledged the
    /// lease in time: it was released, and the call must not be sent (a
    /// failover could lose the lease, and a retry create a second invoice).
    /// The text names the store and the counts.
    #[error("idempotency store unavailable: {0}")]
    NotReplicated(String),
}

/// The flags describe a store that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--idempotency-store {store}: {reason}")]
    Store { store: String, reason: String },
    #[error("idempotency store: {0}")]
    Start(String),
}

/// The idempotency store of the gateway; cheap to clone, clones share it.
#[derive(Clone)]
pub struct Idempotency {
    store: Store,
}

#[derive(Clone)]
enum Store {
    Memory(Arc<memory::MemoryStore>),
    Redis(Arc<redis::RedisStore>),
}

impl Idempotency {
    /// Opens the store the flags name, with the store flags' defaults.
    /// Call inside the Tokio runtime.
    pub async fn from_args(args: &IdempotencyArgs) -> Result<Self, ConfigError> {
        Self::open(args, &StoreArgs::default())
    }

    /// Opens the store the flags name. A Redis store is not contacted here:
    /// it connects in the background and reconnects by itself, so the
    /// gateway starts while Redis is down (calls with a key fail until it is
    /// back). Call inside the Tokio runtime. The binary opens the shared
    /// store itself, once for all its users ([`Self::on`]).
    pub fn open(args: &IdempotencyArgs, store_args: &StoreArgs) -> Result<Self, ConfigError> {
        Self::on(args, Self::shared_store_of(args, store_args)?)
    }

    /// The shared store `--idempotency-store` names (`None` for `memory`),
    /// opened: the handle idempotency, quotas and cooldowns share.
    pub fn shared_store_of(
        args: &IdempotencyArgs,
        store_args: &StoreArgs,
    ) -> Result<Option<crate::store::Store>, ConfigError> {
        match &args.idempotency_store {
            StoreLocation::Memory => Ok(None),
            StoreLocation::Redis(url) => crate::store::Store::open(
                url,
                args.idempotency_store_timeout,
                store_args.idempotency_store_replicas,
            )
            .map(Some)
            .map_err(|e| ConfigError::Start(e.to_string())),
        }
    }

    /// The idempotency records of `args`, in `shared` when the flags name a
    /// Redis store (opened by [`Self::shared_store_of`]), in memory
    /// otherwise.
    pub fn on(
        args: &IdempotencyArgs,
        shared: Option<crate::store::Store>,
    ) -> Result<Self, ConfigError> {
        let store = match shared {
            None => Self::memory(args)?,
            Some(shared) => Store::Redis(Arc::new(redis::RedisStore::new(
                shared,
                args.idempotency_ttl,
            )?)),
        };
        Ok(Self { store })
    }

    /// The shared store the records live in (`None` with `memory`): the
    /// handle quotas and cooldowns share, and whose metrics to register.
    pub fn shared_store(&self) -> Option<&crate::store::Store> {
        match &self.store {
            Store::Memory(_) => None,
            Store::Redis(store) => Some(store.shared()),
        }
    }

    /// Looks the key up and, if it is new, takes a lease on it for `lease`
    /// (pass the call's remaining budget plus [`Self::store_timeout`], so that
    /// the owner can still record its verdict before repeats are told the
    /// outcome is unknown).
    pub async fn begin(
        &self,
        scope: &Scope,
        digest: Digest,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.begin_within(scope, digest, lease, None).await
    }

    /// [`Self::begin`], ending by `deadline` (the call's): a lease that
    /// waits for replicas gives up in time to answer by then.
    pub async fn begin_within(
        &self,
        scope: &Scope,
        digest: Digest,
        lease: Duration,
        deadline: Option<Instant>,
    ) -> Result<Begin, StoreError> {
        match &self.store {
            Store::Memory(store) => store.begin(scope, digest, lease),
            Store::Redis(store) => store.begin(scope, digest, lease, deadline).await,
        }
    }

    /// How long a call refused for the store's sake should wait before a
    /// retry (`RetryInfo`): until the store's next connection attempt while
    /// it is down, else 1 s.
    pub fn retry_after(&self) -> Duration {
        match &self.store {
            Store::Memory(_) => Duration::from_secs(1),
            Store::Redis(store) => store.shared().retry_after(),
        }
    }

    /// Bound of one store operation (zero for the memory store, which never
    /// waits on anything but a short mutex).
    pub fn store_timeout(&self) -> Duration {
        match &self.store {
            Store::Memory(_) => Duration::ZERO,
            Store::Redis(store) => store.timeout(),
        }
    }

    /// The default store: in memory, with the command line's limits.
    pub fn in_memory() -> Result<Self, ConfigError> {
        Ok(Self {
            store: Self::memory(&IdempotencyArgs::default())?,
        })
    }

    fn memory(args: &IdempotencyArgs) -> Result<Store, ConfigError> {
        Ok(Store::Memory(memory::MemoryStore::start(memory::Limits {
            ttl: args.idempotency_ttl,
            max_entries: args.idempotency_max_entries,
            max_bytes: args.idempotency_max_bytes,
        })?))
    }

    /// Records and bytes held, for the memory store.
    pub fn usage(&self) -> Option<Usage> {
        match &self.store {
            Store::Memory(store) => Some(store.usage()),
            Store::Redis(_) => None,
        }
    }
}

/// What identifies the record a lease owns, per store: the one place that
/// knows both stores, so that the lease knows neither.
pub(crate) enum Claim {
    Memory {
        store: Arc<memory::MemoryStore>,
        scope: Scope,
        token: u64,
    },
    Redis(redis::Held),
}

impl Claim {
    async fn finish(&self, pending: &Pending) -> Result<Recorded, StoreError> {
        match self {
            Self::Memory {
                store,
                scope,
                token,
            } => Ok(store.finish(scope, *token, pending)),
            Self::Redis(held) => held.finish(pending).await,
        }
    }

    /// Carries out `pending` without waiting (for `Drop`).
    fn finish_detached(self, pending: Pending) {
        match self {
            // A short critical section under a mutex: nothing to wait for.
            Self::Memory {
                store,
                scope,
                token,
            } => {
                store.finish(&scope, token, &pending);
            }
            Self::Redis(held) => held.finish_detached(pending),
        }
    }

    fn store_name(&self) -> &'static str {
        match self {
            Self::Memory { .. } => "memory",
            Self::Redis(_) => "redis",
        }
    }
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.store {
            Store::Memory(_) => f.write_str("Idempotency(memory)"),
            Store::Redis(store) => write!(f, "Idempotency({})", store.target()),
        }
    }
}
