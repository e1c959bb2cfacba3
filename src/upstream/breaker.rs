//! Failing fast while Gormic is unreachable: a circuit breaker in front of
//! the upstream, in the manner of Linkerd's failure accrual and Envoy's
//! outlier detection.
//!
//! - **Closed** (normal): every call goes to the upstream. The breaker counts
//!   consecutive calls that could not reach it (no connection: refused,
//!   timed out, name not resolved, TLS or proxy failure) and, when
//!   `--upstream-breaker-gateway-errors` is set, consecutive calls that got
//!   a 502/503/504 or no connection. Any other answer resets both counts.
//! - **Open**: after `--upstream-breaker-failures` (or the gateway-error
//!   count), calls fail at once with `UNAVAILABLE`, `request_sent=false` and
//!   a `RetryInfo` of the time until the next probe.
//! - **Half-open**: once the backoff has passed, one call at a time goes
//!   through as a probe. An answer closes the breaker; another failure opens
//!   it again with the backoff doubled (up to `--upstream-breaker-max-backoff`,
//!   plus up to 20 % jitter, so replicas do not probe in step).
//!
//! Never counted: answers with a functional error or any other 4xx (the
//! upstream is there), the caller's own deadline, a cancelled call, a full
//! connection queue. Readiness does not follow the breaker: taking every
//! replica out of the load balancer because Gormic is down helps no caller.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use clap::Args;
use tokio::time::Instant;

use super::metrics::{BreakerState, UpstreamMetrics};
use crate::units::parse_duration;

/// Share of the backoff added at random to each wait before a probe.
const JITTER: f64 = 0.2;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Upstream circuit breaker")]
pub struct BreakerArgs {
    /// Consecutive calls that could not reach the upstream (connection
    /// refused or timed out, TLS handshake failed) before the breaker opens
    /// and calls fail fast; 0 turns the breaker off. 5 is Envoy's
    /// consecutive-gateway-failure default: few enough to stop tying up
    /// calls within a second at production rates, more than a single
    /// restarting upstream instance causes.
    #[arg(
        long,
        env = "GORMIC_UPSTREAM_BREAKER_FAILURES",
        value_name = "N",
        default_value_t = 5
    )]
    pub upstream_breaker_failures: u32,

    /// Also open after this many consecutive calls answered 502, 503 or 504
    /// (or not reaching the upstream); 0 (the default, as Envoy's
    /// enforcement of gateway failures) leaves those to the retries: a 503
    /// is an answer, and its Retry-After is honoured.
    #[arg(
        long,
        env = "GORMIC_UPSTREAM_BREAKER_GATEWAY_ERRORS",
        value_name = "N",
        default_value_t = 0
    )]
    pub upstream_breaker_gateway_errors: u32,

    /// How long an open breaker waits before its first probe; doubled after
    /// each failed probe. 1s (Linkerd's minimum backoff) notices a
    /// recovered upstream within about a second.
    #[arg(long, env = "GORMIC_UPSTREAM_BREAKER_BACKOFF", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub upstream_breaker_backoff: Duration,

    /// Longest wait between probes. 30s (Envoy's base ejection time) bounds
    /// how long a recovered upstream stays unused.
    #[arg(long, env = "GORMIC_UPSTREAM_BREAKER_MAX_BACKOFF", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub upstream_breaker_max_backoff: Duration,
}

impl Default for BreakerArgs {
    fn default() -> Self {
        Self {
            upstream_breaker_failures: 5,
            upstream_breaker_gateway_errors: 0,
            upstream_breaker_backoff: Duration::from_secs(1),
            upstream_breaker_max_backoff: Duration::from_secs(30),
        }
    }
}

/// How a call's exchange ended, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The upstream answered (any status but a counted gateway error).
    Answered,
    /// 502, 503 or 504.
    GatewayError,
    /// No connection could be made.
    Unreachable,
    /// Says nothing about the upstream (caller's deadline, cancelled, ...).
    Neutral,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

pub(super) struct Breaker {
    failures_to_open: u32,
    gateway_errors_to_open: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    /// Read without the lock on every call.
    state: AtomicU8,
    failures: AtomicU32,
    gateway_errors: AtomicU32,
    /// While not closed.
    open: Mutex<Open>,
}

struct Open {
    /// When the next probe may go.
    next_probe: Instant,
    backoff: Duration,
    /// A probe is in flight.
    probing: bool,
}

/// A call let through; [`Ticket::record`] tells the breaker how it ended.
/// A probe's ticket dropped unrecorded (the call was cancelled) frees the
/// probe slot.
pub(super) struct Ticket<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Breaker {
    pub(super) fn new(args: &BreakerArgs) -> Self {
        let min_backoff = args.upstream_breaker_backoff;
        Self {
            failures_to_open: args.upstream_breaker_failures,
            gateway_errors_to_open: args.upstream_breaker_gateway_errors,
            min_backoff,
            max_backoff: args.upstream_breaker_max_backoff.max(min_backoff),
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            gateway_errors: AtomicU32::new(0),
            open: Mutex::new(Open {
                next_probe: Instant::now(),
                backoff: min_backoff,
                probing: false,
            }),
        }
    }

