//! The cap on what the gateway asks of the upstream at once:
//! `--upstream-max-connections` requests in flight (with HTTP/1.1 that is
//! also the most connections open; with HTTP/2, the most streams), and a
//! hard, process-wide bound on the calls waiting for a slot
//! (`--upstream-max-pending`). A slot is held from before the connection is
//! looked for until the answer is read whole, so a slow or unreachable
//! upstream makes calls wait or fail fast; it never makes the gateway open
//! more. Calls wait round robin across tenants, first come first served
//! within one (`queue`).
//!
//! The slots are split between the worker threads: each worker has its own
//! HTTP client and connection pool (`super::client`), and a connection idle
//! in one worker's pool cannot serve another's call. With one process-wide
//! set of slots, a slot freed on one worker let another open a connection
//! while the first kept its idle one: under a burst the upstream saw far
//! more connections than the cap (`scripts/limits`; BENCHMARKS.md, "Memory:
//! 10,000 calls in flight"). Split exactly (the remainder to the first
//! workers), the cap holds: each worker opens at most its share. The cost: a
//! worker whose share is busy queues its calls even when another worker has
//! room. A worker's share is at least one slot, so with fewer slots than
//! workers the cap is the number of workers.

mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::tenant::TenantId;
use queue::Share;

/// The state of the cap and of the connections, read by the metrics.
#[derive(Debug, Default)]
pub struct UpstreamGauges {
    /// `--upstream-max-connections`.
    pub limit: u64,
    /// Slots in use: requests connecting, in flight or being read.
    pub active: AtomicU64,
    /// Calls waiting for a slot.
    pub pending: AtomicU64,
    /// Tenants with calls waiting for a slot, counted once per worker
    /// share they wait in (by the shares, which hold it too).
    pub tenants_waiting: Arc<AtomicU64>,
    /// Connections opened since start (TCP, and TLS or proxy tunnel).
    pub opened_total: AtomicU64,
}

/// Why no slot was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Every slot is taken and `--upstream-max-pending` calls already wait.
    QueueFull,
    /// The deadline passed while waiting.
    Deadline,
}

pub(super) struct ConnectionLimit {
    /// One share of the slots per worker thread.
    shares: Box<[Share]>,
    max_pending: u64,
    /// `pending` counts the calls waiting: each is counted before it checks
    /// the bound, so that the bound is exact under concurrency.
    gauges: Arc<UpstreamGauges>,
}

/// One slot; given back when dropped.
pub(super) struct Slot<'a> {
    share: &'a Share,
    gauges: &'a UpstreamGauges,
}

impl ConnectionLimit {
    /// `max_connections` slots split between `workers` shares.
    pub(super) fn new(max_connections: usize, max_pending: usize, workers: usize) -> Self {
        let workers = workers.max(1);
        let tenants_waiting = Arc::new(AtomicU64::new(0));
        let shares: Box<[Share]> = (0..workers)
            .map(|i| {
                let share = max_connections / workers + usize::from(i < max_connections % workers);
                Share::new(share.max(1), tenants_waiting.clone())
            })
            .collect();
        let limit = shares.iter().map(Share::available).sum::<usize>();
        Self {
            shares,
            max_pending: max_pending as u64,
            gauges: Arc::new(UpstreamGauges {
                limit: limit as u64,
                tenants_waiting,
                ..UpstreamGauges::default()
            }),
        }
    }

    pub(super) fn gauges(&self) -> Arc<UpstreamGauges> {
        self.gauges.clone()
    }

    /// A slot of `share` now, or after waiting in `tenant`'s line, in its
    /// turn, until `deadline`.
    pub(super) async fn acquire(
        &self,
        share: usize,
        tenant: TenantId,
        deadline: Instant,
    ) -> Result<Slot<'_>, Refused> {
        let slots = &self.shares[share % self.shares.len()];
        // A free slot means nobody waits: taking it jumps no line.
        if !slots.try_take() {
            let waiting = Waiting::enter(self).ok_or(Refused::QueueFull)?;
            tokio::time::timeout_at(deadline, slots.wait(tenant))
                .await
                .map_err(|_| Refused::Deadline)?;
            drop(waiting);
        }
        self.gauges.active.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            share: slots,
            gauges: &self.gauges,
        })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.gauges.active.fetch_sub(1, Ordering::Relaxed);
        self.share.release();
    }
}

/// A call counted among those waiting, while it waits.
struct Waiting<'a>(&'a ConnectionLimit);

