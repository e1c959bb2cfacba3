//! Idempotency's series: what the store did with each call that carried a
//! key (`gormic_gateway_idempotency_requests_total{result}`); `step::metric`
//! says which result a call's start counts as.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::metrics::{CachedFamily, MetricsArgs, Series};

/// What the idempotency layer did with a call
/// (`gormic_gateway_idempotency_requests_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotencyResult {
    /// First use of the key: the call went to the upstream.
    New,
    /// A stored outcome was returned.
    Replayed,
    /// The key's first call is still running (`IDEMPOTENCY_KEY_IN_PROGRESS`).
    InProgress,
    /// The key came with a different request (`IDEMPOTENCY_KEY_REUSED`).
    Reused,
    /// The key's first call ended without a known outcome
    /// (`IDEMPOTENCY_OUTCOME_UNKNOWN`).
    OutcomeUnknown,
    /// The store failed or was full.
    StoreError,
}

impl IdempotencyResult {
    const ALL: [Self; 6] = [
        Self::New,
        Self::Replayed,
        Self::InProgress,
        Self::Reused,
        Self::OutcomeUnknown,
        Self::StoreError,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Replayed => "replayed",
            Self::InProgress => "in_progress",
            Self::Reused => "reused",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::StoreError => "store_error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Idempotency's counter; registered with
/// [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct IdempotencyMetrics {
    /// Cached by [`IdempotencyResult`].
    results: CachedFamily<ResultLabels, Counter>,
}

impl Series for IdempotencyMetrics {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let results = CachedFamily::new(IdempotencyResult::ALL.len());
        registry.register(
            "gormic_gateway_idempotency_requests",
            "Calls with an idempotency key, by what the idempotency store did",
            results.family().clone(),
        );
        Self { results }
    }
}

impl IdempotencyMetrics {
    /// A call with a key came to `result`.
    pub fn idempotency(&self, result: IdempotencyResult) {
        self.results
            .get(result as usize, || ResultLabels {
                result: result.as_str(),
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
    fn results_are_counted_by_their_label() {
        let metrics = Metrics::default();
        let idempotency = metrics.series::<IdempotencyMetrics>();
        for result in IdempotencyResult::ALL {
            idempotency.idempotency(result);
        }
        idempotency.idempotency(IdempotencyResult::Replayed);
        let text = metrics.encode();
        for (result, count) in [
            ("new", "1"),
            ("replayed", "2"),
            ("in_progress", "1"),
            ("reused", "1"),
            ("outcome_unknown", "1"),
            ("store_error", "1"),
        ] {
            let series =
                format!(r#"gormic_gateway_idempotency_requests_total{{result="{result}"}}"#);
            assert_eq!(sample(&text, &series).as_deref(), Some(count), "{series}");
        }
    }
}
