//! Upstream connection pools, one per worker thread (a shard), so that a
//! call's upstream connection is driven by the thread that serves the call.
//!
//! The process-wide caps are split evenly between the shards:
//! `--upstream-max-connections` bounds the connections open (connecting,
//! busy or idle), exactly; `--upstream-max-pending` bounds the calls waiting
//! for one. A call that finds no idle connection opens one if its shard is
//! under its cap, else queues (first come, first served) until a connection
//! is handed back or closes, or its deadline ends; with the queue full it is
//! refused at once. So a slow upstream makes calls wait or fail fast; it
//! never makes the pool grow.
//!
//! HTTP/1.1 connections carry one request at a time; an idle one is reused
//! most-recently-used first (it is the least likely to have been closed by
//! the upstream) and dropped after `--upstream-idle-timeout`. A request
//! that a pooled connection refuses before sending (it had just closed) is
//! tried on another connection: it provably never left.
//!
//! An `https://` upstream may pick HTTP/2 (ALPN), and then one connection
//! per shard carries every request. Whether it will is only known once a
//! connection is open, so while a connection that may turn out HTTP/2 is
//! being opened, other calls wait for it instead of opening their own (a
//! burst after a start or a GOAWAY would otherwise open one connection per
//! call), and calls queued for a connection are handed the HTTP/2 one as
//! soon as it is up. Once the upstream has answered HTTP/1.1, connections
//! are opened side by side again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

use super::connect::{ConnectError, Connection, Connector, RequestBody, Sender};
use crate::runtime;

/// A request tried on this many pooled connections that turn out closed is
/// then refused: something is wrong beyond a stale keep-alive.
const MAX_STALE_CONNECTIONS: usize = 8;

/// Why a request could not be sent, or failed after it was.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The shard's connections are all busy and its queue is full.
    QueueFull,
    /// No connection could be opened; nothing was sent.
    Connect(ConnectError),
    /// Every pooled connection tried was closed; nothing was sent.
    Stale(hyper::Error),
    /// The exchange failed after the request was handed to a connection.
    Sent(hyper::Error),
}

/// Why a leased connection did not carry a request.
enum Refused {
    /// It had closed: the request (when recovered) never left.
    Stale(hyper::Error, Option<Box<http::Request<RequestBody>>>),
    /// It failed after the request was handed over.
    Sent(hyper::Error),
}

/// The pool's state for the metrics (read at scrape time).
#[derive(Debug, Default)]
pub struct PoolGauges {
    pub idle: AtomicU64,
    pub busy: AtomicU64,
    pub pending: AtomicU64,
    pub opened_total: AtomicU64,
    pub limit: AtomicU64,
}

/// The connection pools; cheap to clone.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Shard]>,
    connector: Connector,
    /// `scheme://authority` of HTTP/2 requests, whose URI must be absolute.
    origin: (http::uri::Scheme, http::uri::Authority),
    idle_timeout: Duration,
    /// Calls that may wait for a connection, process-wide.
    max_pending: u64,
    gauges: Arc<PoolGauges>,
}

struct Shard {
    state: Mutex<State>,
    limit: usize,
    /// Signalled when the connection being opened by a [`Probe`] is up (or
    /// failed): the calls waiting to share it look again.
    probed: Notify,
}

#[derive(Default)]
struct State {
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: Vec<Idle>,
    /// Connections counted against `limit`: connecting, busy or idle.
    open: usize,
    /// Calls waiting for a connection, oldest first; a waiter whose call
    /// ended is skipped when its turn comes.
    waiters: VecDeque<oneshot::Sender<Handoff>>,
    /// The shared connection when the upstream speaks HTTP/2.
    http2: Option<http2::SendRequest<RequestBody>>,
    /// A connection that may turn out HTTP/2 is being opened: other calls
    /// wait for it rather than open their own.
    probing: bool,
    /// The last connection opened spoke HTTP/1.1 (always so for
    /// `http://`): connections are opened side by side, one per request.
    http1: bool,
}

/// An HTTP/1.1 connection without a request.
struct Idle {
    sender: http1::SendRequest<RequestBody>,
    driver: AbortHandle,
    since: Instant,
}

/// What a waiting call receives.
enum Handoff {
    /// A connection another call has finished with.
    Idle(Idle),
    /// The right to open a connection (one closed).
    Slot(Slot),
    /// The HTTP/2 connection that was just opened, to share.
    Http2(http2::SendRequest<RequestBody>),
}

/// What a call looking for a connection does next.
enum Step<'a> {
    Ready(Leased),
    /// Wait for the connection another call is opening (it may be HTTP/2).
    AwaitProbe(tokio::sync::futures::Notified<'a>),
    /// Open a connection, probing its protocol when given a [`Probe`].
    Open(Option<Probe>),
    /// Wait in the queue for a connection.
    Queued(oneshot::Receiver<Handoff>),
}

