//! Hard limits on what one process holds: the cap on calls in flight
//! (admission), the tenants' fair shares of it (`fair`), and the cap on
//! request message size, and the flags of every per-connection protection
//! ([`LimitArgs`]; the server applies those). The upstream's cap on
//! requests in flight and its queue live in `upstream::limit`. `metrics`
//! declares the shed calls' series and the tenants' gauges, and lets
//! `gormic_gateway_calls_in_flight` read the admission cap.

mod fair;
mod metrics;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::builder::TypedValueParser;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::body::Body;

use crate::tenant::TenantId;
use crate::units::{parse_duration, parse_size};

pub use fair::OverShare;
pub use metrics::{ShedMetrics, ShedReason, TenantMetrics};

/// Default of `--max-in-flight`: a call waiting on a slow upstream holds
/// ~9 KiB (measured by scripts/limits, BENCHMARKS.md), so 10 000 of them
/// with 1024 busy upstream requests peak at ~148 MiB; far more than one
/// replica should ever serve at once, and a bound an operator can size a
/// container for.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// Default of `--max-request-bytes`. The largest legitimate request is an
/// UpdateInvoice with four ids of at most a few hundred bytes; 64 KiB leaves
/// room for any future field while refusing junk early.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Default of `--http2-max-concurrent-streams` (justified there).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// Hard limits on memory and load (docs/operations.md justifies each default).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// Calls served at once, process-wide, at least 1; past it a call is
    /// refused at once with RESOURCE_EXHAUSTED (reason OVERLOADED), never
    /// forwarded. Shared fairly between tenants (--tenant-key) past all but
    /// a sixteenth of it (reason TENANT_OVER_SHARE). 10000 calls waiting on
    /// a slow upstream take ~148 MiB (~9 KiB each, BENCHMARKS.md): size the
    /// container for it, or lower this.
    #[arg(long, env = "GORMIC_MAX_IN_FLIGHT", value_name = "N", default_value_t = DEFAULT_MAX_IN_FLIGHT, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub max_in_flight: usize,

    /// Largest request message accepted; a larger one is refused with
    /// RESOURCE_EXHAUSTED (reason REQUEST_TOO_LARGE) before it is read. The
    /// largest real request is well under 4 KiB.
    #[arg(long, env = "GORMIC_MAX_REQUEST_BYTES", value_name = "BYTES", default_value = "64KiB", value_parser = parse_size)]
    pub max_request_bytes: usize,

    /// Largest request header list (all metadata); a call over it is refused
    /// by HTTP/2 (status 431) without affecting other calls on the
    /// connection. 16 KiB is nginx's and Envoy's order of magnitude.
    #[arg(long, env = "GORMIC_MAX_HEADER_BYTES", value_name = "BYTES", default_value = "16KiB", value_parser = parse_size)]
    pub max_header_bytes: usize,

    /// HTTP/2 calls one client connection may have open at once; more wait
    /// in the client. 256 is ample for one caller (nginx's default is 128)
    /// and bounds what one connection can pin in memory during a burst
    /// (256 × ~9 KiB), refused calls included.
    #[arg(
        long,
        env = "GORMIC_HTTP2_MAX_CONCURRENT_STREAMS",
        value_name = "N",
        default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS
    )]
    pub http2_max_concurrent_streams: u32,

    /// Interval of HTTP/2 PINGs on a quiet connection, to find dead peers.
    #[arg(long, env = "GORMIC_HTTP2_KEEPALIVE_INTERVAL", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// How long a PING may go unanswered before the connection is closed.
    #[arg(long, env = "GORMIC_HTTP2_KEEPALIVE_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// After this age (±10 %) a client connection is asked to reconnect
    /// (GOAWAY), so that long-lived connections rebalance across replicas
    /// after a scale-up; `0s` turns it off. 30m costs one reconnect per
    /// client connection per half hour.
    #[arg(long, env = "GORMIC_MAX_CONNECTION_AGE", value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,

    /// How long calls on a connection past its age may take to finish;
    /// longer than --upstream-timeout.
    #[arg(long, env = "GORMIC_MAX_CONNECTION_AGE_GRACE", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// HTTP/1.1 (gRPC-Web): how long a request's headers may take to
    /// arrive; hyper also closes a keep-alive connection idle this long.
    #[arg(long, env = "GORMIC_HTTP1_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub http1_header_read_timeout: Duration,
}

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
    /// The tenants' calls in flight, and their shares.
    fair: fair::FairShares,
}

/// One admitted call; gives its place back when dropped.
#[derive(Debug)]
pub struct Admitted {
    inner: Arc<InFlight>,
}

/// One of a tenant's calls, counted in its share; uncounted when dropped.
#[derive(Debug)]
pub struct TenantShare<'a> {
    limit: &'a InFlightLimit,
    tenant: TenantId,
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
                fair: fair::FairShares::new(max.max(1)),
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

    /// The fairness step, for an admitted call of `tenant`: counted in its
    /// share until the [`TenantShare`] is dropped, or refused because the
    /// gateway is contended and the tenant holds its share (`fair`).
    pub fn fair_share(&self, tenant: TenantId) -> Result<TenantShare<'_>, OverShare> {
        self.inner.fair.enter(tenant, self.in_flight())?;
        Ok(TenantShare {
            limit: self,
            tenant,
        })
    }

    /// Tenants with calls in flight (the unverified organizations count as
    /// one): the entries the fair shares' tables hold.
    pub fn tenants_in_flight(&self) -> usize {
        self.inner.fair.tenants()
    }

    /// `tenant`'s calls in flight.
    pub fn tenant_in_flight(&self, tenant: TenantId) -> usize {
        self.inner.fair.in_flight(tenant)
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

impl Drop for TenantShare<'_> {
    fn drop(&mut self) {
        self.limit.inner.fair.leave(self.tenant);
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
