//! One attempt of a call's exchange: a slot of the connection cap
//! (`super::limit`), a client of this worker (`super::client`), the request
//! on the wire and its answer read whole (`super::request`,
//! `super::answer`), all within the call's deadline. Its guard
//! ([`AttemptGuard`]) records the attempt's metric and span however it
//! ends, a call dropped mid-attempt included.

use tokio::time::Instant;

use super::answer;
use super::client::{Learner, Worker};
use super::error::{Fault, UpstreamError};
use super::limit::Refused;
use super::metrics::{UpstreamMetrics, UpstreamResult};
use super::operation::Operation;
use super::request::Prepared;
use super::sent::SentFlag;
use super::transport;
use super::{CallContext, Reply, Upstream};
use crate::deadline::{Deadline, TimeoutBound};
use crate::routes::Route;
use crate::trace::UpstreamSpan;

/// One attempt's result, and whether it got as far as a request.
pub(super) struct Attempted<T> {
    pub(super) result: Result<Reply<T>, UpstreamError>,
    /// A slot was granted and the request handed to the client.
    pub(super) made: bool,
    /// A connection took the request.
    pub(super) sent: bool,
}

impl Upstream {
    /// One attempt: a slot, the request, the whole answer.
    pub(super) async fn attempt<Op: Operation>(
        &self,
        worker: &Worker,
        prepared: &Prepared,
        call: &CallContext<'_>,
    ) -> Attempted<Op::Response> {
        let deadline = &call.deadline;
        let not_made = |error| Attempted {
            result: Err(error),
            made: false,
            sent: false,
        };
        let slot = match self
            .shared
            .limit
            .acquire(worker.share, call.tenant, deadline.at())
            .await
        {
            Ok(slot) => slot,
            Err(Refused::QueueFull) => return not_made(UpstreamError::QueueFull),
            Err(Refused::Deadline) => {
                return not_made(UpstreamError::Timeout {
                    after: deadline.budget(),
                    bound: deadline.bound(),
                    request_sent: false,
                });
            }
        };
        let Some((client, learner)) = worker.choose(deadline.at()).await else {
            // Waited for another call's connection past the deadline.
            return not_made(connection_not_in_time(deadline));
        };
        let sent = SentFlag::probing(learner.as_ref().and_then(Learner::probe));
        let mut attempt = AttemptGuard {
            metrics: &self.metrics,
            route: Op::ROUTE,
            started: Instant::now(),
            span: call
                .span
                .map(|span| span.upstream(&Op::ROUTE.method, Op::ROUTE.template)),
            sent: sent.clone(),
            finished: false,
        };
        let exchange = self.on_the_wire::<Op>(
            client,
            prepared,
            call,
            attempt.span.as_ref(),
            &sent,
            learner,
        );
        let result = match tokio::time::timeout_at(deadline.at(), exchange).await {
            Ok(result) => result,
            Err(_) if sent.is_set() => Err(UpstreamError::Timeout {
                after: deadline.budget(),
                bound: deadline.bound(),
                request_sent: true,
            }),
            Err(_) => Err(connection_not_in_time(deadline)),
        };
        if let Err(UpstreamError::Unreachable {
            fault: Fault::Connect,
            ..
        }) = &result
        {
            worker.http2_refused();
        }
        drop(slot);
        attempt.finish(&result);
        // A connection took the request, unless the failure proves it went
        // no further (a proxy's 407, an HTTP/2 stream refused unprocessed).
        let sent = sent.is_set()
            && result
                .as_ref()
                .err()
                .is_none_or(UpstreamError::request_sent);
        Attempted {
            result,
            made: true,
            sent,
        }
    }

    /// The request on the wire and its answer read whole.
    async fn on_the_wire<Op: Operation>(
        &self,
        client: &reqwest::Client,
        prepared: &Prepared,
        call: &CallContext<'_>,
        span: Option<&UpstreamSpan>,
        sent: &SentFlag,
        learner: Option<Learner>,
    ) -> Result<Reply<Op::Response>, UpstreamError> {
        let proxy = &self.shared.proxy;
        let request = prepared.request(call, span, sent);
        let response = client
            .execute(request)
            .await
            .map_err(|e| transport::failure(&e, sent.is_set(), proxy))?;
        if let Some(refused) = proxy.refused(response.status()) {
            return Err(refused);
        }
        if let Some(learner) = learner {
            learner.answered(response.version());
        }
        answer::read::<Op>(response, proxy).await
    }
}

/// One attempt's metric and span: recorded by [`AttemptGuard::finish`], or,
/// when the call is dropped mid-attempt (the caller went away) while the
/// request may have been with the upstream, counted as cancelled.
struct AttemptGuard<'a> {
    metrics: &'a UpstreamMetrics,
    route: &'static Route,
    started: Instant,
    /// Taken by `finish`; a span dropped unfinished ends as cancelled.
    span: Option<UpstreamSpan>,
    sent: SentFlag,
    finished: bool,
}

impl AttemptGuard<'_> {
    fn finish<T>(&mut self, result: &Result<Reply<T>, UpstreamError>) {
        self.finished = true;
        let span = self.span.take();
        let (outcome, code) = match result {
            Ok(reply) => (UpstreamResult::Status(reply.http_status), None),
            Err(UpstreamError::Rejected(rejection)) => (
                UpstreamResult::Status(rejection.http_status),
                rejection.code.as_deref(),
            ),
            Err(UpstreamError::Malformed { http_status, .. }) => {
                (UpstreamResult::Malformed(Some(*http_status)), None)
            }
            Err(
                UpstreamError::Timeout { .. }
                | UpstreamError::Unreachable {
                    fault: Fault::Deadline,
                    ..
                },
            ) => (UpstreamResult::Timeout, None),
            Err(UpstreamError::Unreachable {
                request_sent: false,
                ..
            }) => (UpstreamResult::Connect, None),
            Err(UpstreamError::Unreachable { .. }) => (UpstreamResult::Connection, None),
            Err(
                UpstreamError::QueueFull
                | UpstreamError::RateLimited { .. }
                | UpstreamError::CircuitOpen { .. }
                | UpstreamError::Internal { .. },
            ) => return,
        };
        self.metrics
            .upstream_request(self.route, outcome, self.started.elapsed());
        if let Some(span) = span {
            span.end(outcome.status(), outcome.error_type(), code);
        }
    }
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        if !self.finished && self.sent.is_set() {
            self.metrics.upstream_request(
                self.route,
                UpstreamResult::Cancelled,
                self.started.elapsed(),
            );
        }
    }
}

/// The call's deadline passed before a connection took the request.
fn connection_not_in_time(deadline: &Deadline) -> UpstreamError {
    UpstreamError::Unreachable {
        detail: format!(
            "no connection to the upstream took the request within the call's {} ({})",
            crate::units::format_millis(deadline.budget()),
            match deadline.bound() {
                TimeoutBound::CallerDeadline => "deadline",
                TimeoutBound::UpstreamTimeout => "--upstream-timeout",
            }
        ),
        fault: Fault::Deadline,
        request_sent: false,
    }
}
