//! This replica's buckets, on the `governor` crate's GCRA: [`Bucket`] for an
//! entry of the file (a direct limiter, one atomic compare-and-swap per
//! call), [`KeyedBuckets`] for `[default]` (one bucket per organization,
//! in a [`BoundedStore`]).
//!
//! GCRA keeps one number per bucket, its theoretical arrival time (TAT): a
//! call at `now` passes when `now >= TAT - (burst - 1) * interval`, and then
//! moves TAT to `max(TAT, now) + interval`; a refused call changes nothing
//! and may pass after `TAT - (burst - 1) * interval - now`, which is its
//! `RetryInfo`.
//!
//! **Bounded memory.** `[default]` creates a bucket for any organization id
//! a caller sends, and without `--credentials` ids are the callers' claims.
//! The store holds at most [`MAX_DEFAULT_BUCKETS`] of them (16 bytes of
//! key and TAT each, about 2 MiB in all): when a new organization finds its
//! shard full, the buckets indistinguishable from a new one (TAT in the
//! past) are dropped first; if that frees too little, arbitrary buckets go
//! until an eighth of the shard is free. An evicted organization starts
//! again with a full bucket: at worst a burst more than its quota, never a
//! refusal it did not earn. Listed organizations and callers have buckets
//! of their own, never evicted.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
#[cfg(test)]
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use super::file::Limit;
use crate::tenant::IdHasher;

/// Most `[default]` buckets kept, per bucket kind (the default, and each
/// per-RPC default): about 2 MiB each.
pub const MAX_DEFAULT_BUCKETS: usize = 65_536;

/// Shards of a [`BoundedStore`]: calls of different organizations on
/// different worker threads rarely wait for the same lock.
const SHARDS: usize = 16;

