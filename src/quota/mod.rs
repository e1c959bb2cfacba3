//! Quotas (`--quotas FILE`): calls per second for each organization and
//! each mTLS caller, as GCRA buckets ([`local`] with the `governor` crate,
//! [`shared`] in Redis when the gateway has a Redis store), the file and
//! its format ([`file`]), the buckets in use and their reloads ([`table`]).
//!
//! The step of the call path ([`Quotas::check`]) runs after the
//! credentials, the request's validation and the fair-share admission, and
//! before the idempotency key: a refused call takes no lease, reaches no
//! upstream, and costs one bucket check. A call is checked against its
//! caller's entry, if the file names its caller, then against its
//! organization's entry, else `[default]`; both must pass, and a refusal
//! names the bucket that refused ([`QuotaExceeded`]). A per-RPC override
//! is that RPC's bucket instead of the entry's. A call refused by its
//! caller's bucket takes nothing from its organization's; one refused by
//! its organization's has taken its caller's share.
//!
//! **When the shared store fails** (Redis unreachable or too slow),
//! `--quota-store-failure` decides ([`StoreFailure`]): by default each
//! replica enforces the quota alone with its own buckets (at most N times
//! the quota with N replicas, and no outage caused by the store); `allow`
//! lets calls through unchecked; `refuse` refuses them. The change of state
//! is logged once each way, not per call.

pub mod file;
pub mod local;
mod metrics;
pub mod shared;
pub mod table;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub use file::{Limit, QuotaFileError, Rule, Rules};
pub use metrics::{DecidedBy, QuotaMetrics};
pub use table::{Kind, QuotaTable};

use crate::metrics::Metrics;
use crate::routes::Route;
use crate::store::Store;
use crate::tls::CallerIdentity;
use shared::Decision;
use table::Target;

/// The quota flags, flattened into the command line.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Quotas")]
pub struct QuotaArgs {
    /// TOML file of quotas: calls per second (and a burst) for each
    /// organization (`[organizations."ID"]`, `[default]` for the others)
    /// and each mTLS caller (`[callers."IDENTITY"]`), optionally per RPC
    /// (docs/tenants.md). A call over a quota is refused RESOURCE_EXHAUSTED
    /// (QUOTA_EXCEEDED), unsent. Shared by every replica when
    /// --idempotency-store is Redis. Re-read when it changes
    /// (--reload-interval). Default: none (no quotas).
    #[arg(long, env = "GORMIC_QUOTAS", value_name = "FILE")]
    pub quotas: Option<PathBuf>,

    /// What quotas do while the Redis store cannot be reached: `local`
    /// (each replica enforces every quota alone, so at most N times the
    /// quota with N replicas), `allow` (calls pass unchecked) or `refuse`
    /// (calls are refused). Default `local`: the quota still holds within
    /// a bound, and the store's outage causes none of the gateway's.
    #[arg(
        long,
        env = "GORMIC_QUOTA_STORE_FAILURE",
        value_name = "MODE",
        value_enum,
        default_value_t = StoreFailure::Local
    )]
    pub quota_store_failure: StoreFailure,
}

/// `--quota-store-failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreFailure {
    /// This replica's own buckets decide.
    #[default]
    Local,
    /// Calls pass unchecked.
    Allow,
    /// Calls are refused (QUOTA_EXCEEDED, RetryInfo until the store's next
    /// connection attempt).
    Refuse,
}

impl StoreFailure {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Allow => "allow",
            Self::Refuse => "refuse",
        }
    }
}

/// A call over a quota: refused RESOURCE_EXHAUSTED (`QUOTA_EXCEEDED`),
/// never sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("quota exceeded for {subject}")]
pub struct QuotaExceeded {
    /// `organization:ID` or `caller:IDENTITY`, with `/rpc:NAME` for a
    /// per-RPC bucket (`QuotaFailure.subject`).
    pub subject: String,
    pub kind: Kind,
    pub limit: Limit,
    pub rpc: Option<&'static str>,
    /// When a call would pass (`RetryInfo`).
    pub retry_after: Duration,
    /// Refused because the store could not be asked
    /// (`--quota-store-failure refuse`), not because the bucket was empty.
    pub store_unavailable: bool,
}

impl QuotaExceeded {
    fn new(target: &Target<'_>, retry_after: Duration, store_unavailable: bool) -> Self {
        let mut subject = format!(
            "{}:{}",
            target.kind.subject_kind(),
            String::from_utf8_lossy(target.subject)
        );
        if let Some(rpc) = target.rpc {
            subject.push_str("/rpc:");
            subject.push_str(rpc);
        }
        Self {
            subject,
            kind: target.kind,
            limit: target.limit,
            rpc: target.rpc,
            retry_after,
            store_unavailable,
        }
    }

    /// `QuotaFailure.description`: the limit and where it comes from
    /// (`20 calls per second, burst 40 (--quotas)`).
    pub fn description(&self) -> String {
        let rpc = self.rpc.map(|rpc| format!(" to {rpc}")).unwrap_or_default();
        let source = match self.kind {
            Kind::Default => "[default] of --quotas",
            Kind::Caller | Kind::Organization => "--quotas",
        };
        let limit = self.limit;
        let description = format!(
            "{} calls per second{rpc}, burst {} ({source})",
            limit.calls_per_second, limit.burst
        );
        if self.store_unavailable {
            format!(
                "{description}; not checked: the quota store is unavailable \
                 (--quota-store-failure refuse)"
            )
        } else {
            description
        }
    }
}

