//! A scripted stand-in for the Gormic REST API: records every request it
//! receives and answers with whatever the test scripted; over plain HTTP/1.1
//! ([`FakeUpstream::start`]), over plaintext HTTP/2 with prior knowledge
//! ([`FakeUpstream::start_h2c`]), or over TLS with the ALPN protocols the
//! test chose, HTTP/2 included ([`FakeUpstream::start_tls`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Version};
use axum::response::Response;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::{PATIENCE, until};

/// One request as the upstream saw it; the path is raw (still percent-encoded).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// The request's HTTP version as the server read it (Debug prints
    /// `HTTP/1.1`, `HTTP/2.0`): HTTP/2 from [`FakeUpstream::start_h2c`] and
    /// when [`FakeUpstream::start_tls`] negotiated `h2`.
    pub version: Version,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the request arrived (its body read).
    pub at: tokio::time::Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering (to model a slow upstream).
    pub delay: Option<Duration>,
}

impl Scripted {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            delay: None,
        }
    }

    /// A 200 with the standard envelope around `data`.
    pub fn ok(data: serde_json::Value) -> Self {
        Self::json(200, envelope(data))
    }

    /// A 400 functional error `{"error":{"code":…}}` with a `requestId`.
    pub fn code(code: &str) -> Self {
        Self::json(
            400,
            serde_json::json!({"error": {"code": code}, "requestId": "req-upstream-1"}),
        )
    }

    pub fn raw(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "text/html".into())],
            body: body.as_bytes().to_vec(),
            delay: None,
        }
    }

    /// A 429 Too Many Requests, with `Retry-After: <retry_after>` when given.
    pub fn too_many_requests(retry_after: Option<&str>) -> Self {
        let answer = Self::raw(429, "Too Many Requests");
        match retry_after {
            Some(value) => answer.header("retry-after", value),
            None => answer,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// The standard success envelope around `data`.
pub fn envelope(data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "app": "om",
        "service": "invoices",
        "warnings": [],
        "instanceId": "inst-7",
        "requestId": "req-upstream-1",
        "data": data,
    })
}

#[derive(Default)]
struct Shared {
    /// TCP connections accepted, open now, and the most open at once.
    connections: Mutex<Connections>,
    recorded: Mutex<Vec<Recorded>>,
    /// Answers used in order; the last one repeats.
    script: Mutex<VecDeque<Scripted>>,
    received: Notify,
    /// Dropped-request count: a handler future dropped before it answered.
    abandoned: Mutex<usize>,
    abandoned_notify: Notify,
    /// While true, answers wait (requests are still recorded on arrival).
    held: Mutex<bool>,
    released: Notify,
    /// Hold every answer until this many requests have arrived.
    hold_until: Mutex<Option<usize>>,
    /// Answers by `organization-id`, used instead of the script.
    by_organization: Mutex<HashMap<String, Scripted>>,
}

/// Connection counts as the upstream saw them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    pub accepted: usize,
    pub open: usize,
    pub max_open: usize,
}

/// A listener that counts connections for [`FakeUpstream::connections`].
struct CountingListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for CountingListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        {
            let mut c = self.shared.connections.lock().unwrap();
            c.accepted += 1;
            c.open += 1;
            c.max_open = c.max_open.max(c.open);
        }
        (
            CountedStream {
                io,
                shared: self.shared.clone(),
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A TCP stream that counts itself closed when dropped.
pub struct CountedStream {
    io: tokio::net::TcpStream,
    shared: Arc<Shared>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.shared.connections.lock().unwrap().open -= 1;
    }
}

impl tokio::io::AsyncRead for CountedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[derive(Clone)]
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// `http`, or `https` for [`FakeUpstream::start_tls`].
    scheme: &'static str,
}

struct AbandonGuard {
    shared: Arc<Shared>,
    answered: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.answered {
            *self.shared.abandoned.lock().unwrap() += 1;
            self.shared.abandoned_notify.notify_waiters();
        }
    }
}

/// A loopback port bound for a fake upstream that does not listen yet:
/// connections to it are refused (nothing can take the port meanwhile)
/// until [`ReservedPort::start`] serves on it.
pub struct ReservedPort {
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl ReservedPort {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts listening: from now on the fake upstream answers on this port.
    pub async fn start(self) -> FakeUpstream {
        let listener = self
            .socket
            .listen(1024)
            .expect("listen on the reserved port");
        FakeUpstream::start_on(listener).await
    }
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        Self::start_on(listener).await
    }

