//! Command line and environment, resolved into the one [`Config`] the
//! binary runs: every flag has an env var, shown in `--help`, and a default
//! justified in its doc comment (and in docs/operations.md). Flags of a
//! cross-cutting concern are defined by its module (`UpstreamArgs` in
//! `upstream`, `DeadlineArgs` in `deadline`, `LogArgs` in `logging`, ...)
//! and flattened here; this module composes them and nothing imports it
//! back.
//!
//! Two steps, neither of which binds a port: [`Cli::settings`] checks the
//! values (pure), then [`Config::load`] reads and checks the files they name
//! (TLS certificates, keys and CAs, `--credentials`, `--quotas`, the sandbox
//! fixture).
//! A bad file stops the binary there, naming the flag, the file and the
//! problem; nothing is patched into the configuration afterwards.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use url::Url;

use crate::admin::AdminArgs;
use crate::cors::CorsOrigins;
use crate::credentials::{CredentialMap, CredentialsArgs, CredentialsError};
use crate::deadline::DeadlineArgs;
use crate::idempotency::IdempotencyArgs;
use crate::limits::LimitArgs;
use crate::logging::LogArgs;
use crate::metrics::MetricsArgs;
use crate::quota::{QuotaArgs, QuotaFileError, QuotaTable, StoreFailure};
use crate::reload::Reloads;
use crate::sandbox::{Fixture, FixtureError};
use crate::server::{ConnectionLimits, ServerOptions};
use crate::store::StoreArgs;
use crate::tenant::{TenantArgs, TenantKey};
use crate::tls::{self, ServerTls, TlsArgs, TlsError, UpstreamTls};
use crate::trace::{TraceArgs, TraceConfig};
use crate::units::parse_duration;
use crate::upstream::{ProxySetting, UpstreamArgs, UpstreamOptions};

/// Default of `--listen`: every interface, as a server in a container or
/// behind a load balancer must be reached from outside its host.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 50051));
/// Default of `--listen` with `--sandbox`: loopback, as a sandbox is for the
/// machine it runs on, and nobody else should reach it.
pub const DEFAULT_SANDBOX_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50051));

/// gRPC gateway for the Gormic Order Management invoices REST API.
#[derive(Debug, Parser)]
#[command(
    name = "gormic-gateway",
    version,
    about,
    after_help = "DURATION is a number and a unit (500ms, 10s, 1m, 24h), greater than zero except \
                  for --shutdown-delay, --deadline-margin, --max-connection-age, \
                  --upstream-cooldown-max and --otlp-timeout, which take 0s. BYTES is a number with an optional unit (B, KiB, \
                  MiB, GiB), greater than zero."
)]
pub struct Cli {
    /// Address the gRPC server listens on. Default: 0.0.0.0:50051 (every
    /// interface), or 127.0.0.1:50051 with --sandbox (a sandbox is for this
    /// machine only).
    #[arg(long, env = "GORMIC_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Base URL of the Gormic REST API, e.g. `https://api.example.com/gormic`.
    /// May carry a path prefix; must not carry credentials, a query or a fragment.
    #[arg(long, env = "GORMIC_UPSTREAM_URL", value_name = "URL", value_parser = parse_upstream, conflicts_with = "sandbox")]
    pub upstream: Option<Url>,

    /// Instead of --upstream: run the built-in sandbox, an in-memory imitation
    /// of the REST API, on a loopback port and forward to it. For demos and
    /// tests only, never for production (docs/sandbox.md).
    #[arg(long, env = "GORMIC_SANDBOX", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub sandbox: bool,

