//! The `gormic-gateway` binary: parse the configuration (failing fast, before
//! any port is bound), bind, log every bound address, serve until SIGINT or
//! SIGTERM, drain, exit 0.

use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;

use gormic_gateway::config::{Cli, Config};
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::upstream::Upstream;
use gormic_gateway::{server, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("gormic-gateway: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(cli.log_level, cli.log_format);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gormic-gateway: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "gateway stopped");
            eprintln!("gormic-gateway: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let upstream = Upstream::new(&config.upstream, config.upstream_timeout)
        .map_err(|e| format!("cannot build the HTTP client for --upstream: {e}"))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
    tracing::info!(
        grpc = %listener.local_addr()?,
        upstream = %config.upstream,
        upstream_timeout = %humantime::format_duration(config.upstream_timeout),
        "serving gormic.om.v1.InvoiceService"
    );
    server::run(
        listener,
        InvoiceGateway::new(upstream),
        shutdown_signal(),
        config.shutdown_grace,
    )
    .await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. If a handler cannot be installed the
/// gateway keeps serving and says so, rather than exiting.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
