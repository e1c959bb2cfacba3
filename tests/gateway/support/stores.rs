//! The idempotency stores a case runs against: one [`StoreKind`] per kind
//! of store (memory, a real redis-server, a Sentinel deployment, a Redis
//! Cluster), and [`for_each_store!`], which
//! makes each shared case one test per kind. The store suites
//! (`idempotency`, `idempotency_store`) use it, so that a new kind runs
//! every shared case by adding it here, not by copying the suites.
//!
//! The shared cases borrow their deployments from a pool ([`StoreKind::lease`]):
//! a run starts about as many of each kind as cases run at once, not one
//! per case (a Cluster takes over 2 s to start). A deployment goes to one
//! case at a time, and back to the pool only if the case passed and the
//! deployment is then emptied and found as a new one is ([`Lease::give_back`]);
//! otherwise it is stopped. Pooled processes die with the test binary
//! (`redis::spawn`).

use std::sync::{Mutex, PoisonError};

use gormic_gateway::idempotency::{Idempotency, IdempotencyArgs, parse_store};

use super::redis::RedisServer;
use super::redis_cluster::RedisCluster;
use super::redis_sentinel::RedisSentinel;

/// A kind of idempotency store. Adding one is a variant here, its arm in
/// [`StoreKind::start`] (and [`Backend`]) and its line in
/// [`for_each_store!`] (which does not compile without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `--idempotency-store memory`: this gateway's own.
    Memory,
    /// `--idempotency-store redis://…`: one redis-server, shared by every
    /// store opened on it, as by replicas.
    Redis,
    /// `--idempotency-store redis+sentinel://…`: a primary, its replica and
    /// three Sentinels.
    Sentinel,
    /// `--idempotency-store redis+cluster://…`: three primaries, each with
    /// a replica.
    Cluster,
}

impl StoreKind {
    /// Starts what a store of this kind needs (a redis-server for Redis, a
    /// deployment for Sentinel and Cluster), its own. The Redis processes
    /// are started synchronously: call it where blocking is allowed.
    pub fn start(self) -> Backend {
        match self {
            StoreKind::Memory => Backend::Memory,
            StoreKind::Redis => Backend::Redis(RedisServer::start()),
            StoreKind::Sentinel => Backend::Sentinel(RedisSentinel::start()),
            StoreKind::Cluster => Backend::Cluster(RedisCluster::start()),
        }
    }

    /// A backend of this kind for one case: an idle one of the pool, found
    /// still as [`Self::start`] left it, or else a new one. Blocking, like
    /// [`Self::start`].
    pub fn lease(self) -> Lease {
        loop {
            let idle = {
                let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
                let found = idle.iter().position(|b| b.kind() == self);
                found.map(|i| idle.swap_remove(i))
            };
            let Some(backend) = idle else {
                return Lease(Some(self.start()));
            };
            // Idle, it may still have been broken meanwhile (a Sentinel
            // that saw the primary stall on a loaded machine, say).
            match backend.ready() {
                Ok(()) => return Lease(Some(backend)),
                Err(why) => eprintln!("a pooled {self:?} backend is stopped: {why}"),
            }
        }
    }
}

/// The idle backends, of every kind. Never dropped: their processes die
/// with the test binary.
static IDLE: Mutex<Vec<Backend>> = Mutex::new(Vec::new());

/// A backend lent to one case. Dropped (as when the case panics), it is
/// stopped; [`Lease::give_back`] returns it to the pool.
pub struct Lease(Option<Backend>);

impl Lease {
    pub fn backend(&self) -> &Backend {
        self.0
            .as_ref()
            .expect("a lease holds its backend until given back")
    }

    /// Returns the backend to the pool once the case that used it has
    /// passed and everything it ran is gone (its runtime dropped), if it is
    /// then emptied and found as new: otherwise it is stopped. Blocking.
    pub fn give_back(mut self) {
        // A memory store is the gateway's own, gone with the case.
        let Some(backend) = self.0.take().filter(|b| b.kind() != StoreKind::Memory) else {
            return;
        };
        match backend.empty().and_then(|()| backend.ready()) {
            Ok(()) => IDLE
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(backend),
            Err(why) => eprintln!(
                "a {:?} backend is stopped, not pooled: {why}",
                backend.kind()
            ),
        }
    }
}

