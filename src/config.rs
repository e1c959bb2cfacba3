//! Command line and environment: every flag has an env var, shown in
//! `--help`. Parsing only checks values; nothing here binds a port.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use reqwest::Url;

/// gRPC gateway for the Gormic Order Management invoices REST API.
#[derive(Debug, Parser)]
#[command(name = "gormic-gateway", version, about)]
pub struct Cli {
    /// Address the gRPC server listens on.
    #[arg(long, env = "GORMIC_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Base URL of the Gormic REST API, e.g. `https://api.example.com/gormic`.
    /// May carry a path prefix; must not carry credentials, a query or a fragment.
    #[arg(long, env = "GORMIC_UPSTREAM_URL", value_name = "URL", value_parser = parse_upstream)]
    pub upstream: Option<Url>,

    /// Upper bound on each upstream request (the caller's deadline applies
    /// when it is shorter), e.g. `500ms`, `10s`.
    #[arg(long, env = "GORMIC_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "GORMIC_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log level of the gateway's own log lines.
    #[arg(long, env = "GORMIC_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Log line format.
    #[arg(long, env = "GORMIC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    pub upstream: Url,
    pub upstream_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// A command line that cannot start the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no upstream: pass --upstream URL (or set GORMIC_UPSTREAM_URL) to name the Gormic REST API"
    )]
    NoUpstream,
}

impl Cli {
    pub fn config(&self) -> Result<Config, ConfigError> {
        let upstream = self.upstream.clone().ok_or(ConfigError::NoUpstream)?;
        Ok(Config {
            listen: self.listen,
            upstream,
            upstream_timeout: self.upstream_timeout,
            shutdown_grace: self.shutdown_grace,
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
        assert_eq!(config.upstream.path(), "/api");
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
    fn no_upstream_is_refused() {
        let error = parse(&[]).unwrap().config().unwrap_err().to_string();
        assert!(error.contains("--upstream"), "{error}");
    }
}
