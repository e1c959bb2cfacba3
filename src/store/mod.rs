//! The Redis deployment the gateway's replicas share: one connection
//! machinery for idempotency records now, and for quotas and cooldowns
//! later. It owns finding the primary (one server, a managed endpoint, the
//! Sentinels' primary, or every primary of a Redis Cluster), following a
//! failover, waiting for replicas, and the store's metrics; the users own
//! their keys and scripts.
//!
//! # The API
//! [`Store`] is one handle, cheap to clone (one `Arc`); every user of the
//! store shares it, so they share its connections and follow the same
//! failover.
//! - [`Store::open`] checks nothing over the network and returns at once: a
//!   task (the supervisor) finds the primary and finds it again in the
//!   background, so the gateway starts while Redis is down.
//! - [`Store::run`] runs a [`Script`] ([`Script::call`] with its keys, then
//!   [`Call::arg`]s) by `EVALSHA` (`EVAL` on `NOSCRIPT`), bounded by
//!   `--idempotency-store-timeout` and an optional deadline. With
//!   [`Wait::Replicas`], a `WAIT` for the required replicas goes in the same
//!   round trip, on the same connection (in a cluster, to the key's node);
//!   the [`Reply`] says whether fewer acknowledged ([`Shortfall`]): what a
//!   shortfall means is the caller's to decide.
//! - [`Store::publish`] and [`Store::subscribe`]: small messages to every
//!   replica ([`pubsub`]: at most once, with [`Event::Gap`] after any
//!   interruption; the subscription survives failovers and reconnections).
//! - [`Store::health`] tells the state, the primaries and the replicas;
//!   [`Store::retry_after`] the delay to suggest to a caller refused for the
//!   store's sake (`RetryInfo`); [`Store::collector`] gives the metrics to
//!   register ([`metrics`]).
//!
//! Keys: every script touches keys of one hash slot only, since Redis
//! Cluster runs a script on one node. A script of one key needs nothing
//! (the idempotency records are `gormic:idem:v1:<hex>`, one key each, the
//! same bytes with one server, Sentinel or Cluster). A script of several
//! keys puts the same hash tag in each: `app:{org-42}:quota` and
//! `app:{org-42}:cooldown` hash only `org-42`. Key prefixes are the users'
//! and must not collide (`gormic:idem:` is idempotency's). A key named by
//! a SHA-256 is its prefix then the digest in lowercase hex
//! ([`prefixed_hex`]).
//!
//! Failures ([`Failure`]) name the store with its password redacted. While
//! no primary is usable (a failover under way, Redis down), every operation
//! fails at once or within its bound: a user must fail closed or fall back
//! as its own design says.
//!
//! # Connections
//! An operation is sent and answered on a connection of the thread that
//! runs it (`local`): on a gateway worker, driven by that worker's own
//! runtime, so a call's store operations never wake another thread (as the
//! upstream clients, one per worker). The supervisor (`supervisor`,
//! spawned by [`Store::open`] on the caller's runtime: `main`'s) decides
//! where the primary is and publishes it with a generation (`link`); each
//! thread connects to that primary on its first operation, checked like
//! the supervisor's connection (`finder`: `ROLE`, and the same server),
//! and connects again once the generation changes. Per gateway process and
//! primary (each connection a cluster connection in a cluster, one per
//! primary):
//! - the supervisor's connection (its `ROLE` and `CLUSTER NODES` looks);
//! - per thread that uses the store (the workers; `main` if it does): one
//!   connection, plus up to four (`local::WAIT_CONNECTIONS`) for writes that
//!   wait for replicas, opened as they are needed;
//! - the subscriber connection ([`pubsub`]), once something subscribes.

mod args;
mod finder;
mod link;
mod local;
pub mod metrics;
pub mod pubsub;
mod script;
mod supervisor;
mod url;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

pub use args::{Replicas, StoreArgs};
pub use pubsub::{Event, Subscription};
pub use script::{Call, Script};
pub use url::{Node, StoreUrl, Topology};

use crate::runtime::AbortOnDrop;
use finder::Finder;
use link::{Cause, Conn, Live, Shared, State, cause_of};
use local::Purpose;

