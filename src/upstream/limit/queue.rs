//! One worker's share of the upstream slots, and the calls waiting for one:
//! served round robin across tenants (deficit round robin with a quantum
//! of one call, every request costing one slot), first come first served
//! within a tenant. A freed slot goes to the first call of the tenant whose
//! turn it is, then the turn passes on; a tenant that starts waiting joins
//! the round at its end. So one tenant's long line delays another's next
//! call by at most one slot's turn per tenant waiting, not by the line.
//!
//! The fast path is a tokio semaphore's: a free slot is taken with one
//! compare-and-swap, without the lock, and a slot given back takes the
//! lock to see whether anybody waits. It cannot jump the line: slots are
//! counted free only while nobody waits (a freed slot goes to a waiter
//! directly), and a call starts waiting only under the lock, after finding
//! no free slot there.
//!
//! Waiting calls are linked lists in slabs, by index: a call that leaves
//! (its deadline, or its caller gone) is unlinked in constant time, and a
//! tenant leaves the round when its last call does. The tables hold at
//! most the calls waiting, bounded by `--upstream-max-pending`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use slab::Slab;

use crate::tenant::{TenantId, TenantMap};

/// One worker's slots.
pub(in crate::upstream) struct Share {
    /// Slots free; never above zero while a call waits.
    free: AtomicUsize,
    line: Mutex<Line>,
}

/// The calls waiting, by tenant.
#[derive(Default)]
struct Line {
    calls: Slab<Call>,
    tenants: Slab<Tenant>,
    by_tenant: TenantMap<usize>,
    /// The tenant whose turn is next, in the ring of tenants waiting.
    turn: Option<usize>,
    /// Counts the tenants waiting (the gauges', shared by every share).
    tenants_waiting: Arc<AtomicU64>,
}

/// A call waiting, or granted a slot it has not picked up yet.
struct Call {
    tenant: usize,
    earlier: Option<usize>,
    later: Option<usize>,
    waker: Waker,
    granted: bool,
}

/// A tenant with calls waiting: its line, and its neighbours in the ring.
struct Tenant {
    id: TenantId,
    first: usize,
    last: usize,
    before: usize,
    after: usize,
}

impl Share {
    /// `tenants_waiting`: the gauge counting the tenants waiting.
    pub(in crate::upstream) fn new(slots: usize, tenants_waiting: Arc<AtomicU64>) -> Self {
        Self {
            free: AtomicUsize::new(slots),
            line: Mutex::new(Line {
                tenants_waiting,
                ..Line::default()
            }),
        }
    }

    /// Slots free now.
    pub(in crate::upstream) fn available(&self) -> usize {
        self.free.load(Ordering::Acquire)
    }

    /// A free slot, if there is one (then nobody waits).
    pub(in crate::upstream) fn try_take(&self) -> bool {
        let mut free = self.free.load(Ordering::Acquire);
        while free > 0 {
            match self.free.compare_exchange_weak(
                free,
                free - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => free = now,
            }
        }
        false
    }

