//! `gormic.om.v1.InvoiceService`: reads the call metadata and deadline,
//! validates the request, forwards it through [`Upstream`] and writes one log
//! line per call.

use std::future::Future;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::errors::{CallError, FieldViolation};
use crate::proto::v1 as pb;
use crate::proto::v1::invoice_service_server::InvoiceService;
use crate::routes;
use crate::upstream::{CallContext, Credentials, Reply, Upstream};

/// The service implementation; cheap to clone, all clones share one pool.
#[derive(Debug, Clone)]
pub struct InvoiceGateway {
    upstream: Upstream,
}

impl InvoiceGateway {
    pub fn new(upstream: Upstream) -> Self {
        Self { upstream }
    }

    /// Runs one call: metadata, validation, the upstream exchange, the
    /// status mapping and the log line.
    async fn handle<Req, Res, F, Fut>(
        &self,
        rpc: &'static str,
        request: Request<Req>,
        validate: fn(&Req) -> Vec<FieldViolation>,
        forward: F,
    ) -> Result<Response<Res>, Status>
    where
        F: FnOnce(CallContext, Req) -> Fut,
        Fut: Future<Output = Result<Reply<Res>, crate::upstream::UpstreamError>>,
    {
        let (metadata, _, message) = request.into_parts();
        let caller_request_id = text(&metadata, "x-request-id");
        let mut log = CallLog::start(rpc, caller_request_id);
        let result = async {
            let credentials = credentials(&metadata, caller_request_id)?;
            let violations = validate(&message);
            if !violations.is_empty() {
                return Err(CallError::InvalidRequest(violations));
            }
            let call = CallContext {
                credentials,
                caller_timeout: grpc_timeout(&metadata),
            };
            Ok(forward(call, message).await?)
        }
        .await;
        match result {
            Ok(reply) => {
                log.finish(Some(reply.http_status), tonic::Code::Ok, None);
                Ok(Response::new(reply.message))
            }
            Err(error) => {
                let status = error.to_status(rpc, caller_request_id);
                log.finish(error.http_status(), status.code(), Some(status.message()));
                Err(status)
            }
        }
    }
}

#[tonic::async_trait]
impl InvoiceService for InvoiceGateway {
    async fn create_invoice(
        &self,
        request: Request<pb::CreateInvoiceRequest>,
    ) -> Result<Response<pb::CreateInvoiceResponse>, Status> {
        self.handle(
            routes::CREATE_INVOICE.rpc,
            request,
            validate_create,
            |c, r| async move { self.upstream.create_invoice(&c, &r).await },
        )
        .await
    }

    async fn update_invoice(
        &self,
        request: Request<pb::UpdateInvoiceRequest>,
    ) -> Result<Response<pb::UpdateInvoiceResponse>, Status> {
        self.handle(
            routes::UPDATE_INVOICE.rpc,
            request,
            validate_update,
            |c, r| async move { self.upstream.update_invoice(&c, &r).await },
        )
        .await
    }

    async fn delete_invoice(
        &self,
        request: Request<pb::DeleteInvoiceRequest>,
    ) -> Result<Response<pb::DeleteInvoiceResponse>, Status> {
        let validate =
            |r: &pb::DeleteInvoiceRequest| invoice_id(&r.invoice_id).into_iter().collect();
        self.handle(
            routes::DELETE_INVOICE.rpc,
            request,
            validate,
            |c, r| async move { self.upstream.delete_invoice(&c, &r).await },
        )
        .await
    }

    async fn close_invoice(
        &self,
        request: Request<pb::CloseInvoiceRequest>,
    ) -> Result<Response<pb::CloseInvoiceResponse>, Status> {
        let validate =
            |r: &pb::CloseInvoiceRequest| invoice_id(&r.invoice_id).into_iter().collect();
        self.handle(
            routes::CLOSE_INVOICE.rpc,
            request,
            validate,
            |c, r| async move { self.upstream.close_invoice(&c, &r).await },
        )
        .await
    }

    async fn send_invoice(
        &self,
        request: Request<pb::SendInvoiceRequest>,
    ) -> Result<Response<pb::SendInvoiceResponse>, Status> {
        let validate = |r: &pb::SendInvoiceRequest| invoice_id(&r.invoice_id).into_iter().collect();
        self.handle(
            routes::SEND_INVOICE.rpc,
            request,
            validate,
            |c, r| async move { self.upstream.send_invoice(&c, &r).await },
        )
        .await
    }
}

// ---- metadata ------------------------------------------------------------

/// Authentication is checked before the organization: a caller without a
/// key learns nothing else.
fn credentials(metadata: &MetadataMap, request_id: Option<&str>) -> Result<Credentials, CallError> {
    let mut api_key = header(metadata, "api-key").ok_or(CallError::MissingApiKey)?;
    api_key.set_sensitive(true);
    let organization_id =
        header(metadata, "organization-id").ok_or(CallError::MissingOrganizationId)?;
    Ok(Credentials {
        api_key,
        organization_id,
        request_id: request_id.and_then(|id| HeaderValue::from_str(id).ok()),
    })
}

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

// ---- logging ---------------------------------------------------------------

/// Writes the call's log line when it finishes, or when the caller goes
/// away and the call's future is dropped.
struct CallLog<'a> {
    rpc: &'static str,
    /// The caller's `x-request-id`, to find the call in the logs.
    request_id: Option<&'a str>,
    started: Instant,
    done: bool,
}

impl<'a> CallLog<'a> {
    fn start(rpc: &'static str, request_id: Option<&'a str>) -> Self {
        Self {
            rpc,
            request_id,
            started: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, upstream_status: Option<u16>, code: tonic::Code, message: Option<&str>) {
        self.done = true;
        let latency_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        let grpc_code = code_name(code);
        let (rpc, request_id) = (self.rpc, self.request_id);
        match message {
            None => tracing::info!(
                rpc,
                request_id,
                upstream_status,
                grpc_code,
                latency_ms,
                "call"
            ),
            Some(error) => {
                tracing::info!(
                    rpc,
                    request_id,
                    upstream_status,
                    grpc_code,
                    latency_ms,
                    error,
                    "call"
                )
            }
        }
    }
}

impl Drop for CallLog<'_> {
    fn drop(&mut self) {
        if !self.done {
            let latency_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
            let (rpc, request_id) = (self.rpc, self.request_id);
            tracing::info!(
                rpc,
                request_id,
                grpc_code = "CANCELLED",
                latency_ms,
                "call cancelled by the caller"
            );
        }
    }
}

/// The canonical gRPC code name, as in the gRPC specification.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        metadata
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            grpc_timeout(&with_timeout("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            grpc_timeout(&with_timeout("2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            grpc_timeout(&with_timeout("1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            grpc_timeout(&with_timeout("99999999u")),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(&with_timeout("123456789S")), None);
        assert_eq!(grpc_timeout(&with_timeout("5x")), None);
        assert_eq!(grpc_timeout(&with_timeout("m")), None);
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
