//! Whether a request may have reached the upstream: the one fact the HTTP
//! client does not report when the gateway gives up on an attempt (the
//! call's deadline), and that retries, the idempotency verdict and the
//! caller's `request_sent` depend on.
//!
//! The request body carries a flag that is set the moment a connection
//! takes the request: hyper's HTTP/1.1 and HTTP/2 dispatchers both ask the
//! body `is_end_stream()` right when they start writing the request, and
//! nothing before that does (reqwest's redirect layer only reads
//! `size_hint`; its retry layer is off). So a flag still down when the
//! deadline fires proves the request never left: it was waiting for a
//! connection (connecting, or for an HTTP/2 stream). A flag that is up may
//! be early (the write may still fail), which errs on the safe side.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::client::Alpn;

/// Set once a connection has taken the request; shared with its body.
#[derive(Clone, Default)]
pub(super) struct SentFlag {
    sent: Arc<AtomicBool>,
    /// The protocol probe to tell, if this request is it.
    probe: Option<Arc<Alpn>>,
}

impl SentFlag {
    /// The flag of a request that probes the upstream's protocol.
    pub(super) fn probing(alpn: Option<Arc<Alpn>>) -> Self {
        Self {
            sent: Arc::default(),
            probe: alpn,
        }
    }

    pub(super) fn is_set(&self) -> bool {
        self.sent.load(Ordering::Relaxed)
    }

    fn set(&self) {
        if !self.sent.swap(true, Ordering::Relaxed)
            && let Some(alpn) = &self.probe
        {
            alpn.probe_sent();
        }
    }
}

impl std::fmt::Debug for SentFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SentFlag").field(&self.is_set()).finish()
    }
}

/// The JSON of one request (or nothing), telling [`SentFlag`] when a
/// connection takes it.
#[derive(Debug)]
pub(super) struct TrackedBody {
    data: Option<Bytes>,
    sent: SentFlag,
}

impl TrackedBody {
    pub(super) fn new(data: Option<Bytes>, sent: SentFlag) -> Self {
        Self {
            data: data.filter(|d| !d.is_empty()),
            sent,
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.sent.set();
        Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        // Asked by the connection as it starts writing the request.
        self.sent.set();
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn the_flag_goes_up_when_the_body_is_asked_for_its_end_or_read() {
        let sent = SentFlag::default();
        let body = TrackedBody::new(Some(Bytes::from_static(b"{}")), sent.clone());
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(
            !sent.is_set(),
            "building and sizing the request sends nothing"
        );
        assert!(!body.is_end_stream());
        assert!(sent.is_set());
        let bytes = body.collect().await.expect("infallible").to_bytes();
        assert_eq!(&bytes[..], b"{}");

        let sent = SentFlag::default();
        let empty = TrackedBody::new(None, sent.clone());
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(!sent.is_set());
        assert!(empty.is_end_stream());
        assert!(sent.is_set());
    }
}
