//! A call's deadline, computed once when the call arrives: the caller's
//! `grpc-timeout` less a margin, bounded by `--upstream-timeout`. Every step
//! of the call (the idempotency store, the wait for an upstream connection,
//! each attempt and each backoff) runs against this one [`Deadline`], so
//! the gateway's own answer, with its details, reaches the caller before the
//! caller's timer fires, whatever the steps before the upstream cost.

use std::time::Duration;

use clap::Args;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::units::parse_duration;

/// Default of `--deadline-margin`.
pub const DEFAULT_MARGIN: Duration = Duration::from_millis(100);
/// Default of `--upstream-timeout`.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct DeadlineArgs {
    /// Upper bound on a call, from its arrival to its answer: the
    /// idempotency store, the wait for an upstream connection, every attempt
    /// and the waits between them (the caller's deadline applies when it is
    /// shorter), e.g. `500ms`, `10s`.
    #[arg(long, env = "GORMIC_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// How much earlier than the caller's gRPC deadline the gateway gives up
    /// (at most a tenth of the deadline), so that its DEADLINE_EXCEEDED with
    /// details reaches the caller before the caller's own timer fires.
    #[arg(long, env = "GORMIC_DEADLINE_MARGIN", value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub deadline_margin: Duration,
}

impl Default for DeadlineArgs {
    fn default() -> Self {
        Self {
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            deadline_margin: DEFAULT_MARGIN,
        }
    }
}

/// Which limit a call's deadline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutBound {
    /// The deadline the caller set on the gRPC call (less the margin).
    CallerDeadline,
    /// The gateway's `--upstream-timeout`.
    UpstreamTimeout,
}

impl TimeoutBound {
    /// `ErrorInfo.metadata.bound`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CallerDeadline => "caller_deadline",
            Self::UpstreamTimeout => "upstream_timeout",
        }
    }
}

/// The instant a call must be answered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    /// `at` less the arrival: what the call was given.
    budget: Duration,
    bound: TimeoutBound,
}

impl Deadline {
    /// The deadline of a call arriving now, from the flags and the caller's
    /// `grpc-timeout` (if any): the caller's timeout less the margin (at
    /// most a tenth of it), or `upstream_timeout`, whichever is shorter.
    pub fn starting_now(args: &DeadlineArgs, caller_timeout: Option<Duration>) -> Self {
        let caller_budget =
            caller_timeout.map(|caller| caller - args.deadline_margin.min(caller / 10));
        let (budget, bound) = match caller_budget {
            Some(budget) if budget < args.upstream_timeout => {
                (budget, TimeoutBound::CallerDeadline)
            }
            _ => (args.upstream_timeout, TimeoutBound::UpstreamTimeout),
        };
        Self {
            at: Instant::now() + budget,
            budget,
            bound,
        }
    }

    /// The deadline of a call that arrived now and carries `metadata`.
    pub fn for_call(args: &DeadlineArgs, metadata: &MetadataMap) -> Self {
        Self::starting_now(args, grpc_timeout(metadata))
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    /// The whole time the call was given (reported in timeouts).
    pub fn budget(&self) -> Duration {
        self.budget
    }

    pub fn bound(&self) -> TimeoutBound {
        self.bound
    }

    /// What is left of it (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// This deadline moved `reserve` earlier (not before now), keeping its
    /// budget and bound: the time a later step (the idempotency record)
    /// needs is kept back from an earlier one (the upstream exchange).
    pub fn reserving(&self, reserve: Duration) -> Self {
        Self {
            at: self
                .at
                .checked_sub(reserve)
                .unwrap_or(self.at)
                .max(Instant::now()),
            ..*self
        }
    }

    /// The earlier of the deadline and `limit` from now: the bound of one
    /// step that has a limit of its own (a store operation).
    pub fn within(&self, limit: Duration) -> Instant {
        self.at.min(Instant::now() + limit)
    }
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><unit>`,
/// at most 8 digits, unit one of `H M S m u n`).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(timeout_ms: u64, margin_ms: u64) -> DeadlineArgs {
        DeadlineArgs {
            upstream_timeout: Duration::from_millis(timeout_ms),
            deadline_margin: Duration::from_millis(margin_ms),
        }
    }

    #[test]
    fn the_caller_deadline_less_a_capped_margin_or_the_upstream_timeout() {
        let ms = Duration::from_millis;
        let budget = |args: &DeadlineArgs, caller: Option<u64>| {
            let d = Deadline::starting_now(args, caller.map(ms));
            (d.budget(), d.bound())
        };
        let default = args(1000, 100);
        assert_eq!(
            budget(&default, None),
            (ms(1000), TimeoutBound::UpstreamTimeout)
        );
        assert_eq!(
            budget(&default, Some(600)),
            (ms(540), TimeoutBound::CallerDeadline)
        );
        assert_eq!(
            budget(&default, Some(1050)),
            (ms(950), TimeoutBound::CallerDeadline)
        );
        assert_eq!(
            budget(&default, Some(5000)),
            (ms(1000), TimeoutBound::UpstreamTimeout)
        );
        assert_eq!(
            budget(&args(1000, 5000), Some(800)),
            (ms(720), TimeoutBound::CallerDeadline)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_limit_never_reaches_past_the_deadline() {
        let deadline = Deadline::starting_now(&args(1000, 100), None);
        assert_eq!(deadline.within(Duration::from_secs(5)), deadline.at());
        let short = deadline.within(Duration::from_millis(10));
        assert!(short < deadline.at());
        let earlier = deadline.reserving(Duration::from_millis(300));
        assert_eq!(earlier.at(), deadline.at() - Duration::from_millis(300));
        assert_eq!(
            earlier.budget(),
            deadline.budget(),
            "the budget is the call's"
        );
        assert_eq!(earlier.bound(), deadline.bound());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(deadline.remaining(), Duration::ZERO);
        assert_eq!(
            deadline.reserving(Duration::from_secs(1)).remaining(),
            Duration::ZERO
        );
    }

    #[test]
    fn grpc_timeout_units() {
        let t = |v: &str| {
            let mut metadata = MetadataMap::new();
            metadata.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&metadata)
        };
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("123456789S"), None);
        assert_eq!(t("5x"), None);
        assert_eq!(t("m"), None);
    }
}