    /// With --sandbox: seed data to use instead of the built-in fixture
    /// (JSON, format in docs/sandbox.md).
    #[arg(
        long,
        env = "GORMIC_SANDBOX_FIXTURE",
        value_name = "FILE",
        requires = "sandbox"
    )]
    pub sandbox_fixture: Option<PathBuf>,

    #[command(flatten)]
    pub deadlines: DeadlineArgs,

    /// On SIGTERM/SIGINT, after the delay, how long in-flight calls may take
    /// to finish. Longer than --upstream-timeout, so that a call in flight
    /// can end normally.
    #[arg(long, env = "GORMIC_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// On SIGTERM/SIGINT, how long the gateway keeps serving (and accepting)
    /// while its readiness and gRPC health already say NOT_SERVING, so that
    /// load balancers stop sending first. 0s for local use; set it to the
    /// time your platform needs to update its endpoints (5s on Kubernetes).
    #[arg(long, env = "GORMIC_SHUTDOWN_DELAY", value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// Worker threads, 1 to 1024; each serves its connections wholly
    /// (thread-per-core). Default: the number of CPUs the process may use.
    #[arg(long, env = "GORMIC_WORKER_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub tenants: TenantArgs,

    #[command(flatten)]
    pub upstream_client: UpstreamArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub credentials: CredentialsArgs,

    #[command(flatten)]
    pub quotas: QuotaArgs,

    #[command(flatten)]
    pub idempotency: IdempotencyArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub admin: AdminArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    #[command(flatten)]
    pub trace: TraceArgs,

    /// Browser origins allowed to call the gateway with gRPC-Web: a
    /// comma-separated list such as `https://app.example.com,http://localhost:3000`,
    /// or `*` for any origin. Default: none (no CORS headers; browsers are refused).
    // No heading: listed with the server options, not under the heading of
    // the flattened group declared before it.
    #[arg(long, env = "GORMIC_CORS_ALLOWED_ORIGINS", value_name = "ORIGINS", value_parser = CorsOrigins::parse, help_heading = None::<&str>)]
    pub cors_allowed_origins: Option<CorsOrigins>,

    #[command(flatten)]
    pub logs: LogArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Other things the binary can run instead of the gateway.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the sandbox's REST API alone (no gRPC), for tools that speak
    /// REST. An in-memory imitation: never for production.
    Sandbox(SandboxArgs),
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Address the sandbox REST API listens on.
    #[arg(
        long,
        env = "GORMIC_SANDBOX_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,

    /// Seed data to use instead of the built-in fixture (JSON).
    #[arg(long, env = "GORMIC_SANDBOX_FIXTURE", value_name = "FILE")]
    pub fixture: Option<PathBuf>,

    /// Print the built-in fixture (JSON) and exit; a one-shot action, so it
    /// has no env var.
    #[arg(long)]
    pub print_fixture: bool,
}

/// Where the gateway forwards calls, as the command line names it.
#[derive(Debug, Clone)]
pub enum Target {
    /// The Gormic REST API at this base URL (`--upstream`).
    Url(Url),
    /// The in-process sandbox (`--sandbox`), seeded from this file or, when
    /// `None`, from the built-in fixture.
    Sandbox { fixture: Option<PathBuf> },
}

/// What the command line says, every value checked, before any file it
/// names is read ([`Config::load`] reads them).
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `--admin-listen`; `None` when off.
    pub admin: Option<SocketAddr>,
    /// OTLP export (the flags and the standard `OTEL_*` variables).
    pub trace: TraceConfig,
    pub upstream: Target,
    /// Without TLS: [`Config::load`] adds it, from the files.
    pub upstream_options: UpstreamOptions,
    /// `--upstream-timeout` and `--deadline-margin`.
    pub deadlines: DeadlineArgs,
    /// Without TLS: [`Config::load`] adds it, from the files.
    pub server: ServerOptions,
    pub max_in_flight: usize,
}

/// What the binary does, resolved from the command line.
#[derive(Debug)]
pub enum Run {
    /// The gateway.
    Gateway(Box<Config>),
    /// `gormic-gateway sandbox`: the sandbox REST API alone.
    Sandbox(SandboxConfig),
    /// `gormic-gateway sandbox --print-fixture`.
    PrintFixture,
}

/// Where the gateway forwards calls, ready to use.
#[derive(Debug, Clone)]
pub enum Destination {
    /// The Gormic REST API at this base URL (`--upstream`).
    Url(Url),
    /// The in-process sandbox (`--sandbox`), with its seed data read and
    /// checked.
    Sandbox(Fixture),
}

