//! Hard limits on what one process holds: the cap on calls in flight
//! (admission) and the cap on request message size. The upstream connection
//! cap and its queue live in `upstream::pool`; the HTTP/2 and HTTP/1.1
//! protections in `server`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::body::Body;

/// Default of `--max-in-flight`: a call waiting on a slow upstream holds
/// ~9 KiB (measured by scripts/limits, BENCHMARKS.md), so 10 000 of them
/// with 1024 busy upstream connections peak at ~140 MiB; far more than one
/// replica should ever serve at once, and a bound an operator can size a
/// container for.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// Default of `--max-request-bytes`. The largest legitimate request is an
/// UpdateInvoice with four ids of at most a few hundred bytes; 64 KiB leaves
/// room for any future field while refusing junk early.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A shed call is refused with this `RetryInfo` delay: long enough for a
/// burst to pass, short enough not to idle a recovered gateway.
pub const SHED_RETRY_DELAY: Duration = Duration::from_secs(1);
/// At most one log line per this period about shed calls.
const SHED_LOG_EVERY: Duration = Duration::from_secs(1);

/// The process-wide cap on calls in flight. Cheap to clone; all clones share
/// one count.
#[derive(Debug, Clone)]
pub struct InFlightLimit {
    inner: Arc<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    max: usize,
    current: AtomicUsize,
    shed_total: AtomicU64,
    /// Shed calls not yet reported in a log line, and when the last line was.
    shed_unreported: AtomicU64,
    last_report: std::sync::Mutex<Option<Instant>>,
}

/// One admitted call; gives its place back when dropped.
#[derive(Debug)]
pub struct Admitted {
    inner: Arc<InFlight>,
}

impl InFlightLimit {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(InFlight {
                max: max.max(1),
                current: AtomicUsize::new(0),
                shed_total: AtomicU64::new(0),
                shed_unreported: AtomicU64::new(0),
                last_report: std::sync::Mutex::new(None),
            }),
        }
    }

    /// Admits a call, or `None` when `max` calls are already in flight (the
    /// call is counted as shed and, at most once a second, logged).
    pub fn try_admit(&self) -> Option<Admitted> {
        let inner = &self.inner;
        let previous = inner.current.fetch_add(1, Ordering::AcqRel);
        if previous < inner.max {
            return Some(Admitted {
                inner: inner.clone(),
            });
        }
        inner.current.fetch_sub(1, Ordering::AcqRel);
        inner.shed_total.fetch_add(1, Ordering::Relaxed);
        inner.shed_unreported.fetch_add(1, Ordering::Relaxed);
        self.report_shedding();
        None
    }

    pub fn max(&self) -> usize {
        self.inner.max
    }

    pub fn in_flight(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed)
    }

    /// Calls refused so far.
    pub fn shed_total(&self) -> u64 {
        self.inner.shed_total.load(Ordering::Relaxed)
    }

    /// Logs the calls shed since the last line, at most once per
    /// [`SHED_LOG_EVERY`]. Called on each shed call, and every second by
    /// [`Self::report_periodically`] so that the tail of a burst is told too.
    fn report_shedding(&self) {
        let inner = &self.inner;
        let now = Instant::now();
        let Ok(mut last) = inner.last_report.try_lock() else {
            return; // another thread is reporting right now
        };
        if last.is_some_and(|at| now.duration_since(at) < SHED_LOG_EVERY) {
            return;
        }
        let count = inner.shed_unreported.swap(0, Ordering::Relaxed);
        if count == 0 {
            return;
        }
        *last = Some(now);
        tracing::warn!(
            shed = count,
            max_in_flight = inner.max,
            "overloaded: refused calls past --max-in-flight with RESOURCE_EXHAUSTED"
        );
    }

    /// Reports shed calls left unreported, every [`SHED_LOG_EVERY`], for as
    /// long as it runs (the server runs it beside the accept loop).
    pub async fn report_periodically(self) {
        let mut tick = tokio::time::interval(SHED_LOG_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.report_shedding();
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.inner.current.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Set on a request whose message is larger than `--max-request-bytes`; the
/// call path refuses it with RESOURCE_EXHAUSTED before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTooLarge {
    /// The length the gRPC frame declares.
    pub declared: usize,
    pub limit: usize,
}

/// The five bytes of a gRPC frame of length zero: the empty message.
const EMPTY_MESSAGE: [u8; 5] = [0; 5];

/// Checks the length prefix of a call's first gRPC message. An oversized
/// one is never read: the request is marked [`RequestTooLarge`] and its body
/// replaced by an empty message, so the refusal takes the one call path
/// (status, details, metrics, log line) instead of tonic's `OUT_OF_RANGE`,
/// which the gRPC specification reserves for other cases. Otherwise the
/// request goes on with the bytes read ahead put back in front.
pub async fn check_request_size(request: http::Request<Body>, limit: usize) -> http::Request<Body> {
    let (mut parts, body) = request.into_parts();
    let (head, rest) = read_prefix(body).await;
    let body = match declared_length(&head) {
        Some(declared) if declared > limit => {
            parts.extensions.insert(RequestTooLarge { declared, limit });
            // The rest of the oversized message is never read; h2 resets
            // the stream's request side when the call ends.
            Body::new(Replayed::new(Bytes::from_static(&EMPTY_MESSAGE), None))
        }
        _ => Body::new(Replayed::new(head, rest)),
    };
    http::Request::from_parts(parts, body)
}

/// The length a gRPC frame header declares (byte 0 is the compression flag).
fn declared_length(head: &[u8]) -> Option<usize> {
    let length: [u8; 4] = head.get(1..5)?.try_into().ok()?;
    Some(u32::from_be_bytes(length) as usize)
}

/// What was read of the body before the decision, and what remains.
enum Rest {
    Body(Body),
    Failed(tonic::Status),
}

/// Reads data frames until the five header bytes are in (or the body ends).
/// A unary request's message usually comes whole in its first frame, which
/// is then kept as it is, without a copy.
async fn read_prefix(mut body: Body) -> (Bytes, Option<Rest>) {
    let mut head = Bytes::new();
    while head.len() < EMPTY_MESSAGE.len() {
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if head.is_empty() => head = data,
                Ok(data) => {
                    let mut joined = BytesMut::with_capacity(head.len() + data.len());
                    joined.extend_from_slice(&head);
                    joined.extend_from_slice(&data);
                    head = joined.freeze();
                }
                // Trailers before a whole header: let tonic report it.
                Err(_) => break,
            },
            Some(Err(status)) => return (head, Some(Rest::Failed(status))),
            None => return (head, None),
        }
    }
    (head, Some(Rest::Body(body)))
}

