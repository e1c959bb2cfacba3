//! The upstream's answer, read whole and turned into a [`Reply`] or an
//! [`UpstreamError`]: a 2xx whose body is the envelope is a success; any
//! other answer is read as an error answer (`{"error": {"code": …}}`, or the
//! start of whatever else the body holds), with its `Retry-After` (seconds
//! or an HTTP-date) and request id. The JSON shapes are `super::wire`'s.

use http::header::RETRY_AFTER;

use super::Reply;
use super::error::{self, Rejection, UpstreamError};
use super::operation::{Operation, Undecodable};
use super::proxy::Proxy;
use super::transport;
use super::wire;

/// Largest upstream body the gateway reads; a larger one is a malformed answer
/// (the known answers are a few hundred bytes, this bounds memory per call).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Reads `response` whole and decodes it as `Op`'s answer.
pub(super) async fn read<Op: Operation>(
    mut response: reqwest::Response,
    proxy: &Proxy,
) -> Result<Reply<Op::Response>, UpstreamError> {
    let status = response.status();
    let http_status = status.as_u16();
    let bytes = read_body(&mut response, http_status, proxy).await?;

    // A 2xx is a success when its body is the envelope; otherwise, and
    // for every other status, the body is read as an error answer.
    let header_request_id = || {
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let unreadable = if status.is_success() {
        match Op::decode(&bytes) {
            Ok(message) => {
                return Ok(Reply {
                    message,
                    http_status,
                });
            }
            Err(Undecodable::Unreadable { detail, request_id }) => {
                return Err(UpstreamError::Malformed {
                    http_status,
                    detail: format!("{}: {detail}", Op::ROUTE.rpc),
                    request_id,
                });
            }
            Err(Undecodable::NotTheEnvelope(error)) => Some(error),
        }
    } else {
        None
    };
    let parsed = wire::ErrorBody::parse(&bytes).unwrap_or_default();
    if let Some(error) = unreadable
        && parsed.code.is_none()
    {
        return Err(UpstreamError::Malformed {
            http_status,
            detail: format!("{}: {error}", Op::ROUTE.rpc),
            request_id: header_request_id(),
        });
    }
    // A 2xx carrying `{"error": {"code": …}}` is a refusal like a 400.
    let body_excerpt = match parsed.code {
        Some(_) => None,
        None => error::excerpt(&bytes),
    };
    Err(UpstreamError::Rejected(Box::new(Rejection {
        http_status,
        code: parsed.code,
        message: parsed.message,
        request_id: parsed.request_id.or_else(header_request_id),
        retry_after: response
            .headers()
            .get(RETRY_AFTER)
            .map(|v| error::parse_retry_after(v.as_bytes(), std::time::SystemTime::now())),
        cooldown: None,
        body_excerpt,
    })))
}

/// Reads the body chunk by chunk so that an oversized answer is refused
/// before it is held in memory.
async fn read_body(
    response: &mut reqwest::Response,
    http_status: u16,
    proxy: &Proxy,
) -> Result<Vec<u8>, UpstreamError> {
    let expected = response.content_length();
    let mut bytes =
        Vec::with_capacity(expected.map_or(512, |n| n.min(MAX_BODY_BYTES as u64) as usize));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport::body_broken(&e, proxy))?
    {
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(UpstreamError::Malformed {
                http_status,
                detail: format!("answer larger than {MAX_BODY_BYTES} bytes"),
                request_id: None,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}
