//! Command line and environment: every flag has an env var, shown in
//! `--help`. Parsing only checks values; nothing here binds a port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use reqwest::Url;

use crate::cors::CorsOrigins;

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

    /// Upper bound on each upstream request (the caller's deadline applies
    /// when it is shorter), e.g. `500ms`, `10s`.
    #[arg(long, env = "GORMIC_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// How much earlier than the caller's gRPC deadline the gateway gives up
    /// on the upstream (at most a tenth of the deadline), so that its
    /// DEADLINE_EXCEEDED with details reaches the caller before the caller's
    /// own timer fires.
    #[arg(long, env = "GORMIC_DEADLINE_MARGIN", value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub deadline_margin: Duration,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "GORMIC_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Browser origins allowed to call the gateway with gRPC-Web: a
    /// comma-separated list such as `https://app.example.com,http://localhost:3000`,
    /// or `*` for any origin. Default: none (no CORS headers; browsers are refused).
    #[arg(long, env = "GORMIC_CORS_ALLOWED_ORIGINS", value_name = "ORIGINS", value_parser = CorsOrigins::parse)]
    pub cors_allowed_origins: Option<CorsOrigins>,

    /// Log level of the gateway's own log lines.
    #[arg(long, env = "GORMIC_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Log line format.
    #[arg(long, env = "GORMIC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What the binary runs, once the command line is known to be complete.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Target,
    pub upstream_timeout: Duration,
    pub deadline_margin: Duration,
    pub shutdown_grace: Duration,
    pub cors: CorsOrigins,
}

/// A command line that cannot start the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no upstream: pass --upstream URL (or set GORMIC_UPSTREAM_URL) to name the Gormic REST API, \
         or --sandbox (GORMIC_SANDBOX=1) to run against the built-in sandbox (not for production)"
    )]
    NoUpstream,
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
        Ok(Config {
            listen: self.listen,
            upstream,
            upstream_timeout: self.upstream_timeout,
            deadline_margin: self.deadline_margin,
            shutdown_grace: self.shutdown_grace,
            cors: self.cors_allowed_origins.clone().unwrap_or_default(),
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

fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 500ms, 10s, 1m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
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
        assert_eq!(config.upstream_timeout, Duration::from_secs(10));
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
        assert_eq!(cli.config().unwrap().cors, CorsOrigins::None);
        let cli = parse(&[
            "--upstream",
            "http://127.0.0.1:8080",
            "--cors-allowed-origins",
            "*",
        ])
        .unwrap();
        assert_eq!(cli.config().unwrap().cors, CorsOrigins::Any);
        let error = parse(&["--cors-allowed-origins", "https://a.example/"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--cors-allowed-origins") && error.contains("https://a.example"),
            "{error}"
        );
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
