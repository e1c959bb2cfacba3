//! Fair shares of `--max-in-flight` between tenants (docs/tenants.md,
//! "Fair shares"). With C = `--max-in-flight` (still the hard bound,
//! checked first) and a reserve R = max(1, C/16):
//!
//! - while the calls in flight, this one included, are at most C − R,
//!   every call is admitted: one tenant alone may use C − R
//!   (work-conserving);
//! - past that, a call is refused when its tenant already holds its share,
//!   max(1, (C − R) / tenants with calls in flight, this one counted): a
//!   tenant under its share, a newcomer always, is admitted up to C. The
//!   reserve is what a newcomer finds free while another tenant holds all
//!   it may.
//!
//! A tenant is counted only while it has calls in flight: the tables hold
//! at most `--max-in-flight` entries, none once the gateway is idle. They
//! are split in shards by tenant, each behind its own lock, so that two
//! workers serving different tenants do not wait on each other; a call
//! takes its shard's lock twice (when admitted and when done), never
//! allocates once the shard's table has grown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::tenant::{TenantId, TenantMap};

/// Shards of the per-tenant counts: a power of two, a few times the cores
/// a gateway usually runs on.
const SHARDS: usize = 16;

/// Why a call was refused for fairness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the tenant holds {in_flight} calls in flight, its share of {share}")]
pub struct OverShare {
    /// The tenant's share of `--max-in-flight` now.
    pub share: usize,
    /// The tenant's calls in flight.
    pub in_flight: usize,
    /// Tenants with calls in flight, this one included.
    pub tenants: usize,
    /// The tenant is the one of every unverified organization.
    pub unverified: bool,
}

pub(super) struct FairShares {
    shards: Box<[Shard]>,
    /// Tenants with calls in flight (entries over all shards).
    tenants: AtomicUsize,
    /// C − R: what the tenants share before fairness applies.
    usable: usize,
}

