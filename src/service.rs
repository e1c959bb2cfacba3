//! `gormic.om.v1.InvoiceService`: reads the call metadata and deadline,
//! validates the request, and runs every RPC through one call path
//! (`InvoiceGateway::call`), each step owned by its module: admission
//! (`limits`), credentials (metadata, or `credentials` by mTLS identity),
//! validation, the idempotency key (`idempotency::step`), the upstream
//! exchange with its retries (`upstream`), the status (`errors`), the
//! response metadata and the log line (`call_log`).

use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::call_log::{CallLog, Ending};
use crate::credentials::CredentialMap;
use crate::errors::{CallError, FieldViolation, StatusContext};
use crate::idempotency::step::{Start, Verdict};
use crate::idempotency::{self, Idempotency, Lease};
use crate::limits::{InFlightLimit, RequestTooLarge};
use crate::metrics::{InFlight, Metrics};
use crate::proto::v1 as pb;
use crate::proto::v1::invoice_service_server::InvoiceService;
use crate::request_id::RequestId;
use crate::tls::CallerIdentity;
use crate::trace::{CallSpan, TraceContext, Tracer};
use crate::upstream::{
    CallContext, CloseInvoice, CreateInvoice, Credentials, DeleteInvoice, Operation, SendInvoice,
    UpdateInvoice, Upstream,
};

/// The service implementation; cheap to clone, all clones share one pool.
#[derive(Clone)]
pub struct InvoiceGateway {
    upstream: Upstream,
    in_flight: InFlightLimit,
    idempotency: Idempotency,
    /// `--credentials`: mTLS identities mapped to the keys sent upstream.
    credentials: Option<CredentialMap>,
    metrics: Metrics,
    tracer: Tracer,
}

impl std::fmt::Debug for InvoiceGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvoiceGateway")
            .field("upstream", &self.upstream)
            .field("max_in_flight", &self.in_flight.max())
            .field("credentials", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

/// What a call learns on its way, for its status, log line and record.
#[derive(Default)]
struct CallState {
    /// Upstream requests made, when any was tried.
    attempts: Option<u32>,
    upstream_status: Option<u16>,
    /// The idempotency lease to record the verdict on, and the verdict.
    lease: Option<(Lease, Verdict)>,
}

/// Counts the call in the metrics once: when it is answered, or as
/// CANCELLED when the caller goes away first (the future is dropped).
struct Finished<'a> {
    metrics: &'a Metrics,
    rpc: &'static str,
    started: Instant,
    _in_flight: InFlight<'a>,
    done: bool,
}

impl<'a> Finished<'a> {
    fn new(metrics: &'a Metrics, rpc: &'static str) -> Self {
        Self {
            metrics,
            rpc,
            started: Instant::now(),
            _in_flight: metrics.call_started(),
            done: false,
        }
    }

    fn record(&mut self, code: tonic::Code, organization: Option<&str>) {
        self.done = true;
        self.metrics
            .call_finished(self.rpc, code, self.started.elapsed(), organization);
    }
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.call_finished(
                self.rpc,
                tonic::Code::Cancelled,
                self.started.elapsed(),
                None,
            );
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
    /// A gateway with the command line's defaults: `--max-in-flight`, an
    /// in-memory idempotency store, callers bringing their own api-key.
    pub fn new(upstream: Upstream) -> Result<Self, crate::idempotency::ConfigError> {
        Ok(Self {
            upstream,
            in_flight: InFlightLimit::new(crate::limits::DEFAULT_MAX_IN_FLIGHT),
            idempotency: Idempotency::in_memory()?,
            credentials: None,
            metrics: Metrics::default(),
            tracer: Tracer::disabled(),
        })
    }

    /// Records every call, attempt, retry and shed call in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.upstream = self.upstream.with_metrics(metrics.clone());
        self.metrics = metrics;
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

