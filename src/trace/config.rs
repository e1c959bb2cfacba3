//! Trace export settings: the `--otlp-endpoint` and `--otel-service-name`
//! flags, and the standard `OTEL_*` environment variables they fall back to.

use std::fmt;
use std::time::Duration;

use http::Uri;

/// `service.name` when neither `--otel-service-name` nor `OTEL_SERVICE_NAME`
/// sets one.
pub const DEFAULT_SERVICE_NAME: &str = "gormic-gateway";

/// Tracing flags, flattened into the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TraceArgs {
    /// OpenTelemetry collector to export spans to, over OTLP/gRPC (e.g.
    /// `http://otel-collector:4317`; `https://` uses TLS, trusting the Mozilla
    /// root certificates). When unset, the standard
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is
    /// used; when none is set, no span is exported (off by default: the
    /// trace context is still continued and sent upstream at no cost).
    #[arg(long, env = "GORMIC_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// `service.name` of the exported spans. Default: OTEL_SERVICE_NAME when
    /// set, else `gormic-gateway`.
    #[arg(long, env = "GORMIC_OTEL_SERVICE_NAME", value_name = "NAME")]
    pub otel_service_name: Option<String>,

    /// How long one export of a batch of spans may take, retries included,
    /// e.g. `10s`. Default: OTEL_EXPORTER_OTLP_TRACES_TIMEOUT or
    /// OTEL_EXPORTER_OTLP_TIMEOUT when set, else 10s (the OpenTelemetry
    /// default); a batch that cannot be sent in time is dropped, and said so
    /// in the log.
    #[arg(long, env = "GORMIC_OTLP_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub otlp_timeout: Option<Duration>,
}

/// What [`TraceArgs`] and the environment resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceConfig {
    /// Where spans go; `None`: export is off.
    pub endpoint: Option<Endpoint>,
    pub service_name: String,
    /// `--otlp-timeout`; `None`: the exporter reads the `OTEL_*` variables.
    pub timeout: Option<Duration>,
}

/// A validated collector endpoint, with where it was configured (for
/// errors and the start-up log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub uri: Uri,
    /// `--otlp-endpoint` or the environment variable it came from.
    pub source: &'static str,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {})", self.uri, self.source)
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "{source_name}: {value:?} is not a collector URL ({reason}); expected e.g. http://otel-collector:4317"
    )]
    InvalidEndpoint {
        source_name: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "{variable}={value:?} is not supported: the gateway exports OTLP over gRPC only; \
         point the endpoint at the collector's gRPC port (4317) and set {variable}=grpc or unset it"
    )]
    UnsupportedProtocol {
        variable: &'static str,
        value: String,
    },
    #[error("cannot start the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("cannot start the OTLP export thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("flushing spans to the OTLP collector failed: {0}")]
    Flush(String),
}

const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

impl TraceArgs {
    /// Resolves the flags against the process environment.
    pub fn resolve(&self) -> Result<TraceConfig, TraceError> {
        self.resolve_with(|name| std::env::var(name).ok())
    }

    /// Resolves the flags against `env` (a lookup of environment variables).
    /// Empty variables count as unset, as the OpenTelemetry specification
    /// asks. The flag wins over the `OTEL_*` variables; the signal-specific
    /// `..._TRACES_ENDPOINT` wins over `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// `OTEL_SDK_DISABLED=true` turns export off unless the flag is set.
    pub fn resolve_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<TraceConfig, TraceError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let service_name = self
            .otel_service_name
            .clone()
            .filter(|name| !name.is_empty())
            .or_else(|| env(SERVICE_NAME))
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());

        let configured = match self.otlp_endpoint.as_deref().filter(|v| !v.is_empty()) {
            Some(value) => Some(("--otlp-endpoint", value.to_owned())),
            None => {
                let disabled =
                    env(SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
                let from_env = env(TRACES_ENDPOINT)
                    .map(|v| (TRACES_ENDPOINT, v))
                    .or_else(|| env(ENDPOINT).map(|v| (ENDPOINT, v)));
                match from_env {
                    Some(_) if disabled => None,
                    Some(found) => {
                        for variable in [TRACES_PROTOCOL, PROTOCOL] {
                            if let Some(value) = env(variable) {
                                if value.trim() != "grpc" {
                                    return Err(TraceError::UnsupportedProtocol {
                                        variable,
                                        value,
                                    });
                                }
                                break;
                            }
                        }
                        Some(found)
                    }
                    None => None,
                }
            }
        };
        let endpoint = configured
            .map(|(source, value)| parse_endpoint(source, &value))
            .transpose()?;
        Ok(TraceConfig {
            endpoint,
            service_name,
            timeout: self.otlp_timeout,
        })
    }
}

