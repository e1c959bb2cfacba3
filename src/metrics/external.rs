//! Series whose values live elsewhere, read at scrape time: the upstream
//! connection pools (owned by the upstream client), the TLS certificate
//! expiry (set by whoever loads the certificate) and the log lines dropped
//! (counted by the log writer).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// A connection pool's state, read on each scrape. Implemented by the
/// upstream client; every method must be cheap and must not block (an
/// atomic load), since a scrape reads them all.
pub trait PoolGauges: Send + Sync + 'static {
    /// Open connections with no request in flight.
    fn idle(&self) -> u64;
    /// Open connections carrying a request.
    fn busy(&self) -> u64;
    /// Requests waiting for a connection.
    fn pending(&self) -> u64;
    /// Most connections the pool may open.
    fn limit(&self) -> u64;
    /// Connections opened since start (a counter: never decreases).
    fn opened_total(&self) -> u64;
}

/// Sums every registered pool: the series describe the process, not one
/// worker.
#[derive(Clone, Default)]
pub(super) struct PoolCollector {
    pools: Arc<Mutex<Vec<Arc<dyn PoolGauges>>>>,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("PoolCollector")
            .field("pools", &pools.len())
            .finish()
    }
}

impl PoolCollector {
    pub fn register(&self, pool: Arc<dyn PoolGauges>) {
        self.pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pool);
    }
}

#[derive(Default)]
struct Totals {
    idle: u64,
    busy: u64,
    pending: u64,
    limit: u64,
    opened: u64,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = {
            let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
            if pools.is_empty() {
                // No upstream client registered (yet): no series rather than zeros
                // that would read as "no connections".
                return Ok(());
            }
            pools.iter().fold(Totals::default(), |t, p| Totals {
                idle: t.idle.saturating_add(p.idle()),
                busy: t.busy.saturating_add(p.busy()),
                pending: t.pending.saturating_add(p.pending()),
                limit: t.limit.saturating_add(p.limit()),
                opened: t.opened.saturating_add(p.opened_total()),
            })
        };
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));

        let mut family = encoder.encode_descriptor(
            "gormic_gateway_upstream_connections",
            "Open connections to the upstream by state, summed over the worker pools.",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [("idle", totals.idle), ("busy", totals.busy)] {
            gauge(value).encode(family.encode_family(&[("state", state)])?)?;
        }
        let limit = gauge(totals.limit);
        limit.encode(encoder.encode_descriptor(
            "gormic_gateway_upstream_connections_limit",
            "Most connections the upstream pools may open, summed over the worker pools.",
            None,
            limit.metric_type(),
        )?)?;
        let pending = gauge(totals.pending);
        pending.encode(encoder.encode_descriptor(
            "gormic_gateway_upstream_pending_requests",
            "Upstream requests waiting for a connection.",
            None,
            pending.metric_type(),
        )?)?;
        let opened = ConstCounter::new(totals.opened);
        opened.encode(encoder.encode_descriptor(
            "gormic_gateway_upstream_connections_opened",
            "Connections opened to the upstream since start.",
            None,
            opened.metric_type(),
        )?)?;
        Ok(())
    }
}

/// `gormic_gateway_tls_certificate_expiry_timestamp_seconds`, present only
/// once a certificate was loaded: a zero would read as "expired" to an
/// alert on `expiry - time()`.
#[derive(Debug, Clone)]
pub(super) struct ExpiryCollector {
    seconds: Arc<AtomicI64>,
}

const UNSET: i64 = i64::MIN;

impl Default for ExpiryCollector {
    fn default() -> Self {
        Self {
            seconds: Arc::new(AtomicI64::new(UNSET)),
        }
    }
}

impl ExpiryCollector {
    pub fn set(&self, unix_seconds: i64) {
        self.seconds.store(unix_seconds, Ordering::Relaxed);
    }
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let seconds = self.seconds.load(Ordering::Relaxed);
        if seconds == UNSET {
            return Ok(());
        }
        let gauge = ConstGauge::new(seconds);
        gauge.encode(encoder.encode_descriptor(
            "gormic_gateway_tls_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of the serving TLS certificate, in seconds since the Unix epoch.",
            None,
            gauge.metric_type(),
        )?)
    }
}

/// `gormic_gateway_log_lines_dropped_total`: lines reported one batch at a
/// time, plus the running total of a registered source.
#[derive(Debug, Clone, Default)]
pub(super) struct DroppedLinesCollector {
    reported: Arc<AtomicU64>,
    source: Arc<OnceLock<fn() -> u64>>,
}

impl DroppedLinesCollector {
    pub fn add(&self, n: u64) {
        self.reported.fetch_add(n, Ordering::Relaxed);
    }

    /// `false` when a source was already set (the first one stays).
    pub fn set_source(&self, source: fn() -> u64) -> bool {
        self.source.set(source).is_ok()
    }
}

impl Collector for DroppedLinesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let total = self
            .reported
            .load(Ordering::Relaxed)
            .saturating_add(self.source.get().map_or(0, |source| source()));
        let counter = ConstCounter::new(total);
        counter.encode(encoder.encode_descriptor(
            "gormic_gateway_log_lines_dropped",
            "Log lines dropped because the log writer could not keep up.",
            None,
            counter.metric_type(),
        )?)
    }
}
