//! The gRPC server: the invoice service with health, reflection and gRPC-Web
//! (with its CORS policy) on one port; the accept loop, which hands each
//! connection to a worker thread ([`crate::runtime`]); the HTTP/2 and
//! HTTP/1.1 protections; and the drain on shutdown.
//!
//! The gateway runs its own accept loop instead of `tonic::transport::Server`
//! because tonic's server answers an expired `grpc-timeout` with a bare
//! `CANCELLED`; here the caller's deadline is enforced by the service, which
//! answers `DEADLINE_EXCEEDED` with error details. It also lets each
//! connection live on one worker thread, and bounds its age.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::service::Routes;
use tower::ServiceBuilder;

use crate::cors::CorsOrigins;
use crate::limits::{DEFAULT_MAX_CONCURRENT_STREAMS, check_request_size};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::v1::invoice_service_server::InvoiceServiceServer;
use crate::runtime::Workers;
use crate::service::InvoiceGateway;
use crate::tls::{CallerIdentity, ServerTls};

/// Connections the kernel queues for `accept` (std's default is 128, which
/// drops SYNs when hundreds of clients connect at once; nginx uses 511).
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds `addr` for [`run`], with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted gateway can bind while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The path prefix of the invoice service's calls.
pub const SERVICE_PREFIX: &str = "/gormic.om.v1.InvoiceService/";

/// What can stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(#[source] std::io::Error),
}

/// How the server behaves, apart from the service it serves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// After the listener closes, how long in-flight calls may take to finish.
    pub grace: Duration,
    /// After shutdown is asked, how long the gateway keeps serving (and
    /// accepting) while reporting NOT_SERVING, so that load balancers stop
    /// sending before the listener closes.
    pub delay: Duration,
    /// Which browser origins may make gRPC-Web calls.
    pub cors: CorsOrigins,
    /// Worker threads (see [`crate::runtime`]).
    pub workers: usize,
    pub limits: ConnectionLimits,
    /// TLS (and mTLS) on the listener; `None`: plaintext.
    pub tls: Option<ServerTls>,
    /// How long a client has to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
}

