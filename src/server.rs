//! The gRPC server: the invoice service with health, reflection and gRPC-Web
//! (with its CORS policy) on one port, served by hyper on an already-bound
//! listener (tests bind `127.0.0.1:0`), and the graceful shutdown.
//!
//! The gateway runs its own accept loop instead of `tonic::transport::Server`
//! because tonic's server answers an expired `grpc-timeout` with a bare
//! `CANCELLED`; here the caller's deadline is enforced by the service, which
//! answers `DEADLINE_EXCEEDED` with error details.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tower::ServiceBuilder;

use crate::cors::CorsOrigins;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::v1::invoice_service_server::InvoiceServiceServer;
use crate::service::InvoiceGateway;

/// HTTP/2 streams one connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Pings idle connections so that dead peers are noticed and dropped.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// What can stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How the server behaves, apart from the service it serves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// After shutdown is asked, how long in-flight calls may take to finish.
    pub grace: Duration,
    /// Which browser origins may make gRPC-Web calls.
    pub cors: CorsOrigins,
}

impl Default for ServerOptions {
    /// The command line's defaults: 10 s of grace, no CORS.
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            cors: CorsOrigins::None,
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, reports
/// NOT_SERVING on the health service, and lets in-flight calls finish for at
/// most `options.grace`.
pub async fn run(
    listener: TcpListener,
    gateway: InvoiceGateway,
    shutdown: impl Future<Output = ()>,
    options: ServerOptions,
) -> Result<(), ServerError> {
    let ServerOptions { grace, cors } = options;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InvoiceServiceServer<InvoiceGateway>>()
        .await;

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let routes = Routes::new(InvoiceServiceServer::new(gateway))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();

    let service = ServiceBuilder::new()
        // Outermost, so that it answers browsers' preflight requests itself.
        // Absent unless --cors-allowed-origins names origins.
        .option_layer(cors.layer())
        // gRPC-Web (HTTP/1.1 or HTTP/2) is translated to gRPC; plain gRPC passes through.
        .layer(tonic_web::GrpcWebLayer::new())
        .service(routes);
    let service = TowerToHyperService::new(service);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE);
    builder.http1().timer(TokioTimer::new());

    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service.clone())
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }

    drop(listener);
    health
        .set_not_serving::<InvoiceServiceServer<InvoiceGateway>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight calls");
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!("grace period over: closing the remaining connections"),
    }
    Ok(())
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
