//! The gateway's own retries of upstream requests: when a failed attempt is
//! tried again, after how long, and how many retries the upstream is spared.
//!
//! - A request that provably never reached the upstream (connection refused,
//!   name not resolved, TLS handshake failed, a pooled connection found
//!   closed before it was written, an HTTP/2 stream refused unprocessed) is
//!   retried for every operation: nothing happened upstream. A connection
//!   attempt that timed out is not: the next would most likely wait as long
//!   (`--upstream-connect-timeout` per call, not per attempt), and the
//!   circuit breaker handles an upstream that stays away.
//! - A request that went out is retried only for operations whose
//!   repetition is harmless (`Operation::REPEATABLE`: update, delete), and
//!   only when the answer was 502, 503 or 504 or the connection broke.
//!   Create, close and send are never sent twice by the gateway: a second
//!   CreateInvoice would be a second invoice. Callers retry those safely
//!   with an `idempotency-key`.
//! - Timeouts are not retried: the attempt used the time the call had.
//!
//! Waits are exponential with full jitter (25 ms doubling to 1 s), at least
//! the upstream's `Retry-After`, and never past the call's deadline. A
//! retry budget (like Linkerd's and Finagle's: tower's `TpsBudget`) caps
//! retries at `--retry-budget-ratio` of the calls over the last 10 s, plus
//! a floor of `--retry-budget-min-per-second`, so that a failing upstream
//! is not hammered by the gateway multiplying its load. Each worker thread
//! keeps its own budget (`super::client`): `TpsBudget` takes a mutex on
//! every deposit, and a budget shared by the workers would make every call
//! take a shared lock; a worker's own is never contended.

use std::time::Duration;

use clap::Args;
use tower::retry::budget::{Budget, TpsBudget};

use super::error::{Fault, RetryAfter, UpstreamError};

/// First backoff step; each retry doubles it, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The retry budget's sliding window.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Retries")]
pub struct RetryArgs {
    /// Attempts per call, the first included: 1 to 10 (1 turns gateway
    /// retries off). 3 rides out a stale connection or a one-off 503 without
    /// multiplying load by much when the upstream is down.
    #[arg(long, env = "GORMIC_MAX_ATTEMPTS", value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub max_attempts: u32,

    /// Retries allowed, as a fraction of the calls of the last 10 s, 0 to 10
    /// (0.2 = at most 20 % extra upstream requests), on top of the floor;
    /// kept per worker thread.
    #[arg(long, env = "GORMIC_RETRY_BUDGET_RATIO", value_name = "RATIO", default_value_t = 0.2, value_parser = parse_ratio)]
    pub retry_budget_ratio: f64,

    /// Retries always allowed per second (per worker thread) whatever the
    /// ratio, so that a quiet gateway can still retry a stale connection.
    #[arg(
        long,
        env = "GORMIC_RETRY_BUDGET_MIN_PER_SECOND",
        value_name = "N",
        default_value_t = 10
    )]
    pub retry_budget_min_per_second: u32,
}

impl Default for RetryArgs {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 10,
        }
    }
}

fn parse_ratio(value: &str) -> Result<f64, String> {
    let ratio: f64 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number (e.g. 0.2)"))?;
    if !(0.0..=10.0).contains(&ratio) {
        return Err("must be between 0 and 10".into());
    }
    Ok(ratio)
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait `delay`, then try again; `reason` labels the retry metric.
    Retry {
        delay: Duration,
        reason: &'static str,
    },
    /// Answer the caller with this failure.
    Stop,
    /// Answer the caller with this failure: a retry would land inside the
    /// credential's cooldown, which outlasts the call (this much is left of
    /// it, the answer's `RetryInfo`).
    Cooling(Duration),
}

/// The retry rules of one gateway, shared by all calls; the budgets they
/// draw on are per worker ([`RetryPolicy::budget`]).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    ratio: f32,
    floor: u32,
}

impl RetryPolicy {
    pub fn new(args: &RetryArgs) -> Self {
        Self {
            max_attempts: args.max_attempts.max(1),
            ratio: args.retry_budget_ratio as f32,
            floor: args.retry_budget_min_per_second,
        }
    }

