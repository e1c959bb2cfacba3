//! A family whose children are looked up once per slot, then read from the
//! slot: recording through it takes no lock and allocates nothing after a
//! label set's first use. prometheus-client's `Family` takes a read lock and
//! hashes the labels on every lookup, which the call path cannot afford.

use std::hash::Hash;
use std::sync::OnceLock;

use prometheus_client::metrics::family::Family;

/// A [`Family`] and one cache slot per label set the owner can name by an
/// index (an RPC's index in the route table, a gRPC code, an enum's
/// discriminant). A slot always holds the same label set: the owner's index
/// decides the labels.
#[derive(Debug)]
pub struct CachedFamily<L, M> {
    family: Family<L, M>,
    slots: Box<[OnceLock<M>]>,
}

impl<L, M> CachedFamily<L, M>
where
    L: Clone + Hash + Eq,
    M: Default + Clone,
{
    /// A family with `slots` cache slots (index `0..slots`).
    pub fn new(slots: usize) -> Self {
        Self {
            family: Family::default(),
            slots: (0..slots).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The family, to register it, or to record a label set that has no
    /// slot (a rare one).
    pub fn family(&self) -> &Family<L, M> {
        &self.family
    }

    /// The child of the label set of `slot`; `labels` builds it the first
    /// time only.
    pub fn get(&self, slot: usize, labels: impl FnOnce() -> L) -> &M {
        self.slots[slot].get_or_init(|| self.family.get_or_create(&labels()).clone())
    }
}
