//! The `gormic-gateway` binary: resolve the configuration ([`Cli::resolve`]:
//! every value and every file a flag names is checked before any port is
//! bound), start the logs, bind, log every bound address, serve until SIGINT
//! or SIGTERM, drain within `--shutdown-grace`, exit 0. The main thread runs
//! the accept loop and the signal handling on a current-thread runtime;
//! calls are served on the worker threads the server starts (`runtime`).
//! With `--sandbox` the sandbox REST API is started first, on a loopback
//! port, and is the upstream; `gormic-gateway sandbox` serves that REST API
//! alone.

use std::cell::OnceCell;
use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;
use url::Url;

use gormic_gateway::admin::{self, Readiness};
use gormic_gateway::config::{Cli, Config, Destination, Run, SandboxConfig};
use gormic_gateway::credentials::CredentialMap;
use gormic_gateway::idempotency::Idempotency;
use gormic_gateway::limits::InFlightLimit;
use gormic_gateway::metrics::Metrics;
use gormic_gateway::quota::Quotas;
use gormic_gateway::sandbox::{self, Fixture};
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::store::metrics::StoreSeries;
use gormic_gateway::tenant::Tenants;
use gormic_gateway::trace::Tracer;
use gormic_gateway::upstream::Upstream;
use gormic_gateway::{logging, server};

/// mimalloc instead of glibc's malloc: a call allocates many small blocks
/// on one thread and frees them there, the case thread-local free lists
/// serve best (BENCHMARKS.md, "Profiles", has the before/after counts).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let run = match Cli::parse().resolve() {
        Ok(run) => run,
        Err(error) => {
            // Nothing was started; the logs are not either.
            eprintln!("gormic-gateway: {error}");
            return ExitCode::from(2);
        }
    };
    // The logs start once, before either server, and outlive its error.
    let (logs, serve): (_, Box<dyn FnOnce() -> Result<(), String>>) = match run {
        Run::PrintFixture => {
            print!("{}", sandbox::DEFAULT_FIXTURE_JSON);
            return ExitCode::SUCCESS;
        }
        Run::Gateway(config) => (config.logs.clone(), Box::new(move || gateway(*config))),
        Run::Sandbox(config) => (config.logs.clone(), Box::new(move || sandbox_only(config))),
    };
    let _logs = logging::init(logs.log_level, logs.log_format);
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Said once, in the log's format; the text names the flag at
            // fault (`cannot listen on ... (--listen): ...`).
            tracing::error!(%error, "stopped");
            ExitCode::FAILURE
        }
    }
}

/// The gateway, in front of `--upstream` or the in-process sandbox.
fn gateway(config: Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let tracer = OnceCell::new();
    let served = runtime
        .block_on(serve(config, &tracer))
        .map_err(|e| e.to_string());
    // After every runtime has stopped: the exporter flushes on its own thread.
    if let Some(tracer) = tracer.get()
        && let Err(error) = tracer.shutdown()
    {
        tracing::warn!(%error, "spans not exported at exit");
    }
    served
}

