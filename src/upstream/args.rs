//! The upstream client's flags ([`UpstreamArgs`]) and the options they
//! become ([`UpstreamOptions`], which tests build directly); the value of
//! `--upstream-proxy` is read by `super::proxy`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::ArgAction;
use clap::Args;
use clap::builder::{BoolishValueParser, TypedValueParser};

use super::breaker::BreakerArgs;
use super::cooldown::{DEFAULT_COOLDOWN_MAX, MAX_COOLDOWN_MAX};
use super::proxy::ProxySetting;
use super::retry::RetryArgs;
use crate::units::parse_duration;

/// Default of `--upstream-max-connections`: Envoy's default circuit-breaker
/// value; at ~20 KiB per HTTP/1.1 connection it is 20 MiB at most.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of `--upstream-max-pending`: as many as may be in flight, so that
/// every admitted call may wait for a connection within its own deadline.
pub const DEFAULT_MAX_PENDING: usize = crate::limits::DEFAULT_MAX_IN_FLIGHT;
/// Default of `--upstream-idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `--upstream-connect-timeout` (justified there).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Upstream")]
pub struct UpstreamArgs {
    /// Upstream requests in flight at once (at least 1): with HTTP/1.1 the
    /// most connections open, with HTTP/2 the most streams; split between the
    /// worker threads (each has its own connections), at least one each.
    /// 1024 is Envoy's default; a call past it waits for a slot
    /// (--upstream-max-pending).
    #[arg(long, env = "GORMIC_UPSTREAM_MAX_CONNECTIONS", value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub upstream_max_connections: usize,

    /// Calls waiting for an upstream slot, process-wide (a hard bound); past
    /// it a call is refused with RESOURCE_EXHAUSTED (reason
    /// UPSTREAM_QUEUE_FULL). Default: --max-in-flight's default, so that
    /// every admitted call may wait within its own deadline; lower it to
    /// fail fast instead.
    #[arg(long, env = "GORMIC_UPSTREAM_MAX_PENDING", value_name = "N", default_value_t = DEFAULT_MAX_PENDING, value_parser = clap::value_parser!(u32).map(|n| n as usize))]
    pub upstream_max_pending: usize,

    /// How long an idle upstream connection is kept for reuse.
    #[arg(long, env = "GORMIC_UPSTREAM_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Longest time to open one upstream connection (TCP, the proxy tunnel
    /// and TLS), shared between the addresses of the upstream's name, so a
    /// dead address costs its share before the next is tried. 2s: room for
    /// one lost SYN (TCP retries after 1 s) and a TLS handshake over a slow
    /// path, between Linkerd's 1s and Envoy's 5s. A timed-out connection is
    /// not retried within the call.
    #[arg(long, env = "GORMIC_UPSTREAM_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Speak HTTP/2 only: with prior knowledge to an http:// upstream (h2c),
    /// by ALPN h2 alone to an https:// one. Default: HTTP/1.1 to http://,
    /// ALPN (h2, then http/1.1) to https://.
    #[arg(long, env = "GORMIC_UPSTREAM_HTTP2", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub upstream_http2: bool,

    /// Forward proxy for upstream requests: `http://[user:password@]host:port`,
    /// or `none`. An https:// upstream is reached through it with CONNECT
    /// (TLS end to end, the upstream's certificate verified). Default: the
    /// HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY variables (either
    /// case), as curl and reqwest read them.
    // A plain string, checked by `options()`: clap would quote a refused
    // value, password included, in its error, and show the variable's value
    // in --help.
    #[arg(
        long,
        env = "GORMIC_UPSTREAM_PROXY",
        value_name = "URL|none",
        hide_env_values = true
    )]
    pub upstream_proxy: Option<String>,

    /// Longest cooldown of a credential (api-key and organization-id) the
    /// upstream rate-limited (a 429, or a 503 with Retry-After): its calls
    /// are refused unsent (RESOURCE_EXHAUSTED, UPSTREAM_RATE_LIMITED) for
    /// the Retry-After, or 1s without one, but never longer than this, so
    /// that a broken header cannot lock a key out. 60s covers the per-second
    /// and per-minute windows rate limits use; 0s turns cooldowns off; at
    /// most 1h.
    #[arg(long, env = "GORMIC_UPSTREAM_COOLDOWN_MAX", value_name = "DURATION", default_value = "60s", value_parser = parse_cooldown_max)]
    pub upstream_cooldown_max: Duration,

    #[command(flatten)]
    pub retry: RetryArgs,

    #[command(flatten)]
    pub breaker: BreakerArgs,
}