/// The shared store; cheap to clone, clones share the connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    _supervisor: AbortOnDrop,
    hub: Arc<pubsub::Hub>,
    subscriber: OnceLock<AbortOnDrop>,
}

/// Whether a write waits for replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Answer as soon as the primary has it (reads, or writes whose loss
    /// in a failover is harmless).
    None,
    /// Also wait (`WAIT`) for the replicas `--idempotency-store-replicas`
    /// requires now.
    Replicas,
}

/// What a script answered.
#[derive(Debug)]
pub struct Reply {
    pub value: Value,
    /// With [`Wait::Replicas`]: fewer replicas acknowledged the write in
    /// time than were required. The write stands on the primary.
    pub shortfall: Option<Shortfall>,
}

/// Fewer replicas acknowledged a write than required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    pub acknowledged: u32,
    pub required: u32,
}

/// The store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// Names the store (password redacted) and what went wrong.
    pub detail: String,
    /// The operation may have taken effect with its answer lost (a timeout,
    /// a connection broken mid-way); `false` when it provably did not.
    pub may_have_applied: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Unreachable, too slow, no primary, or an error reply.
    Unavailable,
    /// Out of memory (`maxmemory` with `noeviction`): writes are refused.
    Full,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The store's state, as [`Store::health`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    /// Connecting (at start-up, or after the connection was given up).
    Connecting,
    /// A primary is connected.
    Up,
    /// No usable primary; connection attempts continue.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub state: StoreState,
    /// The primary in use (each primary, in a cluster), `host:port`.
    pub primaries: Vec<String>,
    /// Replicas the primary reports connected (the fewest, in a cluster).
    pub connected_replicas: u32,
    /// Replicas a [`Wait::Replicas`] write waits for now.
    pub required_replicas: u32,
    pub failovers: u64,
    /// Why the store is down, when it is.
    pub error: Option<String>,
}

/// The store cannot be opened as configured.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(String);