/// A body that yields the bytes read ahead, then the rest of the original.
struct Replayed {
    head: Option<Bytes>,
    rest: Option<Rest>,
}

impl Replayed {
    fn new(head: Bytes, rest: Option<Rest>) -> Self {
        Self {
            head: (!head.is_empty()).then_some(head),
            rest,
        }
    }
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match self.rest.as_mut() {
            None => Poll::Ready(None),
            Some(Rest::Body(body)) => Pin::new(body).poll_frame(cx),
            Some(Rest::Failed(_)) => match self.rest.take() {
                Some(Rest::Failed(status)) => Poll::Ready(Some(Err(status))),
                _ => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && match &self.rest {
                None => true,
                Some(Rest::Body(body)) => body.is_end_stream(),
                Some(Rest::Failed(_)) => false,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        match &self.rest {
            Some(Rest::Body(body)) => {
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + head);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + head);
                }
                hint
            }
            _ => SizeHint::with_exact(head),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_admits_up_to_max_and_frees_on_drop() {
        let limit = InFlightLimit::new(2);
        let first = limit.try_admit().expect("first");
        let second = limit.try_admit().expect("second");
        assert!(limit.try_admit().is_none(), "third is shed");
        assert_eq!(limit.shed_total(), 1);
        assert_eq!(limit.in_flight(), 2);
        drop(first);
        let third = limit.try_admit().expect("room again");
        assert_eq!(limit.in_flight(), 2);
        drop((second, third));
        assert_eq!(limit.in_flight(), 0);
    }

    #[test]
    fn the_frame_header_declares_the_length() {
        assert_eq!(declared_length(&[0, 0, 0, 1, 0]), Some(256));
        assert_eq!(declared_length(&[1, 0, 1, 0, 0, 9, 9]), Some(65_536));
        assert_eq!(declared_length(&[0, 0, 0]), None);
    }

    #[tokio::test]
    async fn a_body_read_ahead_is_replayed_whole() {
        let original = Body::new(http_body_util::Full::new(Bytes::from_static(
            b"\0\0\0\0\x03abc",
        )));
        let (head, rest) = read_prefix(original).await;
        assert_eq!(&head[..], b"\0\0\0\0\x03abc");
        let replayed = Replayed::new(head, rest)
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&replayed[..], b"\0\0\0\0\x03abc");
    }
}