impl UpstreamArgs {
    /// The options of the client (TLS is loaded separately, from files). An
    /// unusable `--upstream-proxy` is an error naming the flag, never its
    /// value.
    pub fn options(&self) -> Result<UpstreamOptions, String> {
        let proxy = match self.upstream_proxy.as_deref() {
            None => ProxySetting::Environment,
            Some(value) => ProxySetting::parse(value)
                .map_err(|problem| format!("--upstream-proxy: {problem}"))?,
        };
        Ok(UpstreamOptions {
            max_connections: self.upstream_max_connections,
            max_pending: self.upstream_max_pending,
            idle_timeout: self.upstream_idle_timeout,
            connect_timeout: self.upstream_connect_timeout,
            http2: self.upstream_http2,
            proxy,
            cooldown_max: self.upstream_cooldown_max,
            retry: self.retry.clone(),
            breaker: self.breaker.clone(),
            tls: None,
            resolve: Vec::new(),
            workers: 1,
        })
    }
}

/// How the upstream client behaves.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub max_connections: usize,
    pub max_pending: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 only (`--upstream-http2`).
    pub http2: bool,
    pub proxy: ProxySetting,
    /// `--upstream-cooldown-max`: the longest cooldown of a rate-limited
    /// credential; zero turns cooldowns off.
    pub cooldown_max: Duration,
    pub retry: RetryArgs,
    pub breaker: BreakerArgs,
    /// TLS client configuration for an `https://` upstream
    /// (`crate::tls::UpstreamTls::client_config`); `None` uses the
    /// compiled-in public roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Names resolved to these addresses instead of by DNS, in this order
    /// (as curl's `--resolve`; for tests and pinned set-ups).
    pub resolve: Vec<(String, Vec<SocketAddr>)>,
    /// The worker threads that call it (`--worker-threads`): the connection
    /// cap is split between them (`limit`).
    pub workers: usize,
}

impl Default for UpstreamOptions {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: DEFAULT_MAX_PENDING,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            http2: false,
            proxy: ProxySetting::Environment,
            cooldown_max: DEFAULT_COOLDOWN_MAX,
            retry: RetryArgs::default(),
            breaker: BreakerArgs::default(),
            tls: None,
            resolve: Vec::new(),
            workers: 1,
        }
    }
}

/// `--upstream-cooldown-max`: a humantime duration from 0 (off) to
/// [`MAX_COOLDOWN_MAX`].
fn parse_cooldown_max(value: &str) -> Result<Duration, String> {
    let max =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 0s, 30s, 2m)"))?;
    if max > MAX_COOLDOWN_MAX {
        return Err(format!(
            "at most {}: a longer refusal is a lockout",
            humantime::format_duration(MAX_COOLDOWN_MAX)
        ));
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        upstream: UpstreamArgs,
    }

    fn parse(args: &[&str]) -> Result<UpstreamOptions, String> {
        Cli::try_parse_from(std::iter::once("gw").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?
            .upstream
            .options()
    }

    #[test]
    fn defaults() {
        let options = parse(&[]).expect("defaults parse");
        assert_eq!(options.connect_timeout, Duration::from_secs(2));
        assert_eq!(options.max_connections, 1024);
        assert_eq!(options.idle_timeout, Duration::from_secs(60));
        assert!(!options.http2);
        assert_eq!(options.proxy, ProxySetting::Environment);
        assert_eq!(options.breaker.upstream_breaker_failures, 5);
        assert_eq!(options.retry.max_attempts, 3);
        assert_eq!(options.cooldown_max, Duration::from_secs(60));
    }

    #[test]
    fn the_cooldown_cap_takes_zero_for_off_and_at_most_an_hour() {
        let max = |value: &str| parse(&["--upstream-cooldown-max", value]).map(|o| o.cooldown_max);
        assert_eq!(max("0s"), Ok(Duration::ZERO));
        assert_eq!(max("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(max("1h"), Ok(Duration::from_secs(3600)));
        let error = max("2h").expect_err("over an hour");
        assert!(error.contains("--upstream-cooldown-max"), "{error}");
        assert!(error.contains("at most 1h"), "{error}");
        assert!(max("soon").is_err());
    }

    #[test]
    fn the_proxy_flag_takes_a_url_or_none_and_never_echoes_a_password() {
        let options = parse(&["--upstream-proxy", "none"]).expect("none");
        assert_eq!(options.proxy, ProxySetting::Off);
        let options = parse(&["--upstream-proxy", "http://u:p%40ss@proxy.corp:3128"]).expect("url");
        let ProxySetting::Url(url) = options.proxy else {
            panic!("a URL");
        };
        assert_eq!(url.to_string(), "http://u:***@proxy.corp:3128");
        assert_eq!(format!("{url:?}"), "ProxyUrl(http://u:***@proxy.corp:3128)");
        assert_eq!(url.secrets(), vec!["p%40ss".to_owned(), "p@ss".to_owned()]);
        for bad in [
            "socks5://u:hunter2@p:1080",
            "https://u:hunter2@p:443",
            "http://u:hunter2@p:3128/path",
            "not a url hunter2",
        ] {
            let error = parse(&["--upstream-proxy", bad]).expect_err(bad);
            assert!(error.contains("--upstream-proxy"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn a_zero_connect_timeout_is_refused() {
        let error = parse(&["--upstream-connect-timeout", "0s"]).expect_err("zero");
        assert!(error.contains("greater than zero"), "{error}");
    }
}