impl Store {
    /// Opens the store `url` names (no network I/O). Must be called inside
    /// a Tokio runtime: the connection task runs there for as long as a
    /// clone of the handle lives.
    pub fn open(url: &StoreUrl, timeout: Duration, replicas: Replicas) -> Result<Self, OpenError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(OpenError(
                "the store must be opened inside the async runtime".into(),
            ));
        }
        if url.is_tls() {
            // The redis crate builds its rustls configuration with the
            // process-wide default provider and cannot be handed one: make it
            // ring (the project's provider). If another default was
            // installed already, that one stays.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let topology = match url.topology() {
            Topology::Single => "single",
            Topology::Sentinel { .. } => "sentinel",
            Topology::Cluster { .. } => "cluster",
        };
        let shared = Arc::new(Shared::new(
            url.redacted().to_owned(),
            topology,
            timeout,
            replicas,
            url.secrets(),
        ));
        let finder = Finder::new(url, timeout)
            .map_err(|e| OpenError(format!("{}: {}", shared.target, shared.scrub(e))))?;
        let supervisor = tokio::spawn(supervisor::supervise(shared.clone(), finder));
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                _supervisor: AbortOnDrop(supervisor.abort_handle()),
                hub: Arc::default(),
                subscriber: OnceLock::new(),
            }),
        })
    }

    /// The URL without its password.
    pub fn target(&self) -> &str {
        &self.inner.shared.target
    }

    /// `--idempotency-store-timeout`: the bound of one operation.
    pub fn timeout(&self) -> Duration {
        self.inner.shared.timeout
    }

    /// Runs `call` within the store timeout (and `deadline`, if nearer).
    /// With [`Wait::Replicas`] and replicas required, the `WAIT` ends in
    /// time for its answer to come back within that bound.
    pub async fn run(
        &self,
        call: &Call<'_>,
        wait: Wait,
        deadline: Option<Instant>,
    ) -> Result<Reply, Failure> {
        let shared = &self.inner.shared;
        let mut bound = Instant::now() + shared.timeout;
        if let Some(deadline) = deadline {
            bound = bound.min(deadline);
        }
        let live = shared.live(bound).await?;
        let required = match wait {
            Wait::None => 0,
            Wait::Replicas => shared.required_replicas(),
        };
        let purpose = if required == 0 {
            Purpose::Commands
        } else {
            Purpose::Wait
        };
        let (value, acknowledged) = self
            .exchange(&live, purpose, bound, async |conn| {
                if required == 0 {
                    run_once(conn, call).await
                } else {
                    run_and_wait(conn, call, required, bound).await
                }
            })
            .await?;
        let shortfall = acknowledged
            .filter(|n| *n < required)
            .map(|acknowledged| Shortfall {
                acknowledged,
                required,
            });
        if shortfall.is_some() {
            shared.count_shortfall(call.script().name());
            // Perhaps the replica is gone: count them again.
            shared.inspect_soon();
        }
        Ok(Reply { value, shortfall })
    }

    /// Publishes `message` on `channel` to every subscriber (every
    /// replica's [`Subscription`]); the number that received it.
    pub async fn publish(&self, channel: &str, message: &[u8]) -> Result<u64, Failure> {
        let shared = &self.inner.shared;
        let bound = Instant::now() + shared.timeout;
        let live = shared.live(bound).await?;
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(channel).arg(message);
        let reply = self
            .exchange(&live, Purpose::Commands, bound, async |conn| {
                conn.command(&publish).await
            })
            .await?;
        match reply {
            Value::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
            _ => Err(Failure {
                kind: FailureKind::Unavailable,
                detail: format!("{}: unexpected reply to PUBLISH", shared.target),
                may_have_applied: true,
            }),
        }
    }

    /// Subscribes to `channel`. The first subscription opens the store's
    /// subscriber connection (inside the runtime, like [`Store::open`]).
    pub fn subscribe(&self, channel: &str) -> Subscription {
        let subscription = self.inner.hub.subscribe(channel);
        self.inner.subscriber.get_or_init(|| {
            let task = tokio::spawn(pubsub::run(
                self.inner.shared.clone(),
                self.inner.hub.clone(),
            ));
            AbortOnDrop(task.abort_handle())
        });
        subscription
    }

    pub fn health(&self) -> Health {
        let shared = &self.inner.shared;
        let (state, error) = match &**shared.state() {
            State::Connecting => (StoreState::Connecting, None),
            State::Up(_) => (StoreState::Up, None),
            State::Down { failure, .. } => (StoreState::Down, Some(failure.detail.clone())),
        };
        Health {
            state,
            primaries: shared.primaries(),
            connected_replicas: shared.connected_replicas(),
            required_replicas: shared.required_replicas(),
            failovers: shared.failovers.load(std::sync::atomic::Ordering::Relaxed),
            error,
        }
    }

    /// How long a caller refused for the store's sake should wait before
    /// retrying: until the next connection attempt while the store is down
    /// (at least 100 ms), else 1 s.
    pub fn retry_after(&self) -> Duration {
        const LEAST: Duration = Duration::from_millis(100);
        const USUAL: Duration = Duration::from_secs(1);
        match self.inner.shared.next_attempt_in() {
            Some(wait) => wait.clamp(LEAST, USUAL),
            None => USUAL,
        }
    }

    /// This thread's connection to the primary (`local`), made if need be
    /// within `bound`, with the primary's generation.
    async fn connection(
        &self,
        live: &Live,
        purpose: Purpose,
        bound: Instant,
    ) -> Result<(Conn, u64), Failure> {
        let shared = &self.inner.shared;
        match tokio::time::timeout_at(bound, local::connection(shared, live, purpose)).await {
            Ok(made) => made,
            Err(_) => {
                if shared.unresponsive(live) {
                    shared.invalidate(live.generation, Cause::Lost);
                }
                Err(Failure {
                    // Nothing was sent but the connection's own commands.
                    may_have_applied: false,
                    ..shared.timed_out()
                })
            }
        }
    }

    /// Sends on this thread's connection (for `purpose`) to the primary of
    /// `live`, within `bound`, and reports what the outcome says of that
    /// primary: an answer ([`Shared::answered`]), an error
    /// ([`Store::connection_trouble`]), or no answer in time (the primary
    /// given up if it has answered nothing for a whole timeout).
    async fn exchange<T>(
        &self,
        live: &Live,
        purpose: Purpose,
        bound: Instant,
        send: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Result<T, Failure> {
        let shared = &self.inner.shared;
        let (mut conn, generation) = self.connection(live, purpose, bound).await?;
        match tokio::time::timeout_at(bound, send(&mut conn)).await {
            Ok(Ok(answer)) => {
                shared.answered(live);
                Ok(answer)
            }
            Ok(Err(error)) => {
                self.connection_trouble(&conn, generation, cause_of(&error));
                Err(shared.failure(&error))
            }
            Err(_) => {
                if shared.unresponsive(live) {
                    self.connection_trouble(&conn, generation, Some(Cause::Lost));
                }
                Err(shared.timed_out())
            }
        }
    }

    /// Reports what a failed operation on `conn`, a connection to the
    /// primary of `generation`, says about it.
    fn connection_trouble(&self, conn: &Conn, generation: u64, cause: Option<Cause>) {
        let shared = &self.inner.shared;
        match (conn, cause) {
            // The cluster client repairs its own connections; a look at the
            // topology keeps the metrics and the log line current.
            (Conn::Cluster(_), _) => shared.inspect_soon(),
            (_, Some(cause)) => shared.invalidate(generation, cause),
            (_, None) => {}
        }
    }
}

