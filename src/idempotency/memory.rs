//! The embedded store (`--idempotency-store memory`): records in this
//! process, shared by all worker threads through sharded mutexes, bounded by
//! `--idempotency-max-entries` and `--idempotency-max-bytes`. When full, a
//! new key is refused ([`StoreError::Full`]); no live record is ever evicted,
//! since forgetting one could let a retry create a second invoice. Expired
//! records are dropped lazily when their key is looked up, by a sweeper
//! thread every second, and at once when a new key finds the store full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::lease::Lease;
use super::verdict::{Pending, Recorded, UnknownCause};
use super::{Begin, Claim, ConfigError, Digest, MAX_LEASE, Outcome, Scope, StoreError};

/// A power of two well above the worker count: two calls rarely meet on
/// one mutex, and each shard stays small enough to sweep in microseconds.
const SHARDS: usize = 32;

/// Bytes counted per record besides its outcome: the key, the entry, the
/// hash table's slot and control byte, rounded up.
pub const ENTRY_OVERHEAD: u64 = 160;

const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct Limits {
    pub ttl: Duration,
    pub max_entries: u64,
    pub max_bytes: u64,
}

/// What the memory store holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub entries: u64,
    pub bytes: u64,
}

/// The store; the sweeper thread stops when it is dropped.
pub(crate) struct MemoryStore {
    inner: Arc<Inner>,
    sweeper: Thread,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    entries: AtomicU64,
    bytes: AtomicU64,
    limits: Limits,
    next_token: AtomicU64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Scope, Entry>,
    /// No entry of this shard expires before this (a lower bound).
    next_expiry: Option<Instant>,
}

struct Entry {
    digest: Digest,
    state: State,
    expires_at: Instant,
    /// Counted against `max_bytes`, overhead included.
    bytes: u64,
}

enum State {
    InProgress { token: u64, lease_until: Instant },
    Done(Outcome),
    Unknown,
}

impl MemoryStore {
    pub(crate) fn start(limits: Limits) -> Result<Arc<Self>, ConfigError> {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            limits,
            next_token: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&inner);
        let sweeper = std::thread::Builder::new()
            .name("idempotency-sweep".into())
            .spawn(move || sweep_until_dropped(weak))
            .map_err(|e| ConfigError::Start(format!("cannot start the sweeper thread: {e}")))?;
        Ok(Arc::new(Self {
            inner,
            sweeper: sweeper.thread().clone(),
        }))
    }

    pub(crate) fn begin(
        self: &Arc<Self>,
        scope: &Scope,
        digest: Digest,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let inner = &self.inner;
        let lease = lease.min(MAX_LEASE);
        for attempt in 0..2 {
            let now = Instant::now();
            {
                let mut shard = inner.shard(scope);
                if let Some(entry) = shard.map.get(scope) {
                    if entry.expires_at > now {
                        return Ok(classify(entry, &digest, now));
                    }
                    if let Some(gone) = shard.map.remove(scope) {
                        inner.forget(1, gone.bytes);
                    }
                }
                if inner.reserve(1, ENTRY_OVERHEAD) {
                    let token = inner.next_token.fetch_add(1, Relaxed);
                    let expires_at = now + inner.limits.ttl.max(lease);
                    shard.map.insert(
                        *scope,
                        Entry {
                            digest,
                            state: State::InProgress {
                                token,
                                lease_until: now + lease,
                            },
                            expires_at,
                            bytes: ENTRY_OVERHEAD,
                        },
                    );
                    shard.note_expiry(expires_at);
                    return Ok(Begin::Proceed(Lease::new(Claim::Memory {
                        store: self.clone(),
                        scope: *scope,
                        token,
                    })));
                }
            }
            if attempt == 0 {
                // Full: expired records may still be counted; drop them and
                // look once more before refusing.
                inner.sweep(Instant::now());
            }
        }
        Err(StoreError::Full)
    }

    /// Carries out a lease's verdict if the record is still the lease's.
    pub(crate) fn finish(&self, scope: &Scope, token: u64, pending: &Pending) -> Recorded {
        let inner = &self.inner;
        let now = Instant::now();
        let mut shard = inner.shard(scope);
        let Some(entry) = shard.map.get_mut(scope) else {
            return Recorded::NotOwner;
        };
        let owned = matches!(entry.state, State::InProgress { token: t, .. } if t == token);
        if !owned || entry.expires_at <= now {
            return Recorded::NotOwner;
        }
        let expires_at = now + inner.limits.ttl;
        let recorded = match pending {
            Pending::Release => {
                if let Some(gone) = shard.map.remove(scope) {
                    inner.forget(1, gone.bytes);
                }
                return Recorded::Done;
            }
            Pending::Unknown => {
                entry.state = State::Unknown;
                Recorded::Done
            }
            Pending::Complete(outcome) => {
                let extra = outcome.encoded_len() as u64;
                if inner.reserve(0, extra) {
                    entry.state = State::Done(outcome.clone());
                    entry.bytes += extra;
                    Recorded::Done
                } else {
                    entry.state = State::Unknown;
                    Recorded::AsUnknown(UnknownCause::NoRoom)
                }
            }
        };
        entry.expires_at = expires_at;
        shard.note_expiry(expires_at);
        recorded
    }

    pub(crate) fn usage(&self) -> Usage {
        Usage {
            entries: self.inner.entries.load(Relaxed),
            bytes: self.inner.bytes.load(Relaxed),
        }
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        self.sweeper.unpark();
    }
}

