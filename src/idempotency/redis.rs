//! The shared store (`--idempotency-store redis://…`, `redis+sentinel://…`,
//! `redis+cluster://…`): records in Redis or Valkey, reached through the
//! gateway's one [`Store`] (its connection machinery follows failovers), so
//! a retry landing on another replica finds the first call's record. Every
//! operation is one atomic script on one key (a key is taken with
//! `SET NX PX` inside it; a verdict compares the owner's exact value before
//! it sets or deletes), bounded by `--idempotency-store-timeout`.
//!
//! Keys are `gormic:idem:v1:<64 hex digits of the scope hash>`, the same
//! bytes whatever the deployment: one key per script, so no hash tag is
//! needed in a cluster, and a rolling upgrade reads the records already
//! there. Values are the records of [`super::record`]. Nothing in Redis names
//! an organization, an api-key or an idempotency key.
//!
//! **Durable leases.** A lease and a verdict wait (`WAIT`, in the same round
//! trip) for the replicas `--idempotency-store-replicas` requires. A lease
//! fewer replicas acknowledged in time is released at once and the call
//! fails UNAVAILABLE, unsent ([`StoreError::NotReplicated`]): sent, it could
//! be created again by a retry after a failover that lost the lease. A
//! verdict fewer replicas acknowledged stands (the caller has its answer);
//! if the primary is lost before it replicates, the lease that did
//! replicate makes repeats read "in progress", then "outcome unknown", never
//! a fresh key. What WAIT does not cover is in docs/operations.md.
//!
//! Set-up expected of the server (documented for operators):
//! - `maxmemory-policy noeviction`: when full, Redis refuses writes and the
//!   gateway answers RESOURCE_EXHAUSTED (`IDEMPOTENCY_STORE_FULL`) to new
//!   keys. An evicting policy would silently forget live records, and a
//!   retry could then act twice. Verdicts that find Redis full leave the
//!   record in progress; it turns "outcome unknown" when its lease ends.
//! - Replicas (and persistence, `appendonly yes`), if losing records to a
//!   failed server is not acceptable.
//! - An ACL user with `GET SET DEL PTTL EVALSHA EVAL WAIT ROLE PING` (plus
//!   `CLUSTER` in a cluster) on `gormic:idem:*` keys.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use tokio::time::Instant;

use super::lease::Lease;
use super::record::{self, IN_PROGRESS_LEN, Record};
use super::verdict::{Pending, Recorded};
use super::{Begin, Claim, ConfigError, Digest, MAX_LEASE, Scope, StoreError};
use crate::store::{self, Failure, FailureKind, Script, Store, Wait};

/// Versioned so that a future layout never reads these records by mistake.
pub const KEY_PREFIX: &str = "gormic:idem:v1:";
pub(crate) type RedisKey = [u8; KEY_PREFIX.len() + 64];

/// Takes a new key or reports the existing record and its remaining life.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "idempotency_begin",
        // Reads first: a Redis out of memory refuses any SET, even one that
        // NX would turn into a no-op, and a repeat must still replay then.
        r"-- KEYS[1] record; ARGV[1] in-progress record; ARGV[2] its time to live (ms)
local stored = redis.call('GET', KEYS[1])
if stored then
  return {stored, redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return redis.error_reply('record appeared during an atomic script')",
    )
});

/// Replaces the record if it is still exactly what this lease wrote.
static REPLACE_IF_HELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "idempotency_verdict",
        r"-- KEYS[1] record; ARGV[1] the lease's record; ARGV[2] new record; ARGV[3] its time to live (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0",
    )
});

/// Deletes the record if it is still exactly what this lease wrote.
static DELETE_IF_HELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "idempotency_release",
        r"-- KEYS[1] record; ARGV[1] the lease's record
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

pub(crate) struct RedisStore {
    store: Store,
    ttl_ms: u64,
    token_seed: [u8; 8],
    token_counter: AtomicU64,
}

/// What identifies the record a Redis lease owns.
pub(crate) struct Held {
    store: Arc<RedisStore>,
    key: RedisKey,
    /// The exact value this lease wrote: it holds a unique owner token, so
    /// "the stored value is still this" is the ownership check.
    held: [u8; IN_PROGRESS_LEN],
    digest: Digest,
}

