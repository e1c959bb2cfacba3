//! The limits' series: the calls shed before reaching the upstream, by
//! reason (`gormic_gateway_calls_shed_total{reason}`), the admission
//! cap's count, read at scrape time as `gormic_gateway_calls_in_flight`
//! (through [`InFlightGauge`]), and the tenants' gauges, read at scrape
//! time too ([`TenantMetrics`]).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::InFlightLimit;
use crate::metrics::{CachedFamily, InFlightGauge, MetricsArgs, Series, Watched, encode_gauge};
use crate::tenant::{TenantId, Tenants};

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
    /// The gateway was contended and the call's tenant held its share
    /// (`TENANT_OVER_SHARE`).
    FairShare,
    /// A quota of `--quotas` had no call left (`QUOTA_EXCEEDED`).
    Quota,
}

impl ShedReason {
    const ALL: [Self; 5] = [
        Self::InFlightLimit,
        Self::UpstreamQueueFull,
        Self::UpstreamRateLimited,
        Self::FairShare,
        Self::Quota,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InFlightLimit => "in_flight_limit",
            Self::UpstreamQueueFull => "upstream_queue_full",
            Self::UpstreamRateLimited => "upstream_rate_limited",
            Self::FairShare => "fair_share",
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

/// The tenants' gauges, read at scrape time from the admission cap and
/// the tenants a gateway uses ([`TenantMetrics::watch`]); registered with
/// [`Metrics::series`](crate::metrics::Metrics::series). Their help texts
/// say "tenant": the word "organization" appears in the exposition only as
/// the opt-in label (a test holds it to that).
#[derive(Debug)]
pub struct TenantMetrics {
    watched: Watched<Admission>,
}

#[derive(Debug)]
struct Admission {
    limit: InFlightLimit,
    tenants: Tenants,
}

impl Series for TenantMetrics {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let watched = Watched::default();
        registry.register_collector(Box::new(TenantCollector {
            watched: watched.clone(),
        }));
        Self { watched }
    }
}

impl TenantMetrics {
    /// The gauges read `limit`'s tenants and `tenants`' trusted set; the
    /// last pair set is used.
    pub fn watch(&self, limit: &InFlightLimit, tenants: &Tenants) {
        self.watched.set(Admission {
            limit: limit.clone(),
            tenants: tenants.clone(),
        });
    }
}

#[derive(Debug)]
struct TenantCollector {
    watched: Watched<Admission>,
}

impl Collector for TenantCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(values) = self.watched.with(|Admission { limit, tenants }| {
            [
                (
                    "gormic_gateway_tenants_in_flight",
                    "Tenants with calls in flight, among which --max-in-flight is shared when \
                     contended; the unverified ones count as one",
                    limit.tenants_in_flight(),
                ),
                (
                    "gormic_gateway_unverified_calls_in_flight",
                    "Calls in flight of the one tenant shared by all those Gormic has not \
                     accepted a call for yet (with --tenant-key caller: by the calls without a \
                     caller identity)",
                    limit.tenant_in_flight(TenantId::UNVERIFIED),
                ),
                (
                    "gormic_gateway_tenants_trusted",
                    "Tenants Gormic accepted a call for within the last hour, each counted on \
                     its own (at most 10000; 0 with --credentials or --tenant-key caller, where \
                     every tenant is trusted)",
                    tenants.trusted(),
                ),
            ]
        }) else {
            return Ok(());
        };
        for (name, help, value) in values {
            encode_gauge(
                &mut encoder,
                name,
                help,
                u64::try_from(value).unwrap_or(u64::MAX),
            )?;
        }
        Ok(())
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
        assert_eq!(series("fair_share"), None, "appears with its first call");
        shed.call_shed(ShedReason::FairShare);
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_calls_shed_total{reason="fair_share"}"#
            )
            .as_deref(),
            Some("1")
        );
    }

    #[test]
    fn the_tenant_gauges_read_the_cap_and_the_trusted_set() {
        use crate::tenant::TenantKey;
        let metrics = Metrics::default();
        let gauges = metrics.series::<TenantMetrics>();
        assert_eq!(
            sample(&metrics.encode(), "gormic_gateway_tenants_in_flight"),
            None,
            "nothing watched yet"
        );
        let limit = InFlightLimit::new(100);
        let tenants = Tenants::new(TenantKey::Organization);
        gauges.watch(&limit, &tenants);
        let value = |name: &str| sample(&metrics.encode(), name);
        assert_eq!(
            value("gormic_gateway_tenants_in_flight").as_deref(),
            Some("0")
        );
        let _admitted = limit.try_admit().expect("room");
        let one = limit.fair_share(TenantId::UNVERIFIED).expect("share");
        let two = limit.fair_share(TenantId::UNVERIFIED).expect("share");
        assert_eq!(
            value("gormic_gateway_tenants_in_flight").as_deref(),
            Some("1")
        );
        assert_eq!(
            value("gormic_gateway_unverified_calls_in_flight").as_deref(),
            Some("2")
        );
        assert_eq!(
            value("gormic_gateway_tenants_trusted").as_deref(),
            Some("0")
        );
        let credentials = crate::credentials::Credentials {
            api_key: http::HeaderValue::from_static("k"),
            organization_id: http::HeaderValue::from_static("org-1"),
        };
        tenants.answered(&tenants.identify(&credentials, None, false), 200);
        assert_eq!(
            value("gormic_gateway_tenants_trusted").as_deref(),
            Some("1")
        );
        drop((one, two));
        assert_eq!(
            value("gormic_gateway_tenants_in_flight").as_deref(),
            Some("0")
        );
        assert_eq!(
            value("gormic_gateway_unverified_calls_in_flight").as_deref(),
            Some("0")
        );
    }
}