/// The gateway's configuration, resolved: the command line's values and
/// what the files it names hold, read and checked. Built by
/// [`Config::load`] before anything is bound; nothing changes it after.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `--admin-listen`; `None` when off.
    pub admin: Option<SocketAddr>,
    /// OTLP export (the flags and the standard `OTEL_*` variables).
    pub trace: TraceConfig,
    pub upstream: Destination,
    /// With the TLS client configuration of the upstream files (it follows
    /// their reloads).
    pub upstream_options: UpstreamOptions,
    /// `--upstream-timeout` and `--deadline-margin`.
    pub deadlines: DeadlineArgs,
    /// With the server's TLS (`--tls-cert`), which follows reloads.
    pub server: ServerOptions,
    pub max_in_flight: usize,
    /// `--tenant-key`: what fair shares count as a tenant.
    pub tenant_key: TenantKey,
    /// `--credentials`: mTLS identities mapped to the keys sent upstream.
    pub credentials: Option<CredentialMap>,
    /// `--quotas`: the quotas file, read and checked, with its buckets.
    pub quotas: Option<QuotaTable>,
    /// `--quota-store-failure`.
    pub quota_store_failure: StoreFailure,
    /// `--reload-interval`: how often the files are re-read
    /// ([`Config::reloads`]).
    pub reload_interval: Duration,
    /// `--upstream-ca` and the upstream client pair, when any is set: the
    /// files behind `upstream_options`' TLS configuration, re-read while
    /// serving.
    pub upstream_tls: Option<UpstreamTls>,
    pub idempotency: IdempotencyArgs,
    /// The shared store's replication requirement (`--idempotency-store-replicas`).
    pub store: StoreArgs,
    pub metrics: MetricsArgs,
    pub logs: LogArgs,
}

/// `gormic-gateway sandbox`, resolved.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub listen: SocketAddr,
    pub fixture: Fixture,
    pub logs: LogArgs,
}

/// A command line that cannot start the gateway; the text names the flag
/// (and the file and the problem, for a file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no upstream: pass --upstream URL (or set GORMIC_UPSTREAM_URL) to name the Gormic REST API, \
         or --sandbox (GORMIC_SANDBOX=1) to run against the built-in sandbox (not for production)"
    )]
    NoUpstream,
    #[error(transparent)]
    Trace(#[from] crate::trace::TraceError),
    /// A flag of the upstream client; the text names it.
    #[error("{0}")]
    Upstream(String),
    /// `--upstream` is a plain http:// URL the gateway must not send keys to.
    #[error("--upstream {url}: {problem}")]
    InsecureUpstream { url: Url, problem: String },
    /// `--sandbox-fixture` (or the subcommand's `--fixture`).
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// A TLS file (server or upstream side).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The credentials error names the file and line; this adds the flag.
    #[error("--credentials {0}")]
    Credentials(#[from] CredentialsError),
    /// The quotas error names the file, line and field; this adds the flag.
    #[error("--quotas {0}")]
    Quotas(#[from] QuotaFileError),
}

impl Cli {
    /// What the binary does: the gateway with its [`Config`], or the
    /// sandbox subcommand. Reads the files the flags name; binds nothing.
    pub fn resolve(&self) -> Result<Run, ConfigError> {
        match &self.command {
            None => Ok(Run::Gateway(Box::new(Config::load(self)?))),
            Some(Command::Sandbox(args)) if args.print_fixture => Ok(Run::PrintFixture),
            Some(Command::Sandbox(args)) => Ok(Run::Sandbox(SandboxConfig {
                listen: args.listen,
                fixture: load_fixture(args.fixture.as_ref())?,
                logs: self.logs.clone(),
            })),
        }
    }

    /// The gateway's settings, every value checked; reads no file.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let upstream = match (&self.upstream, self.sandbox) {
            (Some(url), _) => Target::Url(url.clone()),
            (None, true) => Target::Sandbox {
                fixture: self.sandbox_fixture.clone(),
            },
            (None, false) => return Err(ConfigError::NoUpstream),
        };
        let listen = self.listen.unwrap_or(match upstream {
            Target::Url(_) => DEFAULT_LISTEN,
            Target::Sandbox { .. } => DEFAULT_SANDBOX_LISTEN,
        });
        let workers = self
            .worker_threads
            .map_or_else(crate::runtime::default_worker_threads, usize::from);
        let limits = &self.limits;
        Ok(Settings {
            listen,
            admin: self.admin.addr(),
            trace: self.trace.resolve()?,
            upstream,
            upstream_options: UpstreamOptions {
                workers,
                ..self
                    .upstream_client
                    .options()
                    .map_err(ConfigError::Upstream)?
            },
            deadlines: self.deadlines.clone(),
            server: ServerOptions {
                grace: self.shutdown_grace,
                delay: self.shutdown_delay,
                cors: self.cors_allowed_origins.clone().unwrap_or_default(),
                workers,
                limits: ConnectionLimits {
                    max_request_bytes: limits.max_request_bytes,
                    max_header_bytes: u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
                    max_concurrent_streams: limits.http2_max_concurrent_streams,
                    keepalive_interval: limits.http2_keepalive_interval,
                    keepalive_timeout: limits.http2_keepalive_timeout,
                    max_connection_age: Some(limits.max_connection_age)
                        .filter(|age| !age.is_zero()),
                    max_connection_age_grace: limits.max_connection_age_grace,
                    http1_header_read_timeout: limits.http1_header_read_timeout,
                },
                tls: None,
                tls_handshake_timeout: self.tls.tls_handshake_timeout,
            },
            max_in_flight: limits.max_in_flight,
        })
    }
}

