//! The cooldowns' series, read from the table at scrape time (nothing is
//! recorded on the call path):
//!
//! - `gormic_gateway_upstream_cooldowns_active`: credentials cooling down
//!   now;
//! - `gormic_gateway_upstream_cooldowns_opened_total{source}`: cooldowns
//!   opened, by an answer to this replica (`local`) or by another replica's
//!   message (`replica`); a cooldown lengthened is not a new one;
//! - `gormic_gateway_upstream_cooldown_messages_total{event}`: the store
//!   channel: `published`, `publish_failed`, `received` (from another
//!   replica), `malformed`, `gap` (subscribed, at start and after each
//!   interruption: what was published before is not known).
//!
//! The refusals are `gormic_gateway_calls_shed_total{reason="upstream_rate_limited"}`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;

use super::Cooldowns;
use crate::metrics::{MetricsArgs, Series, Watched, encode_gauge};

/// The cooldowns' series in one registry; [`CooldownSeries::watch`] tells
/// them which table to read.
pub(in crate::upstream) struct CooldownSeries {
    watched: Watched<Weak<Cooldowns>>,
}

impl Series for CooldownSeries {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let watched = Watched::default();
        registry.register_collector(Box::new(CooldownCollector {
            watched: watched.clone(),
        }));
        Self { watched }
    }
}

impl CooldownSeries {
    /// The series read `cooldowns` (the last one watched).
    pub(in crate::upstream) fn watch(&self, cooldowns: &Arc<Cooldowns>) {
        self.watched.set(Arc::downgrade(cooldowns));
    }
}

#[derive(Debug)]
struct CooldownCollector {
    watched: Watched<Weak<Cooldowns>>,
}

impl Collector for CooldownCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(cooldowns) = self.watched.with(Weak::upgrade).flatten() else {
            return Ok(());
        };
        encode_gauge(
            &mut encoder,
            "gormic_gateway_upstream_cooldowns_active",
            "Credentials the upstream rate-limited (a 429, or a 503 with Retry-After) whose \
             cooldown runs now: their calls are refused unsent.",
            u64::try_from(cooldowns.active()).unwrap_or(u64::MAX),
        )?;

        let counts = &cooldowns.counts;
        let mut family = encoder.encode_descriptor(
            "gormic_gateway_upstream_cooldowns_opened",
            "Cooldowns opened, by an upstream answer to this replica (local) or by another \
             replica's message (replica).",
            None,
            MetricType::Counter,
        )?;
        for (source, count) in [
            ("local", &counts.opened_here),
            ("replica", &counts.opened_by_replica),
        ] {
            ConstCounter::new(count.load(Relaxed))
                .encode(family.encode_family(&[("source", source)])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "gormic_gateway_upstream_cooldown_messages",
            "Cooldown messages between replicas through the shared store, by event.",
            None,
            MetricType::Counter,
        )?;
        for (event, count) in [
            ("published", &counts.published),
            ("publish_failed", &counts.publish_failed),
            ("received", &counts.received),
            ("malformed", &counts.malformed),
            ("gap", &counts.gaps),
        ] {
            ConstCounter::new(count.load(Relaxed))
                .encode(family.encode_family(&[("event", event)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;
    use crate::metrics::tests::sample;

    #[test]
    fn the_series_read_the_watched_table_at_scrape_time() {
        let metrics = Metrics::default();
        let series = metrics.series::<CooldownSeries>();
        assert_eq!(
            sample(
                &metrics.encode(),
                "gormic_gateway_upstream_cooldowns_active"
            ),
            None,
            "nothing to read before a table is watched"
        );
        let cooldowns = Cooldowns::new(Duration::from_secs(60));
        series.watch(&cooldowns);
        // Registered once however often a component asks for them.
        metrics.series::<CooldownSeries>().watch(&cooldowns);
        let text = metrics.encode();
        assert_eq!(
            text.matches("# TYPE gormic_gateway_upstream_cooldowns_active")
                .count(),
            1
        );
        assert_eq!(
            sample(&text, "gormic_gateway_upstream_cooldowns_active").as_deref(),
            Some("0")
        );
        cooldowns.heard(super::super::CredentialId([1; 16]), Duration::from_secs(30));
        cooldowns.counts.gaps.fetch_add(1, Relaxed);
        let text = metrics.encode();
        let value = |series: &str| sample(&text, series);
        assert_eq!(
            value("gormic_gateway_upstream_cooldowns_active").as_deref(),
            Some("1")
        );
        assert_eq!(
            value(r#"gormic_gateway_upstream_cooldowns_opened_total{source="replica"}"#).as_deref(),
            Some("1")
        );
        assert_eq!(
            value(r#"gormic_gateway_upstream_cooldowns_opened_total{source="local"}"#).as_deref(),
            Some("0")
        );
        assert_eq!(
            value(r#"gormic_gateway_upstream_cooldown_messages_total{event="gap"}"#).as_deref(),
            Some("1")
        );
    }
}