/// Per-connection protections (each a flag; defaults justified in
/// docs/operations.md).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Largest request message (gRPC frame), in bytes.
    pub max_request_bytes: usize,
    /// Largest header list (HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`, and the
    /// HTTP/1.1 header buffer), in bytes.
    pub max_header_bytes: u32,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 PING interval on idle connections, to notice dead peers.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// After this age (±10 % jitter) a connection is asked to go away
    /// (HTTP/2 GOAWAY), so that clients reconnect and spread across replicas.
    /// `None`: no limit.
    pub max_connection_age: Option<Duration>,
    /// How long a connection asked to go away may finish its calls.
    pub max_connection_age_grace: Duration,
    /// HTTP/1.1 (gRPC-Web): how long a request's headers may take to arrive;
    /// hyper also applies it to an idle keep-alive connection.
    pub http1_header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: crate::limits::DEFAULT_MAX_REQUEST_BYTES,
            max_header_bytes: 16 * 1024,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(30),
            http1_header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ServerOptions {
    /// The command line's defaults, except: one worker thread, and no
    /// maximum connection age (tests).
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            delay: Duration::ZERO,
            cors: CorsOrigins::None,
            workers: 1,
            limits: ConnectionLimits::default(),
            tls: None,
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The most HTTP/2 streams a peer may reset before the server has answered
/// them, per connection (the "rapid reset" attack, CVE-2023-44487); h2's
/// default is 20.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Locally reset streams (protocol errors by the peer) tolerated per
/// connection before it is closed (h2's default is 1024).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Bytes buffered per stream for sending; bounds memory per slow reader.
const MAX_SEND_BUF_SIZE: usize = 64 * 1024;
/// hyper refuses an HTTP/1.1 read buffer smaller than this.
const HTTP1_MIN_BUF: usize = 8192;

/// Serves until `shutdown` resolves, then: reports NOT_SERVING on the health
/// service at once, keeps serving for `options.delay`, closes the listener,
/// asks every connection to go away and lets in-flight calls finish for at
/// most `options.grace`.
pub async fn run(
    listener: TcpListener,
    gateway: InvoiceGateway,
    shutdown: impl Future<Output = ()>,
    options: ServerOptions,
) -> Result<(), ServerError> {
    run_with(listener, gateway, shutdown, options, Hooks::default()).await
}

/// Callbacks into the rest of the process at the server's turning points.
#[derive(Default)]
pub struct Hooks {
    /// Called once when draining starts (readiness goes down).
    pub on_drain: Option<Box<dyn FnOnce() + Send>>,
}

/// [`run`] with [`Hooks`].
pub async fn run_with(
    listener: TcpListener,
    gateway: InvoiceGateway,
    shutdown: impl Future<Output = ()>,
    options: ServerOptions,
    hooks: Hooks,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InvoiceServiceServer<InvoiceGateway>>()
        .await;

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let limits = &options.limits;
    // Shed calls are told in one line per second, not one line each.
    let shed_reports = tokio::spawn(gateway.in_flight_limit().clone().report_periodically());
    let invoices = InvoiceServiceServer::new(gateway)
        // A backstop: check_request_size refuses larger messages first.
        .max_decoding_message_size(limits.max_request_bytes.saturating_add(5));
    let others = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    let routes = Dispatch {
        invoices,
        others,
        max_request_bytes: limits.max_request_bytes,
    };

    let service = ServiceBuilder::new()
        // Outermost, so that it answers browsers' preflight requests itself.
        // Absent unless --cors-allowed-origins names origins.
        .option_layer(options.cors.layer())
        // gRPC-Web (HTTP/1.1 or HTTP/2) is translated to gRPC; plain gRPC passes through.
        .layer(tonic_web::GrpcWebLayer::new())
        // Invoice calls (their size checked before tonic decodes them) or
        // the router for the rest.
        .service(routes);

    let shared = Arc::new(Shared {
        builder: http_builder(limits),
        service,
        max_age: limits.max_connection_age,
        age_grace: limits.max_connection_age_grace,
        tls: options.tls.clone(),
        handshake_timeout: options.tls_handshake_timeout,
    });

    let workers = Workers::start(options.workers).map_err(ServerError::Workers)?;
    let (drain, draining) = watch::channel(false);

    tokio::pin!(shutdown);
    let accepting = accept_loop(&listener, &workers, &shared, &draining);
    tokio::select! {
        () = accepting => {}
        () = &mut shutdown => {}
    }

    // Draining: not ready from this moment, while still serving for `delay`.
    if let Some(on_drain) = hooks.on_drain {
        on_drain();
    }
    health
        .set_not_serving::<InvoiceServiceServer<InvoiceGateway>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    if !options.delay.is_zero() {
        tracing::info!(
            delay = %humantime::format_duration(options.delay),
            "shutting down: NOT_SERVING; still serving until the delay ends"
        );
        let accepting = accept_loop(&listener, &workers, &shared, &draining);
        let _ = tokio::time::timeout(options.delay, accepting).await;
    }

    drop(listener);
    drop(draining);
    tracing::info!(
        grace = %humantime::format_duration(options.grace),
        "shutting down: listener closed, draining in-flight calls"
    );
    let _ = drain.send(true);
    match tokio::time::timeout(options.grace, drain.closed()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!("grace period over: closing the remaining connections"),
    }
    let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    shed_reports.abort();
    Ok(())
}

/// The tower stack every connection serves (see `run_with`).
type Stack = tower::util::Either<tower_http::cors::Cors<GrpcWebStack>, GrpcWebStack>;
type GrpcWebStack = tonic_web::GrpcWebService<Dispatch>;

/// Routes invoice calls straight to the service (after the message size
/// check), and everything else (health, reflection) through tonic's router:
/// the router's matching and body boxing cost every call measurably
/// (BENCHMARKS.md, "Design choices measured").
#[derive(Clone)]
struct Dispatch {
    invoices: InvoiceServiceServer<InvoiceGateway>,
    others: Routes,
    max_request_bytes: usize,
}

type DispatchFuture = std::pin::Pin<
    Box<
        dyn Future<Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>>
            + Send,
    >,
>;

impl tower::Service<http::Request<tonic::body::Body>> for Dispatch {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = DispatchFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Both are always ready (tonic's services never apply backpressure).
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path().starts_with(SERVICE_PREFIX) {
            let mut invoices = self.invoices.clone();
            let limit = self.max_request_bytes;
            Box::pin(async move {
                let request = check_request_size(request, limit).await;
                invoices.call(request).await
            })
        } else {
            Box::pin(self.others.call(request))
        }
    }
}

/// What every connection needs, shared by all.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    service: Stack,
    max_age: Option<Duration>,
    age_grace: Duration,
    tls: Option<ServerTls>,
    handshake_timeout: Duration,
}