    /// A new budget for one worker thread.
    pub fn budget(&self) -> TpsBudget {
        // The flags are range-checked (ratio 0..=10, the floor a u32), well
        // inside what TpsBudget asserts (0..=1000, below i32::MAX).
        TpsBudget::new(WINDOW, self.floor.min(i32::MAX as u32 - 1), self.ratio)
    }

    /// Whether attempt number `attempt` (1-based), which failed with
    /// `failure`, is tried again; `remaining` is what is left of the call's
    /// time, `cooldown` what is left of the credential's cooldown (a retry
    /// waits for its end). A retry is withdrawn from `budget`, where each
    /// call deposited: only once it is sure to be made.
    pub fn decide(
        &self,
        budget: &TpsBudget,
        repeatable: bool,
        failure: &UpstreamError,
        attempt: u32,
        remaining: Duration,
        cooldown: Option<Duration>,
    ) -> Decision {
        let Some((reason, retry_after)) = retryable(repeatable, failure) else {
            return Decision::Stop;
        };
        if attempt >= self.max_attempts {
            return Decision::Stop;
        }
        let delay = backoff(attempt).max(retry_after.unwrap_or_default());
        if delay >= remaining {
            return Decision::Stop;
        }
        let delay = match cooldown {
            Some(left) if left >= remaining => return Decision::Cooling(left),
            Some(left) => delay.max(left),
            None => delay,
        };
        if !budget.withdraw() {
            tracing::debug!(reason, "retry budget exhausted: not retrying");
            return Decision::Stop;
        }
        Decision::Retry { delay, reason }
    }
}

/// Whether a failure may be retried, with the retry reason and the delay
/// the upstream asked for.
fn retryable(
    repeatable: bool,
    failure: &UpstreamError,
) -> Option<(&'static str, Option<Duration>)> {
    match failure {
        // Nothing reached the upstream: any operation.
        UpstreamError::Unreachable {
            request_sent: false,
            fault: Fault::Connect,
            ..
        } => Some(("connect", None)),
        UpstreamError::Unreachable {
            request_sent: false,
            fault: Fault::NotProcessed,
            ..
        } => Some(("refused_stream", None)),
        // The request may have been processed: repeatable operations only.
        UpstreamError::Unreachable {
            request_sent: true, ..
        } if repeatable => Some(("connection", None)),
        UpstreamError::Rejected(rejection)
            if repeatable && matches!(rejection.http_status, 502..=504) =>
        {
            let reason = match rejection.http_status {
                502 => "http_502",
                503 => "http_503",
                _ => "http_504",
            };
            let delay = match rejection.retry_after {
                Some(RetryAfter::Delay(delay)) => Some(delay),
                _ => None,
            };
            Some((reason, delay))
        }
        _ => None,
    }
}