fn classify(entry: &Entry, digest: &Digest, now: Instant) -> Begin {
    if entry.digest != *digest {
        return Begin::Mismatch;
    }
    match &entry.state {
        State::Done(outcome) => Begin::Replay(outcome.clone()),
        State::Unknown => Begin::OutcomeUnknown,
        State::InProgress { lease_until, .. } if *lease_until > now => Begin::InProgress {
            retry_after: *lease_until - now,
        },
        State::InProgress { .. } => Begin::OutcomeUnknown,
    }
}

impl Inner {
    fn shard(&self, scope: &Scope) -> MutexGuard<'_, Shard> {
        // The scope is a SHA-256: any byte is uniform.
        let index = usize::from(scope.0[0]) % SHARDS;
        // A panic under this lock leaves a map that is still consistent
        // (every mutation is a single insert, remove or field store).
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes room for `entries` records and `bytes` bytes, or none of it.
    fn reserve(&self, entries: u64, bytes: u64) -> bool {
        let max_entries = self.limits.max_entries;
        if entries > 0
            && self
                .entries
                .fetch_update(Relaxed, Relaxed, |n| {
                    (n + entries <= max_entries).then_some(n + entries)
                })
                .is_err()
        {
            return false;
        }
        let max_bytes = self.limits.max_bytes;
        if self
            .bytes
            .fetch_update(Relaxed, Relaxed, |n| {
                n.checked_add(bytes).filter(|total| *total <= max_bytes)
            })
            .is_err()
        {
            self.entries.fetch_sub(entries, Relaxed);
            return false;
        }
        true
    }

    fn forget(&self, entries: u64, bytes: u64) {
        self.entries.fetch_sub(entries, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }

    /// Drops expired records from the shards that may hold some, one shard
    /// lock at a time.
    fn sweep(&self, now: Instant) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            if shard.next_expiry.is_none_or(|t| t > now) {
                continue;
            }
            let (mut entries, mut bytes, mut next) = (0, 0, None::<Instant>);
            shard.map.retain(|_, entry| {
                if entry.expires_at <= now {
                    entries += 1;
                    bytes += entry.bytes;
                    false
                } else {
                    next = Some(next.map_or(entry.expires_at, |t| t.min(entry.expires_at)));
                    true
                }
            });
            shard.next_expiry = next;
            drop(shard);
            self.forget(entries, bytes);
        }
    }
}

impl Shard {
    fn note_expiry(&mut self, at: Instant) {
        self.next_expiry = Some(self.next_expiry.map_or(at, |t| t.min(at)));
    }
}

/// The sweeper thread: wakes every [`SWEEP_INTERVAL`] (or when the store is
/// dropped) and ends once the store is gone.
fn sweep_until_dropped(store: Weak<Inner>) {
    loop {
        std::thread::park_timeout(SWEEP_INTERVAL);
        let Some(inner) = store.upgrade() else {
            return;
        };
        inner.sweep(Instant::now());
        if Arc::strong_count(&inner) == 1 {
            // The store was dropped while this sweep held it.
            return;
        }
    }
}