/// The governor quota of a limit.
fn quota(limit: Limit) -> Quota {
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    // `interval()` is at least 1 ns, so `with_period` has a quota to give.
    Quota::with_period(limit.interval())
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

/// One bucket: an entry of the file (or one of its per-RPC overrides).
#[derive(Debug)]
pub struct Bucket<C: Clock = DefaultClock> {
    limit: Limit,
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

impl Bucket {
    pub fn new(limit: Limit) -> Self {
        Self::with_clock(limit, DefaultClock::default())
    }
}

impl<C: Clock> Bucket<C> {
    pub fn with_clock(limit: Limit, clock: C) -> Self {
        Self {
            limit,
            limiter: RateLimiter::direct_with_clock(quota(limit), clock),
        }
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Takes one call from the bucket, or tells how long until one would
    /// pass (nothing is taken then).
    pub fn take(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

/// `[default]` (or one of its per-RPC overrides): one bucket per key (the
/// organization id's hash), at most `capacity` of them.
#[derive(Debug)]
pub struct KeyedBuckets<C: Clock = DefaultClock> {
    limit: Limit,
    limiter: RateLimiter<u64, BoundedStore, C, NoOpMiddleware<C::Instant>>,
}

impl KeyedBuckets {
    pub fn new(limit: Limit) -> Self {
        Self::with_clock(limit, MAX_DEFAULT_BUCKETS, DefaultClock::default())
    }
}

impl<C: Clock> KeyedBuckets<C> {
    pub fn with_clock(limit: Limit, capacity: usize, clock: C) -> Self {
        let store = BoundedStore::new(capacity, limit.interval());
        Self {
            limit,
            limiter: RateLimiter::new(quota(limit), store, clock),
        }
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// [`Bucket::take`] on the bucket of `key`.
    pub fn take(&self, key: u64) -> Result<(), Duration> {
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Buckets held now (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// The keyed state governor's GCRA reads and writes through
/// [`StateStore`]: a TAT (nanoseconds since the limiter started) per key,
/// in [`SHARDS`] maps behind a lock each, at most `capacity` keys in all.
/// Keys are already hashes (the organization id's, with a per-process
/// random key), so the maps use them as they are.
#[derive(Debug)]
pub struct BoundedStore {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    interval: u64,
}

type Shard = HashMap<u64, u64, BuildHasherDefault<IdHasher>>;

impl BoundedStore {
    fn new(capacity: usize, interval: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            interval: Nanos::from(interval).as_u64(),
        }
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        // Bits the map does not use for its position or its tag.
        &self.shards[(key >> 32) as usize % SHARDS]
    }

    /// Makes room in a full shard for a key whose first call comes at `now`.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        // A TAT in the past is a full bucket: dropping it changes nothing.
        shard.retain(|_, tat| *tat > now);
        if shard.len() >= self.per_shard {
            let keep = (self.per_shard - self.per_shard / 8).min(self.per_shard - 1);
            let excess = shard.len().saturating_sub(keep);
            let evicted: Vec<u64> = shard.keys().take(excess).copied().collect();
            for key in evicted {
                shard.remove(&key);
            }
        }
    }
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // A panic elsewhere leaves complete numbers behind: use them.
        let mut shard = self
            .shard(*key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = shard.get(key).copied();
        let (outcome, tat) = f(before.map(Nanos::from))?;
        let tat = tat.as_u64();
        if before.is_none() && shard.len() >= self.per_shard {
            // A new key's TAT is its first call's time plus one interval.
            self.make_room(&mut shard, tat.saturating_sub(self.interval));
        }
        shard.insert(*key, tat);
        Ok(outcome)
    }
}

/// For [`KeyedBuckets::len`] (tests): a full shard makes room by itself.
#[cfg(test)]
impl ShrinkableKeyedStateStore<u64> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|_, tat| *tat > drop_below.as_u64());
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limit(calls_per_second: f64, burst: u32) -> Limit {
        Limit {
            calls_per_second,
            burst,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_bucket_lets_its_burst_through_at_once_then_refuses() {
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::with_clock(limit(10.0, 4), clock.clone());
        for call in 1..=4 {
            assert_eq!(bucket.take(), Ok(()), "call {call} of the burst");
        }
        // The fifth waits for one interval (100 ms), exactly.
        assert_eq!(bucket.take(), Err(100 * MS));
        clock.advance(30 * MS);
        assert_eq!(bucket.take(), Err(70 * MS), "RetryInfo is the time left");
        clock.advance(70 * MS);
        assert_eq!(bucket.take(), Ok(()));
        assert_eq!(bucket.take(), Err(100 * MS), "a refusal took nothing");
    }

    #[test]
    fn the_steady_rate_is_one_call_per_interval() {
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::with_clock(limit(20.0, 1), clock.clone());
        let mut passed = 0;
        // 10 s in 1 ms steps, a call tried at each: 20 per second pass.
        for _ in 0..10_000 {
            if bucket.take().is_ok() {
                passed += 1;
            }
            clock.advance(MS);
        }
        assert_eq!(passed, 200);
    }

    #[test]
    fn an_idle_bucket_refills_to_its_burst_and_no_further() {
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::with_clock(limit(2.0, 3), clock.clone());
        for _ in 0..3 {
            bucket.take().expect("the burst");
        }
        assert_eq!(bucket.take(), Err(500 * MS));
        // One second refills two calls' worth.
        clock.advance(Duration::from_secs(1));
        assert_eq!(bucket.take(), Ok(()));
        assert_eq!(bucket.take(), Ok(()));
        assert_eq!(bucket.take(), Err(500 * MS));
        // An hour refills the burst, not an hour's calls.
        clock.advance(Duration::from_secs(3600));
        for _ in 0..3 {
            bucket.take().expect("the burst again");
        }
        assert_eq!(bucket.take(), Err(500 * MS));
    }

    #[test]
    fn a_fractional_rate_spaces_calls_by_its_interval() {
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::with_clock(limit(0.5, 1), clock.clone());
        assert_eq!(bucket.take(), Ok(()));
        assert_eq!(bucket.take(), Err(Duration::from_secs(2)));
        clock.advance(Duration::from_millis(1999));
        assert_eq!(bucket.take(), Err(MS));
        clock.advance(MS);
        assert_eq!(bucket.take(), Ok(()));
    }

    #[test]
    fn keyed_buckets_are_separate_per_key() {
        let clock = FakeRelativeClock::default();
        let buckets = KeyedBuckets::with_clock(limit(1.0, 2), 1024, clock.clone());
        assert_eq!(buckets.take(1), Ok(()));
        assert_eq!(buckets.take(1), Ok(()));
        assert_eq!(buckets.take(1), Err(Duration::from_secs(1)));
        assert_eq!(buckets.take(2), Ok(()), "another key, another bucket");
        clock.advance(250 * MS);
        assert_eq!(buckets.take(1), Err(750 * MS));
        assert_eq!(buckets.len(), 2);
    }

    /// Keys spread like hashes (the golden ratio's multiples).
    fn made_up(n: u64) -> u64 {
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn a_flood_of_made_up_keys_at_once_never_holds_more_than_the_capacity() {
        let clock = FakeRelativeClock::default();
        let capacity = 1024;
        let buckets = KeyedBuckets::with_clock(limit(1.0, 2), capacity, clock);
        for n in 0..10_000 {
            buckets
                .take(made_up(n))
                .expect("a new key's first call passes");
            assert!(buckets.len() <= capacity, "{} buckets", buckets.len());
        }
        assert!(buckets.len() > capacity / 2, "{} buckets", buckets.len());
        // The newest key kept its bucket.
        assert_eq!(buckets.take(made_up(9_999)), Ok(()));
        assert_eq!(buckets.take(made_up(9_999)), Err(Duration::from_secs(1)));
    }

    #[test]
    fn a_steady_flood_of_made_up_keys_never_evicts_a_bucket_in_use() {
        let clock = FakeRelativeClock::default();
        let capacity = 1024;
        let buckets = KeyedBuckets::with_clock(limit(1.0, 2), capacity, clock.clone());
        let real = made_up(u64::MAX / 3);
        buckets.take(real).expect("the burst");
        buckets.take(real).expect("the burst");
        // 10,000 made-up keys over 40 s, one every 4 ms: about 250 alive at
        // any time (each for 1 s), the rest full buckets that make room.
        for n in 0..10_000 {
            buckets.take(made_up(n)).expect("a new key passes");
            assert!(buckets.len() <= capacity, "{} buckets", buckets.len());
            clock.advance(4 * MS);
            if n % 250 == 249 {
                // The real key, at its rate: one call a second passes, and
                // its bucket stays empty (an evicted one would be full).
                assert_eq!(buckets.take(real), Ok(()), "call {n}");
                assert_eq!(buckets.take(real), Err(Duration::from_secs(1)), "call {n}");
            }
        }
    }
}
