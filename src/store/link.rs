//! The store's primary (every primary, in a cluster) as calls see it:
//! live, being made, or down, with what the store's supervisor
//! (`supervisor`) learnt about its replicas and primaries.
//!
//! Calls never wait for the supervisor's own connection: they take the
//! live primary from an [`ArcSwap`] (no lock) and send on their thread's
//! connection to it (`local`); they wait (within their bound) while the
//! supervisor is finding a primary, and fail at once while the store is
//! down between attempts. A call that finds its connection broken, or the
//! server demoted, gives the primary up ([`Shared::invalidate`]): the
//! supervisor finds it again, with a new generation, and every thread
//! connects anew.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisResult, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::args::Replicas;
use super::{Failure, FailureKind};

/// One connection: to a primary, or a cluster client (which routes each
/// command to its key's primary and follows MOVED and ASK itself).
#[derive(Clone)]
pub(super) enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    /// One command; an error reply is an `Err`.
    pub(super) async fn command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let value = match self {
            Self::Node(c) => c.req_packed_command(cmd).await?,
            Self::Cluster(c) => c.req_packed_command(cmd).await?,
        };
        match value {
            Value::ServerError(error) => Err(error.into()),
            value => Ok(value),
        }
    }

    /// Commands sent together (one round trip); error replies stay values.
    pub(super) async fn pipeline(&mut self, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipe, 0, pipe.len()).await,
            Self::Cluster(c) => c.req_packed_commands(pipe, 0, pipe.len()).await,
        }
    }
}

/// How a thread connects to the primary of one generation (`local`).
#[derive(Clone)]
pub(super) enum Dial {
    Node(Box<Server>),
    /// The cluster client: a connection reaches every primary.
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// The primary server the supervisor found, and how to know it again.
#[derive(Clone)]
pub(super) struct Server {
    /// The URL's client (its name looked up again on each connection) or
    /// the one the Sentinels named.
    pub client: redis::Client,
    /// Its `run_id` (`INFO server`), unless it may not be asked: a thread's
    /// connection through a managed name that reaches another server (the
    /// name moved) is not used, so that every thread writes to the one
    /// primary the supervisor checked.
    pub run_id: Option<String>,
}

/// A primary found, with the supervisor's own connection to it.
pub(super) struct Live {
    /// Counts the primaries found: each thread's connections are for one
    /// generation and made again for the next.
    pub generation: u64,
    /// The supervisor's connection: for its looks at the primary (`ROLE`,
    /// `CLUSTER NODES`), never for calls.
    pub main: Conn,
    /// How calls' threads connect to this primary.
    pub dial: Dial,
    /// Clients of the nodes a subscription may use: the primary, or a
    /// cluster's seed nodes.
    pub clients: Box<[redis::Client]>,
    /// When a reply last came, in ms from [`Shared::epoch`]; updated at most
    /// every 100 ms.
    pub answered_ms: AtomicU64,
}

/// The state calls read.
pub(super) enum State {
    /// A connection attempt is under way: wait for it.
    Connecting,
    Up(Arc<Live>),
    /// The last attempt failed; the next is due at `retry_at`.
    Down {
        failure: Failure,
        retry_at: Instant,
    },
}

/// Why the connection is being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Cause {
    None = 0,
    /// The connection broke or answered nothing for a whole timeout.
    Lost = 1,
    /// The server says it is no longer the primary (`READONLY`, `ROLE`), or
    /// another server answers at its address (a managed name moved).
    Demoted = 2,
    /// The Sentinels announced a new primary (`+switch-master`).
    Switched = 3,
}

impl Cause {
    pub(super) fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Lost,
            2 => Self::Demoted,
            3 => Self::Switched,
            _ => Self::None,
        }
    }
}

