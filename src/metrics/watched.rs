//! What a collector reads at scrape time and its owner points it at later
//! (a component's `watch`): the last value set.

use std::sync::{Arc, Mutex, PoisonError};

/// Empty until [`Watched::set`]; cheap to clone, clones share the value.
pub struct Watched<T> {
    value: Arc<Mutex<Option<T>>>,
}

impl<T> Watched<T> {
    /// Replaces the value.
    pub fn set(&self, value: T) {
        *self.lock() = Some(value);
    }

    /// `f` of the value, under the lock; `None` until one is set.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.lock().as_ref().map(f)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<T>> {
        // A value is replaced whole: it is consistent after any panic.
        self.value.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Default for Watched<T> {
    fn default() -> Self {
        Self {
            value: Arc::new(Mutex::new(None)),
        }
    }
}

impl<T> Clone for Watched<T> {
    fn clone(&self) -> Self {
        Self {
            value: Arc::clone(&self.value),
        }
    }
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("set", &self.lock().is_some())
            .finish()
    }
}
