//! Bounded waits, so that a broken gateway fails a test instead of hanging
//! it: [`within`] for one event (a request arriving, a task ending), and
//! [`until`] for a condition polled until it holds (an answer that changes
//! once a record expires, a gauge that reaches a value). Both fail the test
//! naming what they waited for.

use std::fmt::Debug;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::Notify;

/// Upper bound on what the harness itself waits for (a request at the fake
/// upstream, a log line, a round trip at a proxy); only reached when a test
/// fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How long [`until`] pauses between two probes unless told otherwise.
const EVERY: Duration = Duration::from_millis(20);

/// Awaits `future` for at most `patience`; past it, fails the test saying it
/// waited for `what` (a noun phrase: "the first request to arrive").
pub async fn within<T>(what: &str, patience: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(patience, future)
        .await
        .unwrap_or_else(|_| panic!("waited {patience:?} for {what}, in vain"))
}

/// Runs `probe` until `done` accepts what it returned, and returns that
/// value; a probe may be sync (`async || store.usage()`) or make a call.
/// Fails the test, naming `what` and the last value, once `patience` has
/// passed. `.meanwhile(…)` also checks every value before the last (a
/// replay until the record expires, never anything else); `.every(…)`
/// changes the pause between probes (20 ms); `.woken_by(…)` probes again
/// at each notification instead (a count that the code under test
/// notifies as it grows). Its future is not `Send` (a probe's future
/// cannot be named `Send`): await it in the test's own task, as every
/// wait is.
pub fn until<'a, T, P, D>(
    what: &'a str,
    patience: Duration,
    probe: P,
    done: D,
) -> Until<'a, T, P, D, fn(&T) -> bool>
where
    P: AsyncFnMut() -> T,
    D: FnMut(&T) -> bool,
{
    Until {
        what,
        patience,
        every: EVERY,
        woken_by: None,
        probe,
        done,
        meanwhile: |_| true,
        value: PhantomData,
    }
}

/// A poll set up by [`until`]; awaiting it runs it.
#[must_use = "an `until` does nothing unless awaited"]
pub struct Until<'a, T, P, D, M> {
    what: &'a str,
    patience: Duration,
    every: Duration,
    woken_by: Option<&'a Notify>,
    probe: P,
    done: D,
    meanwhile: M,
    /// What the probe returns.
    value: PhantomData<fn() -> T>,
}

impl<'a, T, P, D, M> Until<'a, T, P, D, M> {
    /// Every value `done` refuses must satisfy `meanwhile`, or the test
    /// fails at once.
    pub fn meanwhile<N>(self, meanwhile: N) -> Until<'a, T, P, D, N>
    where
        N: FnMut(&T) -> bool,
    {
        Until {
            what: self.what,
            patience: self.patience,
            every: self.every,
            woken_by: self.woken_by,
            probe: self.probe,
            done: self.done,
            meanwhile,
            value: PhantomData,
        }
    }

    /// Pauses `every` between two probes.
    pub fn every(self, every: Duration) -> Self {
        Self { every, ..self }
    }

    /// Probes again each time `changed` notifies its waiters
    /// (`notify_waiters`), not on a timer.
    pub fn woken_by(self, changed: &'a Notify) -> Self {
        Self {
            woken_by: Some(changed),
            ..self
        }
    }
}

impl<'a, T, P, D, M> IntoFuture for Until<'a, T, P, D, M>
where
    T: Debug + 'a,
    P: AsyncFnMut() -> T + 'a,
    D: FnMut(&T) -> bool + 'a,
    M: FnMut(&T) -> bool + 'a,
{
    type Output = T;
    type IntoFuture = Pin<Box<dyn Future<Output = T> + 'a>>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + self.patience;
            loop {
                // Registered before the probe: a change during it still wakes.
                let woken = self.woken_by.map(Notify::notified);
                let value = (self.probe)().await;
                if (self.done)(&value) {
                    return value;
                }
                assert!(
                    (self.meanwhile)(&value),
                    "while waiting for {}: unexpected {value:?}",
                    self.what
                );
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "waited {:?} for {}, in vain; the last probe gave {value:?}",
                    self.patience,
                    self.what
                );
                match woken {
                    Some(woken) => {
                        let _ = tokio::time::timeout_at(deadline, woken).await;
                    }
                    None => tokio::time::sleep(self.every).await,
                }
            }
        })
    }
}

mod tests {
    use std::future::IntoFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::{until, within};

    #[tokio::test]
    async fn until_returns_the_first_value_done_accepts() {
        let mut probes = 0;
        let value = until(
            "the third probe",
            Duration::from_secs(5),
            async || {
                probes += 1;
                probes
            },
            |n| *n == 3,
        )
        .meanwhile(|n| *n < 3)
        .every(Duration::from_millis(1))
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    #[should_panic(
        expected = "waited 50ms for the counter to reach 10, in vain; the last probe gave"
    )]
    async fn until_fails_naming_what_it_waited_for_and_the_last_value() {
        until(
            "the counter to reach 10",
            Duration::from_millis(50),
            async || 1,
            |n| *n == 10,
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "while waiting for a success: unexpected Err(\"refused\")")]
    async fn until_fails_at_once_on_a_value_meanwhile_refuses() {
        let _ = until(
            "a success",
            Duration::from_secs(60),
            async || Err::<(), _>("refused"),
            Result::is_ok,
        )
        .meanwhile(|answer| answer == &Err("busy"))
        .await;
    }

    #[tokio::test]
    async fn until_woken_by_a_notify_probes_again_at_each_notification() {
        let count = AtomicUsize::new(0);
        let changed = Notify::new();
        // An hour between probes on a timer: only the notifications can
        // get it done within the second `within` allows.
        let counted = until(
            "two increments",
            Duration::from_secs(5),
            async || count.load(Ordering::SeqCst),
            |n| *n >= 2,
        )
        .every(Duration::from_secs(3600))
        .woken_by(&changed)
        .into_future();
        let bump = async {
            for _ in 0..2 {
                tokio::task::yield_now().await;
                count.fetch_add(1, Ordering::SeqCst);
                changed.notify_waiters();
            }
        };
        let (counted, ()) = within("the notified poll", Duration::from_secs(1), async {
            tokio::join!(counted, bump)
        })
        .await;
        assert_eq!(counted, 2);
    }

    #[tokio::test]
    #[should_panic(expected = "waited 50ms for a signal that never comes, in vain")]
    async fn within_fails_naming_what_it_waited_for() {
        within(
            "a signal that never comes",
            Duration::from_millis(50),
            std::future::pending::<()>(),
        )
        .await;
    }
}