/// The right to open one connection, counted in `open`; given back when
/// dropped unused.
struct Slot {
    inner: Arc<Inner>,
    shard: usize,
    used: bool,
}

/// Sizes of the pool (the flags).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolLimits {
    pub max_connections: usize,
    pub max_pending: usize,
    pub idle_timeout: Duration,
    /// One shard per worker thread.
    pub shards: usize,
}

impl Pool {
    pub(crate) fn new(
        connector: Connector,
        origin: (http::uri::Scheme, http::uri::Authority),
        limits: PoolLimits,
    ) -> Self {
        let shards = limits.shards.max(1);
        // Every shard gets its share, and at least one connection.
        let per_shard = |total: usize| total.div_ceil(shards).max(1);
        let gauges = Arc::new(PoolGauges::default());
        let http1 = !connector.may_negotiate_h2();
        gauges.limit.store(
            (per_shard(limits.max_connections) * shards) as u64,
            Ordering::Relaxed,
        );
        Self {
            inner: Arc::new(Inner {
                shards: (0..shards)
                    .map(|_| Shard {
                        state: Mutex::new(State {
                            http1,
                            ..State::default()
                        }),
                        limit: per_shard(limits.max_connections),
                        probed: Notify::new(),
                    })
                    .collect(),
                connector,
                origin,
                idle_timeout: limits.idle_timeout,
                max_pending: limits.max_pending as u64,
                gauges,
            }),
        }
    }

    pub(crate) fn gauges(&self) -> Arc<PoolGauges> {
        self.inner.gauges.clone()
    }

    /// Sends `request` on a connection of this worker's shard, and returns
    /// the response with the connection, which goes back to the pool when
    /// the [`Lease`] is dropped after [`Lease::reusable`]. `sent` tells a
    /// caller that gives up (deadline) whether the request may have reached
    /// the upstream (`false` while waiting for or opening a connection).
    ///
    /// The request is built by `request` only once a connection is granted,
    /// and all that follows the wait is boxed: a call queued for a
    /// connection holds neither its request's headers nor the sending
    /// machinery, which is what bounds the memory of 10 000 queued calls.
    pub(crate) async fn send(
        &self,
        request: &(dyn Fn() -> http::Request<RequestBody> + Sync),
        sent: &AtomicBool,
    ) -> Result<(http::Response<Incoming>, Lease), SendError> {
        let shard = runtime::current_worker().unwrap_or(0) % self.inner.shards.len();
        let mut stale = None;
        let mut unsent = None;
        for _ in 0..MAX_STALE_CONNECTIONS {
            sent.store(false, Ordering::Relaxed);
            let lease = self.checkout(shard).await?;
            let request = unsent.take().unwrap_or_else(request);
            match Box::pin(self.send_on(lease, request, sent)).await {
                Ok(answered) => return Ok(answered),
                // The connection closed before taking it: try another.
                Err(Refused::Stale(error, request)) => {
                    sent.store(false, Ordering::Relaxed);
                    stale = Some(error);
                    unsent = request.map(|request| *request);
                }
                Err(Refused::Sent(error)) => return Err(SendError::Sent(error)),
            }
        }
        match stale {
            Some(error) => Err(SendError::Stale(error)),
            None => Err(SendError::QueueFull),
        }
    }

    /// Sends `request` on the leased connection.
    async fn send_on(
        &self,
        mut lease: Lease,
        mut request: http::Request<RequestBody>,
        sent: &AtomicBool,
    ) -> Result<(http::Response<Incoming>, Lease), Refused> {
        // A connection handed back an instant ago may not want its next
        // request yet; one that closed meanwhile fails here.
        let ready = match &mut lease.connection {
            Some(Leased::Http1(idle)) => idle.sender.ready().await,
            Some(Leased::Http2(sender)) => sender.ready().await,
            None => unreachable_lease(),
        };
        if let Err(error) = ready {
            return Err(Refused::Stale(error, Some(Box::new(request))));
        }
        sent.store(true, Ordering::Relaxed);
        let outcome = match &mut lease.connection {
            Some(Leased::Http1(idle)) => idle.sender.try_send_request(request).await,
            Some(Leased::Http2(sender)) => {
                self.inner.absolute(&mut request);
                sender.try_send_request(request).await
            }
            None => unreachable_lease(),
        };
        match outcome {
            Ok(response) => Ok((response, lease)),
            Err(mut error) => match error.take_message() {
                Some(unsent) => Err(Refused::Stale(error.into_error(), Some(Box::new(unsent)))),
                None => Err(Refused::Sent(error.into_error())),
            },
        }
    }