impl std::fmt::Debug for FairShares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairShares")
            .field("usable", &self.usable)
            .field("tenants", &self.tenants.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// One shard, alone on its cache lines.
#[repr(align(128))]
struct Shard(Mutex<TenantMap<usize>>);

impl FairShares {
    pub(super) fn new(max_in_flight: usize) -> Self {
        let reserve = (max_in_flight / 16).max(1);
        Self {
            shards: (0..SHARDS)
                .map(|_| Shard(Mutex::new(TenantMap::default())))
                .collect(),
            tenants: AtomicUsize::new(0),
            usable: max_in_flight.saturating_sub(reserve),
        }
    }

    /// `tenant`'s call is admitted, or refused for holding its share;
    /// `in_flight` counts the calls in flight, this one included.
    pub(super) fn enter(&self, tenant: TenantId, in_flight: usize) -> Result<(), OverShare> {
        let mut counts = self.shard(tenant);
        let held = counts.get(&tenant).copied().unwrap_or(0);
        if in_flight > self.usable {
            let tenants = self.tenants.load(Ordering::Relaxed) + usize::from(held == 0);
            let share = (self.usable / tenants.max(1)).max(1);
            if held >= share {
                return Err(OverShare {
                    share,
                    in_flight: held,
                    tenants,
                    unverified: tenant.is_unverified(),
                });
            }
        }
        match counts.get_mut(&tenant) {
            Some(held) => *held += 1,
            None => {
                counts.insert(tenant, 1);
                self.tenants.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// One of `tenant`'s calls is done; a tenant with none left is forgotten.
    pub(super) fn leave(&self, tenant: TenantId) {
        let mut counts = self.shard(tenant);
        let Some(held) = counts.get_mut(&tenant) else {
            debug_assert!(false, "a tenant left more often than it entered");
            return;
        };
        *held -= 1;
        if *held == 0 {
            counts.remove(&tenant);
            self.tenants.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Tenants with calls in flight.
    pub(super) fn tenants(&self) -> usize {
        self.tenants.load(Ordering::Relaxed)
    }

    /// `tenant`'s calls in flight.
    pub(super) fn in_flight(&self, tenant: TenantId) -> usize {
        self.shard(tenant).get(&tenant).copied().unwrap_or(0)
    }

    fn shard(&self, tenant: TenantId) -> MutexGuard<'_, TenantMap<usize>> {
        // The high bits: the tables' buckets use the low ones.
        let index = (tenant.as_u64() >> 59) as usize % SHARDS;
        lock(&self.shards[index].0)
    }
}

fn lock(counts: &Mutex<TenantMap<usize>>) -> MutexGuard<'_, TenantMap<usize>> {
    // The counts are consistent after any panic: each change is one write.
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Credentials;
    use crate::tenant::{TenantKey, Tenants};

    /// Distinct trusted tenants.
    fn tenants(n: usize) -> Vec<TenantId> {
        let tenants = Tenants::new(TenantKey::Organization);
        (0..n)
            .map(|i| {
                let credentials = Credentials {
                    api_key: http::HeaderValue::from_static("k"),
                    organization_id: http::HeaderValue::from_str(&format!("org-{i}")).unwrap(),
                };
                tenants.identify(&credentials, None, true).id
            })
            .collect()
    }

    /// A model of the admission count: `enter` with the count this call
    /// makes, undone when refused (as the call path drops its permit).
    struct Gateway {
        fair: FairShares,
        max: usize,
        in_flight: usize,
    }

    impl Gateway {
        fn new(max: usize) -> Self {
            Self {
                fair: FairShares::new(max),
                max,
                in_flight: 0,
            }
        }

        fn call(&mut self, tenant: TenantId) -> Result<(), &'static str> {
            if self.in_flight == self.max {
                return Err("overloaded");
            }
            self.fair
                .enter(tenant, self.in_flight + 1)
                .map_err(|_| "over share")?;
            self.in_flight += 1;
            Ok(())
        }

        fn done(&mut self, tenant: TenantId) {
            self.fair.leave(tenant);
            self.in_flight -= 1;
        }
    }

    #[test]
    fn a_tenant_alone_uses_all_but_the_reserve() {
        let [a] = tenants(1)[..] else { unreachable!() };
        for (max, reserve) in [(2, 1), (8, 1), (16, 1), (100, 6), (10_000, 625)] {
            let mut gateway = Gateway::new(max);
            let usable = max - reserve;
            for n in 0..usable {
                assert_eq!(gateway.call(a), Ok(()), "call {n} of {max}");
            }
            assert_eq!(gateway.call(a), Err("over share"), "--max-in-flight {max}");
            assert_eq!(gateway.fair.in_flight(a), usable);
        }
        // With room for one call, the one call is admitted.
        let mut gateway = Gateway::new(1);
        assert_eq!(gateway.call(a), Ok(()));
        assert_eq!(gateway.call(a), Err("overloaded"));
    }

    #[test]
    fn a_newcomer_is_admitted_while_another_holds_all_it_may() {
        let [a, b, c] = tenants(3)[..] else {
            unreachable!()
        };
        let mut gateway = Gateway::new(16); // R = 1, C − R = 15
        for _ in 0..15 {
            gateway.call(a).expect("A alone");
        }
        assert_eq!(gateway.call(a), Err("over share"));
        gateway.call(b).expect("B, a newcomer, takes the reserve");
        assert_eq!(gateway.call(c), Err("overloaded"), "the hard bound holds");
        // A's calls end and A may not take their places while the gateway
        // is contended: B may, up to its share (15 / 2 = 7).
        for _ in 0..6 {
            gateway.done(a);
            assert_eq!(gateway.call(a), Err("over share"));
            gateway.call(b).expect("B under its share");
        }
        assert_eq!(gateway.fair.in_flight(a), 9);
        assert_eq!(gateway.fair.in_flight(b), 7);
        assert_eq!(gateway.call(b), Err("overloaded"));
        gateway.done(a);
        assert_eq!(gateway.call(b), Err("over share"), "B at its share of 7");
        gateway.call(c).expect("C, a newcomer");
        // Three tenants: shares of 5.
        gateway.done(b);
        assert_eq!(gateway.call(a), Err("over share"), "A holds 8 > 5");
        gateway.call(c).expect("C under its share");
    }

    #[test]
    fn below_c_minus_r_nobody_is_refused_for_fairness() {
        let [a, b] = tenants(2)[..] else {
            unreachable!()
        };
        let mut gateway = Gateway::new(16);
        gateway.call(b).expect("B");
        // A goes past its share of 7 (two tenants): the gateway is not
        // contended, so nobody is refused (work-conserving).
        for _ in 0..14 {
            gateway.call(a).expect("A, up to C − R in all");
        }
        assert_eq!(gateway.fair.in_flight(a), 14);
        assert_eq!(gateway.call(a), Err("over share"), "past C − R, over share");
        gateway
            .call(b)
            .expect("B, under its share, takes the reserve");
    }

    #[test]
    fn the_refusal_says_the_share_and_the_tenants_calls() {
        let fair = FairShares::new(16);
        let [a, b] = tenants(2)[..] else {
            unreachable!()
        };
        for n in 1..=10 {
            fair.enter(a, n).expect("A");
        }
        fair.enter(b, 11).expect("B");
        assert_eq!(
            fair.enter(a, 16),
            Err(OverShare {
                share: 7,
                in_flight: 10,
                tenants: 2,
                unverified: false
            })
        );
        for n in 1..=15 {
            fair.enter(TenantId::UNVERIFIED, n).expect("pool alone");
        }
        assert_eq!(
            fair.enter(TenantId::UNVERIFIED, 16)
                .map_err(|o| o.unverified),
            Err(true)
        );
    }

    #[test]
    fn tenants_are_counted_only_while_they_have_calls_in_flight() {
        let fair = FairShares::new(10_000);
        let many = tenants(1000);
        for (n, &tenant) in many.iter().enumerate() {
            fair.enter(tenant, n + 1).expect("room");
            fair.enter(tenant, n + 1).expect("room");
        }
        assert_eq!(fair.tenants(), 1000);
        assert_eq!(fair.tenants.load(Ordering::Relaxed), 1000);
        for &tenant in &many {
            fair.leave(tenant);
        }
        assert_eq!(fair.tenants(), 1000, "each still has one call");
        for &tenant in &many {
            fair.leave(tenant);
        }
        assert_eq!(fair.tenants(), 0);
        assert_eq!(fair.tenants.load(Ordering::Relaxed), 0);
    }
}
