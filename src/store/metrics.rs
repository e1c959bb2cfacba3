//! The shared store's series, read from its state at scrape time (nothing
//! is recorded on the call path but a `WAIT` shortfall):
//!
//! - `gormic_gateway_store_state{state}`: 1 for the state it is in:
//!   `connecting`, `up` (a primary is connected) or `down` (no usable
//!   primary: calls with an idempotency key fail);
//! - `gormic_gateway_store_primary_info{topology, address}`: 1 per primary
//!   in use (`host:port`, never credentials);
//! - `gormic_gateway_store_failovers_total`: failovers followed (a new
//!   primary after a demotion, a Sentinel announcement, or a cluster shard's
//!   new primary);
//! - `gormic_gateway_store_reconnects_total`: connections made again after
//!   the first (failovers included);
//! - `gormic_gateway_store_replicas_required`: replicas a durable write
//!   waits for now (`--idempotency-store-replicas`, `auto` resolved);
//! - `gormic_gateway_store_wait_shortfalls_total{script}`: writes that fewer
//!   replicas acknowledged in time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::Store;
use super::link::{Shared, State};
use crate::metrics::{MetricsArgs, Series, Watched, encode_counter, encode_gauge};

/// The store's series in one registry; [`StoreSeries::watch`] tells them
/// which store to read. Registered with
/// [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct StoreSeries {
    watched: Watched<Arc<Shared>>,
}

impl Series for StoreSeries {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let watched = Watched::default();
        registry.register_collector(Box::new(WatchedStore {
            watched: watched.clone(),
        }));
        Self { watched }
    }
}

impl StoreSeries {
    /// The series read `store` (the last one watched); until then there
    /// are none.
    pub fn watch(&self, store: &Store) {
        self.watched.set(store.inner.shared.clone());
    }
}

#[derive(Debug)]
struct WatchedStore {
    watched: Watched<Arc<Shared>>,
}

impl Collector for WatchedStore {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self.watched.with(Arc::clone) {
            Some(shared) => encode(&shared, encoder),
            None => Ok(()),
        }
    }
}

fn encode(shared: &Shared, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let current = match &**shared.state() {
        State::Connecting => "connecting",
        State::Up(_) => "up",
        State::Down { .. } => "down",
    };
    let mut family = encoder.encode_descriptor(
        "gormic_gateway_store_state",
        "State of the shared store (--idempotency-store): 1 for the state it is in.",
        None,
        MetricType::Gauge,
    )?;
    for state in ["connecting", "up", "down"] {
        let gauge = ConstGauge::new(i64::from(state == current));
        gauge.encode(family.encode_family(&[("state", state)])?)?;
    }

    let mut family = encoder.encode_descriptor(
        "gormic_gateway_store_primary_info",
        "The shared store's primary in use (each primary, in a cluster); the value is always 1.",
        None,
        MetricType::Gauge,
    )?;
    for address in shared.primaries() {
        let gauge = ConstGauge::new(1_i64);
        gauge.encode(
            family
                .encode_family(&[("topology", shared.topology), ("address", address.as_str())])?,
        )?;
    }

    for (name, help, value) in [
        (
            "gormic_gateway_store_failovers",
            "Failovers of the shared store followed: a new primary after a demotion, a \
             Sentinel announcement, or a cluster shard's new primary.",
            shared.failovers.load(Relaxed),
        ),
        (
            "gormic_gateway_store_reconnects",
            "Connections to the shared store made again after the first (failovers included).",
            shared.reconnects.load(Relaxed),
        ),
    ] {
        encode_counter(&mut encoder, name, help, value)?;
    }

    encode_gauge(
        &mut encoder,
        "gormic_gateway_store_replicas_required",
        "Replicas a lease or an outcome record waits for now (--idempotency-store-replicas, \
         auto resolved).",
        u64::from(shared.required_replicas()),
    )?;

    let shortfalls: Vec<(&'static str, u64)> = shared
        .shortfalls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(script, n)| (*script, *n))
        .collect();
    let mut family = encoder.encode_descriptor(
        "gormic_gateway_store_wait_shortfalls",
        "Writes to the shared store that fewer replicas than required acknowledged in time \
         (a lease: the call failed UNAVAILABLE, unsent).",
        None,
        MetricType::Counter,
    )?;
    for (script, n) in shortfalls {
        let counter = ConstCounter::new(n);
        counter.encode(family.encode_family(&[("script", script)])?)?;
    }
    Ok(())
}
