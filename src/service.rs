//! `gormic.om.v1.InvoiceService`: every RPC runs through one call path,
//! [`InvoiceGateway::call`], which reads as the steps of a call, each owned
//! by its module:
//!
//! 1. admission (`limits`): one permit from the first step to the last;
//! 2. the deadline (`deadline`), anchored at arrival, used by every step;
//! 3. the end-of-call record (`call_end`): metrics, log line, span;
//! 4. the request's size (`limits`), its credentials (`credentials`), its
//!    fields (`Operation::validate`), its tenant's fair share (`tenant`,
//!    `limits`), its quotas (`quota`, with `--quotas`): a refused call
//!    takes no lease and is never sent;
//! 5. the idempotency key (`idempotency::step`): a lease, or a replay;
//! 6. the upstream exchange with its retries (`upstream`): the credential's
//!    cooldown first, then the breaker, each attempt in the tenant's turn
//!    for a slot; an answer that accepted the credentials makes the organization
//!    trusted (`tenant`);
//! 7. the status of a failure (`errors`, the one table);
//! 8. the idempotency verdict, recorded within the deadline;
//! 9. the record of the call, and the answer's metadata.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::call_end::{CallEnd, CallMetrics, Ending};
use crate::credentials::{self, CredentialMap, Credentials};
use crate::deadline::{Deadline, DeadlineArgs};
use crate::errors::{CallError, StatusContext};
use crate::idempotency::step::{Start, Verdict};
use crate::idempotency::{self, Idempotency, IdempotencyMetrics, Lease};
use crate::limits::{
    Admitted, InFlightLimit, RequestTooLarge, ShedMetrics, ShedReason, TenantMetrics,
};
use crate::metrics::Metrics;
use crate::proto::v1 as pb;
use crate::proto::v1::invoice_service_server::InvoiceService;
use crate::quota::Quotas;
use crate::request_id::RequestId;
use crate::tenant::{TenantKey, Tenants};
use crate::tls::CallerIdentity;
use crate::trace::{CallSpan, TraceContext, Tracer};
use crate::upstream::{
    CallContext, CloseInvoice, CreateInvoice, DeleteInvoice, Operation, SendInvoice, UpdateInvoice,
    Upstream,
};

/// The service implementation; cheap to clone, all clones share one
/// upstream client, admission cap and idempotency store.
#[derive(Clone)]
pub struct InvoiceGateway {
    upstream: Upstream,
    in_flight: InFlightLimit,
    deadlines: DeadlineArgs,
    idempotency: Idempotency,
    /// `--credentials`: mTLS identities mapped to the keys sent upstream.
    credentials: Option<CredentialMap>,
    /// Who each call is for (`--tenant-key`), and the organizations trusted.
    tenants: Tenants,
    /// `--quotas`: `None` costs the call path one branch.
    quotas: Option<Quotas>,
    metrics: Metrics,
    /// The call path's series, registered in `metrics`.
    calls: Arc<CallMetrics>,
    shed: Arc<ShedMetrics>,
    idempotency_results: Arc<IdempotencyMetrics>,
    tracer: Tracer,
}

impl std::fmt::Debug for InvoiceGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvoiceGateway")
            .field("upstream", &self.upstream)
            .field("max_in_flight", &self.in_flight.max())
            .field("credentials", &self.credentials.is_some())
            .field("tenant_key", &self.tenants.key())
            .field("quotas", &self.quotas)
            .finish_non_exhaustive()
    }
}

/// What the steps of a call came to, before it becomes a gRPC answer.
struct Outcome<R> {
    answer: Result<Answer<R>, CallError>,
    /// Upstream requests made, when any was.
    attempts: Option<u32>,
    upstream_status: Option<u16>,
    /// The idempotency lease to record the verdict on, and the verdict.
    lease: Option<(Lease, Verdict)>,
    /// The organization-id sent upstream (never the caller's claim alone).
    organization: Option<HeaderValue>,
}

impl<R> Outcome<R> {
    fn refused(error: impl Into<CallError>, organization: Option<HeaderValue>) -> Self {
        Self {
            answer: Err(error.into()),
            attempts: None,
            upstream_status: None,
            lease: None,
            organization,
        }
    }
}

/// A call's answer before it becomes a gRPC response.
enum Answer<R> {
    /// From the upstream, now.
    Fresh(R),
    /// From the idempotency record: the first call's answer.
    Replayed(Result<R, Status>),
}

