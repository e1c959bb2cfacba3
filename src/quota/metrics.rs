//! The quotas' series: every bucket check, by the kind of bucket, its
//! result and what decided it
//! (`gormic_gateway_quota_checks_total{bucket,result,decided_by}`).
//! Refused calls are also counted in
//! `gormic_gateway_calls_shed_total{reason="quota"}`. No series names an
//! organization: per organization, refusals show in
//! `gormic_gateway_calls_total{organization}` under
//! `--metrics-organization-label`, and each refusal's log line names it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::table::Kind;
use crate::metrics::{CachedFamily, MetricsArgs, Series};

/// What decided a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// This replica's bucket: the gateway has no shared store.
    Local,
    /// The shared store's bucket.
    Store,
    /// The store failed: `--quota-store-failure` decided (this replica's
    /// bucket with `local`; `allow`; `refuse`).
    StoreFailed,
}

impl DecidedBy {
    const ALL: [Self; 3] = [Self::Local, Self::Store, Self::StoreFailed];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Store => "store",
            Self::StoreFailed => "store_failed",
        }
    }
}

const KINDS: [Kind; 3] = [Kind::Caller, Kind::Organization, Kind::Default];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    bucket: &'static str,
    result: &'static str,
    decided_by: &'static str,
}

/// The quotas' counter; registered with
/// [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct QuotaMetrics {
    /// Cached by kind × result × decider.
    checks: CachedFamily<CheckLabels, Counter>,
}

impl Series for QuotaMetrics {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let checks = CachedFamily::new(KINDS.len() * 2 * DecidedBy::ALL.len());
        registry.register(
            "gormic_gateway_quota_checks",
            "Quota checks (--quotas), by bucket (caller, organization, default), result \
             (allowed, refused) and what decided (local, store, store_failed)",
            checks.family().clone(),
        );
        Self { checks }
    }
}

impl QuotaMetrics {
    /// A bucket of `kind` was checked.
    pub fn checked(&self, kind: Kind, allowed: bool, by: DecidedBy) {
        let slot =
            ((kind as usize) * 2 + usize::from(!allowed)) * DecidedBy::ALL.len() + by as usize;
        self.checks
            .get(slot, || CheckLabels {
                bucket: kind.as_str(),
                result: if allowed { "allowed" } else { "refused" },
                decided_by: by.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::metrics::tests::sample;

    #[test]
    fn checks_are_counted_by_bucket_result_and_decider() {
        let metrics = Metrics::default();
        let quotas = metrics.series::<QuotaMetrics>();
        quotas.checked(Kind::Organization, true, DecidedBy::Local);
        quotas.checked(Kind::Organization, true, DecidedBy::Local);
        quotas.checked(Kind::Default, false, DecidedBy::Store);
        quotas.checked(Kind::Caller, true, DecidedBy::StoreFailed);
        quotas.checked(Kind::Caller, false, DecidedBy::StoreFailed);
        let text = metrics.encode();
        let series = |bucket: &str, result: &str, by: &str| {
            sample(
                &text,
                &format!(
                    r#"gormic_gateway_quota_checks_total{{bucket="{bucket}",result="{result}",decided_by="{by}"}}"#
                ),
            )
        };
        assert_eq!(
            series("organization", "allowed", "local").as_deref(),
            Some("2")
        );
        assert_eq!(series("default", "refused", "store").as_deref(), Some("1"));
        assert_eq!(
            series("caller", "allowed", "store_failed").as_deref(),
            Some("1")
        );
        assert_eq!(
            series("caller", "refused", "store_failed").as_deref(),
            Some("1")
        );
        assert_eq!(series("organization", "refused", "local"), None);
    }
}