async fn serve(
    config: Config,
    tracer_slot: &OnceCell<Tracer>,
) -> Result<(), Box<dyn std::error::Error>> {
    let signal = shutdown_signal();
    let (stop, mut stopped) = watch::channel(false);
    let shutdown = async move {
        signal.await;
        let _ = stop.send(true);
    };
    // The one shared store (with a Redis `--idempotency-store`): idempotency
    // records, quotas and cooldowns use its connections and follow its
    // failovers together.
    let store = Idempotency::shared_store_of(&config.idempotency, &config.store)
        .map_err(|e| e.to_string())?;
    let idempotency =
        Idempotency::on(&config.idempotency, store.clone()).map_err(|e| e.to_string())?;
    let upstream_url = match &config.upstream {
        Destination::Url(url) => url.clone(),
        Destination::Sandbox(fixture) => start_sandbox(fixture.clone()).await?,
    };
    let metrics = Metrics::new(&config.metrics);
    // Wired to `metrics` with the gateway (`InvoiceGateway::with_metrics`).
    let upstream =
        Upstream::new(&upstream_url, config.upstream_options.clone()).map_err(|e| e.to_string())?;
    metrics.register_connections(upstream.gauges());
    if let Some(store) = &store {
        metrics.series::<StoreSeries>().watch(store);
        upstream.share_cooldowns(store);
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
        tls = config.server.tls.as_ref().map(|t| if t.mutual() { "mutual" } else { "server" }),
        upstream = %upstream_url,
        upstream_proxy = upstream.proxy(),
        upstream_timeout = %humantime::format_duration(config.deadlines.upstream_timeout),
        upstream_connect_timeout = %humantime::format_duration(config.upstream_options.connect_timeout),
        upstream_cooldown_max = %humantime::format_duration(config.upstream_options.cooldown_max),
        workers = config.server.workers,
        max_in_flight = config.max_in_flight,
        tenant_key = %config.tenant_key,
        upstream_max_connections = config.upstream_options.max_connections,
        idempotency_store = %config.idempotency.idempotency_store,
        idempotency_store_replicas = %config.store.idempotency_store_replicas,
        credentials = config.credentials.as_ref().map(CredentialMap::len),
        cors_allowed_origins = %config.server.cors,
        otlp_endpoint = config.trace.endpoint.as_ref().map(|e| e.to_string()),
        "serving gormic.om.v1.InvoiceService"
    );
    tokio::spawn(config.reloads().run(
        async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        },
        metrics.clone(),
    ));
    let mut gateway = InvoiceGateway::new(upstream)
        .map_err(|e| e.to_string())?
        .with_in_flight_limit(InFlightLimit::new(config.max_in_flight))
        .with_tenants(Tenants::new(config.tenant_key))
        .with_deadlines(config.deadlines.clone())
        .with_idempotency(idempotency)
        .with_metrics(metrics)
        .with_tracer(tracer);
    if let Some(credentials) = config.credentials.clone() {
        gateway = gateway.with_credentials(credentials);
    }
    if let Some(table) = config.quotas.clone() {
        gateway = gateway.with_quotas(quotas(table, store, &config));
    }
    readiness.set_ready(true);
    let hooks = server::Hooks {
        on_drain: Some(Box::new(move || readiness.set_ready(false))),
    };
    server::run_with(listener, gateway, shutdown, config.server, hooks).await?;
    let _ = admin_stop.send(());
    Ok(())
}

/// The quotas of `--quotas`, shared through the Redis store when there is
/// one; said once at start-up.
fn quotas(
    table: gormic_gateway::quota::QuotaTable,
    store: Option<gormic_gateway::store::Store>,
    config: &Config,
) -> Quotas {
    let rules = table.rules();
    tracing::info!(
        quotas = %table.path().display(),
        default = rules.default.is_some(),
        organizations = rules.organizations.len(),
        callers = rules.callers.len(),
        shared = store.is_some(),
        quota_store_failure = config.quota_store_failure.as_str(),
        "quotas on: {}",
        if store.is_some() {
            "counted by every replica together in the store"
        } else {
            "counted by this replica alone (no Redis store)"
        }
    );
    Quotas::new(table, store, config.quota_store_failure)
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

/// `gormic-gateway sandbox`: the sandbox REST API alone.
fn sandbox_only(config: SandboxConfig) -> Result<(), String> {
    let SandboxConfig {
        listen, fixture, ..
    } = config;
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let shutdown = shutdown_signal();
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen} (sandbox --listen): {e}"))?;
        let rest = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::warn!(
            %rest,
            orders = fixture.order_count(),
            "SANDBOX: serving an in-memory imitation of the Gormic invoices REST API. \
             Never use this in production"
        );
        sandbox::serve(listener, fixture, shutdown)
            .await
            .map_err(|e| format!("sandbox stopped: {e}"))
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