impl InvoiceGateway {
    /// A gateway with the command line's defaults: `--max-in-flight`,
    /// `--upstream-timeout`, an in-memory idempotency store, callers
    /// bringing their own api-key.
    pub fn new(upstream: Upstream) -> Result<Self, crate::idempotency::ConfigError> {
        let metrics = Metrics::default();
        let gateway = Self {
            upstream,
            in_flight: InFlightLimit::new(crate::limits::DEFAULT_MAX_IN_FLIGHT),
            deadlines: DeadlineArgs::default(),
            idempotency: Idempotency::in_memory()?,
            credentials: None,
            tenants: Tenants::new(TenantKey::default()),
            quotas: None,
            calls: metrics.series(),
            shed: metrics.series(),
            idempotency_results: metrics.series(),
            metrics,
            tracer: Tracer::disabled(),
        };
        gateway.watch_admission();
        Ok(gateway)
    }

    /// Points the in-flight and tenant gauges of `self.metrics` at
    /// `self.in_flight` and `self.tenants`; called whenever one of the three
    /// is set.
    fn watch_admission(&self) {
        self.metrics.count_in_flight(&self.in_flight);
        self.metrics
            .series::<TenantMetrics>()
            .watch(&self.in_flight, &self.tenants);
    }

    /// Records every call, attempt, retry and shed call in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.upstream = self.upstream.with_metrics(metrics.clone());
        self.calls = metrics.series();
        self.shed = metrics.series();
        self.idempotency_results = metrics.series();
        self.quotas = self.quotas.map(|quotas| quotas.with_metrics(&metrics));
        self.metrics = metrics;
        self.watch_admission();
        self
    }

    /// Continues the caller's trace (W3C `traceparent`) and, when exporting,
    /// records a span per call and per upstream request.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// The cap on calls in flight (the server reports its shedding).
    pub fn in_flight_limit(&self) -> &InFlightLimit {
        &self.in_flight
    }

    /// Replaces the cap on calls in flight.
    pub fn with_in_flight_limit(mut self, limit: InFlightLimit) -> Self {
        self.in_flight = limit;
        self.watch_admission();
        self
    }

    /// Replaces the tenants (`--tenant-key`, the trusted organizations).
    pub fn with_tenants(mut self, tenants: Tenants) -> Self {
        self.tenants = tenants;
        self.watch_admission();
        self
    }

    /// `--upstream-timeout` and `--deadline-margin`.
    pub fn with_deadlines(mut self, deadlines: DeadlineArgs) -> Self {
        self.deadlines = deadlines;
        self
    }

    /// Replaces the idempotency store.
    pub fn with_idempotency(mut self, store: Idempotency) -> Self {
        self.idempotency = store;
        self
    }

    /// Injects credentials by mTLS identity (`--credentials`).
    pub fn with_credentials(mut self, map: CredentialMap) -> Self {
        self.credentials = Some(map);
        self
    }

    /// Checks every call against quotas (`--quotas`), counted in this
    /// gateway's metrics.
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = Some(quotas.with_metrics(&self.metrics));
        self
    }

    /// Runs one call of `Op`, step by step (module comment).
    async fn call<Op: Operation>(
        &self,
        request: Request<Op::Request>,
    ) -> Result<Response<Op::Response>, Status> {
        let route = Op::ROUTE;
        // Step 1, before anything else: a shed call costs only its refusal.
        // The permit is held to step 9.
        let Some(admitted) = self.in_flight.try_admit() else {
            return Err(self.shed(route.rpc));
        };
        let (metadata, extensions, message) = request.into_parts();
        // Step 2, at arrival: every later step runs against it.
        let deadline = Deadline::for_call(&self.deadlines, &metadata);
        // Step 3.
        let request_id = RequestId::read(&metadata);
        let identity = extensions.get::<CallerIdentity>();
        let span = self
            .tracer
            .start_call(&TraceContext::from_metadata(&metadata), route.rpc);
        let end = CallEnd::start(
            &self.calls,
            route,
            request_id.as_str(),
            identity.map(CallerIdentity::as_str),
            span,
        );
        // Steps 4 to 6: an oversized request is refused first.
        let outcome = match extensions.get::<RequestTooLarge>() {
            Some(too_large) => Outcome::refused(CallError::RequestTooLarge(*too_large), None),
            None => {
                self.forward::<Op>(
                    &metadata,
                    identity,
                    &message,
                    &request_id,
                    end.span(),
                    deadline,
                )
                .await
            }
        };
        // Step 7.
        let (answer, replayed, reason) = match outcome.answer {
            Ok(Answer::Fresh(message)) => (Ok(message), false, None),
            Ok(Answer::Replayed(answer)) => (answer, true, None),
            Err(ref error) => {
                if let Some(shed) = error.shed_reason() {
                    self.shed.call_shed(shed);
                }
                let (status, reason) = error.to_status_and_reason(&StatusContext {
                    rpc: route.rpc,
                    request_id: Some(request_id.as_str()),
                    attempts: outcome.attempts,
                });
                (Err(status), false, Some(reason))
            }
        };
        // Step 8, before answering, so that a quick retry finds the verdict.
        if let Some((lease, verdict)) = outcome.lease {
            record_within(lease, verdict, &answer, &deadline, admitted).await;
        }
        // Step 9.
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        end.finish(Ending {
            code,
            reason: reason.as_deref(),
            upstream_status: outcome.upstream_status,
            attempts: outcome.attempts,
            error: answer.as_ref().err().map(Status::message),
            replayed,
            organization: outcome.organization.as_ref().and_then(|o| o.to_str().ok()),
        });
        let mut answer = answer.map(Response::new);
        let metadata = match &mut answer {
            Ok(response) => response.metadata_mut(),
            Err(status) => status.metadata_mut(),
        };
        request_id.set_on(metadata);
        if replayed {
            metadata.insert(
                crate::idempotency::REPLAYED_METADATA_KEY,
                MetadataValue::from_static("true"),
            );
        }
        answer
    }

    /// Steps 4 to 6 of [`Self::call`] (module doc), for a request of an
    /// accepted size from `identity`.
    async fn forward<Op: Operation>(
        &self,
        metadata: &MetadataMap,
        identity: Option<&CallerIdentity>,
        message: &Op::Request,
        request_id: &RequestId,
        span: Option<&CallSpan>,
        deadline: Deadline,
    ) -> Outcome<Op::Response> {
        let credentials = match credentials::for_call(self.credentials.as_ref(), metadata, identity)
        {
            Ok(credentials) => credentials,
            Err(refusal) => return Outcome::refused(refusal, None),
        };
        let organization = Some(credentials.organization_id.clone());
        let violations = Op::validate(message);
        if !violations.is_empty() {
            return Outcome::refused(CallError::InvalidRequest(violations), organization);
        }
        let tenant = self
            .tenants
            .identify(&credentials, identity, self.credentials.is_some());
        // Counted in the tenant's share until the exchange is over.
        let _share = match self.in_flight.fair_share(tenant.id) {
            Ok(share) => share,
            Err(over) => return Outcome::refused(over, organization),
        };
        if let Some(quotas) = &self.quotas
            && let Err(refused) = quotas
                .check(
                    Op::ROUTE,
                    identity,
                    credentials.organization_id.as_bytes(),
                    deadline.at(),
                )
                .await
        {
            return Outcome::refused(refused, organization);
        }

        let began = Instant::now();
        let lease = match self
            .idempotency_start::<Op>(metadata, &credentials, message, &deadline)
            .await
        {
            Ok(Start::NoKey) => None,
            Ok(Start::Fresh(lease)) => Some(lease),
            Ok(Start::Replay(outcome)) => {
                return Outcome {
                    answer: idempotency::step::replay(&outcome)
                        .map(Answer::Replayed)
                        .map_err(CallError::from),
                    attempts: None,
                    upstream_status: None,
                    lease: None,
                    organization,
                };
            }
            Err(refusal) => return Outcome::refused(refusal, organization),
        };

        // The verdict is recorded after the exchange, within the deadline:
        // keep back about what taking the lease cost (one store round trip).
        let deadline = match &lease {
            Some(_) => deadline.reserving(self.record_reserve(began.elapsed(), &deadline)),
            None => deadline,
        };
        let call = CallContext {
            credentials: &credentials,
            request_id: request_id.header(),
            span,
            deadline,
            tenant: tenant.id,
        };
        let exchange = self.upstream.send::<Op>(&call, message).await;
        let upstream_status = match &exchange.result {
            Ok(reply) => Some(reply.http_status),
            Err(error) => error.http_status(),
        };
        if let Some(status) = upstream_status {
            self.tenants.answered(&tenant, status);
        }
        let lease = lease.map(|lease| {
            let verdict = match &exchange.result {
                Ok(_) => Verdict::Complete,
                Err(error) => Verdict::of_failure(error, exchange.sent),
            };
            (lease, verdict)
        });
        Outcome {
            answer: exchange
                .result
                .map(|reply| Answer::Fresh(reply.message))
                .map_err(CallError::from),
            attempts: Some(exchange.attempts).filter(|&n| n > 0),
            upstream_status,
            lease,
            organization,
        }
    }

    /// Step 5, only for calls with a key (boxed: the store's futures are
    /// large and most calls never need them), counted in the metrics.
    async fn idempotency_start<Op: Operation>(
        &self,
        metadata: &MetadataMap,
        credentials: &Credentials,
        message: &Op::Request,
        deadline: &Deadline,
    ) -> Result<Start, idempotency::step::Refusal> {
        if !metadata.contains_key(idempotency::METADATA_KEY) {
            return Ok(Start::NoKey);
        }
        let start = Box::pin(idempotency::step::start(
            &self.idempotency,
            metadata,
            Op::ROUTE.rpc,
            credentials,
            message,
            deadline,
        ))
        .await;
        if let Some(result) = idempotency::step::metric(&start) {
            self.idempotency_results.idempotency(result);
        }
        start
    }

    /// How much of the deadline the exchange leaves to the idempotency
    /// record: twice the lease's round trip (at least [`MIN_RECORD_RESERVE`]),
    /// never more than half of what is left nor the store timeout. A record
    /// slower than that is finished in the background (`record_within`).
    fn record_reserve(&self, begin_took: Duration, deadline: &Deadline) -> Duration {
        let store_timeout = self.idempotency.store_timeout();
        if store_timeout.is_zero() {
            return Duration::ZERO; // the memory store records at once
        }
        (begin_took * 2)
            .max(MIN_RECORD_RESERVE)
            .min(deadline.remaining() / 2)
            .min(store_timeout)
    }

    /// The refusal of a call past `--max-in-flight`: one counter, no log
    /// line of its own (`limits` tells shedding once a second).
    fn shed(&self, rpc: &'static str) -> Status {
        self.shed.call_shed(ShedReason::InFlightLimit);
        CallError::Overloaded {
            max_in_flight: self.in_flight.max(),
        }
        .to_status(&StatusContext {
            rpc,
            request_id: None,
            attempts: None,
        })
    }
}

