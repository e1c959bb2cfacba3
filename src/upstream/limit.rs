//! The cap on what the gateway asks of the upstream at once:
//! `--upstream-max-connections` requests in flight (with HTTP/1.1 that is
//! also the most connections open; with HTTP/2, the most streams), and a
//! hard, process-wide bound on the calls waiting for a slot
//! (`--upstream-max-pending`). A slot is held from before the connection is
//! looked for until the answer is read whole, so a slow or unreachable
//! upstream makes calls wait (first come, first served) or fail fast; it
//! never makes the gateway open more.
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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};
use tokio::time::Instant;

/// The state of the cap and of the connections, read by the metrics.
#[derive(Debug, Default)]
pub struct UpstreamGauges {
    /// `--upstream-max-connections`.
    pub limit: u64,
    /// Slots in use: requests connecting, in flight or being read.
    pub active: AtomicU64,
    /// Calls waiting for a slot.
    pub pending: AtomicU64,
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
    shares: Box<[Semaphore]>,
    max_pending: u64,
    /// `pending` counts the calls waiting: each is counted before it checks
    /// the bound, so that the bound is exact under concurrency.
    gauges: Arc<UpstreamGauges>,
}

/// One slot; given back when dropped.
pub(super) struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    gauges: &'a UpstreamGauges,
}

impl ConnectionLimit {
    /// `max_connections` slots split between `workers` shares.
    pub(super) fn new(max_connections: usize, max_pending: usize, workers: usize) -> Self {
        let workers = workers.max(1);
        let max_connections = max_connections.min(Semaphore::MAX_PERMITS);
        let shares: Box<[Semaphore]> = (0..workers)
            .map(|i| {
                let share = max_connections / workers + usize::from(i < max_connections % workers);
                Semaphore::new(share.max(1))
            })
            .collect();
        let limit = shares
            .iter()
            .map(Semaphore::available_permits)
            .sum::<usize>();
        Self {
            shares,
            max_pending: max_pending as u64,
            gauges: Arc::new(UpstreamGauges {
                limit: limit as u64,
                ..UpstreamGauges::default()
            }),
        }
    }

    pub(super) fn gauges(&self) -> Arc<UpstreamGauges> {
        self.gauges.clone()
    }

    /// A slot of `share` now, or after waiting in line until `deadline`.
    pub(super) async fn acquire(
        &self,
        share: usize,
        deadline: Instant,
    ) -> Result<Slot<'_>, Refused> {
        let slots = &self.shares[share % self.shares.len()];
        // The queue is FIFO: a free permit with callers waiting is theirs,
        // so this cannot jump the line.
        let permit = match slots.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Refused::QueueFull),
            Err(TryAcquireError::NoPermits) => {
                let waiting = Waiting::enter(self).ok_or(Refused::QueueFull)?;
                let permit = tokio::time::timeout_at(deadline, slots.acquire())
                    .await
                    .map_err(|_| Refused::Deadline)?
                    .map_err(|_| Refused::QueueFull)?;
                drop(waiting);
                permit
            }
        };
        self.gauges.active.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            _permit: permit,
            gauges: &self.gauges,
        })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.gauges.active.fetch_sub(1, Ordering::Relaxed);
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
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn slots_are_capped_and_the_queue_is_a_hard_bound() {
        let limit = Arc::new(ConnectionLimit::new(1, 1, 1));
        let held = limit.acquire(0, soon()).await.expect("a free slot");
        assert_eq!(limit.gauges().active.load(Ordering::Relaxed), 1);

        // One waits (the queue's only place)...
        let queued = {
            let limit = limit.clone();
            tokio::spawn(async move {
                limit
                    .acquire(0, Instant::now() + Duration::from_secs(5))
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
            limit.acquire(0, soon()).await.err(),
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
        let _held = limit.acquire(0, soon()).await.expect("a free slot");
        assert_eq!(
            limit.acquire(0, soon()).await.err(),
            Some(Refused::Deadline)
        );
        assert_eq!(limit.gauges().pending.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn no_queue_means_refusal_when_full() {
        let limit = ConnectionLimit::new(2, 0, 1);
        let _a = limit.acquire(0, soon()).await.expect("slot 1");
        let _b = limit.acquire(0, soon()).await.expect("slot 2");
        assert_eq!(
            limit.acquire(0, soon()).await.err(),
            Some(Refused::QueueFull)
        );
    }

    #[tokio::test]
    async fn the_slots_are_split_exactly_between_the_workers() {
        let limit = ConnectionLimit::new(1024, 0, 3);
        let sizes: Vec<usize> = limit
            .shares
            .iter()
            .map(Semaphore::available_permits)
            .collect();
        assert_eq!(sizes, vec![342, 341, 341]);
        assert_eq!(limit.gauges().limit, 1024);
        // A worker's share is its own: worker 1 full does not take worker 0's.
        let _one = limit.acquire(1, soon()).await.expect("worker 1's slot");
        let few = ConnectionLimit::new(2, 0, 1);
        assert_eq!(few.gauges().limit, 2);
        let fewer_than_workers = ConnectionLimit::new(1, 0, 2);
        assert_eq!(
            fewer_than_workers.gauges().limit,
            2,
            "at least one per worker"
        );
    }
}
