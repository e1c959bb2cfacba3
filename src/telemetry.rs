//! Log set-up. The level applies to the gateway's own lines; libraries that
//! see raw headers (h2, hyper, reqwest, tonic) are capped at `info`, so that
//! no level, however verbose, prints request headers such as `api-key`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogLevel};

/// The filter for a level: our level for everything, at most `info` for the
/// HTTP stacks.
pub fn filter(level: LogLevel) -> EnvFilter {
    let ours = match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    let libraries = match level {
        LogLevel::Error | LogLevel::Warn => ours,
        _ => "info",
    };
    let mut filter = EnvFilter::new(ours);
    for target in [
        "h2",
        "hyper",
        "hyper_util",
        "reqwest",
        "tonic",
        "tonic_web",
        "tower",
        "tower_http",
        "axum",
    ] {
        if let Ok(directive) = format!("{target}={libraries}").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Installs the global subscriber, writing to stderr.
pub fn init(level: LogLevel, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