impl RedisStore {
    pub(crate) fn new(store: Store, ttl: Duration) -> Result<Self, ConfigError> {
        let mut token_seed = [0; 8];
        let mut counter_seed = [0; 8];
        let random = ring::rand::SystemRandom::new();
        ring::rand::SecureRandom::fill(&random, &mut token_seed)
            .and_then(|()| ring::rand::SecureRandom::fill(&random, &mut counter_seed))
            .map_err(|_| ConfigError::Start("no random source for lease owner tokens".into()))?;
        Ok(Self {
            store,
            ttl_ms: millis(ttl).max(1),
            token_seed,
            token_counter: AtomicU64::new(u64::from_be_bytes(counter_seed)),
        })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.store.timeout()
    }

    pub(crate) fn target(&self) -> &str {
        self.store.target()
    }

    pub(crate) fn shared(&self) -> &Store {
        &self.store
    }

    /// Takes a lease (or reads the record), within the store timeout and
    /// `deadline`; the lease waits for the required replicas.
    pub(crate) async fn begin(
        self: &Arc<Self>,
        scope: &Scope,
        digest: Digest,
        lease: Duration,
        deadline: Option<Instant>,
    ) -> Result<Begin, StoreError> {
        let lease_ms = millis(lease.min(MAX_LEASE));
        let ttl_ms = self.ttl_ms.max(lease_ms);
        let held = record::in_progress(&digest, self.next_token(), lease_ms, ttl_ms);
        let key = redis_key(scope);
        let mut call = BEGIN.call(&[&key[..]]);
        call.arg(&held[..]).arg(ttl_ms);
        // Until the answer is read, the SET may have happened unseen (the
        // answer lost, or this future cancelled): the guard then undoes it,
        // or the key would read "unknown" for a call that never sent anything.
        let mut undo = UndoBegin {
            store: Some(self.clone()),
            key,
            held,
        };
        let reply = match self.store.run(&call, Wait::Replicas, deadline).await {
            Ok(reply) => reply,
            Err(failure) => {
                if !failure.may_have_applied {
                    undo.store = None;
                }
                return Err(store_error(failure));
            }
        };
        undo.store = None;
        match reply.value {
            Value::Int(1) => {
                if let Some(shortfall) = reply.shortfall {
                    // Not on enough replicas to survive a failover: give it
                    // back before anything is sent.
                    let released = self.delete_if_held(&key, &held).await;
                    if let Err(error) = released {
                        tracing::warn!(%error, "idempotency: could not release a lease its replicas did not acknowledge; \
                             its record reads outcome unknown once the lease ends");
                    }
                    return Err(StoreError::NotReplicated(format!(
                        "{}: {} of {} replicas acknowledged the lease in time \
                         (--idempotency-store-replicas); it was released",
                        self.target(),
                        shortfall.acknowledged,
                        shortfall.required
                    )));
                }
                Ok(Begin::Proceed(Lease::new(Claim::Redis(Held {
                    store: self.clone(),
                    key,
                    held,
                    digest,
                }))))
            }
            Value::Array(items) => match <[Value; 2]>::try_from(items) {
                Ok([Value::BulkString(stored), Value::Int(pttl)]) => {
                    self.classify(Bytes::from(stored), pttl, &digest)
                }
                _ => Err(self.unexpected("begin")),
            },
            _ => Err(self.unexpected("begin")),
        }
    }

    fn classify(&self, stored: Bytes, pttl: i64, digest: &Digest) -> Result<Begin, StoreError> {
        let (stored_digest, stored) = record::decode(stored).map_err(|reason| {
            StoreError::Unavailable(format!("{}: unreadable record: {reason}", self.target()))
        })?;
        if stored_digest != *digest {
            return Ok(Begin::Mismatch);
        }
        Ok(match stored {
            Record::Done(outcome) => Begin::Replay(outcome),
            Record::Unknown => Begin::OutcomeUnknown,
            Record::InProgress { lease_ms, ttl_ms } => {
                // The lease's age by Redis's clock: the record's time to live
                // when written minus what is left of it.
                let Ok(left) = u64::try_from(pttl) else {
                    // No expiry (someone else wrote it): never "free".
                    return Ok(Begin::OutcomeUnknown);
                };
                let age = ttl_ms.saturating_sub(left);
                match lease_ms.checked_sub(age).filter(|rest| *rest > 0) {
                    Some(rest) => Begin::InProgress {
                        retry_after: Duration::from_millis(rest),
                    },
                    None => Begin::OutcomeUnknown,
                }
            }
        })
    }