/// The least time kept back for an idempotency record in a remote store.
const MIN_RECORD_RESERVE: Duration = Duration::from_millis(5);

/// Step 8: records the verdict, within the call's deadline. A record still
/// under way at the deadline is finished in the background, holding the
/// call's admission permit, while the lease keeps repeats waiting
/// (`idempotency::step`, "When the record cannot be written in time").
async fn record_within<M: prost::Message>(
    lease: Lease,
    verdict: Verdict,
    answer: &Result<M, Status>,
    deadline: &Deadline,
    admitted: Admitted,
) {
    let mut record = Box::pin(idempotency::step::record(lease, verdict, answer));
    if tokio::time::timeout_at(deadline.at(), &mut record)
        .await
        .is_err()
    {
        tracing::warn!(
            ?verdict,
            "idempotency verdict not recorded by the call's deadline: answered, \
             finishing the record in the background"
        );
        tokio::spawn(async move {
            record.await;
            drop(admitted);
        });
    }
}

#[tonic::async_trait]
impl InvoiceService for InvoiceGateway {
    async fn create_invoice(
        &self,
        request: Request<pb::CreateInvoiceRequest>,
    ) -> Result<Response<pb::CreateInvoiceResponse>, Status> {
        self.call::<CreateInvoice>(request).await
    }