    async fn checkout(&self, shard: usize) -> Result<Lease, SendError> {
        let inner = &self.inner;
        let limits = &inner.shards[shard];
        let (waiting, probe) = loop {
            // The lock is held in this block only, never across an await.
            let step = {
                let mut state = inner.lock(shard);
                if let Some(sender) = state.http2.as_ref().filter(|s| !s.is_closed()) {
                    Step::Ready(Leased::Http2(sender.clone()))
                } else if let Some(idle) = inner.take_idle(&mut state) {
                    Step::Ready(Leased::Http1(idle))
                } else if state.probing {
                    // Registered under the lock: the signal cannot be missed.
                    Step::AwaitProbe(limits.probed.notified())
                } else if state.open < limits.limit {
                    state.open += 1;
                    let probe = (!state.http1).then(|| {
                        state.probing = true;
                        Probe {
                            inner: inner.clone(),
                            shard,
                        }
                    });
                    Step::Open(probe)
                } else {
                    // The queue's bound is process-wide, like the in-flight
                    // cap: a worker with more than its share of calls must
                    // not refuse them while others have room.
                    if inner.gauges.pending.load(Ordering::Relaxed) >= inner.max_pending {
                        return Err(SendError::QueueFull);
                    }
                    // Waiters whose call ended are skipped when their turn
                    // comes; sweep them now and then so a stuck upstream
                    // (no turns) does not let them pile up.
                    let waiting = state.waiters.len();
                    if waiting >= 64 && waiting.is_power_of_two() {
                        state.waiters.retain(|w| !w.is_closed());
                    }
                    let (tx, rx) = oneshot::channel();
                    state.waiters.push_back(tx);
                    Step::Queued(rx)
                }
            };
            match step {
                Step::Ready(leased) => return Ok(self.lease(shard, leased)),
                Step::AwaitProbe(probed) => {
                    let _pending = Pending::new(&inner.gauges);
                    probed.await;
                }
                Step::Open(probe) => break (None, probe),
                Step::Queued(turn) => break (Some(turn), None),
            }
        };
        let slot = match waiting {
            None => Slot {
                inner: inner.clone(),
                shard,
                used: false,
            },
            Some(turn) => {
                let _pending = Pending::new(&inner.gauges);
                match turn.await {
                    Ok(Handoff::Idle(idle)) => {
                        return Ok(self.lease(shard, Leased::Http1(idle)));
                    }
                    Ok(Handoff::Slot(slot)) => slot,
                    Ok(Handoff::Http2(sender)) => {
                        return Ok(self.lease(shard, Leased::Http2(sender)));
                    }
                    // The pool is gone (shutdown).
                    Err(_) => return Err(SendError::QueueFull),
                }
            }
        };
        let lease = self.open(slot).await;
        // Dropped only now: the connection, if HTTP/2, is in the state.
        drop(probe);
        lease
    }

    /// Opens a connection with `slot` and leases it.
    async fn open(&self, mut slot: Slot) -> Result<Lease, SendError> {
        // Boxed: the handshakes' state is 7 KiB, which every call's future
        // would otherwise carry (and copy) though few calls ever connect.
        let Connection { sender, driver } = Box::pin(self.inner.connector.connect())
            .await
            .map_err(SendError::Connect)?;
        slot.used = true;
        let shard = slot.shard;
        self.inner
            .gauges
            .opened_total
            .fetch_add(1, Ordering::Relaxed);
        let closed = Closed {
            inner: self.inner.clone(),
            shard,
        };
        let task = tokio::spawn(async move {
            let _closed = closed;
            driver.await;
        });
        let leased = match sender {
            Sender::Http1(sender) => {
                self.inner.lock(shard).http1 = true;
                Leased::Http1(Idle {
                    sender,
                    driver: task.abort_handle(),
                    since: Instant::now(),
                })
            }
            Sender::Http2(sender) => {
                let mut state = self.inner.lock(shard);
                state.http1 = false;
                state.http2 = Some(sender.clone());
                // Calls queued for a connection share this one.
                while let Some(waiter) = state.waiters.pop_front() {
                    let _ = waiter.send(Handoff::Http2(sender.clone()));
                }
                Leased::Http2(sender)
            }
        };
        Ok(self.lease(shard, leased))
    }

    fn lease(&self, shard: usize, connection: Leased) -> Lease {
        self.inner.gauges.busy.fetch_add(1, Ordering::Relaxed);
        Lease {
            inner: self.inner.clone(),
            shard,
            connection: Some(connection),
            reusable: false,
        }
    }
}