    /// Lets a call through, or refuses it with the time until the next
    /// probe may go.
    pub(super) fn admit(&self, metrics: &UpstreamMetrics) -> Result<Ticket<'_>, Duration> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(Ticket {
                breaker: self,
                probe: false,
            });
        }
        let mut open = self.lock();
        let now = Instant::now();
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(Ticket {
                breaker: self,
                probe: false,
            }),
            _ if open.probing => Err(open.backoff.min(self.min_backoff)),
            _ if now < open.next_probe => Err(open.next_probe - now),
            state => {
                open.probing = true;
                if state == OPEN {
                    self.state.store(HALF_OPEN, Ordering::Release);
                    metrics.breaker_state(BreakerState::HalfOpen);
                    tracing::info!(
                        "upstream circuit breaker half-open: one call goes through as a probe"
                    );
                }
                Ok(Ticket {
                    breaker: self,
                    probe: true,
                })
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // The state is a few plain fields, consistent after any panic.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, probe: bool, outcome: Outcome, metrics: &UpstreamMetrics) {
        // Without --upstream-breaker-gateway-errors a 502-504 is an answer
        // like any other: it shows the upstream is there.
        let outcome = match outcome {
            Outcome::GatewayError if self.gateway_errors_to_open == 0 => Outcome::Answered,
            other => other,
        };
        match outcome {
            Outcome::Answered => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                if self.gateway_errors.load(Ordering::Relaxed) != 0 {
                    self.gateway_errors.store(0, Ordering::Relaxed);
                }
                if probe || self.state.load(Ordering::Acquire) != CLOSED {
                    self.close(metrics);
                }
            }
            Outcome::GatewayError | Outcome::Unreachable => {
                let unreachable = outcome == Outcome::Unreachable;
                let failures = if unreachable {
                    self.failures.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    // An answer: the upstream is there.
                    self.failures.store(0, Ordering::Relaxed);
                    0
                };
                let gateway_errors = self.gateway_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if probe {
                    self.reopen(metrics);
                } else if unreachable && reached(failures, self.failures_to_open) {
                    self.trip(metrics, failures, "could not reach the upstream");
                } else if reached(gateway_errors, self.gateway_errors_to_open) {
                    self.trip(
                        metrics,
                        gateway_errors,
                        "got 502, 503 or 504 or could not reach the upstream",
                    );
                }
            }
            Outcome::Neutral => {
                if probe {
                    // Let the next call probe at once.
                    let mut open = self.lock();
                    open.probing = false;
                    open.next_probe = Instant::now();
                }
            }
        }
    }

    /// Closed → open, once.
    fn trip(&self, metrics: &UpstreamMetrics, consecutive: u32, what: &str) {
        let Some(wait) = self.open_for(metrics, |_| self.min_backoff, |state| state == CLOSED)
        else {
            return;
        };
        tracing::warn!(
            consecutive,
            first_probe_in_ms = wait.as_millis() as u64,
            "upstream circuit breaker open: {consecutive} consecutive calls {what}; \
             calls fail fast with UNAVAILABLE until a probe gets an answer"
        );
    }

    /// A failed probe: open again, backing off further.
    fn reopen(&self, metrics: &UpstreamMetrics) {
        // Unless another call's answer closed it meanwhile.
        let doubled = |backoff: Duration| (backoff * 2).min(self.max_backoff);
        let Some(wait) = self.open_for(metrics, doubled, |state| state != CLOSED) else {
            return;
        };
        tracing::warn!(
            next_probe_in_ms = wait.as_millis() as u64,
            "upstream circuit breaker probe failed: open again"
        );
    }

    /// Opens the breaker with the backoff `backoff(current)`, if its state
    /// passes `from`; returns the wait before the next probe.
    fn open_for(
        &self,
        metrics: &UpstreamMetrics,
        backoff: impl FnOnce(Duration) -> Duration,
        from: impl FnOnce(u8) -> bool,
    ) -> Option<Duration> {
        let mut open = self.lock();
        if !from(self.state.load(Ordering::Acquire)) {
            return None;
        }
        open.backoff = backoff(open.backoff);
        open.probing = false;
        let wait = jittered(open.backoff);
        open.next_probe = Instant::now() + wait;
        self.state.store(OPEN, Ordering::Release);
        drop(open);
        metrics.breaker_state(BreakerState::Open);
        Some(wait)
    }

    fn close(&self, metrics: &UpstreamMetrics) {
        let mut open = self.lock();
        if self.state.load(Ordering::Acquire) == CLOSED {
            return;
        }
        open.backoff = self.min_backoff;
        open.probing = false;
        self.state.store(CLOSED, Ordering::Release);
        drop(open);
        metrics.breaker_state(BreakerState::Closed);
        tracing::info!("upstream circuit breaker closed: the upstream answers again");
    }
}

