//! The `gormic-gateway` binary: parse the configuration (failing fast, before
//! any port is bound), bind, log every bound address, serve until SIGINT or
//! SIGTERM, drain, exit 0. The main thread runs the accept loop and the
//! signal handling on a current-thread runtime; calls are served on the
//! worker threads the server starts (`runtime`). With `--sandbox` the sandbox REST API is started
//! first, on a loopback port, and is the upstream; `gormic-gateway sandbox`
//! serves that REST API alone.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use url::Url;

use gormic_gateway::config::{Cli, Command, Config, SandboxArgs, Target};
use gormic_gateway::limits::InFlightLimit;
use gormic_gateway::sandbox::{self, Fixture};
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::upstream::Upstream;
use gormic_gateway::{logging, server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Sandbox(args)) => sandbox_only(args, &cli),
        None => gateway(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit::Usage(message)) => {
            eprintln!("gormic-gateway: {message}");
            ExitCode::from(2)
        }
        Err(Exit::Failed(message)) => {
            tracing::error!(error = %message, "stopped");
            eprintln!("gormic-gateway: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Why the binary stops with a non-zero status.
enum Exit {
    /// The command line or a file it names is wrong (status 2); nothing was bound.
    Usage(String),
    /// Serving failed (status 1).
    Failed(String),
}

/// The gateway, in front of `--upstream` or the in-process sandbox.
fn gateway(cli: &Cli) -> Result<(), Exit> {
    let config = cli.config().map_err(|e| Exit::Usage(e.to_string()))?;
    // A bad fixture file stops the binary here, before any port is bound.
    let sandbox = match &config.upstream {
        Target::Url(_) => None,
        Target::Sandbox { fixture } => Some(load_fixture(fixture.as_deref())?),
    };
    let _logs = logging::init(cli.log_level, cli.log_format);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit::Failed(format!("cannot start the async runtime: {e}")))?;
    block_on(runtime, serve(config, sandbox))
}

fn block_on(
    runtime: tokio::runtime::Runtime,
    future: impl Future<Output = Result<(), Box<dyn std::error::Error>>>,
) -> Result<(), Exit> {
    runtime
        .block_on(future)
        .map_err(|e| Exit::Failed(e.to_string()))
}

async fn serve(config: Config, sandbox: Option<Fixture>) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = shutdown_signal();
    let upstream_url = match (&config.upstream, sandbox) {
        (Target::Url(url), _) => url.clone(),
        (Target::Sandbox { .. }, fixture) => {
            start_sandbox(fixture.unwrap_or_else(Fixture::builtin)).await?
        }
    };
    let upstream = Upstream::new(&upstream_url, config.upstream_options.clone())
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let listener = server::bind(config.listen)
        .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
    tracing::info!(
        grpc = %listener.local_addr()?,
        upstream = %upstream_url,
        upstream_timeout = %humantime::format_duration(config.upstream_options.timeout),
        workers = config.server.workers,
        max_in_flight = config.max_in_flight,
        upstream_max_connections = config.upstream_options.max_connections,
        cors_allowed_origins = %config.server.cors,
        "serving gormic.om.v1.InvoiceService"
    );
    let gateway = InvoiceGateway::new(upstream)
        .with_in_flight_limit(InFlightLimit::new(config.max_in_flight));
    server::run(listener, gateway, shutdown, config.server).await?;
    Ok(())
}

/// Runs the sandbox on a loopback port, in this process, and returns the URL
/// the gateway forwards to: calls still take the real REST client path.
async fn start_sandbox(fixture: Fixture) -> Result<Url, Box<dyn std::error::Error>> {
    let (addr, _task) = sandbox::spawn(fixture)
        .await
        .map_err(|e| format!("cannot start the sandbox on 127.0.0.1: {e}"))?;
    let url = Url::parse(&format!("http://{addr}"))?;
    tracing::warn!(
        sandbox = %url,
        "SANDBOX MODE: invoices go to an in-memory imitation of the Gormic API, \
         not to Gormic; state is lost on exit. Never use this in production"
    );
    Ok(url)
}

fn load_fixture(path: Option<&Path>) -> Result<Fixture, Exit> {
    match path {
        Some(path) => Fixture::from_file(path).map_err(|e| Exit::Usage(e.to_string())),
        None => Ok(Fixture::builtin()),
    }
}

/// `gormic-gateway sandbox`: the sandbox REST API alone.
fn sandbox_only(args: &SandboxArgs, cli: &Cli) -> Result<(), Exit> {
    if args.print_fixture {
        print!("{}", sandbox::DEFAULT_FIXTURE_JSON);
        return Ok(());
    }
    let fixture = load_fixture(args.fixture.as_deref())?;
    let _logs = logging::init(cli.log_level, cli.log_format);
    let listen = args.listen;
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Exit::Failed(format!("cannot start the async runtime: {e}")))?;
    block_on(runtime, async move {
        let shutdown = shutdown_signal();
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen} (sandbox --listen): {e}"))?;
        tracing::warn!(
            rest = %listener.local_addr()?,
            orders = fixture.order_count(),
            "SANDBOX: serving an in-memory imitation of the Gormic invoices REST API. \
             Never use this in production"
        );
        sandbox::serve(listener, fixture, shutdown)
            .await
            .map_err(|e| format!("sandbox stopped: {e}"))?;
        Ok(())
    })
}

/// Installs the SIGINT and SIGTERM handlers now (so that a signal that
/// arrives during start-up is not fatal) and resolves on the first of them.
/// If a handler cannot be installed the gateway keeps serving and says so.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let (mut interrupt, mut terminate) = match (interrupt, terminate) {
                (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::warn!(%error, "cannot listen for SIGINT/SIGTERM");
                    return std::future::pending().await;
                }
            };
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}
