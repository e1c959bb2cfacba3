//! Command line and environment: every flag has an env var, shown in
//! `--help`, and a default justified in its doc comment (and in
//! docs/operations.md). Parsing only checks values; nothing here binds a
//! port. Flags of a cross-cutting concern are defined by its module
//! (`UpstreamArgs` in `upstream`, `DeadlineArgs` in `deadline`, `LogArgs`
//! in `logging`, ...) and flattened here; this module composes them and
//! nothing imports it back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use url::Url;

use crate::admin::AdminArgs;
use crate::cors::CorsOrigins;
use crate::credentials::CredentialsArgs;
use crate::deadline::DeadlineArgs;
use crate::idempotency::IdempotencyArgs;
use crate::limits::LimitArgs;
use crate::logging::LogArgs;
use crate::metrics::MetricsArgs;
use crate::server::{ConnectionLimits, ServerOptions};
use crate::store::StoreArgs;
use crate::tls::TlsArgs;
use crate::trace::{TraceArgs, TraceConfig};
use crate::units::parse_duration;
use crate::upstream::{UpstreamArgs, UpstreamOptions};

/// gRPC gateway for the Gormic Order Management invoices REST API.
#[derive(Debug, Parser)]
#[command(name = "gormic-gateway", version, about)]
pub struct Cli {
    /// Address the gRPC server listens on.
    #[arg(long, env = "GORMIC_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

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

    /// Worker threads; each serves its connections wholly (thread-per-core).
    /// Default: the number of CPUs the process may use.
    #[arg(long, env = "GORMIC_WORKER_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub upstream_client: UpstreamArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub credentials: CredentialsArgs,

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
    #[arg(long, env = "GORMIC_SANDBOX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Seed data to use instead of the built-in fixture (JSON).
    #[arg(long, env = "GORMIC_SANDBOX_FIXTURE", value_name = "FILE")]
    pub fixture: Option<PathBuf>,

    /// Print the built-in fixture (JSON) and exit; a one-shot action, so it
    /// has no env var.
    #[arg(long)]
    pub print_fixture: bool,
}

/// Where the gateway forwards calls.
#[derive(Debug, Clone)]
pub enum Target {
    /// The Gormic REST API at this base URL (`--upstream`).
    Url(Url),
    /// The in-process sandbox (`--sandbox`), seeded from this file or, when
    /// `None`, from the built-in fixture.
    Sandbox { fixture: Option<PathBuf> },
}

/// What the binary runs, once the command line is known to be complete.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `--admin-listen`; `None` when off.
    pub admin: Option<SocketAddr>,
    /// OTLP export (the flags and the standard `OTEL_*` variables).
    pub trace: TraceConfig,
    pub upstream: Target,
    pub upstream_options: UpstreamOptions,
    /// `--upstream-timeout` and `--deadline-margin`.
    pub deadlines: DeadlineArgs,
    pub server: ServerOptions,
    pub max_in_flight: usize,
}

/// A command line that cannot start the gateway.
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
}

impl Cli {
    pub fn config(&self) -> Result<Config, ConfigError> {
        let upstream = match (&self.upstream, self.sandbox) {
            (Some(url), _) => Target::Url(url.clone()),
            (None, true) => Target::Sandbox {
                fixture: self.sandbox_fixture.clone(),
            },
            (None, false) => return Err(ConfigError::NoUpstream),
        };
        let workers = self
            .worker_threads
            .map_or_else(crate::runtime::default_worker_threads, usize::from);
        let limits = &self.limits;
        Ok(Config {
            listen: self.listen,
            admin: self.admin.addr(),
            trace: self.trace.resolve()?,
            upstream,
            // TLS is loaded from the files by main, after parsing.
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
                // Loaded from the files by main, after parsing.
                tls: None,
                tls_handshake_timeout: self.tls.tls_handshake_timeout,
            },
            max_in_flight: limits.max_in_flight,
        })
    }
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
        let config = cli.config().unwrap();
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
        let config = parse(&["--sandbox"]).unwrap().config().unwrap();
        assert!(matches!(config.upstream, Target::Sandbox { fixture: None }));
        let config = parse(&["--sandbox", "--sandbox-fixture", "f.json"])
            .unwrap()
            .config()
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
        assert_eq!(cli.config().unwrap().server.cors, CorsOrigins::None);
        let cli = parse(&[
            "--upstream",
            "http://127.0.0.1:8080",
            "--cors-allowed-origins",
            "*",
        ])
        .unwrap();
        assert_eq!(cli.config().unwrap().server.cors, CorsOrigins::Any);
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
        let error = cli.config().unwrap_err().to_string();
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
        assert_eq!(cli.config().unwrap().server.limits.max_connection_age, None);
    }

    #[test]
    fn no_upstream_is_refused() {
        let error = parse(&[]).unwrap().config().unwrap_err().to_string();
        assert!(
            error.contains("--upstream") && error.contains("--sandbox"),
            "{error}"
        );
    }
}
