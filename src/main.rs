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

use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;
use url::Url;

use gormic_gateway::admin::{self, Readiness};
use gormic_gateway::config::{Cli, Command, Config, SandboxArgs, Target};
use gormic_gateway::credentials::CredentialMap;
use gormic_gateway::idempotency::Idempotency;
use gormic_gateway::limits::InFlightLimit;
use gormic_gateway::metrics::Metrics;
use gormic_gateway::reload;
use gormic_gateway::sandbox::{self, Fixture};
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::tls::{self, ServerTls, UpstreamTls};
use gormic_gateway::trace::Tracer;
use gormic_gateway::upstream::{ProxySetting, Upstream};
use gormic_gateway::{logging, server};

/// mimalloc instead of glibc's malloc: a call allocates ~60 small blocks on
/// one thread and frees them there, the case thread-local free lists serve
/// best (BENCHMARKS.md has the before/after instruction counts).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let mut config = cli.config().map_err(|e| Exit::Usage(e.to_string()))?;
    // A bad file named by a flag stops the binary here, before any port is
    // bound, with the flag, the file and the problem.
    let sandbox = match &config.upstream {
        Target::Url(_) => None,
        Target::Sandbox { fixture } => Some(load_fixture(fixture.as_deref())?),
    };
    let files = Files::load(cli, &config)?;
    config.upstream_options.tls = Some(files.upstream_tls.client_config());
    config.server.tls = files.server_tls.clone();
    let _logs = logging::init(cli.logs.log_level, cli.logs.log_format);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit::Failed(format!("cannot start the async runtime: {e}")))?;
    let tracer = std::cell::OnceCell::new();
    let served = block_on(runtime, serve(cli, config, sandbox, files, &tracer));
    // After every runtime has stopped: the exporter flushes on its own thread.
    if let Some(tracer) = tracer.get()
        && let Err(error) = tracer.shutdown()
    {
        tracing::warn!(%error, "spans not exported at exit");
    }
    served
}

/// What the flags' files hold, checked at start-up and re-read on change.
struct Files {
    server_tls: Option<ServerTls>,
    upstream_tls: UpstreamTls,
    credentials: Option<CredentialMap>,
}

impl Files {
    fn load(cli: &Cli, config: &Config) -> Result<Self, Exit> {
        let usage = |e: &dyn std::fmt::Display| Exit::Usage(e.to_string());
        if let Target::Url(url) = &config.upstream {
            tls::check_upstream_url(url, cli.tls.allow_insecure_upstream)
                .map_err(|problem| Exit::Usage(format!("--upstream {url}: {problem}")))?;
        }
        Ok(Self {
            server_tls: ServerTls::load(&cli.tls).map_err(|e| usage(&e))?,
            upstream_tls: UpstreamTls::load(&cli.tls).map_err(|e| usage(&e))?,
            // CredentialsError names the file and line, not the flag.
            credentials: cli
                .credentials
                .credentials
                .as_deref()
                .map(CredentialMap::load)
                .transpose()
                .map_err(|e| Exit::Usage(format!("--credentials {e}")))?,
        })
    }

    /// One reload task per reloadable file set, until `stop` says so; each
    /// outcome is counted, and the certificate expiry gauge follows.
    fn watch(&self, interval: Duration, stop: &watch::Receiver<bool>, metrics: &Metrics) {
        let until = |stop: &watch::Receiver<bool>| {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            }
        };
        let count = |metrics: &Metrics| {
            let metrics = metrics.clone();
            move |file: &'static str, outcome: reload::Outcome| {
                metrics.reload(file, outcome == reload::Outcome::Success);
            }
        };
        if let Some(server_tls) = self.server_tls.clone() {
            metrics.set_tls_certificate_expiry(server_tls.not_after());
            let expiry = metrics.clone();
            let counted = count(metrics);
            let tls = server_tls.clone();
            tokio::spawn(reload::watch(
                interval,
                until(stop),
                "tls",
                move || server_tls.reload(),
                move |file, outcome| {
                    counted(file, outcome);
                    expiry.set_tls_certificate_expiry(tls.not_after());
                },
            ));
        }
        if self.upstream_tls.has_files() {
            let upstream_tls = self.upstream_tls.clone();
            tokio::spawn(reload::watch(
                interval,
                until(stop),
                "upstream_tls",
                move || upstream_tls.reload(),
                count(metrics),
            ));
        }
        if let Some(credentials) = self.credentials.clone() {
            tokio::spawn(reload::watch(
                interval,
                until(stop),
                "credentials",
                move || credentials.reload(),
                count(metrics),
            ));
        }
    }
}

