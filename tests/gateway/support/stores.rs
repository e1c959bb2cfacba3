//! The idempotency stores a case runs against: one [`StoreKind`] per kind
//! of store (memory, a real redis-server, a Sentinel deployment, a Redis
//! Cluster), and [`for_each_store!`], which
//! makes each shared case one test per kind. The store suites
//! (`idempotency`, `idempotency_store`) use it, so that a new kind runs
//! every shared case by adding it here, not by copying the suites.

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
    /// deployment for Sentinel and Cluster). The Redis processes are
    /// started synchronously: call it where blocking is allowed (the macro
    /// below does, in `block_in_place`).
    pub fn start(self) -> Backend {
        match self {
            StoreKind::Memory => Backend::Memory,
            StoreKind::Redis => Backend::Redis(RedisServer::start()),
            StoreKind::Sentinel => Backend::Sentinel(RedisSentinel::start()),
            StoreKind::Cluster => Backend::Cluster(RedisCluster::start()),
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
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = tokio::task::block_in_place(|| {
                        $crate::support::stores::StoreKind::$kind.start()
                    });
                    super::$case(&backend).await;
                }
            )*
        }
        $crate::support::stores::for_each_store!(@each [$($more: $more_kind),*] ($($case),*));
    };
}

pub(crate) use for_each_store;