    async fn finish(
        &self,
        key: &RedisKey,
        held: &[u8; IN_PROGRESS_LEN],
        digest: &Digest,
        pending: &Pending,
    ) -> Result<Recorded, StoreError> {
        let replacement: Vec<u8> = match pending {
            Pending::Release => return self.delete_if_held(key, held).await,
            Pending::Unknown => record::unknown(digest).to_vec(),
            Pending::Complete(outcome) => record::outcome(digest, outcome),
        };
        let mut call = REPLACE_IF_HELD.call(&[&key[..]]);
        call.arg(&held[..]).arg(replacement).arg(self.ttl_ms);
        let reply = self
            .store
            .run(&call, Wait::Replicas, None)
            .await
            .map_err(store_error)?;
        if let Some(shortfall) = reply.shortfall {
            // The caller has its answer; the lease did replicate, so if this
            // record is lost with the primary, repeats read "in progress",
            // then "outcome unknown", never a fresh key.
            tracing::warn!(
                acknowledged = shortfall.acknowledged,
                required = shortfall.required,
                "idempotency: fewer replicas than required acknowledged an outcome record in time; \
                 it stands on the primary"
            );
        }
        self.owned(reply.value, "verdict")
    }

    async fn delete_if_held(
        &self,
        key: &RedisKey,
        held: &[u8; IN_PROGRESS_LEN],
    ) -> Result<Recorded, StoreError> {
        let mut call = DELETE_IF_HELD.call(&[&key[..]]);
        call.arg(&held[..]);
        let reply = self
            .store
            .run(&call, Wait::None, None)
            .await
            .map_err(store_error)?;
        self.owned(reply.value, "release")
    }

    fn owned(&self, reply: Value, what: &str) -> Result<Recorded, StoreError> {
        match reply {
            Value::Int(1) => Ok(Recorded::Done),
            Value::Int(0) => Ok(Recorded::NotOwner),
            _ => Err(self.unexpected(what)),
        }
    }

    fn unexpected(&self, what: &str) -> StoreError {
        StoreError::Unavailable(format!("{}: unexpected reply to {what}", self.target()))
    }

    /// Unique across replicas: 8 random bytes per process, then a counter.
    fn next_token(&self) -> [u8; 16] {
        let mut token = [0; 16];
        token[..8].copy_from_slice(&self.token_seed);
        token[8..].copy_from_slice(&self.token_counter.fetch_add(1, Relaxed).to_be_bytes());
        token
    }
}

impl Held {
    pub(crate) async fn finish(&self, pending: &Pending) -> Result<Recorded, StoreError> {
        self.store
            .finish(&self.key, &self.held, &self.digest, pending)
            .await
    }

    /// A lease dropped without a verdict, or whose verdict was cancelled:
    /// carried out by a task, since `Drop` must not wait.
    pub(crate) fn finish_detached(self, pending: Pending) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "idempotency: lease dropped outside the runtime; \
                 its record reads outcome unknown once the lease ends"
            );
            return;
        };
        runtime.spawn(async move {
            if let Err(error) = self.finish(&pending).await {
                tracing::warn!(%error, "idempotency: could not record the verdict of a dropped lease; \
                     its record reads outcome unknown once the lease ends");
            }
        });
    }
}

fn store_error(failure: Failure) -> StoreError {
    match failure.kind {
        FailureKind::Full => StoreError::Full,
        FailureKind::Unavailable => StoreError::Unavailable(failure.detail),
    }
}

/// Deletes a possibly written in-progress record when dropped armed.
struct UndoBegin {
    store: Option<Arc<RedisStore>>,
    key: RedisKey,
    held: [u8; IN_PROGRESS_LEN],
}

impl Drop for UndoBegin {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (key, held) = (self.key, self.held);
            // Best effort: if it fails too, the record reads "outcome
            // unknown" when its lease ends, which is safe.
            runtime.spawn(async move {
                let _ = store.delete_if_held(&key, &held).await;
            });
        }
    }
}

fn redis_key(scope: &Scope) -> RedisKey {
    store::prefixed_hex(KEY_PREFIX, &scope.0)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_hex_of_the_scope() {
        let scope = Scope([0xab; 32]);
        let key = redis_key(&scope);
        let key = std::str::from_utf8(&key).unwrap();
        assert_eq!(key, format!("gormic:idem:v1:{}", "ab".repeat(32)));
        assert_eq!(&key[KEY_PREFIX.len()..], scope.to_hex());
    }
}