fn block_on(
    runtime: tokio::runtime::Runtime,
    future: impl Future<Output = Result<(), Box<dyn std::error::Error>>>,
) -> Result<(), Exit> {
    runtime
        .block_on(future)
        .map_err(|e| Exit::Failed(e.to_string()))
}

async fn serve(
    cli: &Cli,
    config: Config,
    sandbox: Option<Fixture>,
    files: Files,
    tracer_slot: &std::cell::OnceCell<Tracer>,
) -> Result<(), Box<dyn std::error::Error>> {
    let signal = shutdown_signal();
    let (stop, stopped) = watch::channel(false);
    let shutdown = async move {
        signal.await;
        let _ = stop.send(true);
    };
    let idempotency = Idempotency::open(&cli.idempotency, &cli.store).map_err(|e| e.to_string())?;
    let mut upstream_options = config.upstream_options.clone();
    let upstream_url = match (&config.upstream, sandbox) {
        (Target::Url(url), _) => url.clone(),
        (Target::Sandbox { .. }, fixture) => {
            // In this process, on loopback: never through a proxy.
            upstream_options.proxy = ProxySetting::Off;
            start_sandbox(fixture.unwrap_or_else(Fixture::builtin)).await?
        }
    };
    let metrics = Metrics::new(&cli.metrics);
    let upstream = Upstream::new(&upstream_url, upstream_options).map_err(|e| e.to_string())?;
    metrics.register_connections(upstream.gauges());
    if let Some(store) = idempotency.shared_store() {
        metrics.register_series(std::sync::Arc::new(store.collector()));
    }
    metrics.count_log_lines_dropped_from(logging::dropped_lines);
    let tracer = Tracer::start(
        &config.trace,
        upstream_url.host_str().unwrap_or_default(),
        upstream_url.port_or_known_default().unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    let _ = tracer_slot.set(tracer.clone());

    let listener = server::bind(config.listen)
        .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
    let readiness = Readiness::new();
    // The admin listener outlives the drain: /readyz must answer 503 (not
    // refuse connections) and /livez 200 for all of --shutdown-delay and
    // --shutdown-grace, and a last scrape must still work.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = config.admin {
        let admin = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (--admin-listen): {e}"))?;
        tracing::info!(admin = %admin.local_addr()?, "serving /metrics, /livez, /readyz");
        tokio::spawn(admin::serve(
            admin,
            metrics.clone(),
            readiness.clone(),
            async move {
                let _ = admin_stopped.await;
            },
        ));
    }
    tracing::info!(
        grpc = %listener.local_addr()?,
        tls = files.server_tls.as_ref().map(|t| if t.mutual() { "mutual" } else { "server" }),
        upstream = %upstream_url,
        upstream_proxy = upstream.proxy(),
        upstream_timeout = %humantime::format_duration(config.deadlines.upstream_timeout),
        upstream_connect_timeout = %humantime::format_duration(config.upstream_options.connect_timeout),
        workers = config.server.workers,
        max_in_flight = config.max_in_flight,
        upstream_max_connections = config.upstream_options.max_connections,
        idempotency_store = %cli.idempotency.idempotency_store,
        idempotency_store_replicas = %cli.store.idempotency_store_replicas,
        credentials = files.credentials.as_ref().map(CredentialMap::len),
        cors_allowed_origins = %config.server.cors,
        otlp_endpoint = config.trace.endpoint.as_ref().map(|e| e.to_string()),
        "serving gormic.om.v1.InvoiceService"
    );
    files.watch(cli.tls.reload_interval, &stopped, &metrics);
    let mut gateway = InvoiceGateway::new(upstream)
        .map_err(|e| e.to_string())?
        .with_in_flight_limit(InFlightLimit::new(config.max_in_flight))
        .with_deadlines(config.deadlines.clone())
        .with_idempotency(idempotency)
        .with_metrics(metrics)
        .with_tracer(tracer);
    if let Some(credentials) = files.credentials.clone() {
        gateway = gateway.with_credentials(credentials);
    }
    readiness.set_ready(true);
    let hooks = server::Hooks {
        on_drain: Some(Box::new(move || readiness.set_ready(false))),
    };
    server::run_with(listener, gateway, shutdown, config.server, hooks).await?;
    let _ = admin_stop.send(());
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
    let _logs = logging::init(cli.logs.log_level, cli.logs.log_format);
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