    /// Waits in `tenant`'s line for a slot. Dropped before it is ready, it
    /// leaves the line; granted a slot meanwhile, it passes the slot on.
    pub(in crate::upstream) fn wait(&self, tenant: TenantId) -> Wait<'_> {
        Wait {
            share: self,
            tenant,
            call: None,
        }
    }

    /// Gives a slot back: to the call whose turn it is, or to the free ones.
    pub(in crate::upstream) fn release(&self) {
        let line = self.lock();
        self.hand_on(line);
    }

    fn hand_on(&self, mut line: MutexGuard<'_, Line>) {
        match line.grant() {
            Some(waker) => {
                drop(line);
                waker.wake();
            }
            None => {
                self.free.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Line> {
        // The line is consistent after any panic: no change unwinds halfway.
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tenants and calls in the line (tests).
    #[cfg(test)]
    pub(in crate::upstream) fn waiting(&self) -> (usize, usize) {
        let line = self.lock();
        (line.by_tenant.len(), line.calls.len())
    }
}

impl Line {
    /// Puts a call at the end of `tenant`'s line; a tenant not waiting
    /// yet joins the round at its end (its turn comes after every tenant
    /// already waiting).
    fn push(&mut self, tenant: TenantId, waker: Waker) -> usize {
        let call = self.calls.insert(Call {
            tenant: usize::MAX,
            earlier: None,
            later: None,
            waker,
            granted: false,
        });
        match self.by_tenant.get(&tenant).copied() {
            Some(index) => {
                let last = self.tenants[index].last;
                self.calls[last].later = Some(call);
                self.calls[call].earlier = Some(last);
                self.calls[call].tenant = index;
                self.tenants[index].last = call;
            }
            None => {
                let index = self.tenants.insert(Tenant {
                    id: tenant,
                    first: call,
                    last: call,
                    before: usize::MAX,
                    after: usize::MAX,
                });
                self.calls[call].tenant = index;
                self.by_tenant.insert(tenant, index);
                self.join_round(index);
                self.tenants_waiting.fetch_add(1, Ordering::Relaxed);
            }
        }
        call
    }

    /// The first call of the tenant whose turn it is gets the slot (its
    /// waker is returned to be woken), and the turn passes on; `None` when
    /// nobody waits.
    fn grant(&mut self) -> Option<Waker> {
        let index = self.turn?;
        let call = self.tenants[index].first;
        self.turn = Some(self.tenants[index].after);
        self.unlink(call);
        let call = &mut self.calls[call];
        call.granted = true;
        Some(std::mem::replace(&mut call.waker, Waker::noop().clone()))
    }

    /// A call leaves: unlinked if it still waits. Returns whether it had
    /// been granted a slot (which its owner must then pass on).
    fn leave(&mut self, call: usize) -> bool {
        let granted = self.calls[call].granted;
        if !granted {
            self.unlink(call);
        }
        self.calls.remove(call);
        granted
    }

    /// Takes a waiting call out of its tenant's line; a tenant with no call
    /// left leaves the round.
    fn unlink(&mut self, call: usize) {
        let Call {
            tenant,
            earlier,
            later,
            ..
        } = self.calls[call];
        match (earlier, later) {
            (None, None) => self.leave_round(tenant),
            (Some(earlier), None) => {
                self.calls[earlier].later = None;
                self.tenants[tenant].last = earlier;
            }
            (None, Some(later)) => {
                self.calls[later].earlier = None;
                self.tenants[tenant].first = later;
            }
            (Some(earlier), Some(later)) => {
                self.calls[earlier].later = Some(later);
                self.calls[later].earlier = Some(earlier);
            }
        }
    }

    /// Adds a tenant at the end of the round: just before the one whose
    /// turn is next.
    fn join_round(&mut self, index: usize) {
        let Some(next) = self.turn else {
            self.tenants[index].before = index;
            self.tenants[index].after = index;
            self.turn = Some(index);
            return;
        };
        let last = self.tenants[next].before;
        self.tenants[index].before = last;
        self.tenants[index].after = next;
        self.tenants[last].after = index;
        self.tenants[next].before = index;
    }

    fn leave_round(&mut self, index: usize) {
        let Tenant {
            id, before, after, ..
        } = self.tenants.remove(index);
        self.by_tenant.remove(&id);
        self.tenants_waiting.fetch_sub(1, Ordering::Relaxed);
        if after == index {
            self.turn = None;
            return;
        }
        self.tenants[before].after = after;
        self.tenants[after].before = before;
        if self.turn == Some(index) {
            self.turn = Some(after);
        }
    }
}

/// A call waiting for a slot of a [`Share`] ([`Share::wait`]).
pub(in crate::upstream) struct Wait<'a> {
    share: &'a Share,
    tenant: TenantId,
    /// Its place in the line, once it waits.
    call: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut line = this.share.lock();
        let Some(call) = this.call else {
            // A slot freed since the fast path looked is free for the
            // taking: nobody waits while one is.
            if this.share.try_take() {
                return Poll::Ready(());
            }
            this.call = Some(line.push(this.tenant, cx.waker().clone()));
            return Poll::Pending;
        };
        let waiting = &mut line.calls[call];
        if waiting.granted {
            line.calls.remove(call);
            this.call = None;
            return Poll::Ready(());
        }
        if !waiting.waker.will_wake(cx.waker()) {
            waiting.waker = cx.waker().clone();
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        let mut line = self.share.lock();
        if line.leave(call) {
            // Granted as it left: the slot goes to the next in turn.
            self.share.hand_on(line);
        }
    }
}