/// `prefix` followed by `digest` in lowercase hex: the key of a record
/// named by a SHA-256 (`gormic:idem:v1:<hex>`, `gormic:quota:v1:<hex>`).
/// `N` must be `prefix.len() + 64`.
pub(crate) fn prefixed_hex<const N: usize>(prefix: &str, digest: &[u8; 32]) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    assert_eq!(
        N,
        prefix.len() + 64,
        "a key is its prefix and 64 hex digits"
    );
    let mut key = [0; N];
    key[..prefix.len()].copy_from_slice(prefix.as_bytes());
    for (i, byte) in digest.iter().enumerate() {
        key[prefix.len() + 2 * i] = DIGITS[usize::from(byte >> 4)];
        key[prefix.len() + 2 * i + 1] = DIGITS[usize::from(byte & 0xf)];
    }
    key
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.target())
    }
}

/// The script alone: one command, one round trip.
async fn run_once(conn: &mut Conn, call: &Call<'_>) -> redis::RedisResult<(Value, Option<u32>)> {
    match conn.command(call.evalsha()).await {
        Err(error) if is_noscript(&error) => Ok((conn.command(&call.eval()).await?, None)),
        other => Ok((other?, None)),
    }
}

/// The script and `WAIT` in one round trip, on a connection for writes that
/// wait; the `WAIT` ends a quarter of the bound before it (at least 1 ms:
/// `WAIT 0` would never end).
async fn run_and_wait(
    conn: &mut Conn,
    call: &Call<'_>,
    required: u32,
    bound: Instant,
) -> redis::RedisResult<(Value, Option<u32>)> {
    let wait_ms = |bound: Instant| {
        let left = bound.saturating_duration_since(Instant::now());
        u64::try_from((left * 3 / 4).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    };
    let mut pipe = redis::pipe();
    pipe.add_command(call.evalsha().clone())
        .cmd("WAIT")
        .arg(required)
        .arg(wait_ms(bound));
    let mut values = conn.pipeline(&pipe).await?;
    if matches!(values.first(), Some(Value::ServerError(e)) if e.code() == "NOSCRIPT") {
        let mut pipe = redis::pipe();
        pipe.add_command(call.eval())
            .cmd("WAIT")
            .arg(required)
            .arg(wait_ms(bound));
        values = conn.pipeline(&pipe).await?;
    }
    let mut values = values.into_iter();
    let (Some(script), Some(wait)) = (values.next(), values.next()) else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "a pipeline of two commands answered fewer replies",
        )));
    };
    let script = match script {
        Value::ServerError(error) => return Err(error.into()),
        value => value,
    };
    let acknowledged = match wait {
        Value::Int(n) => u32::try_from(n).unwrap_or(0),
        Value::ServerError(error) => return Err(error.into()),
        _ => 0,
    };
    Ok((script, Some(acknowledged)))
}

fn is_noscript(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}
