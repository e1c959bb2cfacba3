//! The gateway's Prometheus registry and its text exposition, served on the
//! admin listener's `/metrics` (encoded by `prometheus-client`).
//!
//! Each component declares its own series beside its code: its label
//! values, its families with their caches, and its recording methods
//! (`call_end`, `upstream`, `limits`, `idempotency`, `reload`). It
//! registers them here as a [`Series`], once per [`Metrics`], when it is
//! wired to one ([`Metrics::series`]), and records through the handle it
//! got back. This module keeps what they share: the registry and the
//! exposition, the latency histogram (and one per RPC, [`RpcLatency`]), the
//! cached families, what series read at scrape time use ([`Watched`],
//! [`encode_gauge`], [`encode_counter`]), the series read through traits
//! their owners implement, `process_*` and the build info. It imports
//! nothing of the gateway.
//!
//! Recording is lock-free and allocation-free on the call path: every label
//! set is bounded (the RPCs of the route table, 17 gRPC codes, HTTP
//! statuses, a few error types), and the child of a label set is resolved
//! once, then cached ([`CachedFamily`]). Only the opt-in organization label
//! takes a read lock per call. No label ever carries an api-key, an invoice
//! id or another value chosen by the caller, except the organization id
//! behind `--metrics-organization-label`.

mod cached;
mod encode;
mod external;
mod histogram;
mod process;
#[cfg(test)]
pub(crate) mod tests;
mod watched;

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::ArgAction;
use clap::builder::BoolishValueParser;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub use cached::CachedFamily;
pub use encode::{encode_counter, encode_gauge};
pub use external::{ConnectionGauges, InFlightGauge};
pub use histogram::{LATENCY_BUCKETS, LatencyHistogram, RpcLatency};
pub use watched::Watched;

/// `Content-Type` of [`Metrics::encode`]'s output: the Prometheus text
/// format 0.0.4, which every Prometheus-compatible scraper and `promtool`
/// read.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The git commit the binary was built from: CI and the Dockerfile set
/// `GORMIC_GIT_COMMIT` in the build environment (`option_env!` is read by
/// the compiler, and cargo rebuilds when it changes); `unknown` otherwise.
pub const GIT_COMMIT: &str = match option_env!("GORMIC_GIT_COMMIT") {
    Some(commit) if !commit.is_empty() => commit,
    _ => "unknown",
};

/// Metrics flags, flattened into the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Add an `organization` label (the caller's organization-id) to
    /// gormic_gateway_calls_total. Off by default because it is a
    /// cardinality risk: each organization adds up to 85 series, so at most
    /// 1000 organizations are tracked and the rest are counted as `_other`.
    #[arg(
        long,
        env = "GORMIC_METRICS_ORGANIZATION_LABEL",
        action = ArgAction::SetTrue,
        value_parser = BoolishValueParser::new()
    )]
    pub metrics_organization_label: bool,
}

/// A component's series: its families, registered in a [`Metrics`]'s
/// registry the first time the component asks for them
/// ([`Metrics::series`]), and the methods that record into them.
pub trait Series: Send + Sync + 'static {
    /// Registers the series' families in `registry`; `args` are the
    /// metrics flags.
    fn register(registry: &mut Registry, args: &MetricsArgs) -> Self;
}

/// The handle the gateway's series are registered in and exposed from.
/// Cheap to clone (one `Arc`); every clone shares the same registry and
/// series.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    args: MetricsArgs,
    /// Locked to register a component's series and to encode, never to
    /// record.
    state: Mutex<State>,
    log_lines_dropped: external::DroppedLinesCollector,
    tls_expiry: external::ExpiryCollector,
    connections: external::ConnectionCollector,
    in_flight: external::InFlightCollector,
}

struct State {
    registry: Registry,
    /// The [`Series`] registered so far, one of each type.
    series: Vec<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("args", &self.inner.args)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    /// The command line's defaults (no organization label).
    fn default() -> Self {
        Self::new(&MetricsArgs::default())
    }
}

impl Metrics {
    /// A registry with the build info and the series read at scrape time;
    /// the components add theirs when wired to it.
    pub fn new(args: &MetricsArgs) -> Self {
        let mut registry = Registry::default();

        registry.register(
            "gormic_gateway_build",
            "Build of the running gateway; the value is always 1",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_commit", GIT_COMMIT),
            ]),
        );

        let in_flight = external::InFlightCollector::default();
        registry.register_collector(Box::new(in_flight.clone()));
        let log_lines_dropped = external::DroppedLinesCollector::default();
        registry.register_collector(Box::new(log_lines_dropped.clone()));
        let tls_expiry = external::ExpiryCollector::default();
        registry.register_collector(Box::new(tls_expiry.clone()));
        let connections = external::ConnectionCollector::default();
        registry.register_collector(Box::new(connections.clone()));
        registry.register_collector(Box::new(process::ProcessCollector));

        Self {
            inner: Arc::new(Inner {
                args: args.clone(),
                state: Mutex::new(State {
                    registry,
                    series: Vec::new(),
                }),
                log_lines_dropped,
                tls_expiry,
                connections,
                in_flight,
            }),
        }
    }

    /// The component series `S` of this registry, registered on first use;
    /// every later call returns the same series. Called when a component is
    /// wired, not per call: it takes a lock.
    pub fn series<S: Series>(&self) -> Arc<S> {
        let mut state = self.lock();
        if let Some(series) = state
            .series
            .iter()
            .find_map(|series| Arc::clone(series).downcast::<S>().ok())
        {
            return series;
        }
        let series = Arc::new(S::register(&mut state.registry, &self.inner.args));
        state.series.push(series.clone());
        series
    }

    /// `gormic_gateway_calls_in_flight` reads this admission cap's count:
    /// the calls admitted and not yet finished (their outcome record
    /// included), the one in-flight figure. The last one set is used.
    pub fn count_in_flight<L: InFlightGauge + Clone>(&self, limit: &L) {
        self.inner.in_flight.set(Arc::new(limit.clone()));
    }

    /// `n` more log lines were dropped.
    pub fn log_lines_dropped(&self, n: u64) {
        self.inner.log_lines_dropped.add(n);
    }

    /// Reads the log writer's running total of dropped lines on each scrape
    /// (e.g. `crate::logging::dropped_lines`), added to what
    /// [`Metrics::log_lines_dropped`] reported. Only the first source set
    /// is used; returns `false` for a later one.
    pub fn count_log_lines_dropped_from(&self, source: fn() -> u64) -> bool {
        self.inner.log_lines_dropped.set_source(source)
    }

    /// The serving certificate's `notAfter`. Until the first call the series
    /// is absent.
    pub fn set_tls_certificate_expiry(&self, not_after: SystemTime) {
        let seconds = match not_after.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        };
        self.inner.tls_expiry.set(seconds);
    }

    /// Adds an upstream client's connection cap to the
    /// `gormic_gateway_upstream_*` request and connection series (summed
    /// over all registered, read at scrape time).
    pub fn register_connections(&self, gauges: Arc<dyn ConnectionGauges>) {
        self.inner.connections.register(gauges);
    }

    /// The text exposition of every series, as served on `/metrics` with
    /// [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail, and none of our metrics or
        // collectors returns an error of its own.
        let _ =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.lock().registry);
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A registry is consistent after any panic: a registration is one push.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
