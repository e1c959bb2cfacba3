//! The one task that decides where the store's primary is: it finds the
//! primary (`finder`), connects, checks it is one, publishes it to the
//! calls (`link`; each calling thread then connects to it, `local`), and
//! finds it again when a call gives it up (broken, demoted) or the
//! Sentinels announce a failover. It also looks at the primary now and
//! then, on its own connection: its replicas (for `auto` waits), and in a
//! cluster which nodes are primaries (the metrics, the failover log line).
//!
//! The attempts back off from [`FIRST_RETRY`] to [`MAX_RETRY`]: a new
//! primary is in use at most about that long after it is known, and a dead
//! store sees at most a few attempts a second from each gateway.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::finder::{Finder, Found};
use super::link::{Cause, Live, Shared, State};

/// First pause after a failed connection attempt.
const FIRST_RETRY: Duration = Duration::from_millis(50);
/// Longest pause between attempts: a failover is followed within about this
/// once the new primary is known, even if its announcement was missed.
const MAX_RETRY: Duration = Duration::from_millis(500);
/// How often a live primary is asked for its role and replicas (`ROLE`):
/// rarely, since a demotion is also seen on the first write (`READONLY`) and
/// a `WAIT` shortfall asks again at once.
const INSPECT_PRIMARY: Duration = Duration::from_secs(30);
/// How often a cluster's topology is read (`CLUSTER NODES`), for the
/// primaries' metric, the failover log line and `auto` replicas; a failed
/// call asks again sooner (at most every [`INSPECT_SOON`]).
const INSPECT_CLUSTER: Duration = Duration::from_secs(5);
const INSPECT_SOON: Duration = Duration::from_millis(500);

/// Keeps the connection: runs until the store is dropped (aborted).
pub(super) async fn supervise(shared: Arc<Shared>, mut finder: Finder) {
    let mut retry = FIRST_RETRY;
    let mut generation = 0_u64;
    let mut last_primary: Option<String> = None;
    let mut was_down = false;
    // When the primary was last inspected, in ms from `shared.epoch`: the
    // throttle holds across generations.
    let mut last_inspection_ms = 0_u64;
    loop {
        let cause = Cause::from_u8(shared.cause.swap(Cause::None as u8, Relaxed));
        let attempt =
            tokio::time::timeout(shared.timeout.saturating_mul(2), finder.connect(&shared))
                .await
                .unwrap_or_else(|_| Err(shared.timed_out()));
        let found = match attempt {
            Ok(found) => found,
            Err(failure) => {
                if !was_down {
                    tracing::warn!(store = %shared.target, error = %failure.detail,
                        "store: no usable primary; calls with an idempotency key fail until one is found");
                    was_down = true;
                }
                let jitter = retry.mul_f64(0.8 + 0.4 * fastrand::f64());
                shared.publish(State::Down {
                    failure,
                    retry_at: Instant::now() + jitter,
                });
                tokio::select! {
                    () = tokio::time::sleep(jitter) => {}
                    _ = finder.switched() => {}
                }
                retry = (retry * 2).min(MAX_RETRY);
                // Keep the cause for the next attempt's log line.
                shared.cause.fetch_max(cause as u8, Relaxed);
                shared.publish(State::Connecting);
                continue;
            }
        };
        retry = FIRST_RETRY;
        generation += 1;
        let address = found.primaries.join(",");
        let failover = match &last_primary {
            Some(previous) if *previous != address => true,
            Some(_) => matches!(cause, Cause::Demoted | Cause::Switched),
            None => false,
        };
        if failover {
            shared.failovers.fetch_add(1, Relaxed);
            tracing::warn!(
                store = %shared.target,
                previous = last_primary.as_deref().unwrap_or_default(),
                primary = %address,
                "store: failover followed; calls with an idempotency key use the new primary"
            );
        } else if last_primary.is_some() || was_down {
            tracing::info!(store = %shared.target, primary = %address, "store: connected again");
        } else {
            tracing::info!(store = %shared.target, primary = %address, "store: connected");
        }
        if last_primary.is_some() {
            shared.reconnects.fetch_add(1, Relaxed);
        }
        was_down = false;
        last_primary = Some(address);
        let live = accept(&shared, found, generation);
        shared.publish(State::Up(live));
        watch(&shared, &mut finder, generation, &mut last_inspection_ms).await;
    }
}

fn accept(shared: &Shared, found: Found, generation: u64) -> Arc<Live> {
    shared.connected_replicas.store(found.replicas, Relaxed);
    *shared
        .primaries
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = found.primaries;
    Arc::new(Live {
        generation,
        main: found.main,
        dial: found.dial,
        clients: found.clients.into_boxed_slice(),
        answered_ms: AtomicU64::new(shared.now_ms()),
    })
}

/// While the connection of `generation` is live: looks at the primary now
/// and then (not more often than [`INSPECT_SOON`] after
/// `last_inspection_ms`, which it updates), and returns once the
/// connection is given up.
async fn watch(
    shared: &Arc<Shared>,
    finder: &mut Finder,
    generation: u64,
    last_inspection_ms: &mut u64,
) {
    let cluster = finder.is_cluster();
    let interval = if cluster {
        INSPECT_CLUSTER
    } else {
        INSPECT_PRIMARY
    };
    loop {
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(interval) => {}
            to = finder.switched() => {
                // Unless this connection already reached the new primary.
                if !shared.primaries().contains(&to) {
                    shared.invalidate(generation, Cause::Switched);
                }
            }
        }
        let live = match &**shared.state.load() {
            State::Up(live) if live.generation == generation => live.clone(),
            _ => return,
        };
        // Not more often than INSPECT_SOON, however many calls ask.
        let now = shared.now_ms();
        if now.saturating_sub(*last_inspection_ms) < INSPECT_SOON.as_millis() as u64 {
            tokio::time::sleep(INSPECT_SOON).await;
        }
        *last_inspection_ms = shared.now_ms();
        match finder.inspect(&live).await {
            Ok(inspection) => {
                shared
                    .connected_replicas
                    .store(inspection.replicas, Relaxed);
                if cluster {
                    note_cluster_failovers(shared, &inspection.primaries);
                }
            }
            Err(Some(cause)) => shared.invalidate(generation, cause),
            Err(None) => {}
        }
    }
}

/// Logs and counts each cluster shard whose primary changed, and keeps
/// the cluster's `primaries`.
fn note_cluster_failovers(shared: &Shared, primaries: &[String]) {
    let mut known = shared
        .primaries
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if *known == primaries {
        return;
    }
    for new in primaries.iter().filter(|p| !known.contains(p)) {
        shared.failovers.fetch_add(1, Relaxed);
        tracing::warn!(
            store = %shared.target,
            primary = %new,
            "store: failover followed; a cluster shard has a new primary"
        );
    }
    *known = primaries.to_vec();
}