    /// Runs one call of `Op`.
    async fn call<Op: Operation>(
        &self,
        request: Request<Op::Request>,
        validate: fn(&Op::Request) -> Vec<FieldViolation>,
    ) -> Result<Response<Op::Response>, Status> {
        let rpc = Op::ROUTE.rpc;
        let (metadata, extensions, message) = request.into_parts();
        let mut finished = Finished::new(&self.metrics, rpc);
        let request_id = RequestId::read(&metadata);
        let identity = extensions.get::<CallerIdentity>();
        let span = self
            .tracer
            .start_call(&TraceContext::from_metadata(&metadata), rpc);
        let trace_id = span.trace_id().hex();
        let mut log = CallLog::start(
            rpc,
            request_id.as_str(),
            trace_id.as_str(),
            identity.map(CallerIdentity::as_str),
        );
        let mut state = CallState::default();

        let answer = self
            .forward::<Op>(
                &metadata,
                &extensions,
                &message,
                validate,
                (&request_id, &span),
                &mut state,
            )
            .await;
        let (answer, replayed, reason) = match answer {
            Ok(Answer::Fresh(message)) => (Ok(message), false, None),
            Ok(Answer::Replayed(answer)) => (answer, true, None),
            Err(error) => {
                if let Some(shed) = error.shed_reason() {
                    self.metrics.call_shed(shed);
                }
                if matches!(error, CallError::Overloaded { .. }) {
                    log.skip();
                }
                let (status, reason) = error.to_status_and_reason(&StatusContext {
                    rpc,
                    request_id: Some(request_id.as_str()),
                    attempts: state.attempts,
                });
                (Err(status), false, Some(reason))
            }
        };
        // Recorded before answering, so that a quick retry finds it.
        if let Some((lease, verdict)) = state.lease.take() {
            Box::pin(idempotency::step::record(lease, verdict, &answer)).await;
        }

        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        finished.record(code, text(&metadata, "organization-id"));
        span.end(code, reason.as_deref());
        log.finish(Ending {
            code,
            upstream_status: state.upstream_status,
            attempts: state.attempts,
            error: answer.as_ref().err().map(Status::message),
            replayed,
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

    /// The steps of a call, up to its answer.
    async fn forward<Op: Operation>(
        &self,
        metadata: &MetadataMap,
        extensions: &tonic::Extensions,
        message: &Op::Request,
        validate: fn(&Op::Request) -> Vec<FieldViolation>,
        (request_id, span): (&RequestId, &CallSpan),
        state: &mut CallState,
    ) -> Result<Answer<Op::Response>, CallError> {
        // Refused before anything else: the cheapest answer, and the one
        // that protects the process.
        let _admitted = self.in_flight.try_admit().ok_or(CallError::Overloaded {
            max_in_flight: self.in_flight.max(),
        })?;
        if let Some(too_large) = extensions.get::<RequestTooLarge>() {
            return Err(CallError::RequestTooLarge(*too_large));
        }
        let credentials = self.credentials(metadata, extensions.get::<CallerIdentity>())?;
        let violations = validate(message);
        if !violations.is_empty() {
            return Err(CallError::InvalidRequest(violations));
        }
        let caller_timeout = grpc_timeout(metadata);

        // Boxed, and only for calls with a key: the store's futures are
        // large and most calls never need them.
        let start = if metadata.contains_key(idempotency::METADATA_KEY) {
            let lease = self.upstream.exchange_budget(caller_timeout)
                + self.idempotency.store_timeout()
                + idempotency::step::LEASE_SLACK;
            Box::pin(idempotency::step::start(
                &self.idempotency,
                metadata,
                Op::ROUTE.rpc,
                &credentials,
                message,
                lease,
            ))
            .await
        } else {
            Ok(Start::NoKey)
        };
        if let Some(result) = idempotency::step::metric(&start) {
            self.metrics.idempotency(result);
        }
        let lease = match start? {
            Start::NoKey => None,
            Start::Fresh(lease) => Some(lease),
            Start::Replay(outcome) => {
                return Ok(Answer::Replayed(idempotency::step::replay(&outcome)?));
            }
        };

        let call = CallContext {
            credentials,
            request_id: request_id.header(),
            caller_timeout,
            span,
        };
        let exchange = self.upstream.send::<Op>(&call, message).await;
        state.attempts = Some(exchange.attempts).filter(|&n| n > 0);
        state.upstream_status = match &exchange.result {
            Ok(reply) => Some(reply.http_status),
            Err(error) => error.http_status(),
        };
        if let Some(lease) = lease {
            let verdict = match &exchange.result {
                Ok(_) => Verdict::Complete,
                Err(error) => Verdict::of_failure(error, exchange.sent),
            };
            state.lease = Some((lease, verdict));
        }
        Ok(Answer::Fresh(exchange.result?.message))
    }

    /// The credentials sent upstream: the caller's own metadata, or with
    /// `--credentials` those mapped to its mTLS identity (its own api-key
    /// is then ignored, never forwarded). Authentication is checked before
    /// the organization: a caller without a key learns nothing else.
    fn credentials(
        &self,
        metadata: &MetadataMap,
        identity: Option<&CallerIdentity>,
    ) -> Result<Credentials, CallError> {
        let Some(map) = &self.credentials else {
            let mut api_key = header(metadata, "api-key").ok_or(CallError::MissingApiKey)?;
            api_key.set_sensitive(true);
            let organization_id =
                header(metadata, "organization-id").ok_or(CallError::MissingOrganizationId)?;
            return Ok(Credentials {
                api_key,
                organization_id,
            });
        };
        let identity = identity.ok_or(CallError::CallerNotAllowed { identity: None })?;
        let mapped = map
            .lookup(identity)
            .ok_or_else(|| CallError::CallerNotAllowed {
                identity: Some(identity.to_string()),
            })?;
        let organization_id = mapped
            .organization_id_for(header(metadata, "organization-id").as_ref())
            .map_err(|_| CallError::OrganizationNotAllowed {
                identity: identity.to_string(),
            })?
            .ok_or(CallError::MissingOrganizationId)?;
        Ok(Credentials {
            api_key: mapped.api_key.clone(),
            organization_id,
        })
    }
}

#[tonic::async_trait]
impl InvoiceService for InvoiceGateway {
    async fn create_invoice(
        &self,
        request: Request<pb::CreateInvoiceRequest>,
    ) -> Result<Response<pb::CreateInvoiceResponse>, Status> {
        self.call::<CreateInvoice>(request, validate_create).await
    }

    async fn update_invoice(
        &self,
        request: Request<pb::UpdateInvoiceRequest>,
    ) -> Result<Response<pb::UpdateInvoiceResponse>, Status> {
        self.call::<UpdateInvoice>(request, validate_update).await
    }

    async fn delete_invoice(
        &self,
        request: Request<pb::DeleteInvoiceRequest>,
    ) -> Result<Response<pb::DeleteInvoiceResponse>, Status> {
        self.call::<DeleteInvoice>(request, |r| invoice_id(&r.invoice_id).into_iter().collect())
            .await
    }

    async fn close_invoice(
        &self,
        request: Request<pb::CloseInvoiceRequest>,
    ) -> Result<Response<pb::CloseInvoiceResponse>, Status> {
        self.call::<CloseInvoice>(request, |r| invoice_id(&r.invoice_id).into_iter().collect())
            .await
    }

    async fn send_invoice(
        &self,
        request: Request<pb::SendInvoiceRequest>,
    ) -> Result<Response<pb::SendInvoiceResponse>, Status> {
        self.call::<SendInvoice>(request, |r| invoice_id(&r.invoice_id).into_iter().collect())
            .await
    }
}

// ---- metadata ------------------------------------------------------------

/// A non-empty ASCII metadata value, as an HTTP header value.
fn header(metadata: &MetadataMap, key: &str) -> Option<HeaderValue> {
    let value = metadata.get(key)?;
    let bytes = value.as_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    HeaderValue::from_bytes(bytes).ok()
}

fn text<'a>(metadata: &'a MetadataMap, key: &str) -> Option<&'a str> {
    metadata.get(key)?.to_str().ok().filter(|s| !s.is_empty())
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><unit>`,
/// at most 8 digits, unit one of `H M S m u n`).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = text(metadata, "grpc-timeout")?;
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

// ---- validation ----------------------------------------------------------

fn validate_create(request: &pb::CreateInvoiceRequest) -> Vec<FieldViolation> {
    let mut violations: Vec<_> = required("order_id", &request.order_id)
        .into_iter()
        .collect();
    if pb::InvoiceType::try_from(request.r#type).is_err() {
        violations.push(FieldViolation {
            field: "type",
            description: format!("unknown InvoiceType value {}", request.r#type),
        });
    }
    violations
}

fn validate_update(request: &pb::UpdateInvoiceRequest) -> Vec<FieldViolation> {
    invoice_id(&request.invoice_id)
        .into_iter()
        .chain(required("order_id", &request.order_id))
        .collect()
}

fn required(field: &'static str, value: &str) -> Option<FieldViolation> {
    value.is_empty().then(|| FieldViolation {
        field,
        description: "is required".to_owned(),
    })
}

/// Longest `invoice_id` accepted: it travels in the URL, percent-encoded (up
/// to three bytes per byte), and servers commonly refuse URLs over 8 KiB.
pub const MAX_INVOICE_ID_BYTES: usize = 1024;

/// Any id is encoded into one path segment, except the dot segments, which
/// URL normalisation would resolve against the path.
fn invoice_id(value: &str) -> Option<FieldViolation> {
    let problem = if value.is_empty() {
        "is required".to_owned()
    } else if matches!(value, "." | "..") {
        format!("must not be {value:?}")
    } else if value.len() > MAX_INVOICE_ID_BYTES {
        format!("is longer than {MAX_INVOICE_ID_BYTES} bytes")
    } else {
        return None;
    };
    Some(FieldViolation {
        field: "invoice_id",
        description: problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(key: &'static str, value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(key, value.parse().unwrap());
        metadata
    }

    /// tonic boxes every call's future, copying all of it: rare paths
    /// (connecting, the idempotency store) are boxed on their own so that
    /// this stays small (it was 10 KiB before).
    #[tokio::test]
    async fn a_calls_future_stays_small() {
        let url = url::Url::parse("http://127.0.0.1:1").unwrap();
        let upstream = Upstream::new(&url, Default::default()).unwrap();
        let gateway = InvoiceGateway::new(upstream).unwrap();
        let request = Request::new(pb::CloseInvoiceRequest::default());
        let call = gateway.call::<CloseInvoice>(request, |_| Vec::new());
        let size = std::mem::size_of_val(&call);
        assert!(size < 4096, "the call future is {size} bytes");
    }

    #[test]
    fn grpc_timeout_units() {
        let t = |v| grpc_timeout(&with("grpc-timeout", v));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("123456789S"), None);
        assert_eq!(t("5x"), None);
        assert_eq!(t("m"), None);
    }

    #[test]
    fn dot_segments_are_not_ids() {
        assert!(invoice_id(".").is_some());
        assert!(invoice_id("..").is_some());
        assert!(invoice_id("").is_some());
        assert!(invoice_id("...").is_none());
        assert!(invoice_id("a/b").is_none());
        assert!(invoice_id(&"x".repeat(MAX_INVOICE_ID_BYTES)).is_none());
        assert!(invoice_id(&"x".repeat(MAX_INVOICE_ID_BYTES + 1)).is_some());
    }
}