/// A running store of one kind, with what it runs on (stopped on drop).
/// Stores opened on the same Redis backend share their records, like two
/// replicas of the gateway.
pub enum Backend {
    Memory,
    Redis(RedisServer),
    Sentinel(RedisSentinel),
    Cluster(RedisCluster),
}

impl Backend {
    pub fn kind(&self) -> StoreKind {
        match self {
            Backend::Memory => StoreKind::Memory,
            Backend::Redis(_) => StoreKind::Redis,
            Backend::Sentinel(_) => StoreKind::Sentinel,
            Backend::Cluster(_) => StoreKind::Cluster,
        }
    }

    /// Whether this backend is as it was started, ready for a case.
    fn ready(&self) -> Result<(), String> {
        match self {
            Backend::Memory => Ok(()),
            Backend::Redis(server) => server.ready(),
            Backend::Sentinel(deployment) => deployment.ready(),
            Backend::Cluster(cluster) => cluster.ready(),
        }
    }

    /// Makes this backend as empty as a new one (a memory store is the
    /// gateway's own: nothing to do).
    fn empty(&self) -> Result<(), String> {
        match self {
            Backend::Memory => Ok(()),
            Backend::Redis(server) => server.empty(),
            Backend::Sentinel(deployment) => deployment.empty(),
            Backend::Cluster(cluster) => cluster.empty(),
        }
    }

    /// `--idempotency-store` for this backend: `memory`, or its Redis URL.
    pub fn location(&self) -> String {
        match self {
            Backend::Memory => "memory".to_owned(),
            Backend::Redis(server) => server.url(),
            Backend::Sentinel(deployment) => deployment.url(),
            Backend::Cluster(cluster) => cluster.url(),
        }
    }

    /// A store on this backend, opened as a gateway opens it from its flags
    /// (`args`, whose location is this backend's).
    pub async fn open(&self, args: impl Into<IdempotencyArgs>) -> Idempotency {
        open_at(&self.location(), args).await
    }
}

/// A store at `location` (`memory`, `redis://…`) opened from `args`, for
/// the cases about one kind of store only.
pub async fn open_at(location: &str, args: impl Into<IdempotencyArgs>) -> Idempotency {
    let args = IdempotencyArgs {
        idempotency_store: parse_store(location).expect("a store location"),
        ..args.into()
    };
    Idempotency::from_args(&args)
        .await
        .unwrap_or_else(|e| panic!("the store at {location} opens: {e}"))
}

/// Makes each `case`, an `async fn(&Backend)` of the invoking module, one
/// test per store kind, in a module named after the kind
/// (`memory_store::case`, `redis_store::case`, `sentinel_store::case`,
/// `cluster_store::case`), so that the failing test's
/// name says which store failed. The list below is the one list of kinds.
///
/// Each test runs its case on a runtime of its own, as
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` would,
/// with a backend leased from the pool, and gives it back once the runtime
/// is dropped (every connection and task of the case gone); a case that
/// panics never gives it back.
macro_rules! for_each_store {
    ($($case:ident),* $(,)?) => {
        $crate::support::stores::for_each_store!(
            @kinds [
                memory_store: Memory,
                redis_store: Redis,
                sentinel_store: Sentinel,
                cluster_store: Cluster
            ] ($($case),*)
        );
    };
    (@kinds [$($module:ident: $kind:ident),*] $cases:tt) => {
        // Fails to compile when a kind has no line in the list above.
        const _: fn($crate::support::stores::StoreKind) = |kind| match kind {
            $($crate::support::stores::StoreKind::$kind => {})*
        };
        $crate::support::stores::for_each_store!(@each [$($module: $kind),*] $cases);
    };
    (@each [] $cases:tt) => {};
    (@each [$module:ident: $kind:ident $(, $more:ident: $more_kind:ident)*] ($($case:ident),*)) => {
        mod $module {
            $(
                #[test]
                fn $case() {
                    let lease = $crate::support::stores::StoreKind::$kind.lease();
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("a runtime for the case");
                    runtime.block_on(super::$case(lease.backend()));
                    drop(runtime);
                    lease.give_back();
                }
            )*
        }
        $crate::support::stores::for_each_store!(@each [$($more: $more_kind),*] ($($case),*));
    };
}

pub(crate) use for_each_store;
