//! How a transport error of the HTTP client becomes an [`UpstreamError`]:
//! which [`Fault`] it is (it decides retries and the circuit breaker), and
//! whether the request may have reached the upstream. The detail names the
//! fault, not the client's layers nor the URL (it holds the invoice id),
//! and never a proxy's password.

use std::error::Error as _;

use super::error::{Fault, UpstreamError};
use super::proxy::Proxy;

/// A transport error of the HTTP client as an [`UpstreamError`]. `sent`:
/// whether a connection took the request (`super::sent`); the proxy's
/// credentials are cut out of the text.
pub(super) fn failure(error: &reqwest::Error, sent: bool, proxy: &Proxy) -> UpstreamError {
    let (fault, request_sent) = if error.is_connect() {
        if error.is_timeout() {
            (Fault::ConnectTimeout, false)
        } else {
            (Fault::Connect, false)
        }
    } else if not_processed(error) {
        (Fault::NotProcessed, false)
    } else if sent {
        (Fault::Broken, true)
    } else {
        // No connection took it (a fresh one closed at once): unsent.
        (Fault::Connect, false)
    };
    let mut detail = proxy.name_tunnel_refusal(describe(error));
    if fault == Fault::ConnectTimeout {
        detail = format!("connecting timed out (--upstream-connect-timeout): {detail}");
    }
    UpstreamError::Unreachable {
        detail: proxy.scrub(detail),
        fault,
        request_sent,
    }
}

/// A body that broke off mid-answer: the request was sent.
pub(super) fn body_broken(error: &reqwest::Error, proxy: &Proxy) -> UpstreamError {
    UpstreamError::Unreachable {
        detail: proxy.scrub(describe(error)),
        fault: Fault::Broken,
        request_sent: true,
    }
}

/// HTTP/2 says the request was not processed: the server refused the
/// stream, or went away gracefully before it (both safe to send again,
/// RFC 9113 §8.7).
fn not_processed(error: &reqwest::Error) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return h2.is_remote()
                && ((h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM))
                    || (h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR)));
        }
        source = cause.source();
    }
    false
}

/// The causes of a transport error, for the caller: the fault, not the
/// client's layers (`client error (Connect)`) nor the URL (the invoice id).
fn describe(error: &reqwest::Error) -> String {
    let mut detail = String::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let mut text = cause.to_string();
        if is_tls(cause) {
            text = format!("TLS handshake with the upstream failed: {text}");
        }
        if !text.starts_with("client error (") && !detail.ends_with(&text) {
            if !detail.is_empty() {
                detail.push_str(": ");
            }
            detail.push_str(&text);
        }
        source = cause.source();
    }
    if detail.is_empty() {
        detail = error.to_string();
        if let Some(url) = error.url() {
            detail = detail.replace(url.as_str(), "the upstream");
        }
    }
    detail
}

/// Whether `cause` is rustls refusing the handshake (carried in an
/// `io::Error`, whose `source` skips it).
fn is_tls(cause: &(dyn std::error::Error + 'static)) -> bool {
    if cause.is::<rustls::Error>() {
        return true;
    }
    // io::Errors nest (`Other` around `InvalidData` around rustls's).
    let mut io = cause.downcast_ref::<std::io::Error>();
    while let Some(inner) = io.and_then(std::io::Error::get_ref) {
        if inner.is::<rustls::Error>() {
            return true;
        }
        io = inner.downcast_ref::<std::io::Error>();
    }
    false
}