impl Config {
    /// The gateway's configuration: [`Cli::settings`], then the files they
    /// name, each read and checked once, in this order: the sandbox
    /// fixture, `--upstream` (no plain http:// off loopback without
    /// `--allow-insecure-upstream`), the server's TLS files, the upstream's,
    /// `--credentials`, `--quotas`.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let Settings {
            listen,
            admin,
            trace,
            upstream,
            mut upstream_options,
            deadlines,
            mut server,
            max_in_flight,
        } = cli.settings()?;
        let upstream = match upstream {
            Target::Url(url) => {
                tls::check_upstream_url(&url, cli.tls.allow_insecure_upstream).map_err(
                    |problem| ConfigError::InsecureUpstream {
                        url: url.clone(),
                        problem,
                    },
                )?;
                Destination::Url(url)
            }
            Target::Sandbox { fixture } => {
                // In this process, on loopback: never through a proxy.
                upstream_options.proxy = ProxySetting::Off;
                Destination::Sandbox(load_fixture(fixture.as_ref())?)
            }
        };
        let server_tls = ServerTls::load(&cli.tls)?;
        let upstream_tls = UpstreamTls::load(&cli.tls)?;
        let credentials = cli
            .credentials
            .credentials
            .as_deref()
            .map(CredentialMap::load)
            .transpose()?;
        let quotas = cli
            .quotas
            .quotas
            .as_deref()
            .map(QuotaTable::load)
            .transpose()?;
        upstream_options.tls = Some(upstream_tls.client_config());
        server.tls = server_tls;
        Ok(Config {
            listen,
            admin,
            trace,
            upstream,
            upstream_options,
            deadlines,
            server,
            max_in_flight,
            tenant_key: cli.tenants.tenant_key,
            credentials,
            quotas,
            quota_store_failure: cli.quotas.quota_store_failure,
            reload_interval: cli.tls.reload_interval,
            upstream_tls: Some(upstream_tls).filter(UpstreamTls::has_files),
            idempotency: cli.idempotency.clone(),
            store: cli.store.clone(),
            metrics: cli.metrics.clone(),
            logs: cli.logs.clone(),
        })
    }

    /// What is re-read while serving, and how often: the server's TLS, the
    /// upstream's TLS files, `--credentials` and `--quotas`, each a clone
    /// sharing its reloads with the one in use.
    pub fn reloads(&self) -> Reloads {
        Reloads {
            interval: self.reload_interval,
            server_tls: self.server.tls.clone(),
            upstream_tls: self.upstream_tls.clone(),
            credentials: self.credentials.clone(),
            quotas: self.quotas.clone(),
        }
    }
}

/// The fixture in `path`, or the built-in one.
fn load_fixture(path: Option<&PathBuf>) -> Result<Fixture, FixtureError> {
    path.map_or_else(|| Ok(Fixture::builtin()), |path| Fixture::from_file(path))
}