impl<'a> Waiting<'a> {
    fn enter(limit: &'a ConnectionLimit) -> Option<Self> {
        let pending = &limit.gauges.pending;
        if pending.fetch_add(1, Ordering::AcqRel) >= limit.max_pending {
            pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(limit))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.gauges.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// The one tenant of the tests that need no other.
    const T: TenantId = TenantId::UNVERIFIED;

    fn tenant(n: u64) -> TenantId {
        TenantId::numbered(n)
    }

    fn gauge(value: &AtomicU64) -> u64 {
        value.load(Ordering::Relaxed)
    }

    /// Waits until `n` calls wait for a slot.
    async fn pending(limit: &ConnectionLimit, n: u64) {
        let counted = async {
            while gauge(&limit.gauges().pending) != n {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), counted)
            .await
            .unwrap_or_else(|_| panic!("waited 10s for {n} calls to wait for a slot, in vain"));
    }

    #[tokio::test]
    async fn slots_are_capped_and_the_queue_is_a_hard_bound() {
        let limit = Arc::new(ConnectionLimit::new(1, 1, 1));
        let held = limit.acquire(0, T, soon()).await.expect("a free slot");
        assert_eq!(limit.gauges().active.load(Ordering::Relaxed), 1);

        // One waits (the queue's only place)...
        let queued = {
            let limit = limit.clone();
            tokio::spawn(async move {
                limit
                    .acquire(0, T, Instant::now() + Duration::from_secs(5))
                    .await
                    .is_ok()
            })
        };
        let counted = async {
            while limit.gauges().pending.load(Ordering::Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), counted)
            .await
            .expect("waited 10s for the waiter to be counted as pending, in vain");
        // ... the next is refused at once.
        assert_eq!(
            limit.acquire(0, T, soon()).await.err(),
            Some(Refused::QueueFull)
        );
        drop(held);
        assert!(queued.await.expect("task"), "the waiter got the slot");
        assert_eq!(limit.gauges().pending.load(Ordering::Relaxed), 0);
        assert_eq!(limit.gauges().active.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_waiter_gives_up_at_its_deadline() {
        let limit = ConnectionLimit::new(1, 10, 1);
        let _held = limit.acquire(0, T, soon()).await.expect("a free slot");
        assert_eq!(
            limit.acquire(0, T, soon()).await.err(),
            Some(Refused::Deadline)
        );
        assert_eq!(limit.gauges().pending.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn no_queue_means_refusal_when_full() {
        let limit = ConnectionLimit::new(2, 0, 1);
        let _a = limit.acquire(0, T, soon()).await.expect("slot 1");
        let _b = limit.acquire(0, T, soon()).await.expect("slot 2");
        assert_eq!(
            limit.acquire(0, T, soon()).await.err(),
            Some(Refused::QueueFull)
        );
    }

    #[tokio::test]
    async fn the_slots_are_split_exactly_between_the_workers() {
        let limit = ConnectionLimit::new(1024, 0, 3);
        let sizes: Vec<usize> = limit.shares.iter().map(Share::available).collect();
        assert_eq!(sizes, vec![342, 341, 341]);
        assert_eq!(limit.gauges().limit, 1024);
        // A worker's share is its own: worker 1 full does not take worker 0's.
        let _one = limit.acquire(1, T, soon()).await.expect("worker 1's slot");
        let few = ConnectionLimit::new(2, 0, 1);
        assert_eq!(few.gauges().limit, 2);
        let fewer_than_workers = ConnectionLimit::new(1, 0, 2);
        assert_eq!(
            fewer_than_workers.gauges().limit,
            2,
            "at least one per worker"
        );
    }

    #[tokio::test]
    async fn waiting_calls_take_turns_across_tenants_and_keep_their_order_within_one() {
        let limit = Arc::new(ConnectionLimit::new(1, 100, 1));
        let held = limit
            .acquire(0, tenant(1), far())
            .await
            .expect("a free slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut calls = Vec::new();
        // Tenant 1 queues three calls before tenants 2 and 3 come.
        let arrivals = [
            ("a1", 1),
            ("a2", 1),
            ("a3", 1),
            ("b1", 2),
            ("c1", 3),
            ("b2", 2),
        ];
        for (n, (name, t)) in arrivals.into_iter().enumerate() {
            let (shared, order) = (limit.clone(), order.clone());
            calls.push(tokio::spawn(async move {
                let slot = shared.acquire(0, tenant(t), far()).await.expect(name);
                order.lock().unwrap().push(name);
                drop(slot);
            }));
            pending(&limit, n as u64 + 1).await;
        }
        assert_eq!(gauge(&limit.gauges().tenants_waiting), 3);
        drop(held);
        for call in calls {
            call.await.expect("task");
        }
        // First come, first served would be a1 a2 a3 b1 c1 b2.
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert_eq!(limit.shares[0].available(), 1, "the slot is free again");
        assert_eq!(limit.shares[0].waiting(), (0, 0), "the line is empty");
        assert_eq!(gauge(&limit.gauges().tenants_waiting), 0);
        assert_eq!(gauge(&limit.gauges().pending), 0);
    }

    #[tokio::test]
    async fn a_tenant_alone_is_served_first_come_first_served() {
        let limit = Arc::new(ConnectionLimit::new(2, 100, 1));
        let held = [
            limit.acquire(0, T, far()).await.expect("slot 1"),
            limit.acquire(0, T, far()).await.expect("slot 2"),
        ];
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut calls = Vec::new();
        for n in 0..5 {
            let (shared, order) = (limit.clone(), order.clone());
            calls.push(tokio::spawn(async move {
                let slot = shared.acquire(0, T, far()).await.expect("in turn");
                order.lock().unwrap().push(n);
                drop(slot);
            }));
            pending(&limit, n + 1).await;
        }
        drop(held);
        for call in calls {
            call.await.expect("task");
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!(limit.shares[0].available(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_at_its_deadline_leaks_no_slot_and_no_turn() {
        let limit = Arc::new(ConnectionLimit::new(1, 100, 1));
        let held = limit
            .acquire(0, tenant(1), far())
            .await
            .expect("a free slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |name: &'static str, t: u64, deadline: Instant| {
            let (limit, order) = (limit.clone(), order.clone());
            tokio::spawn(async move {
                let slot = limit.acquire(0, tenant(t), deadline).await;
                order.lock().unwrap().push((name, slot.is_ok()));
            })
        };
        // Tenant 2's only call leaves at its deadline, in the middle of the
        // round; tenant 1's first call too, ahead of its second.
        let a1 = spawn("a1", 1, Instant::now() + Duration::from_millis(50));
        pending(&limit, 1).await;
        let b1 = spawn("b1", 2, Instant::now() + Duration::from_millis(70));
        pending(&limit, 2).await;
        let a2 = spawn("a2", 1, far());
        pending(&limit, 3).await;
        let c1 = spawn("c1", 3, far());
        pending(&limit, 4).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        a1.await.expect("task");
        b1.await.expect("task");
        assert_eq!(gauge(&limit.gauges().pending), 2);
        assert_eq!(gauge(&limit.gauges().tenants_waiting), 2);
        assert_eq!(limit.shares[0].waiting(), (2, 2));
        drop(held);
        a2.await.expect("task");
        c1.await.expect("task");
        assert_eq!(
            *order.lock().unwrap(),
            [("a1", false), ("b1", false), ("a2", true), ("c1", true)]
        );
        assert_eq!(limit.shares[0].available(), 1, "no slot leaked");
        assert_eq!(limit.shares[0].waiting(), (0, 0));
        assert_eq!(gauge(&limit.gauges().tenants_waiting), 0);
    }

    /// Polls `wait` once, with a waker that does nothing.
    fn poll(wait: &mut queue::Wait<'_>) -> std::task::Poll<()> {
        use std::future::Future;
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(wait).poll(&mut context)
    }

    #[test]
    fn a_slot_granted_to_a_call_that_leaves_goes_to_the_next_in_turn() {
        let tenants = Arc::new(AtomicU64::new(0));
        let share = Share::new(1, tenants.clone());
        assert!(share.try_take());
        let mut first = share.wait(tenant(1));
        let mut second = share.wait(tenant(2));
        assert!(poll(&mut first).is_pending());
        assert!(poll(&mut second).is_pending());
        assert_eq!(share.waiting(), (2, 2));
        share.release();
        // Granted but not yet picked up: the slot is the first call's, not
        // the fast path's.
        assert!(!share.try_take(), "the fast path never jumps the line");
        drop(first);
        assert!(poll(&mut second).is_ready(), "handed on to the next");
        assert_eq!(share.waiting(), (0, 0));
        assert_eq!(gauge(&tenants), 0);
        share.release();
        assert_eq!(share.available(), 1);
        drop(second);
        assert_eq!(share.available(), 1, "a call done takes nothing back");
    }

    #[test]
    fn a_call_that_finds_a_slot_freed_meanwhile_takes_it_without_waiting() {
        let share = Share::new(1, Arc::default());
        assert!(share.try_take());
        let mut late = share.wait(T);
        share.release();
        assert!(poll(&mut late).is_ready());
        assert_eq!(share.available(), 0);
        assert_eq!(share.waiting(), (0, 0));
    }
}