/// Full jitter: uniform in `[0, min(MAX, BASE × 2^(attempt-1))]`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Rejection;

    const LONG: Duration = Duration::from_secs(3600);

    fn policy(max_attempts: u32, ratio: f64, floor: u32) -> RetryPolicy {
        RetryPolicy::new(&RetryArgs {
            max_attempts,
            retry_budget_ratio: ratio,
            retry_budget_min_per_second: floor,
        })
    }

    fn refused() -> UpstreamError {
        UpstreamError::Unreachable {
            detail: "refused".into(),
            fault: Fault::Connect,
            request_sent: false,
        }
    }

    fn answered(status: u16) -> UpstreamError {
        UpstreamError::Rejected(Box::new(Rejection {
            http_status: status,
            ..Default::default()
        }))
    }

    #[test]
    fn unsent_requests_are_retried_for_every_operation_but_a_connect_timeout() {
        let policy = policy(3, 0.2, 10);
        let budget = policy.budget();
        assert!(matches!(
            policy.decide(&budget, false, &refused(), 1, LONG, None),
            Decision::Retry {
                reason: "connect",
                ..
            }
        ));
        assert_eq!(
            policy.decide(&budget, false, &refused(), 3, LONG, None),
            Decision::Stop
        );
        let refused_stream = UpstreamError::Unreachable {
            detail: "refused stream".into(),
            fault: Fault::NotProcessed,
            request_sent: false,
        };
        assert!(matches!(
            policy.decide(&budget, false, &refused_stream, 1, LONG, None),
            Decision::Retry {
                reason: "refused_stream",
                ..
            }
        ));
        for fault in [Fault::ConnectTimeout, Fault::Deadline] {
            let unsent = UpstreamError::Unreachable {
                detail: "waited".into(),
                fault,
                request_sent: false,
            };
            assert_eq!(
                policy.decide(&budget, true, &unsent, 1, LONG, None),
                Decision::Stop,
                "{fault:?}"
            );
        }
    }

    #[test]
    fn sent_requests_are_retried_only_when_repeatable_and_only_for_gateway_errors() {
        let policy = policy(3, 0.2, 10);
        let budget = policy.budget();
        for status in [502, 503, 504] {
            assert_eq!(
                policy.decide(&budget, false, &answered(status), 1, LONG, None),
                Decision::Stop
            );
            assert!(matches!(
                policy.decide(&budget, true, &answered(status), 1, LONG, None),
                Decision::Retry { .. }
            ));
        }
        for status in [400, 429, 500] {
            assert_eq!(
                policy.decide(&budget, true, &answered(status), 1, LONG, None),
                Decision::Stop
            );
        }
        let broken = UpstreamError::Unreachable {
            detail: "reset".into(),
            fault: Fault::Broken,
            request_sent: true,
        };
        assert_eq!(
            policy.decide(&budget, false, &broken, 1, LONG, None),
            Decision::Stop
        );
        assert!(matches!(
            policy.decide(&budget, true, &broken, 1, LONG, None),
            Decision::Retry {
                reason: "connection",
                ..
            }
        ));
    }

    #[test]
    fn retry_after_is_honoured_and_the_deadline_wins() {
        let policy = policy(3, 0.2, 10);
        let budget = policy.budget();
        let mut rejection = Rejection {
            http_status: 503,
            ..Default::default()
        };
        rejection.retry_after = Some(RetryAfter::Delay(Duration::from_secs(2)));
        let busy = UpstreamError::Rejected(Box::new(rejection));
        assert_eq!(
            policy.decide(&budget, true, &busy, 1, LONG, None),
            Decision::Retry {
                delay: Duration::from_secs(2),
                reason: "http_503"
            }
        );
        assert_eq!(
            policy.decide(&budget, true, &busy, 1, Duration::from_secs(1), None),
            Decision::Stop,
            "a wait past the deadline is no retry"
        );
    }

    #[test]
    fn backoff_doubles_within_full_jitter_and_is_capped() {
        for _ in 0..200 {
            assert!(backoff(1) <= BASE_BACKOFF);
            assert!(backoff(3) <= BASE_BACKOFF * 4);
            assert!(backoff(30) <= MAX_BACKOFF);
        }
    }

    #[tokio::test]
    async fn the_budget_allows_the_floor_plus_the_ratio_of_calls() {
        // Floor 1/s over 10 s = 10 retries, plus 20 % of 100 calls = 20.
        let policy = policy(10, 0.2, 1);
        let budget = policy.budget();
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100)
            .filter(|_| {
                matches!(
                    policy.decide(&budget, false, &refused(), 1, LONG, None),
                    Decision::Retry { .. }
                )
            })
            .count();
        assert_eq!(granted, 30);
    }

    #[tokio::test]
    async fn a_retry_a_cooldown_would_push_past_the_deadline_takes_no_budget() {
        // The floor alone: 1 retry per second over 10 s = 10 retries.
        let policy = policy(10, 0.0, 1);
        let budget = policy.budget();
        let second = Duration::from_secs(1);
        for _ in 0..100 {
            assert!(matches!(
                policy.decide(&budget, false, &refused(), 1, second, Some(second)),
                Decision::Cooling(left) if left == second
            ));
        }
        let granted = (0..100)
            .filter(|_| {
                matches!(
                    policy.decide(&budget, false, &refused(), 1, LONG, Some(second)),
                    Decision::Retry { delay, .. } if delay >= second
                )
            })
            .count();
        assert_eq!(granted, 10, "the refusals above withdrew nothing");
    }
}
