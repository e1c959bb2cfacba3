//! One call's exchange over all its attempts: a credential cooling down
//! after the upstream rate-limited it is refused unsent (`super::cooldown`),
//! the circuit breaker lets the call through (`super::breaker`), then
//! attempts (`super::attempt`) follow one another while the retry policy
//! (`super::retry`) allows and the call's deadline lasts. A 429, or a 503
//! with `Retry-After`, opens the credential's cooldown, and no retry lands
//! inside one: a retry waits for the later of its backoff and the
//! cooldown's end, is not made when that is past the deadline, and is
//! given up when a cooldown runs at the moment it would go (opened
//! meanwhile by another call or replica). The breaker learns how the whole
//! exchange ended; the caller learns whether any attempt's request may have
//! reached the upstream.

use std::time::Duration;

use tower::retry::budget::Budget as _;

use super::breaker::Outcome;
use super::cooldown::CallCredential;
use super::error::{Fault, UpstreamError};
use super::operation::Operation;
use super::retry::Decision;
use super::{CallContext, Exchange, Reply, Upstream};

impl<T> Exchange<T> {
    fn not_made(error: UpstreamError) -> Self {
        Self {
            result: Err(error),
            attempts: 0,
            sent: false,
        }
    }
}

impl Upstream {
    /// Sends one call's request, retrying what `retry` allows, within the
    /// call's deadline.
    pub async fn send<Op: Operation>(
        &self,
        call: &CallContext<'_>,
        request: &Op::Request,
    ) -> Exchange<Op::Response> {
        let shared = &*self.shared;
        // Hashed only if a cooldown runs, and then once for the exchange.
        let credential = CallCredential::new(call.credentials);
        // First: while no cooldown runs, this is one atomic load.
        if let Some(retry_after) = shared.cooldowns.left(&credential) {
            return Exchange::not_made(UpstreamError::RateLimited { retry_after });
        }
        let prepared = match self.prepare::<Op>(request) {
            Ok(prepared) => prepared,
            Err(error) => return Exchange::not_made(error),
        };
        let worker = match shared.clients.this_thread() {
            Ok(worker) => worker,
            Err(error) => {
                return Exchange::not_made(UpstreamError::Internal {
                    detail: shared
                        .proxy
                        .scrub(format!("cannot build the HTTP client: {error}")),
                });
            }
        };
        let ticket = match shared.breaker.admit(&self.metrics) {
            Ok(ticket) => ticket,
            Err(retry_after) => {
                return Exchange::not_made(UpstreamError::CircuitOpen { retry_after });
            }
        };
        worker.budget.deposit();

        let mut attempts = 0;
        let mut sent = false;
        let mut answered = false;
        let mut earlier: Option<UpstreamError> = None;
        let result = loop {
            let attempt = self.attempt::<Op>(&worker, &prepared, call).await;
            attempts += u32::from(attempt.made);
            sent |= attempt.sent;
            let mut error = match attempt.result {
                Ok(reply) => break Ok(reply),
                Err(error) => error,
            };
            if let UpstreamError::Rejected(rejection) = &mut error {
                rejection.cooldown = shared.cooldowns.answered(&credential, rejection);
            }
            answered |= error.http_status().is_some();
            if !attempt.made
                && let Some(earlier) = earlier.take()
            {
                // This attempt never got a slot: the earlier failure says more.
                break Err(earlier);
            }
            // Not into a cooldown: a retry waits for its end too, if in time.
            match shared.retry.decide(
                &worker.budget,
                Op::REPEATABLE,
                &error,
                attempts.max(1),
                call.deadline.remaining(),
                shared.cooldowns.left(&credential),
            ) {
                Decision::Retry { delay, reason } => {
                    self.metrics.retry(Op::ROUTE, reason);
                    tracing::debug!(
                        rpc = Op::ROUTE.rpc,
                        attempt = attempts,
                        reason,
                        delay_ms = delay.as_millis() as u64,
                        "retrying the upstream request"
                    );
                    let _ = tokio::time::timeout_at(call.deadline.at(), tokio::time::sleep(delay))
                        .await;
                    if let Some(left) = shared.cooldowns.left(&credential) {
                        tracing::debug!(
                            rpc = Op::ROUTE.rpc,
                            "retry given up: the upstream rate-limited the credential meanwhile"
                        );
                        break Err(cooling(error, left));
                    }
                    earlier = Some(error);
                }
                Decision::Cooling(left) => break Err(cooling(error, left)),
                Decision::Stop => break Err(error),
            }
        };
        ticket.record(breaker_outcome(&result, answered), &self.metrics);
        Exchange {
            result: result.map_err(|error| error.sent_earlier(sent)),
            attempts,
            sent,
        }
    }
}

