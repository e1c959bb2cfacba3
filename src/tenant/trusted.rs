//! The organizations Gormic accepted a call for lately: bounded
//! ([`CAPACITY`], the oldest evicted first), each trusted for [`TTL`] after
//! the last accepted call. Read on every call without `--credentials`, so a
//! look-up is a shared lock and one atomic load; an accepted call writes
//! only when its entry is new, or older than [`REFRESH`] (an atomic store).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::{TenantId, TenantMap};

/// Most organizations kept: ~10,000 organizations active within an hour is
/// far more than one gateway serves, and the set costs 17 bytes a bucket
/// (16,384 buckets at most: under 300 KiB).
pub(super) const CAPACITY: usize = 10_000;
/// How long an organization stays trusted after Gormic last accepted a
/// call for it.
pub(super) const TTL: Duration = Duration::from_secs(3600);
/// How stale an entry may be before an accepted call refreshes it: fewer
/// writes, at the price of trust lasting between TTL − REFRESH and TTL.
pub(super) const REFRESH: Duration = Duration::from_secs(60);

/// What the set knows of an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trust {
    /// Accepted within [`REFRESH`].
    Fresh,
    /// Accepted within [`TTL`], not within [`REFRESH`].
    Stale,
    /// Never accepted, or not within [`TTL`].
    Unknown,
}

pub(super) struct TrustedSet {
    /// Times are whole seconds since this instant.
    epoch: Instant,
    capacity: usize,
    /// When each organization was last accepted.
    seen: RwLock<TenantMap<AtomicU32>>,
}

impl TrustedSet {
    pub(super) fn new(epoch: Instant, capacity: usize) -> Self {
        Self {
            epoch,
            capacity: capacity.max(1),
            seen: RwLock::new(TenantMap::default()),
        }
    }

    fn seconds(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    pub(super) fn check(&self, id: TenantId, now: Instant) -> Trust {
        let now = self.seconds(now);
        let seen = self.seen.read().unwrap_or_else(PoisonError::into_inner);
        let Some(at) = seen.get(&id) else {
            return Trust::Unknown;
        };
        match now.saturating_sub(at.load(Ordering::Relaxed)) {
            age if age < REFRESH.as_secs() as u32 => Trust::Fresh,
            age if age < TTL.as_secs() as u32 => Trust::Stale,
            _ => Trust::Unknown,
        }
    }

    /// Gormic accepted a call for `id` at `now`.
    pub(super) fn learn(&self, id: TenantId, now: Instant) {
        let now = self.seconds(now);
        if let Some(at) = self
            .seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            at.fetch_max(now, Ordering::Relaxed);
            return;
        }
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= self.capacity && !seen.contains_key(&id) {
            evict(&mut seen, now, self.capacity);
        }
        seen.entry(id)
            .or_insert_with(|| AtomicU32::new(now))
            .fetch_max(now, Ordering::Relaxed);
    }

    /// Organizations trusted at `now`.
    pub(super) fn trusted(&self, now: Instant) -> usize {
        let now = self.seconds(now);
        let ttl = TTL.as_secs() as u32;
        self.seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|at| now.saturating_sub(at.load(Ordering::Relaxed)) < ttl)
            .count()
    }

    /// Entries held, expired ones not yet evicted included.
    #[cfg(test)]
    pub(super) fn entries(&self) -> usize {
        self.seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Makes room in a full set: drops what expired, and if that is not
/// enough, the oldest sixteenth (at least one), so that the next inserts
/// find room without scanning again (amortised constant time).
fn evict(seen: &mut TenantMap<AtomicU32>, now: u32, capacity: usize) {
    let ttl = TTL.as_secs() as u32;
    seen.retain(|_, at| now.saturating_sub(*at.get_mut()) < ttl);
    if seen.len() < capacity {
        return;
    }
    let mut times: Vec<u32> = seen.values_mut().map(|at| *at.get_mut()).collect();
    let drop = (capacity / 16).max(1).min(times.len());
    let (_, &mut cutoff, _) = times.select_nth_unstable(drop - 1);
    let mut dropped = 0;
    seen.retain(|_, at| {
        let keep = *at.get_mut() > cutoff || dropped >= drop;
        dropped += usize::from(!keep);
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> TenantId {
        TenantId::of_hash(n)
    }

    #[test]
    fn trust_is_fresh_then_stale_then_gone() {
        let epoch = Instant::now();
        let set = TrustedSet::new(epoch, 10);
        let at = |s: u64| epoch + Duration::from_secs(s);
        assert_eq!(set.check(id(7), at(0)), Trust::Unknown);
        set.learn(id(7), at(10));
        assert_eq!(set.check(id(7), at(10)), Trust::Fresh);
        assert_eq!(set.check(id(7), at(69)), Trust::Fresh);
        assert_eq!(set.check(id(7), at(70)), Trust::Stale);
        assert_eq!(set.check(id(7), at(3609)), Trust::Stale);
        assert_eq!(set.check(id(7), at(3610)), Trust::Unknown);
        assert_eq!(set.trusted(at(3609)), 1);
        assert_eq!(set.trusted(at(3610)), 0);
        // Learning again restarts the hour; an older time never moves it back.
        set.learn(id(7), at(3000));
        set.learn(id(7), at(2000));
        assert_eq!(set.check(id(7), at(6599)), Trust::Stale);
        assert_eq!(set.check(id(7), at(6600)), Trust::Unknown);
        assert_eq!(set.check(id(8), at(3000)), Trust::Unknown);
    }

    #[test]
    fn the_set_is_bounded_and_evicts_the_oldest_first() {
        let epoch = Instant::now();
        let capacity = 32;
        let set = TrustedSet::new(epoch, capacity);
        let at = |s: u64| epoch + Duration::from_secs(s);
        for n in 0..capacity as u64 {
            set.learn(id(100 + n), at(n));
        }
        assert_eq!(set.entries(), capacity);
        // A new one evicts the oldest sixteenth (2), never the newest.
        set.learn(id(1), at(1000));
        assert_eq!(set.entries(), capacity - 1);
        assert_eq!(set.check(id(100), at(1000)), Trust::Unknown, "oldest gone");
        assert_eq!(
            set.check(id(101), at(1000)),
            Trust::Unknown,
            "second oldest gone"
        );
        assert_eq!(set.check(id(102), at(1000)), Trust::Stale);
        assert_eq!(set.check(id(1), at(1000)), Trust::Fresh);
        // However many arrive, the set never holds more than its capacity.
        for n in 0..10 * capacity as u64 {
            set.learn(id(10_000 + n), at(2000 + n));
            assert!(set.entries() <= capacity, "{} entries", set.entries());
        }
        assert_eq!(
            set.check(id(10_000 + 10 * capacity as u64 - 1), at(3000)),
            Trust::Stale,
            "the newest stays"
        );
        // Expired entries go first, all at once (the set is full by the
        // second of these at the latest).
        set.learn(id(2), at(100_000));
        set.learn(id(3), at(100_000));
        assert_eq!(set.entries(), 2);
        assert_eq!(set.trusted(at(100_000)), 2);
    }

    #[test]
    fn a_refresh_of_a_known_organization_evicts_nothing() {
        let epoch = Instant::now();
        let set = TrustedSet::new(epoch, 2);
        set.learn(id(1), epoch);
        set.learn(id(2), epoch);
        set.learn(id(1), epoch + Duration::from_secs(100));
        assert_eq!(set.entries(), 2);
        assert_eq!(set.check(id(2), epoch), Trust::Fresh);
    }
}
