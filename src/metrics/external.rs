//! Series whose values live elsewhere, read at scrape time: the upstream
//! connection cap (owned by the upstream client, read through
//! [`ConnectionGauges`]), the calls in flight (the admission cap's count,
//! read through [`InFlightGauge`]), the TLS certificate expiry (set by
//! whoever loads the certificate) and the log lines dropped (counted by the
//! log writer). Their owners implement the traits; nothing here knows them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use super::{Watched, encode_counter, encode_gauge};

/// The upstream client's connection cap, read on each scrape. Implemented
/// by the upstream client; every method must be cheap and must not block (an
/// atomic load), since a scrape reads them all.
pub trait ConnectionGauges: Send + Sync + 'static {
    /// Requests holding a slot: connecting, in flight or being read.
    fn active(&self) -> u64;
    /// Calls waiting for a slot.
    fn pending(&self) -> u64;
    /// `--upstream-max-connections`: the most requests at once.
    fn limit(&self) -> u64;
    /// Connections opened since start (a counter: never decreases).
    fn opened_total(&self) -> u64;
}

/// The admission cap's count, read on each scrape. Implemented by the cap;
/// it must be cheap and must not block (an atomic load).
pub trait InFlightGauge: Send + Sync + 'static {
    /// Calls admitted and not yet finished.
    fn in_flight(&self) -> u64;
}

/// Sums every registered client: the series describe the process.
#[derive(Clone, Default)]
pub(super) struct ConnectionCollector {
    clients: Arc<Mutex<Vec<Arc<dyn ConnectionGauges>>>>,
}

impl std::fmt::Debug for ConnectionCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("ConnectionCollector")
            .field("clients", &clients.len())
            .finish()
    }
}

impl ConnectionCollector {
    pub fn register(&self, gauges: Arc<dyn ConnectionGauges>) {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(gauges);
    }
}

#[derive(Default)]
struct Totals {
    active: u64,
    pending: u64,
    limit: u64,
    opened: u64,
}

impl Collector for ConnectionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = {
            let clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
            if clients.is_empty() {
                // No upstream client registered (yet): no series rather than
                // zeros that would read as "nothing in flight".
                return Ok(());
            }
            clients.iter().fold(Totals::default(), |t, c| Totals {
                active: t.active.saturating_add(c.active()),
                pending: t.pending.saturating_add(c.pending()),
                limit: t.limit.saturating_add(c.limit()),
                opened: t.opened.saturating_add(c.opened_total()),
            })
        };
        for (name, help, value) in [
            (
                "gormic_gateway_upstream_requests_active",
                "Upstream requests holding a slot of --upstream-max-connections: connecting, \
                 in flight or being read.",
                totals.active,
            ),
            (
                "gormic_gateway_upstream_requests_limit",
                "Most upstream requests at once (--upstream-max-connections); with HTTP/1.1 \
                 also the most connections busy.",
                totals.limit,
            ),
            (
                "gormic_gateway_upstream_pending_requests",
                "Calls waiting for a slot of --upstream-max-connections.",
                totals.pending,
            ),
        ] {
            encode_gauge(&mut encoder, name, help, value)?;
        }
        encode_counter(
            &mut encoder,
            "gormic_gateway_upstream_connections_opened",
            "Connections opened to the upstream since start.",
            totals.opened,
        )
    }
}

/// `gormic_gateway_calls_in_flight`: the admission cap's count, read at
/// scrape time (0 until a cap is set).
#[derive(Debug, Clone, Default)]
pub(super) struct InFlightCollector {
    limit: Watched<Arc<dyn InFlightGauge>>,
}

impl InFlightCollector {
    pub fn set(&self, limit: Arc<dyn InFlightGauge>) {
        self.limit.set(limit);
    }
}

impl Collector for InFlightCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let in_flight = self.limit.with(|limit| limit.in_flight()).unwrap_or(0);
        encode_gauge(
            &mut encoder,
            "gormic_gateway_calls_in_flight",
            "gRPC calls admitted and not yet finished (their idempotency record included); \
             at most --max-in-flight",
            in_flight,
        )
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
        encode_counter(
            &mut encoder,
            "gormic_gateway_log_lines_dropped",
            "Log lines dropped because the log writer could not keep up.",
            total,
        )
    }
}
