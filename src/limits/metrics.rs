//! The limits' series: the calls shed before reaching the upstream, by
//! reason (`gormic_gateway_calls_shed_total{reason}`), and the admission
//! cap's count, read at scrape time as `gormic_gateway_calls_in_flight`
//! (through [`InFlightGauge`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::InFlightLimit;
use crate::metrics::{CachedFamily, InFlightGauge, MetricsArgs, Series};

/// Why a call was refused before it reached the upstream
/// (`gormic_gateway_calls_shed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// `--max-in-flight` calls were already in flight (`OVERLOADED`).
    InFlightLimit,
    /// The queue of calls waiting for an upstream connection was full
    /// (`UPSTREAM_QUEUE_FULL`).
    UpstreamQueueFull,
    /// The upstream rate-limited the call's credential and its cooldown
    /// runs (`UPSTREAM_RATE_LIMITED`).
    UpstreamRateLimited,
    /// A quota of `--quotas` had no call left (`QUOTA_EXCEEDED`).
    Quota,
}

impl ShedReason {
    const ALL: [Self; 4] = [
        Self::InFlightLimit,
        Self::UpstreamQueueFull,
        Self::UpstreamRateLimited,
        Self::Quota,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InFlightLimit => "in_flight_limit",
            Self::UpstreamQueueFull => "upstream_queue_full",
            Self::UpstreamRateLimited => "upstream_rate_limited",
            Self::Quota => "quota",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The shed calls' counter; registered with
/// [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct ShedMetrics {
    /// Cached by [`ShedReason`].
    shed: CachedFamily<ReasonLabels, Counter>,
}

impl Series for ShedMetrics {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let shed = CachedFamily::new(ShedReason::ALL.len());
        registry.register(
            "gormic_gateway_calls_shed",
            "gRPC calls refused with RESOURCE_EXHAUSTED before reaching the upstream, by reason \
             (in_flight_limit: refused at admission, counted nowhere else; \
             upstream_rate_limited: the credential's cooldown runs)",
            shed.family().clone(),
        );
        Self { shed }
    }
}

impl ShedMetrics {
    /// A call was refused before reaching the upstream. A call refused at
    /// admission (`in_flight_limit`) is counted here only; one refused for a
    /// full connection queue is also counted by `call_end::CallMetrics`.
    pub fn call_shed(&self, reason: ShedReason) {
        self.shed
            .get(reason as usize, || ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }
}

impl InFlightGauge for InFlightLimit {
    fn in_flight(&self) -> u64 {
        InFlightLimit::in_flight(self) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::metrics::tests::sample;

    #[test]
    fn in_flight_is_the_admission_count() {
        let metrics = Metrics::default();
        let gauge = "gormic_gateway_calls_in_flight";
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("0"));
        let limit = InFlightLimit::new(10);
        metrics.count_in_flight(&limit);
        let first = limit.try_admit().expect("room");
        let second = limit.try_admit().expect("room");
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("2"));
        drop(first);
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("1"));
        drop(second);
        assert_eq!(sample(&metrics.encode(), gauge).as_deref(), Some("0"));
    }

    #[test]
    fn shed_calls_by_reason() {
        let metrics = Metrics::default();
        let shed = metrics.series::<ShedMetrics>();
        shed.call_shed(ShedReason::InFlightLimit);
        shed.call_shed(ShedReason::InFlightLimit);
        shed.call_shed(ShedReason::UpstreamQueueFull);
        shed.call_shed(ShedReason::UpstreamRateLimited);
        shed.call_shed(ShedReason::Quota);
        let text = metrics.encode();
        let series = |reason: &str| {
            sample(
                &text,
                &format!(r#"gormic_gateway_calls_shed_total{{reason="{reason}"}}"#),
            )
        };
        assert_eq!(series("in_flight_limit").as_deref(), Some("2"));
        assert_eq!(series("upstream_queue_full").as_deref(), Some("1"));
        assert_eq!(series("upstream_rate_limited").as_deref(), Some("1"));
        assert_eq!(series("quota").as_deref(), Some("1"));
    }
}