fn parse_endpoint(source: &'static str, value: &str) -> Result<Endpoint, TraceError> {
    let invalid = |reason: &str| TraceError::InvalidEndpoint {
        source_name: source,
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = value
        .trim()
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(_) => return Err(invalid("the scheme must be http or https")),
        None => return Err(invalid("it has no http:// or https:// scheme")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("it has no host"));
    }
    if uri.query().is_some() {
        return Err(invalid("it must not have a query"));
    }
    Ok(Endpoint { uri, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn args(endpoint: Option<&str>) -> TraceArgs {
        TraceArgs {
            otlp_endpoint: endpoint.map(str::to_owned),
            ..TraceArgs::default()
        }
    }

    #[test]
    fn flags_parse() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            trace: TraceArgs,
        }
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "gw",
            "--otlp-endpoint",
            "http://collector:4317",
            "--otel-service-name",
            "gw-eu",
            "--otlp-timeout",
            "2s",
        ])
        .expect("valid flags");
        assert_eq!(cli.trace.otlp_timeout, Some(Duration::from_secs(2)));
        let config = cli.trace.resolve_with(|_| None).expect("valid");
        assert_eq!(config.service_name, "gw-eu");
        assert_eq!(config.timeout, Some(Duration::from_secs(2)));
        let error = Cli::try_parse_from(["gw", "--otlp-timeout", "soon"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("--otlp-timeout"), "{error}");
    }

    #[test]
    fn off_without_any_endpoint() {
        let config = args(None).resolve_with(env(&[])).expect("valid");
        assert_eq!(config.endpoint, None);
        assert_eq!(config.service_name, "gormic-gateway");
        let empty = args(Some(""))
            .resolve_with(env(&[(ENDPOINT, " ")]))
            .expect("valid");
        assert_eq!(empty.endpoint, None);
    }

    #[test]
    fn the_flag_wins_then_traces_endpoint_then_endpoint() {
        let vars = [
            (TRACES_ENDPOINT, "http://traces:4317"),
            (ENDPOINT, "http://generic:4317"),
        ];
        let flag = args(Some("http://flag:4317"))
            .resolve_with(env(&vars))
            .expect("valid");
        let endpoint = flag.endpoint.expect("on");
        assert_eq!(endpoint.uri, "http://flag:4317/");
        assert_eq!(endpoint.source, "--otlp-endpoint");

        let traces = args(None).resolve_with(env(&vars)).expect("valid");
        assert_eq!(traces.endpoint.expect("on").source, TRACES_ENDPOINT);

        let generic = args(None)
            .resolve_with(env(&vars[1..]))
            .expect("valid")
            .endpoint
            .expect("on");
        assert_eq!(generic.source, ENDPOINT);
        assert_eq!(generic.uri.host(), Some("generic"));
    }

    #[test]
    fn service_name_from_flag_env_or_default() {
        let mut with_flag = args(None);
        with_flag.otel_service_name = Some("billing-gw".into());
        let vars = [(SERVICE_NAME, "from-env")];
        assert_eq!(
            with_flag
                .resolve_with(env(&vars))
                .expect("valid")
                .service_name,
            "billing-gw"
        );
        assert_eq!(
            args(None)
                .resolve_with(env(&vars))
                .expect("valid")
                .service_name,
            "from-env"
        );
    }

    #[test]
    fn bad_endpoints_name_their_source() {
        for (value, reason) in [
            ("otel-collector:4317", "scheme"),
            ("grpc://collector:4317", "scheme must be http or https"),
            ("http://", ""),
            ("http://collector:4317/?x=1", "query"),
        ] {
            let error = args(Some(value))
                .resolve_with(env(&[]))
                .expect_err(value)
                .to_string();
            assert!(error.starts_with("--otlp-endpoint: "), "{error}");
            assert!(error.contains(reason), "{error}");
        }
        let error = args(None)
            .resolve_with(env(&[(ENDPOINT, "nope")]))
            .expect_err("invalid")
            .to_string();
        assert!(
            error.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT: "),
            "{error}"
        );
    }

    #[test]
    fn an_http_protocol_from_the_environment_is_refused() {
        let vars = [
            (ENDPOINT, "http://collector:4318"),
            (PROTOCOL, "http/protobuf"),
        ];
        let error = args(None).resolve_with(env(&vars)).expect_err("http");
        assert!(matches!(
            error,
            TraceError::UnsupportedProtocol {
                variable: PROTOCOL,
                ..
            }
        ));
        // The signal-specific variable wins over the generic one.
        let vars = [
            (ENDPOINT, "http://collector:4317"),
            (TRACES_PROTOCOL, "grpc"),
            (PROTOCOL, "http/protobuf"),
        ];
        assert!(args(None).resolve_with(env(&vars)).is_ok());
    }

    #[test]
    fn sdk_disabled_turns_env_export_off() {
        let vars = [(ENDPOINT, "http://collector:4317"), (SDK_DISABLED, "true")];
        assert_eq!(
            args(None).resolve_with(env(&vars)).expect("valid").endpoint,
            None
        );
        assert!(
            args(Some("http://flag:4317"))
                .resolve_with(env(&vars))
                .expect("valid")
                .endpoint
                .is_some()
        );
    }
}