impl Ticket<'_> {
    /// How the call's exchange ended.
    pub(super) fn record(mut self, outcome: Outcome, metrics: &UpstreamMetrics) {
        let probe = std::mem::take(&mut self.probe);
        self.breaker.record(probe, outcome, metrics);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.probe {
            // A probe cancelled before its outcome: the next call probes.
            let mut open = self.breaker.lock();
            open.probing = false;
            open.next_probe = Instant::now();
        }
    }
}

/// Whether `count` reaches a threshold; 0 means never.
fn reached(count: u32, threshold: u32) -> bool {
    threshold != 0 && count >= threshold
}

fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(1.0 + JITTER * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;

    fn metrics() -> Arc<UpstreamMetrics> {
        Metrics::default().series()
    }

    fn breaker(failures: u32, gateway_errors: u32) -> Breaker {
        Breaker::new(&BreakerArgs {
            upstream_breaker_failures: failures,
            upstream_breaker_gateway_errors: gateway_errors,
            upstream_breaker_backoff: Duration::from_secs(1),
            upstream_breaker_max_backoff: Duration::from_secs(4),
        })
    }

    fn call(breaker: &Breaker, outcome: Outcome) -> Result<(), Duration> {
        let metrics = metrics();
        let ticket = breaker.admit(&metrics)?;
        ticket.record(outcome, &metrics);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_consecutive_unreachable_calls_and_an_answer_resets_the_count() {
        let b = breaker(3, 0);
        for _ in 0..2 {
            call(&b, Outcome::Unreachable).expect("closed");
        }
        call(&b, Outcome::Answered).expect("closed");
        for _ in 0..2 {
            call(&b, Outcome::Unreachable).expect("closed");
        }
        for outcome in [Outcome::Neutral, Outcome::GatewayError] {
            call(&b, outcome).expect("closed: neither counts towards failures");
        }
        call(&b, Outcome::Unreachable).expect("closed");
        call(&b, Outcome::Unreachable).expect("closed");
        call(&b, Outcome::Unreachable).expect("the third trips it");
        let wait = call(&b, Outcome::Answered).expect_err("open: fails fast");
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_millis(1200));
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_with_doubling_backoff_and_an_answer_closes() {
        let metrics = metrics();
        let b = breaker(1, 0);
        call(&b, Outcome::Unreachable).expect("trips");
        assert!(b.admit(&metrics).is_err());
        tokio::time::advance(Duration::from_millis(1200)).await;
        let probe = b.admit(&metrics).expect("the probe");
        assert!(b.admit(&metrics).is_err(), "only one probe at a time");
        probe.record(Outcome::Unreachable, &metrics);
        // Backoff doubled: 2 s (+ up to 20 %).
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(b.admit(&metrics).is_err(), "not before the doubled backoff");
        tokio::time::advance(Duration::from_millis(500)).await;
        let probe = b.admit(&metrics).expect("the second probe");
        probe.record(Outcome::Answered, &metrics);
        call(&b, Outcome::Answered).expect("closed again");
        // The backoff starts over.
        call(&b, Outcome::Unreachable).expect("trips again");
        let wait = b.admit(&metrics).err().expect("open");
        assert!(wait <= Duration::from_millis(1200), "{wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_or_neutral_probe_lets_the_next_call_probe() {
        let metrics = metrics();
        let b = breaker(1, 0);
        call(&b, Outcome::Unreachable).expect("trips");
        tokio::time::advance(Duration::from_millis(1300)).await;
        drop(b.admit(&metrics).expect("probe, cancelled"));
        let probe = b.admit(&metrics).expect("the next call probes");
        probe.record(Outcome::Neutral, &metrics);
        b.admit(&metrics)
            .expect("and the next")
            .record(Outcome::Answered, &metrics);
        assert_eq!(b.state.load(Ordering::Relaxed), CLOSED);
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_open_it_only_when_asked() {
        let off = breaker(3, 0);
        for _ in 0..10 {
            call(&off, Outcome::GatewayError).expect("never opens on 5xx by default");
        }
        // A probe answered 503 closes it when gateway errors do not count.
        let metrics = metrics();
        let b = breaker(1, 0);
        call(&b, Outcome::Unreachable).expect("trips");
        tokio::time::advance(Duration::from_millis(1300)).await;
        let probe = b.admit(&metrics).expect("the probe");
        probe.record(Outcome::GatewayError, &metrics);
        call(&b, Outcome::Unreachable).expect("closed by the probe's answer");
        let on = breaker(0, 2);
        call(&on, Outcome::GatewayError).expect("closed");
        call(&on, Outcome::Unreachable).expect("counts as a gateway failure too");
        assert!(call(&on, Outcome::Answered).is_err(), "open");
        let disabled = breaker(0, 0);
        for _ in 0..10 {
            call(&disabled, Outcome::Unreachable).expect("off");
        }
    }
}