fn parse_upstream(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {}",
            url.scheme()
        ));
    }
    if url.host().is_none() {
        return Err("the URL has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        // They would end up in logs; the API authenticates with api-key.
        return Err(
            "credentials in the URL are not accepted (the api-key comes from call metadata)".into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or a fragment".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gormic-gateway").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let cli = parse(&["--upstream", "http://127.0.0.1:8080/api"]).unwrap();
        let config = cli.settings().unwrap();
        assert_eq!(config.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(config.deadlines.upstream_timeout, Duration::from_secs(10));
        assert_eq!(config.max_in_flight, 10_000);
        assert_eq!(config.upstream_options.max_connections, 1024);
        assert_eq!(config.server.limits.max_request_bytes, 64 * 1024);
        assert_eq!(config.server.limits.max_header_bytes, 16 * 1024);
        assert_eq!(
            config.server.limits.max_connection_age,
            Some(Duration::from_secs(30 * 60))
        );
        assert_eq!(config.server.delay, Duration::ZERO);
        assert_eq!(config.upstream_options.retry.max_attempts, 3);
        assert_eq!(
            config.upstream_options.connect_timeout,
            Duration::from_secs(2)
        );
        let Target::Url(url) = config.upstream else {
            panic!("--upstream gives a URL target: {:?}", config.upstream);
        };
        assert_eq!(url.path(), "/api");
    }

    #[test]
    fn sandbox_is_an_explicit_alternative_to_upstream() {
        let config = parse(&["--sandbox"]).unwrap().settings().unwrap();
        assert!(matches!(config.upstream, Target::Sandbox { fixture: None }));
        let config = parse(&["--sandbox", "--sandbox-fixture", "f.json"])
            .unwrap()
            .settings()
            .unwrap();
        assert!(
            matches!(config.upstream, Target::Sandbox { fixture: Some(ref f) } if f.as_os_str() == "f.json")
        );
        let error = parse(&["--sandbox", "--upstream", "http://x"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--sandbox") && error.contains("--upstream"),
            "{error}"
        );
        let error = parse(&["--sandbox-fixture", "f.json"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--sandbox"), "{error}");
    }

    #[test]
    fn sandbox_subcommand() {
        let cli = parse(&["sandbox", "--listen", "127.0.0.1:9000"]).unwrap();
        let Some(Command::Sandbox(args)) = cli.command else {
            panic!("sandbox subcommand expected");
        };
        assert_eq!(args.listen, "127.0.0.1:9000".parse().unwrap());
        assert!(args.fixture.is_none() && !args.print_fixture);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let error = parse(&["--upstream", "ftp://x"]).unwrap_err().to_string();
        assert!(
            error.contains("--upstream") && error.contains("scheme"),
            "{error}"
        );
        let error = parse(&["--upstream", "http://u:p@x"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("credentials"), "{error}");
        let error = parse(&["--upstream-timeout", "soon"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--upstream-timeout"), "{error}");
        let error = parse(&["--upstream-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("greater than zero"), "{error}");
    }

    #[test]
    fn cors_origins_default_to_none_and_are_checked() {
        let cli = parse(&["--upstream", "http://127.0.0.1:8080"]).unwrap();
        assert_eq!(cli.settings().unwrap().server.cors, CorsOrigins::None);
        let cli = parse(&[
            "--upstream",
            "http://127.0.0.1:8080",
            "--cors-allowed-origins",
            "*",
        ])
        .unwrap();
        assert_eq!(cli.settings().unwrap().server.cors, CorsOrigins::Any);
        let error = parse(&["--cors-allowed-origins", "https://a.example/"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--cors-allowed-origins") && error.contains("https://a.example"),
            "{error}"
        );
    }

    #[test]
    fn size_flags_name_the_flag() {
        let error = parse(&["--max-request-bytes", "lots"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--max-request-bytes"), "{error}");
    }

    #[test]
    fn a_bad_proxy_is_refused_naming_the_flag_not_the_password() {
        let cli = parse(&[
            "--upstream",
            "https://api.example.com",
            "--upstream-proxy",
            "socks5://me:hunter2@proxy:1080",
        ])
        .unwrap();
        let error = cli.settings().unwrap_err().to_string();
        assert!(error.contains("--upstream-proxy"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn a_zero_connection_age_turns_it_off() {
        let cli = parse(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--max-connection-age",
            "0s",
        ])
        .unwrap();
        assert_eq!(
            cli.settings().unwrap().server.limits.max_connection_age,
            None
        );
    }

    #[test]
    fn no_upstream_is_refused() {
        let error = parse(&[]).unwrap().settings().unwrap_err().to_string();
        assert!(
            error.contains("--upstream") && error.contains("--sandbox"),
            "{error}"
        );
    }

    #[test]
    fn the_sandbox_listens_on_loopback_unless_told_otherwise() {
        let settings = parse(&["--sandbox"]).unwrap().settings().unwrap();
        assert_eq!(settings.listen, "127.0.0.1:50051".parse().unwrap());
        let settings = parse(&["--sandbox", "--listen", "0.0.0.0:50051"])
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(settings.listen, "0.0.0.0:50051".parse().unwrap());
        let settings = parse(&["--upstream", "http://127.0.0.1:8080", "--listen", "[::1]:9"])
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(settings.listen, "[::1]:9".parse().unwrap());
    }

    #[test]
    fn every_value_has_a_placeholder_of_its_own() {
        // Not clap's default, the field's name upper-cased (`<MAX_ATTEMPTS>`).
        let mut command = <Cli as clap::CommandFactory>::command();
        command.build();
        let sandbox = command
            .find_subcommand("sandbox")
            .expect("the sandbox subcommand")
            .clone();
        for argument in command.get_arguments().chain(sandbox.get_arguments()) {
            if !argument.get_action().takes_values() {
                continue;
            }
            let id = argument.get_id().as_str();
            let flag = argument.get_long().unwrap_or(id);
            let names = argument.get_value_names().unwrap_or_default();
            assert!(
                !names.is_empty() && names.iter().all(|n| n.as_str() != id.to_uppercase()),
                "--{flag} shows {names:?}"
            );
        }
        let help = command.render_long_help().to_string();
        for shown in [
            "--listen <ADDR>",
            "--max-attempts <N>",
            "--retry-budget-ratio <RATIO>",
            "--retry-budget-min-per-second <N>",
            "--log-level <LEVEL>",
            "--log-format <FORMAT>",
        ] {
            assert!(help.contains(shown), "{shown} not in:\n{help}");
        }
    }

    #[test]
    fn checked_ranges_are_in_the_help() {
        let help = <Cli as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        let flag = |name: &str| {
            let start = help
                .find(&format!("--{name} "))
                .unwrap_or_else(|| panic!("--{name} in:\n{help}"));
            let end = help[start..]
                .find("[env:")
                .map_or(help.len(), |e| start + e);
            help[start..end]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (name, range) in [
            ("max-attempts", "1 to 10"),
            ("retry-budget-ratio", "0 to 10"),
            ("worker-threads", "1 to 1024"),
            ("max-in-flight", "at least 1"),
            ("upstream-max-connections", "at least 1"),
            ("idempotency-max-entries", "at least 1"),
            ("idempotency-ttl", "1ms to 366 days"),
        ] {
            let text = flag(name);
            assert!(text.to_lowercase().contains(range), "--{name}: {text}");
        }
        assert!(help.contains("DURATION is a number and a unit"), "{help}");
        let error = parse(&["--max-attempts", "11"]).unwrap_err().to_string();
        assert!(error.contains("1..=10"), "{error}");
    }

    #[test]
    fn files_are_read_when_the_config_is_loaded_naming_the_flag() {
        let missing =
            std::env::temp_dir().join(format!("gormic-config-{}-missing.toml", std::process::id()));
        let cli = parse(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--tls-cert",
            missing.to_str().unwrap(),
            "--tls-key",
            missing.to_str().unwrap(),
        ])
        .unwrap();
        assert!(cli.settings().is_ok(), "settings read no file");
        let error = Config::load(&cli).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("--tls-cert {}: ", missing.display()))
                && error.contains("does not exist"),
            "{error}"
        );

        let cli = parse(&["--sandbox"]).unwrap();
        let config = Config::load(&cli).unwrap();
        assert!(
            matches!(&config.upstream, Destination::Sandbox(f) if f.order_count() == Fixture::builtin().order_count())
        );
        assert!(config.upstream_options.tls.is_some() && config.server.tls.is_none());
        assert_eq!(config.upstream_options.proxy, ProxySetting::Off, "loopback");
        assert!(config.reloads().is_empty() && config.credentials.is_none());
    }

    #[test]
    fn a_quotas_file_is_read_at_load_and_a_bad_one_names_flag_file_line_and_field() {
        let dir = std::env::temp_dir().join(format!("gormic-config-quotas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("quotas.toml");
        std::fs::write(&path, "[default]\ncalls_per_second = 20\n").unwrap();
        let cli = parse(&["--sandbox", "--quotas", path.to_str().unwrap()]).unwrap();
        let config = Config::load(&cli).unwrap();
        let quotas = config.quotas.as_ref().expect("--quotas");
        assert_eq!(quotas.rules().default.expect("[default]").limit.burst, 20);
        assert!(config.reloads().quotas.is_some(), "reloaded");
        assert_eq!(config.quota_store_failure, StoreFailure::Local);

        std::fs::write(&path, "[default]\ncalls_per_second = 20\nburst = -1\n").unwrap();
        let error = Config::load(&cli).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "--quotas {}: line 3: default.burst must be a whole number from 1 to 1000000, \
                 not -1",
                path.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let cli = parse(&["--sandbox", "--quota-store-failure", "refuse"]).unwrap();
        assert_eq!(cli.quotas.quota_store_failure, StoreFailure::Refuse);
        let error = parse(&["--quota-store-failure", "open"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--quota-store-failure"), "{error}");
    }
}
