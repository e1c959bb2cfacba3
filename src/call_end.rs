//! The end of a call, recorded once: its metrics, its one log line and its
//! span, from one clock. [`CallEnd::finish`] records how the call was
//! answered; a call whose future is dropped first (the caller went away)
//! is recorded as CANCELLED when the guard drops. Log fields: `rpc`,
//! `request_id`, `trace_id`, `caller` (the mTLS identity),
//! `upstream_status`, `attempts`, `replayed`, `grpc_code`, `latency_ms`,
//! `error`. Never a key. The calls' series are declared in `metrics`.

mod metrics;

use tokio::time::Instant;

pub use metrics::{CallMetrics, MAX_ORGANIZATION_ID_BYTES, MAX_ORGANIZATIONS};

/// The `target` of the call lines, kept from before this module's name
/// changed, so that log queries filtering on it keep working.
const TARGET: &str = "gormic_gateway::call_log";

use crate::grpc_code;
use crate::routes::Route;
use crate::trace::CallSpan;

/// A call being served; recorded once.
pub(crate) struct CallEnd<'a> {
    metrics: &'a CallMetrics,
    route: &'static Route,
    /// The call's `x-request-id` (the caller's, or generated), to find it.
    request_id: &'a str,
    caller: Option<&'a str>,
    started: Instant,
    /// Present until the call is recorded.
    span: Option<CallSpan>,
}

/// How a call ended.
pub(crate) struct Ending<'a> {
    pub code: tonic::Code,
    /// `ErrorInfo.reason` of a failure (the span's `error.code`).
    pub reason: Option<&'a str>,
    pub upstream_status: Option<u16>,
    /// Upstream requests made; `None` when none was tried.
    pub attempts: Option<u32>,
    pub error: Option<&'a str>,
    /// The outcome was replayed from an idempotency record.
    pub replayed: bool,
    /// The organization-id sent upstream (the metrics' optional label).
    pub organization: Option<&'a str>,
}

impl<'a> CallEnd<'a> {
    pub(crate) fn start(
        metrics: &'a CallMetrics,
        route: &'static Route,
        request_id: &'a str,
        caller: Option<&'a str>,
        span: CallSpan,
    ) -> Self {
        Self {
            metrics,
            route,
            request_id,
            caller,
            started: Instant::now(),
            span: Some(span),
        }
    }

    /// The call's span, for its upstream attempts.
    pub(crate) fn span(&self) -> Option<&CallSpan> {
        self.span.as_ref()
    }

    /// Records the call's metrics, log line and span.
    pub(crate) fn finish(mut self, ending: Ending<'_>) {
        let Some(span) = self.span.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        self.metrics
            .call_finished(self.route, ending.code, elapsed, ending.organization);
        let trace_id = span.trace_id().hex();
        let Self {
            route,
            request_id,
            caller,
            ..
        } = self;
        let (upstream_status, attempts, error) =
            (ending.upstream_status, ending.attempts, ending.error);
        tracing::info!(
            target: TARGET,
            rpc = route.rpc,
            request_id,
            trace_id = trace_id.as_str(),
            caller,
            upstream_status,
            attempts,
            replayed = ending.replayed.then_some(true),
            grpc_code = grpc_code::name(ending.code),
            latency_ms = elapsed.as_micros() as f64 / 1000.0,
            error,
            "call"
        );
        span.end(ending.code, ending.reason);
    }
}

impl Drop for CallEnd<'_> {
    fn drop(&mut self) {
        // Still here: the caller went away before the answer.
        let Some(span) = self.span.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        self.metrics
            .call_finished(self.route, tonic::Code::Cancelled, elapsed, None);
        let trace_id = span.trace_id().hex();
        tracing::info!(
            target: TARGET,
            rpc = self.route.rpc,
            request_id = self.request_id,
            trace_id = trace_id.as_str(),
            caller = self.caller,
            grpc_code = "CANCELLED",
            latency_ms = elapsed.as_micros() as f64 / 1000.0,
            "call cancelled by the caller"
        );
        // The span ends itself as CANCELLED when dropped.
        drop(span);
    }
}
