//! The one log line each call writes: when it finishes, or when the caller
//! goes away and the call's future is dropped. Fields: `rpc`, `request_id`,
//! `trace_id`, `caller` (the mTLS identity), `upstream_status`,
//! `attempts`, `grpc_code`, `latency_ms`, `error`. Never a key.

use tokio::time::Instant;

use crate::errors::code_name;

/// A call's log line, written once.
pub(crate) struct CallLog<'a> {
    rpc: &'static str,
    /// The call's `x-request-id` (the caller's, or generated), to find it.
    request_id: &'a str,
    trace_id: &'a str,
    caller: Option<&'a str>,
    started: Instant,
    done: bool,
}

/// How a call ended, for its log line.
pub(crate) struct Ending<'a> {
    pub code: tonic::Code,
    pub upstream_status: Option<u16>,
    /// Upstream requests made; `None` when none was tried.
    pub attempts: Option<u32>,
    pub error: Option<&'a str>,
    /// The outcome was replayed from an idempotency record.
    pub replayed: bool,
}

impl<'a> CallLog<'a> {
    pub(crate) fn start(
        rpc: &'static str,
        request_id: &'a str,
        trace_id: &'a str,
        caller: Option<&'a str>,
    ) -> Self {
        Self {
            rpc,
            request_id,
            trace_id,
            caller,
            started: Instant::now(),
            done: false,
        }
    }

    /// Ends the call without a line of its own: calls shed past
    /// `--max-in-flight` are told by one line per second (`limits`), so
    /// that a burst does not write one line per refused call.
    pub(crate) fn skip(&mut self) {
        self.done = true;
    }

    pub(crate) fn finish(&mut self, ending: Ending<'_>) {
        if self.done {
            return; // skipped
        }
        self.done = true;
        let latency_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        let grpc_code = code_name(ending.code);
        let Self {
            rpc,
            request_id,
            trace_id,
            caller,
            ..
        } = *self;
        let (upstream_status, attempts, error) =
            (ending.upstream_status, ending.attempts, ending.error);
        let replayed = ending.replayed.then_some(true);
        tracing::info!(
            rpc,
            request_id,
            trace_id,
            caller,
            upstream_status,
            attempts,
            replayed,
            grpc_code,
            latency_ms,
            error,
            "call"
        );
    }
}

impl Drop for CallLog<'_> {
    fn drop(&mut self) {
        if !self.done {
            let latency_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
            let Self {
                rpc,
                request_id,
                trace_id,
                caller,
                ..
            } = *self;
            tracing::info!(
                rpc,
                request_id,
                trace_id,
                caller,
                grpc_code = "CANCELLED",
                latency_ms,
                "call cancelled by the caller"
            );
        }
    }
}
