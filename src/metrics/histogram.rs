//! A latency histogram with one atomic counter per bucket, so that recording
//! never takes a lock. prometheus-client's own `Histogram` guards its buckets
//! with a mutex: on the call path, with every worker thread recording into
//! the same few histograms, that lock would be contended.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use super::CachedFamily;

/// Upper bounds, in seconds, of the latency buckets (`+Inf` is implicit).
///
/// The gateway's calls take from ~100 µs (validation errors, shed calls, a
/// nearby upstream) to seconds (a slow upstream, the 10 s default
/// `--upstream-timeout`, retries): a 1-2.5-5 series per decade from 100 µs to
/// 10 s puts every percentile within a factor of 2.5 of its true value, and
/// 30 s separates calls that outlived the default timeout (retries, long
/// caller deadlines) from the rest. 17 buckets keep 5 RPCs × 2 histograms
/// under 200 series.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Cheap to clone: clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the observations in whole microseconds: an integer add is one
    /// atomic instruction, where an `f64` sum needs a compare-and-swap loop.
    /// At 10,000 calls in flight at all times it overflows after 58 years.
    sum_micros: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        // Buckets are inclusive upper bounds (`le`).
        let index = LATENCY_BUCKETS.partition_point(|&bound| bound < seconds);
        self.inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        // Rounded, not truncated, so that short calls do not bias the sum down.
        let micros = (elapsed.as_nanos() + 500) / 1000;
        let micros = u64::try_from(micros).unwrap_or(u64::MAX);
        self.inner.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// `(count, sum in seconds)`.
    pub fn totals(&self) -> (u64, f64) {
        let count = self
            .inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        let sum = self.inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (count, sum)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0); LATENCY_BUCKETS.len() + 1];
        let mut count = 0;
        for (i, slot) in buckets.iter_mut().enumerate() {
            let n = self.inner.buckets[i].load(Ordering::Relaxed);
            count += n;
            *slot = (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n);
        }
        // The count is the buckets' total, so `_count` always equals the
        // `+Inf` bucket even while calls are being recorded.
        let sum = self.inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc_method: &'static str,
}

/// A latency histogram per RPC (`<name>_seconds{rpc_method}`), each cached
/// at its RPC's index in the owner's route table.
#[derive(Debug)]
pub struct RpcLatency {
    family: CachedFamily<RpcLabels, LatencyHistogram>,
}

impl RpcLatency {
    /// Histograms for `rpcs` RPCs (indexes `0..rpcs`), to [`Self::register`].
    pub fn new(rpcs: usize) -> Self {
        Self {
            family: CachedFamily::new(rpcs),
        }
    }

    /// Registers the histograms in `registry` as `<name>_seconds`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register_with_unit(name, help, Unit::Seconds, self.family.family().clone());
    }

    /// A call of the RPC `rpc`, at `index` in the route table, took
    /// `elapsed`.
    pub fn observe(&self, index: usize, rpc: &'static str, elapsed: Duration) {
        self.family
            .get(index, || RpcLabels { rpc_method: rpc })
            .observe(elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_sorted() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(100)); // le=0.0001
        h.observe(Duration::from_micros(101)); // le=0.00025
        h.observe(Duration::from_secs(30)); // le=30
        h.observe(Duration::from_secs(31)); // +Inf
        let counts: Vec<u64> = h
            .inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[16], 1);
        assert_eq!(counts[17], 1);
        let (count, sum) = h.totals();
        assert_eq!(count, 4);
        assert!((sum - 61.000_201).abs() < 1e-9, "{sum}");
    }
}