/// The quota step; cheap to clone, clones share the buckets and the store.
#[derive(Clone)]
pub struct Quotas {
    inner: Arc<Inner>,
    metrics: Arc<QuotaMetrics>,
}

struct Inner {
    table: QuotaTable,
    /// The shared store, when the gateway has one.
    store: Option<Store>,
    on_store_failure: StoreFailure,
    /// Whether the last store check failed (for one log line per change).
    store_failing: AtomicBool,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("table", &self.inner.table)
            .field("store", &self.inner.store)
            .field("on_store_failure", &self.inner.on_store_failure)
            .finish()
    }
}

impl Quotas {
    /// Quotas on `table`'s buckets, shared through `store` when there is
    /// one, counted in a registry of their own until
    /// [`Self::with_metrics`].
    pub fn new(table: QuotaTable, store: Option<Store>, on_store_failure: StoreFailure) -> Self {
        Self {
            inner: Arc::new(Inner {
                table,
                store,
                on_store_failure,
                store_failing: AtomicBool::new(false),
            }),
            metrics: Metrics::default().series(),
        }
    }

    /// Counts the checks in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = metrics.series();
        self
    }

    /// The step: takes one call from the caller's bucket (if the file
    /// names the caller), then from the organization's (its entry, else
    /// `[default]`), for `route`. A refusal takes nothing more.
    /// `deadline` bounds the store's round trips.
    pub async fn check(
        &self,
        route: &'static Route,
        caller: Option<&CallerIdentity>,
        organization: &[u8],
        deadline: Instant,
    ) -> Result<(), QuotaExceeded> {
        match &self.inner.store {
            None => self.check_local(route, caller, organization),
            // Boxed: the store's futures are large, and only this path
            // needs them.
            Some(store) => {
                Box::pin(self.check_shared(store, route, caller, organization, deadline)).await
            }
        }
    }

    /// Without a store: this replica's buckets, no lock but a shard's for
    /// `[default]`, nothing allocated unless refused.
    fn check_local(
        &self,
        route: &'static Route,
        caller: Option<&CallerIdentity>,
        organization: &[u8],
    ) -> Result<(), QuotaExceeded> {
        let table = &self.inner.table;
        let active = table.active();
        let caller = caller.map(|identity| identity.as_str().as_bytes());
        for target in table.targets(&active, route, caller, organization) {
            self.take_local(&target, DecidedBy::Local)?;
        }
        Ok(())
    }

    async fn check_shared(
        &self,
        store: &Store,
        route: &'static Route,
        caller: Option<&CallerIdentity>,
        organization: &[u8],
        deadline: Instant,
    ) -> Result<(), QuotaExceeded> {
        let table = &self.inner.table;
        let active = table.active_owned();
        let caller = caller.map(|identity| identity.as_str().as_bytes());
        for target in table.targets(&active, route, caller, organization) {
            self.take_shared(store, &target, deadline).await?;
        }
        Ok(())
    }

    fn take_local(&self, target: &Target<'_>, by: DecidedBy) -> Result<(), QuotaExceeded> {
        let taken = target.local.take();
        self.metrics.checked(target.kind, taken.is_ok(), by);
        taken.map_err(|wait| QuotaExceeded::new(target, wait, false))
    }

    async fn take_shared(
        &self,
        store: &Store,
        target: &Target<'_>,
        deadline: Instant,
    ) -> Result<(), QuotaExceeded> {
        match shared::take(store, target, deadline).await {
            Ok(decision) => {
                self.store_answered(store);
                let allowed = decision == Decision::Allowed;
                self.metrics.checked(target.kind, allowed, DecidedBy::Store);
                match decision {
                    Decision::Allowed => Ok(()),
                    Decision::Refused(wait) => Err(QuotaExceeded::new(target, wait, false)),
                }
            }
            Err(failure) => {
                self.store_failed(store, &failure);
                match self.inner.on_store_failure {
                    StoreFailure::Local => self.take_local(target, DecidedBy::StoreFailed),
                    StoreFailure::Allow => {
                        self.metrics
                            .checked(target.kind, true, DecidedBy::StoreFailed);
                        Ok(())
                    }
                    StoreFailure::Refuse => {
                        self.metrics
                            .checked(target.kind, false, DecidedBy::StoreFailed);
                        Err(QuotaExceeded::new(target, store.retry_after(), true))
                    }
                }
            }
        }
    }

    /// Logs the store's recovery, once.
    fn store_answered(&self, store: &Store) {
        let failing = &self.inner.store_failing;
        // A load first: the usual case writes nothing shared.
        if failing.load(Ordering::Relaxed) && failing.swap(false, Ordering::Relaxed) {
            tracing::info!(
                store = store.target(),
                "quota store answering again: quotas are shared by every replica again"
            );
        }
    }

    /// Logs the store's failure, once until it answers again.
    fn store_failed(&self, store: &Store, failure: &crate::store::Failure) {
        let failing = &self.inner.store_failing;
        if !failing.load(Ordering::Relaxed) && !failing.swap(true, Ordering::Relaxed) {
            let mode = self.inner.on_store_failure;
            tracing::warn!(
                store = store.target(),
                error = %failure,
                quota_store_failure = mode.as_str(),
                "quota store unavailable: {}",
                match mode {
                    StoreFailure::Local =>
                        "each replica enforces the quotas alone until it answers again",
                    StoreFailure::Allow => "calls pass unchecked until it answers again",
                    StoreFailure::Refuse => "calls with a quota are refused until it answers again",
                }
            );
        }
    }
}