    /// Binds a loopback port without listening on it (see [`ReservedPort`]).
    pub fn reserve() -> ReservedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind a loopback port");
        let addr = socket.local_addr().expect("addr");
        ReservedPort { socket, addr }
    }

    /// Serves on `listener`.
    pub async fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let app = app(&shared);
        let listener = CountingListener {
            inner: listener,
            shared: shared.clone(),
        };
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            scheme: "http",
        }
    }

    /// The same upstream over TLS with `config` (its certificate, client
    /// CA and ALPN protocols): each connection speaks HTTP/2 when it
    /// negotiated `h2`, else HTTP/1.1. Its URL is `https://127.0.0.1:<port>`
    /// (the test leaves name `127.0.0.1` too).
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto;

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let app = app(&shared);
        let mut listener = CountingListener {
            inner: listener,
            shared: shared.clone(),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (io, _) = axum::serve::Listener::accept(&mut listener).await;
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A refused handshake (untrusted gateway) just closes.
                    let Ok(tls) = acceptor.accept(io).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            shared,
            scheme: "https",
        }
    }

    /// The same upstream over plaintext HTTP/2 with prior knowledge only
    /// (h2c without the HTTP/1.1 upgrade): a client must start with the
    /// HTTP/2 preface; an HTTP/1.1 request is refused (the connection
    /// closes). Its URL is `http://127.0.0.1:<port>`.
    pub async fn start_h2c() -> Self {
        use hyper_util::rt::{TokioExecutor, TokioIo};

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let app = app(&shared);
        let mut listener = CountingListener {
            inner: listener,
            shared: shared.clone(),
        };
        tokio::spawn(async move {
            loop {
                let (io, _) = axum::serve::Listener::accept(&mut listener).await;
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            shared,
            scheme: "http",
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connections the upstream has seen.
    pub fn connections(&self) -> Connections {
        *self.shared.connections.lock().unwrap()
    }

    /// Answer the following requests with `answers` in order, the last one
    /// repeating (replaces the script).
    pub fn respond_in_order(&self, answers: Vec<Scripted>) {
        let mut script = self.shared.script.lock().unwrap();
        script.clear();
        script.extend(answers);
    }

    /// Answer every following request for `organization` (its
    /// `organization-id` header) with `answer`, instead of the script.
    pub fn respond_for_organization(&self, organization: &str, answer: Scripted) {
        self.shared
            .by_organization
            .lock()
            .unwrap()
            .insert(organization.to_owned(), answer);
    }

    /// Answer every following request with `answer` (replaces the script).
    pub fn respond(&self, answer: Scripted) {
        let mut script = self.shared.script.lock().unwrap();
        script.clear();
        script.push_back(answer);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.recorded.lock().unwrap().clone()
    }

    pub fn only_request(&self) -> Recorded {
        let requests = self.requests();
        assert_eq!(
            requests.len(),
            1,
            "expected exactly one upstream request: {requests:?}"
        );
        requests.into_iter().next().unwrap()
    }

    /// From now on, answers wait until [`Self::release_answers`]: a request
    /// is recorded when it arrives and then held, however long the test needs.
    pub fn hold_answers(&self) {
        *self.shared.held.lock().unwrap() = true;
    }

    /// Lets held and future answers go out.
    pub fn release_answers(&self) {
        *self.shared.held.lock().unwrap() = false;
        self.shared.released.notify_waiters();
    }

    /// Holds every answer until `n` requests (counted since the start) have
    /// arrived: they are then all in flight at once.
    pub fn hold_answers_until(&self, n: usize) {
        *self.shared.hold_until.lock().unwrap() = Some(n);
    }

    /// Resolves once at least `n` requests have arrived; fails the test
    /// after [`PATIENCE`].
    pub async fn wait_for_requests(&self, n: usize) {
        until(
            &format!("{n} request(s) at the fake upstream (the count of those arrived)"),
            PATIENCE,
            async || self.shared.recorded.lock().unwrap().len(),
            |arrived| *arrived >= n,
        )
        .woken_by(&self.shared.received)
        .await;
    }

    /// Resolves once at least `n` requests were dropped before being answered
    /// (the gateway closed the connection); fails the test after
    /// [`PATIENCE`].
    pub async fn wait_for_abandoned(&self, n: usize) {
        until(
            &format!(
                "the gateway to drop {n} request(s) at the fake upstream (the count of those dropped)"
            ),
            PATIENCE,
            async || *self.shared.abandoned.lock().unwrap(),
            |dropped| *dropped >= n,
        )
        .woken_by(&self.shared.abandoned_notify)
        .await;
    }
}

fn app(shared: &Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone())
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let for_organization = parts
        .headers
        .get("organization-id")
        .and_then(|o| o.to_str().ok())
        .and_then(|o| shared.by_organization.lock().unwrap().get(o).cloned());
    let answer = if let Some(answer) = for_organization {
        answer
    } else {
        let mut script = shared.script.lock().unwrap();
        let answer = if script.len() > 1 {
            script.pop_front()
        } else {
            script.front().cloned()
        };
        answer.unwrap_or_else(|| Scripted::raw(599, "no answer scripted"))
    };
    shared.recorded.lock().unwrap().push(Recorded {
        method: parts.method,
        version: parts.version,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        at: tokio::time::Instant::now(),
    });
    shared.received.notify_waiters();

    let mut guard = AbandonGuard {
        shared: shared.clone(),
        answered: false,
    };
    let hold = *shared.hold_until.lock().unwrap();
    if let Some(n) = hold {
        loop {
            let notified = shared.received.notified();
            if shared.recorded.lock().unwrap().len() >= n {
                break;
            }
            notified.await;
        }
    }
    loop {
        let released = shared.released.notified();
        if !*shared.held.lock().unwrap() {
            break;
        }
        released.await;
    }
    if let Some(delay) = answer.delay {
        tokio::time::sleep(delay).await;
    }
    guard.answered = true;

    let mut response = Response::builder().status(StatusCode::from_u16(answer.status).unwrap());
    for (name, value) in &answer.headers {
        response = response.header(name, value);
    }
    response.body(Body::from(answer.body)).unwrap()
}

mod tests {
    use axum::http::Version;

    use super::{FakeUpstream, Scripted};

    #[tokio::test]
    async fn the_h2c_upstream_records_http2_requests_over_one_connection() {
        let upstream = FakeUpstream::start_h2c().await;
        upstream.respond(Scripted::raw(200, "h2"));
        let client = crate::support::http_client()
            .http2_prior_knowledge()
            .build()
            .expect("HTTP/2 client");

        for path in ["/first", "/second"] {
            let answer = client
                .get(format!("{}{path}", upstream.url()))
                .send()
                .await
                .expect("an HTTP/2 answer");
            assert_eq!(answer.version(), Version::HTTP_2);
            assert_eq!(answer.status(), 200);
        }

        let requests = upstream.requests();
        assert_eq!(
            requests
                .iter()
                .map(|r| (r.path.as_str(), r.version))
                .collect::<Vec<_>>(),
            [("/first", Version::HTTP_2), ("/second", Version::HTTP_2)]
        );
        assert_eq!(format!("{:?}", requests[0].version), "HTTP/2.0");
        assert_eq!(upstream.connections().accepted, 1);
    }

    #[tokio::test]
    async fn the_h2c_upstream_refuses_http1_requests() {
        let upstream = FakeUpstream::start_h2c().await;
        upstream.respond(Scripted::raw(200, "h2"));

        let refused = crate::support::http_client()
            .http1_only()
            .build()
            .expect("HTTP/1.1 client")
            .get(upstream.url())
            .send()
            .await;

        assert!(refused.is_err(), "an HTTP/1.1 answer: {refused:?}");
        assert!(upstream.requests().is_empty());
    }

    #[tokio::test]
    async fn an_organization_can_have_answers_of_its_own() {
        let upstream = FakeUpstream::start().await;
        upstream.respond(Scripted::raw(403, "who?"));
        upstream.respond_for_organization("org-1", Scripted::raw(200, "welcome"));
        let client = crate::support::http_client().build().expect("HTTP client");
        let status = |organization: &'static str| {
            let request = client
                .get(upstream.url())
                .header("organization-id", organization);
            async move { request.send().await.expect("an answer").status() }
        };
        assert_eq!(status("org-1").await, 200);
        assert_eq!(status("made-up").await, 403);
        assert_eq!(status("org-1").await, 200);
        assert_eq!(upstream.requests().len(), 3);
    }

    #[tokio::test]
    async fn the_http1_upstream_records_http11_requests() {
        let upstream = FakeUpstream::start().await;
        upstream.respond(Scripted::raw(200, "h1"));

        crate::support::http_client()
            .build()
            .expect("HTTP client")
            .get(upstream.url())
            .send()
            .await
            .expect("an answer");

        assert_eq!(upstream.only_request().version, Version::HTTP_11);
        assert_eq!(format!("{:?}", upstream.only_request().version), "HTTP/1.1");
    }
}