/// What calls, the supervisor, subscriptions and the metrics share.
pub(super) struct Shared {
    /// The URL without its password.
    pub target: String,
    /// `single`, `sentinel` or `cluster`.
    pub topology: &'static str,
    pub timeout: Duration,
    pub replicas: Replicas,
    secrets: Vec<String>,
    pub epoch: std::time::Instant,
    pub state: ArcSwap<State>,
    /// Woken on every change of `state`.
    pub changed: Notify,
    /// Wakes the supervisor: the connection was given up, or a `WAIT` fell
    /// short and the replicas should be counted again.
    pub wake: Notify,
    pub cause: AtomicU8,
    /// Replicas the primary reports connected (in a cluster: the fewest of
    /// any primary).
    pub connected_replicas: AtomicU32,
    pub primaries: Mutex<Vec<String>>,
    pub failovers: AtomicU64,
    pub reconnects: AtomicU64,
    /// `WAIT` shortfalls per script name (rare: written under a lock).
    pub shortfalls: Mutex<HashMap<&'static str, u64>>,
}

impl Shared {
    pub(super) fn new(
        target: String,
        topology: &'static str,
        timeout: Duration,
        replicas: Replicas,
        secrets: Vec<String>,
    ) -> Self {
        Self {
            target,
            topology,
            timeout,
            replicas,
            secrets,
            epoch: std::time::Instant::now(),
            state: ArcSwap::from_pointee(State::Connecting),
            changed: Notify::new(),
            wake: Notify::new(),
            cause: AtomicU8::new(Cause::None as u8),
            connected_replicas: AtomicU32::new(0),
            primaries: Mutex::default(),
            failovers: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            shortfalls: Mutex::default(),
        }
    }