/// Accepts connections for ever, handing each to a worker.
async fn accept_loop(
    listener: &TcpListener,
    workers: &Workers,
    shared: &Arc<Shared>,
    draining: &watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The socket moves to the worker's own reactor.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%peer, %error, "cannot hand the connection over");
                continue;
            }
        };
        let shared = shared.clone();
        let draining = draining.clone();
        workers.spawn(async move {
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%peer, %error, "cannot register the connection");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            // The handshake runs here, on the worker, so that a slow one
            // never holds up accepting.
            match &shared.tls {
                None => serve_connection(stream, None, peer, &shared, draining).await,
                Some(tls) => match tls.accept(stream, shared.handshake_timeout).await {
                    Ok(accepted) => {
                        serve_connection(
                            accepted.stream,
                            accepted.identity,
                            peer,
                            &shared,
                            draining,
                        )
                        .await
                    }
                    // Port scanners and TCP health checks do this all day.
                    Err(error) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                },
            }
        });
    }
}

/// Serves one connection on the current worker until it ends, reaches its
/// maximum age, or the server drains.
async fn serve_connection<IO>(
    stream: IO,
    identity: Option<CallerIdentity>,
    peer: SocketAddr,
    shared: &Shared,
    mut draining: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(WithIdentity {
        inner: shared.service.clone(),
        identity,
    });
    let connection = shared
        .builder
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let age = async {
        match shared.max_age {
            Some(age) => tokio::time::sleep(jittered(age)).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = age => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(shared.age_grace, connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => Ok(()), // dropped: its calls had their grace
            }
        }
        () = async { let _ = draining.wait_for(|drain| *drain).await; } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Puts the connection's mTLS identity on each of its requests, where the
/// call path reads it (`tonic::Request::extensions`).
#[derive(Clone)]
struct WithIdentity<S> {
    inner: S,
    identity: Option<CallerIdentity>,
}

impl<S, B> tower::Service<http::Request<B>> for WithIdentity<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(identity) = &self.identity {
            request.extensions_mut().insert(identity.clone());
        }
        self.inner.call(request)
    }
}

/// `age` ± 10 %, so that connections opened together do not all go away at
/// once.
fn jittered(age: Duration) -> Duration {
    let tenth = age / 10;
    age - tenth + tenth.mul_f64(2.0 * fastrand::f64())
}

/// HTTP/2 and HTTP/1.1 settings, every protection set deliberately.
fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_header_list_size(limits.max_header_bytes)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_send_buf_size(MAX_SEND_BUF_SIZE);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http1_header_read_timeout)
        .max_buf_size((limits.max_header_bytes as usize).max(HTTP1_MIN_BUF));
    builder
}

/// Reflection over our proto, the health service, both reflection versions
/// (so that either lists every service), and the `google.rpc` error detail
/// types, so that tools such as grpcurl can decode status details.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_age_is_jittered_within_ten_percent() {
        let age = Duration::from_secs(100);
        for _ in 0..1000 {
            let j = jittered(age);
            assert!(
                j >= Duration::from_secs(90) && j <= Duration::from_secs(110),
                "{j:?}"
            );
        }
    }
}
