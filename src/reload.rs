//! Picking up files that change under a running gateway. [`Reloads`] is the
//! list of what is re-read (the server's TLS files, with the certificate
//! expiry gauge; the upstream's TLS files; the credentials file; the quotas
//! file), polled by
//! one task every `--reload-interval`, each outcome logged and counted in
//! `gormic_gateway_reloads_total{file,result}`. Whether a file changed since
//! it was last judged is [`change`]'s bookkeeping, which each reloadable
//! thing's `reload()` uses.

pub mod change;

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::{Instant, MissedTickBehavior};

pub use change::Reloaded;

use crate::credentials::CredentialMap;
use crate::metrics::{Metrics, MetricsArgs, Series};
use crate::quota::QuotaTable;
use crate::tls::{ServerTls, UpstreamTls};

/// A reload that did something, as [`watch`] reports it to its caller (for
/// `gormic_gateway_reloads_total{file,result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New content is in use.
    Success,
    /// New content was refused; the previous content stays in use.
    Failure,
}

impl Outcome {
    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    result: &'static str,
}

/// `gormic_gateway_reloads_total{file,result}`; registered with
/// [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct ReloadMetrics {
    reloads: Family<ReloadLabels, Counter>,
}

impl Series for ReloadMetrics {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "gormic_gateway_reloads",
            "Reloads of the certificates, credentials and quotas files, by file and result",
            reloads.clone(),
        );
        Self { reloads }
    }
}

impl ReloadMetrics {
    /// A reload of `file` (a short constant naming the file set: `tls`,
    /// `upstream_tls`, `credentials`, `quotas`) came to `outcome`.
    pub fn reload(&self, file: &'static str, outcome: Outcome) {
        self.reloads
            .get_or_create(&ReloadLabels {
                file,
                result: outcome.as_str(),
            })
            .inc();
    }
}

/// Everything the gateway re-reads while it serves: the files named by its
/// flags that may be rotated under it, each already read and checked once
/// (by `config::Config::load`; `config::Config::reloads` lists them).
/// Clones share the reloadable things.
#[derive(Debug, Clone)]
pub struct Reloads {
    /// `--reload-interval`.
    pub interval: Duration,
    /// `--tls-cert`, `--tls-key` and `--tls-client-ca`; its certificate's
    /// expiry is a gauge.
    pub server_tls: Option<ServerTls>,
    /// `--upstream-ca` and the upstream client pair, when any is set.
    pub upstream_tls: Option<UpstreamTls>,
    /// `--credentials`.
    pub credentials: Option<CredentialMap>,
    /// `--quotas`.
    pub quotas: Option<QuotaTable>,
}

impl Reloads {
    /// Whether there is nothing to re-read.
    pub fn is_empty(&self) -> bool {
        self.server_tls.is_none()
            && self.upstream_tls.is_none()
            && self.credentials.is_none()
            && self.quotas.is_none()
    }

    /// Sets the certificate expiry gauge, then re-reads everything every
    /// `interval`, in this one task, until `shutdown` resolves: each reload
    /// that replaced something or failed is logged (as [`watch`] does) and
    /// counted in `metrics` under its `file` label (`tls`, `upstream_tls`,
    /// `credentials`, `quotas`), and the expiry gauge follows the server certificate
    /// in use. Returns at once when there is nothing to re-read.
    pub async fn run(self, shutdown: impl Future<Output = ()>, metrics: Metrics) {
        // Registered now, whatever is reloaded: the series is exposed from the start.
        let reloads = metrics.series::<ReloadMetrics>();
        if let Some(tls) = &self.server_tls {
            metrics.set_tls_certificate_expiry(tls.not_after());
        }
        if self.is_empty() {
            return;
        }
        every(self.interval, shutdown, || {
            if let Some(tls) = &self.server_tls
                && counted(&reloads, "tls", tls.reload())
            {
                metrics.set_tls_certificate_expiry(tls.not_after());
            }
            if let Some(tls) = &self.upstream_tls {
                counted(&reloads, "upstream_tls", tls.reload());
            }
            if let Some(map) = &self.credentials {
                counted(&reloads, "credentials", map.reload());
            }
            if let Some(table) = &self.quotas {
                counted(&reloads, "quotas", table.reload());
            }
        })
        .await;
    }
}

/// Judges one reload (see [`judge`]) and counts it; whether it did
/// something.
fn counted<E: Display>(
    reloads: &ReloadMetrics,
    file: &'static str,
    result: Result<Reloaded, E>,
) -> bool {
    let Some(outcome) = judge(file, result) else {
        return false;
    };
    reloads.reload(file, outcome);
    true
}

/// Calls `reload` every `interval` until `shutdown` resolves. `what` names
/// the thing in log lines and is handed to `on_outcome` with every reload
/// that replaced something or failed (not for `Unchanged`), so the caller
/// can count them. [`Reloads::run`] does the same for the gateway's list.
///
/// Logs `info` on success and `warn` with the error on failure; the error
/// types of this crate never carry file content. The first check happens
/// one `interval` after the call: the caller has just loaded the files.
/// `reload` runs on this task's thread: it reads and parses a few small
/// local files, well under a millisecond of work each interval.
pub async fn watch<E: Display>(
    interval: Duration,
    shutdown: impl Future<Output = ()>,
    what: &'static str,
    mut reload: impl FnMut() -> Result<Reloaded, E>,
    mut on_outcome: impl FnMut(&'static str, Outcome),
) {
    every(interval, shutdown, || {
        if let Some(outcome) = judge(what, reload()) {
            on_outcome(what, outcome);
        }
    })
    .await;
}

/// Runs `poll` every `interval`, the first time one `interval` from now,
/// until `shutdown` resolves.
async fn every(interval: Duration, shutdown: impl Future<Output = ()>, mut poll: impl FnMut()) {
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    // After a stall (a suspended VM), one check is enough, not a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        poll();
    }
}

/// Logs what a reload of `what` did; `None` when it did nothing.
fn judge<E: Display>(what: &'static str, result: Result<Reloaded, E>) -> Option<Outcome> {
    match result {
        Ok(Reloaded::Unchanged) => None,
        Ok(Reloaded::Replaced) => {
            tracing::info!(file = what, "reloaded {what}: new content in use");
            Some(Outcome::Success)
        }
        Err(error) => {
            tracing::warn!(
                file = what,
                error = %error,
                "reload of {what} refused; the previous content stays in use"
            );
            Some(Outcome::Failure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_are_counted_by_file_and_result() {
        let metrics = crate::metrics::Metrics::default();
        let reloads = metrics.series::<ReloadMetrics>();
        reloads.reload("credentials", Outcome::Success);
        reloads.reload("tls", Outcome::Failure);
        reloads.reload("tls", Outcome::Failure);
        let text = metrics.encode();
        let series = |file: &str, result: &str| {
            crate::metrics::tests::sample(
                &text,
                &format!(r#"gormic_gateway_reloads_total{{file="{file}",result="{result}"}}"#),
            )
        };
        assert_eq!(series("credentials", "success").as_deref(), Some("1"));
        assert_eq!(series("tls", "failure").as_deref(), Some("2"));
        assert_eq!(series("tls", "success"), None);
    }
}