    /// The live connection; waits (until `bound`) while one is being made.
    /// Lock-free when there is one: the waiter list is joined only while
    /// connecting.
    pub(super) async fn live(&self, bound: Instant) -> Result<Arc<Live>, Failure> {
        loop {
            if let Some(ready) = self.ready() {
                return ready;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // A change between the first look and `enable` is not missed.
            if let Some(ready) = self.ready() {
                return ready;
            }
            if tokio::time::timeout_at(bound, changed).await.is_err() {
                return Err(self.timed_out());
            }
        }
    }

    /// The connection or the failure, unless a connection is being made.
    fn ready(&self) -> Option<Result<Arc<Live>, Failure>> {
        match &**self.state.load() {
            State::Up(live) => Some(Ok(live.clone())),
            State::Down { failure, .. } => Some(Err(failure.clone())),
            State::Connecting => None,
        }
    }

    pub(super) fn state(&self) -> arc_swap::Guard<Arc<State>> {
        self.state.load()
    }

    pub(super) fn publish(&self, state: State) {
        self.state.store(Arc::new(state));
        self.changed.notify_waiters();
    }

    /// Whether the primary of `generation` is still the one in use.
    pub(super) fn is_current(&self, generation: u64) -> bool {
        matches!(&**self.state.load(), State::Up(live) if live.generation == generation)
    }

    /// Gives up the primary of `generation` (if it is still the live one)
    /// and has the supervisor find it again.
    pub(super) fn invalidate(&self, generation: u64, cause: Cause) {
        let current = self.state.load();
        let State::Up(live) = &**current else {
            return;
        };
        if live.generation != generation {
            return;
        }
        let previous = self
            .state
            .compare_and_swap(&*current, Arc::new(State::Connecting));
        if !Arc::ptr_eq(&*previous, &*current) {
            return; // replaced meanwhile
        }
        self.cause.fetch_max(cause as u8, Relaxed);
        self.changed.notify_waiters();
        self.wake.notify_one();
    }

    /// Asks the supervisor to look at the primary again soon (replicas after
    /// a `WAIT` shortfall; a cluster's topology after a failed call).
    pub(super) fn inspect_soon(&self) {
        self.wake.notify_one();
    }

    /// Replicas a write that waits must reach now.
    pub(super) fn required_replicas(&self) -> u32 {
        self.replicas
            .required(self.connected_replicas.load(Relaxed))
    }

    pub(super) fn connected_replicas(&self) -> u32 {
        self.connected_replicas.load(Relaxed)
    }

    pub(super) fn primaries(&self) -> Vec<String> {
        self.primaries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn count_shortfall(&self, script: &'static str) {
        *self
            .shortfalls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(script)
            .or_default() += 1;
    }

    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes a reply on `live` (at most one write every 100 ms).
    pub(super) fn answered(&self, live: &Live) {
        let now = self.now_ms();
        if now.saturating_sub(live.answered_ms.load(Relaxed)) >= 100 {
            live.answered_ms.store(now, Relaxed);
        }
    }

    /// Whether `live` has answered nothing for a whole timeout.
    pub(super) fn unresponsive(&self, live: &Live) -> bool {
        let silent = self.now_ms().saturating_sub(live.answered_ms.load(Relaxed));
        u128::from(silent) >= self.timeout.as_millis()
    }

    pub(super) fn timed_out(&self) -> Failure {
        Failure {
            kind: FailureKind::Unavailable,
            detail: format!(
                "{}: no answer within {}",
                self.target,
                humantime::format_duration(self.timeout)
            ),
            may_have_applied: true,
        }
    }

    /// A client error as a [`Failure`] naming the store, password scrubbed.
    pub(super) fn failure(&self, error: &RedisError) -> Failure {
        if error.is_timeout() {
            // The client's own timeouts are set to ours.
            return self.timed_out();
        }
        let text = error.to_string();
        // Under `noeviction`, Redis refuses writes with an OOM error; inside
        // a script it may come wrapped in a script error.
        if error.code() == Some("OOM") || text.contains("OOM command not allowed") {
            return Failure {
                kind: FailureKind::Full,
                detail: format!("{}: out of memory", self.target),
                may_have_applied: false,
            };
        }
        Failure {
            kind: FailureKind::Unavailable,
            detail: format!("{}: {}", self.target, self.scrub(text)),
            // A refused connection or an error reply means the script did not
            // run to a write that went unreported.
            may_have_applied: !(error.is_connection_refusal()
                || matches!(error.kind(), redis::ErrorKind::Server(_))),
        }
    }

    pub(super) fn scrub(&self, mut text: String) -> String {
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }

    /// Until the next connection attempt, while the store is down.
    pub(super) fn next_attempt_in(&self) -> Option<Duration> {
        match &**self.state.load() {
            State::Down { retry_at, .. } => {
                Some(retry_at.saturating_duration_since(Instant::now()))
            }
            _ => None,
        }
    }
}

/// What a failed call says about its connection: `None` when the
/// connection is fine (an error of the script, a full server).
pub(super) fn cause_of(error: &RedisError) -> Option<Cause> {
    use redis::{ErrorKind, ServerErrorKind};
    match error.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown) => {
            Some(Cause::Demoted)
        }
        // Restarted and still loading its data: the same server.
        ErrorKind::Server(ServerErrorKind::BusyLoading) => Some(Cause::Lost),
        ErrorKind::Server(_) | ErrorKind::Extension => {
            // A write refused inside a script comes wrapped in its error.
            let text = error.to_string();
            (text.contains("READONLY") || text.contains("MASTERDOWN")).then_some(Cause::Demoted)
        }
        ErrorKind::Io | ErrorKind::Client | ErrorKind::Parse => Some(Cause::Lost),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demotions_and_broken_connections_replace_the_connection_other_errors_do_not() {
        let readonly = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert_eq!(cause_of(&readonly), Some(Cause::Demoted));
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(cause_of(&dropped), Some(Cause::Lost));
        let script = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "Error running script",
            "user_script:1: bad".to_owned(),
        ));
        assert_eq!(cause_of(&script), None);
        let oom = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "OOM command not allowed when used memory > 'maxmemory'.",
        ));
        assert_eq!(cause_of(&oom), None);
    }
}