    async fn update_invoice(
        &self,
        request: Request<pb::UpdateInvoiceRequest>,
    ) -> Result<Response<pb::UpdateInvoiceResponse>, Status> {
        self.call::<UpdateInvoice>(request).await
    }

    async fn delete_invoice(
        &self,
        request: Request<pb::DeleteInvoiceRequest>,
    ) -> Result<Response<pb::DeleteInvoiceResponse>, Status> {
        self.call::<DeleteInvoice>(request).await
    }

    async fn close_invoice(
        &self,
        request: Request<pb::CloseInvoiceRequest>,
    ) -> Result<Response<pb::CloseInvoiceResponse>, Status> {
        self.call::<CloseInvoice>(request).await
    }

    async fn send_invoice(
        &self,
        request: Request<pb::SendInvoiceRequest>,
    ) -> Result<Response<pb::SendInvoiceResponse>, Status> {
        self.call::<SendInvoice>(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tonic boxes every call's future, copying all of it: rare paths
    /// (connecting, the idempotency store) are boxed on their own so that
    /// this stays small (it was 10 KiB before).
    #[tokio::test]
    async fn a_calls_future_stays_small() {
        let url = url::Url::parse("http://127.0.0.1:1").unwrap();
        let upstream = Upstream::new(&url, Default::default()).unwrap();
        let gateway = InvoiceGateway::new(upstream).unwrap();
        let request = Request::new(pb::CloseInvoiceRequest::default());
        let call = gateway.call::<CloseInvoice>(request);
        let size = std::mem::size_of_val(&call);
        assert!(size < 4096, "the call future is {size} bytes");
    }
}
