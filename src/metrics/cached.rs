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
    /// time only. `slot` must be below the count given to [`Self::new`]
    /// (else it panics); [`Self::with`] takes any.
    pub fn get(&self, slot: usize, labels: impl FnOnce() -> L) -> &M {
        self.slots[slot].get_or_init(|| self.family.get_or_create(&labels()).clone())
    }

    /// `f` of the child of `labels`: the one cached at `slot`, or, for a
    /// label set without a slot (`None`, or a slot past the last), the one
    /// looked up in the family (a read lock and a hash).
    pub fn with<R>(
        &self,
        slot: Option<usize>,
        labels: impl FnOnce() -> L,
        f: impl FnOnce(&M) -> R,
    ) -> R {
        match slot.and_then(|slot| self.slots.get(slot)) {
            Some(cached) => f(cached.get_or_init(|| self.family.get_or_create(&labels()).clone())),
            None => f(&self.family.get_or_create(&labels())),
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn a_label_set_without_a_slot_is_recorded_in_the_family() {
        let cached = CachedFamily::<(String, String), Counter>::new(2);
        let labels = |v: &'static str| move || (String::from("k"), v.to_owned());
        cached.with(Some(1), labels("cached"), |c| c.inc());
        cached.with(Some(1), labels("cached"), |c| c.inc());
        cached.with(None, labels("none"), |c| c.inc());
        cached.with(Some(2), labels("past"), |c| c.inc());
        let value = |v: &'static str| cached.family().get_or_create(&labels(v)()).get();
        assert_eq!(value("cached"), 2);
        assert_eq!(value("none"), 1);
        assert_eq!(value("past"), 1);
    }
}