impl Inner {
    /// HTTP/2 takes `:scheme` and `:authority` from the URI, not `Host`.
    fn absolute(&self, request: &mut http::Request<RequestBody>) {
        let (scheme, authority) = &self.origin;
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(scheme.clone());
        parts.authority = Some(authority.clone());
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        request.headers_mut().remove(http::header::HOST);
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent enough
        // (counts only); keep serving.
        self.shards[shard]
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used live idle connection, dropping expired ones.
    fn take_idle(&self, state: &mut State) -> Option<Idle> {
        while let Some(idle) = state.idle.pop() {
            self.gauges.idle.fetch_sub(1, Ordering::Relaxed);
            if idle.sender.is_closed() {
                continue; // its driver has ended (or will), giving back its slot
            }
            if idle.since.elapsed() >= self.idle_timeout {
                idle.driver.abort();
                continue;
            }
            return Some(idle);
        }
        None
    }

    /// A finished call gives its connection back: to the oldest waiter, or
    /// to the idle list.
    fn give_back(&self, shard: usize, mut idle: Idle) {
        let mut state = self.lock(shard);
        idle.since = Instant::now();
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(Handoff::Idle(idle)) {
                Ok(()) => return,
                Err(Handoff::Idle(back)) => idle = back,
                Err(Handoff::Slot(_) | Handoff::Http2(_)) => return,
            }
        }
        // Expired connections at the bottom go now, not at the next call.
        let idle_timeout = self.idle_timeout;
        state.idle.retain(|old| {
            let keep = old.since.elapsed() < idle_timeout && !old.sender.is_closed();
            if !keep {
                old.driver.abort();
                self.gauges.idle.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
        state.idle.push(idle);
        self.gauges.idle.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed (or was never opened): its slot goes to the
    /// oldest waiter, or back to the shard.
    fn slot_freed(self: &Arc<Self>, shard: usize) {
        let mut state = self.lock(shard);
        while let Some(waiter) = state.waiters.pop_front() {
            let slot = Slot {
                inner: self.clone(),
                shard,
                used: false,
            };
            match waiter.send(Handoff::Slot(slot)) {
                // The slot stays counted in `open`, now the waiter's.
                Ok(()) => return,
                Err(Handoff::Slot(mut unused)) => unused.used = true, // not a release: retry
                Err(Handoff::Idle(_) | Handoff::Http2(_)) => return,
            }
        }
        state.open = state.open.saturating_sub(1);
        if let Some(sender) = &state.http2
            && sender.is_closed()
        {
            state.http2 = None;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.used {
            self.inner.slot_freed(self.shard);
        }
    }
}

/// The call opening a connection that may turn out HTTP/2; when dropped
/// (the connection is up, failed, or the call gave up), the calls waiting to
/// share it look again, and one of them probes next if there is no HTTP/2
/// connection to share.
struct Probe {
    inner: Arc<Inner>,
    shard: usize,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.inner.lock(self.shard).probing = false;
        self.inner.shards[self.shard].probed.notify_waiters();
    }
}

/// Gives the slot back when a connection's driver ends (closed, failed,
/// aborted, or its runtime stopped).
struct Closed {
    inner: Arc<Inner>,
    shard: usize,
}

impl Drop for Closed {
    fn drop(&mut self) {
        self.inner.slot_freed(self.shard);
    }
}

/// Counts a waiting call in the `pending` gauge while it waits.
struct Pending<'a>(&'a PoolGauges);

impl<'a> Pending<'a> {
    fn new(gauges: &'a PoolGauges) -> Self {
        gauges.pending.fetch_add(1, Ordering::Relaxed);
        Self(gauges)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Leased {
    Http1(Idle),
    Http2(http2::SendRequest<RequestBody>),
}

/// A connection lent to one request. Dropped after [`Lease::reusable`] it
/// goes back to the pool; dropped before (the request failed, timed out or
/// was cancelled mid-way), an HTTP/1.1 connection is closed at once, so the
/// upstream sees the request abandoned.
pub(crate) struct Lease {
    inner: Arc<Inner>,
    shard: usize,
    connection: Option<Leased>,
    reusable: bool,
}

impl Lease {
    /// The response was read whole: the connection can serve another request.
    pub(crate) fn reusable(&mut self) {
        self.reusable = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.gauges.busy.fetch_sub(1, Ordering::Relaxed);
        match self.connection.take() {
            Some(Leased::Http1(idle)) if self.reusable && !idle.sender.is_closed() => {
                self.inner.give_back(self.shard, idle);
            }
            Some(Leased::Http1(idle)) => idle.driver.abort(),
            // HTTP/2: dropping the stream resets it; the connection stays.
            Some(Leased::Http2(_)) | None => {}
        }
    }
}

#[cold]
fn unreachable_lease() -> ! {
    unreachable!("a lease always holds a connection until dropped")
}