/// The failure of a call whose retry would land inside a cooldown: an
/// answer's `RetryInfo` becomes what is left of the cooldown.
fn cooling(mut error: UpstreamError, left: Duration) -> UpstreamError {
    if let UpstreamError::Rejected(rejection) = &mut error {
        rejection.cooldown = Some(left);
    }
    error
}

/// How the breaker should see a call's exchange: an answer, 502-504, no
/// connection, or nothing about the upstream.
fn breaker_outcome<T>(result: &Result<Reply<T>, UpstreamError>, answered: bool) -> Outcome {
    match result {
        Ok(_) => Outcome::Answered,
        Err(UpstreamError::Rejected(rejection)) if matches!(rejection.http_status, 502..=504) => {
            Outcome::GatewayError
        }
        Err(UpstreamError::Rejected(_) | UpstreamError::Malformed { .. }) => Outcome::Answered,
        Err(_) if answered => Outcome::Answered,
        Err(UpstreamError::Unreachable {
            fault: Fault::Connect | Fault::ConnectTimeout,
            ..
        }) => Outcome::Unreachable,
        Err(UpstreamError::Unreachable {
            fault: Fault::NotProcessed,
            ..
        }) => Outcome::Answered,
        Err(_) => Outcome::Neutral,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Rejection;

    #[test]
    fn the_breaker_counts_only_what_says_the_upstream_is_away() {
        let unreachable = |fault| -> Result<Reply<()>, UpstreamError> {
            Err(UpstreamError::Unreachable {
                detail: String::new(),
                fault,
                request_sent: false,
            })
        };
        let rejected = |status| -> Result<Reply<()>, UpstreamError> {
            Err(UpstreamError::Rejected(Box::new(Rejection {
                http_status: status,
                ..Default::default()
            })))
        };
        assert_eq!(
            breaker_outcome(&unreachable(Fault::Connect), false),
            Outcome::Unreachable
        );
        assert_eq!(
            breaker_outcome(&unreachable(Fault::ConnectTimeout), false),
            Outcome::Unreachable
        );
        assert_eq!(
            breaker_outcome(&unreachable(Fault::Connect), true),
            Outcome::Answered
        );
        assert_eq!(
            breaker_outcome(&unreachable(Fault::Deadline), false),
            Outcome::Neutral
        );
        assert_eq!(breaker_outcome(&rejected(400), false), Outcome::Answered);
        assert_eq!(
            breaker_outcome(&rejected(429), false),
            Outcome::Answered,
            "a rate limit is an answer: it never opens the breaker"
        );
        let cooling_down: Result<Reply<()>, _> = Err(UpstreamError::RateLimited {
            retry_after: Duration::from_secs(1),
        });
        assert_eq!(breaker_outcome(&cooling_down, false), Outcome::Neutral);
        assert_eq!(
            breaker_outcome(&rejected(503), false),
            Outcome::GatewayError
        );
        let queue_full: Result<Reply<()>, _> = Err(UpstreamError::QueueFull);
        assert_eq!(breaker_outcome(&queue_full, false), Outcome::Neutral);
    }
}
