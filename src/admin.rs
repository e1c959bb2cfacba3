//! The admin HTTP listener, separate from the gRPC port: `/metrics` (the
//! Prometheus exposition), `/livez` and `/readyz` (the probes), nothing else.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::{self, Metrics};

/// Port of the default `--admin-listen` (docs/operations.md, "Ports and
/// endpoints", says why this one).
pub const DEFAULT_ADMIN_PORT: u16 = 20051;
/// Default of `--admin-listen`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:20051";

/// Admin listener flags, flattened into the command line.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Admin, metrics and traces")]
pub struct AdminArgs {
    /// Address of the admin HTTP listener (`/metrics`, `/livez`, `/readyz`),
    /// or `off` for none. Loopback by default so that metrics are not
    /// exposed to the network by accident; in Kubernetes set `0.0.0.0:20051`
    /// so that Prometheus and the kubelet's probes reach it. Port 20051 stays
    /// clear of Prometheus's own and its exporters' ports (docs/operations.md,
    /// "Ports and endpoints").
    #[arg(
        long,
        env = "GORMIC_ADMIN_LISTEN",
        value_name = "ADDR|off",
        default_value = DEFAULT_ADMIN_LISTEN
    )]
    pub admin_listen: AdminListen,
}

impl Default for AdminArgs {
    fn default() -> Self {
        Self {
            admin_listen: AdminListen::Addr(SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT))),
        }
    }
}

impl AdminArgs {
    /// The address to bind, or `None` when the listener is off.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self.admin_listen {
            AdminListen::Off => None,
            AdminListen::Addr(addr) => Some(addr),
        }
    }
}

/// Where the admin listener listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    Off,
    Addr(SocketAddr),
}

impl FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse().map(Self::Addr).map_err(|_| {
            format!("{s:?} is neither `off` nor an address such as 127.0.0.1:20051 or [::]:20051")
        })
    }
}

impl fmt::Display for AdminListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Addr(addr) => addr.fmt(f),
        }
    }
}

/// Whether the gateway takes new calls: `/readyz` answers 200 while ready,
/// 503 otherwise. Starts not ready; cheap to clone, clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves, then
/// finishes the requests under way and returns.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The admin routes; any other path is 404, any other method 405.
pub fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness })
}

async fn scrape(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
}

/// The process answers, so it is alive: a wedged runtime would not answer.
async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        admin: AdminArgs,
    }

    #[test]
    fn listen_address_or_off() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.admin.addr());
        assert_eq!(
            parse(&["gw"]).ok(),
            Some(Some(SocketAddr::from(([127, 0, 0, 1], 20051))))
        );
        assert_eq!(
            AdminArgs::default().addr(),
            Some(SocketAddr::from(([127, 0, 0, 1], 20051))),
            "Default agrees with the flag's default"
        );
        assert_eq!(
            parse(&["gw", "--admin-listen", "0.0.0.0:9100"]).ok(),
            Some(Some(SocketAddr::from(([0, 0, 0, 0], 9100))))
        );
        assert_eq!(parse(&["gw", "--admin-listen", "off"]).ok(), Some(None));
        let error = parse(&["gw", "--admin-listen", "localhost"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("--admin-listen"), "{error}");
        assert!(error.contains("neither `off` nor an address"), "{error}");
        assert_eq!(AdminArgs::default().addr(), parse(&["gw"]).ok().flatten());
    }

    #[test]
    fn readiness_is_shared_by_clones() {
        let readiness = Readiness::new();
        let clone = readiness.clone();
        assert!(!clone.is_ready());
        readiness.set_ready(true);
        assert!(clone.is_ready());
        readiness.set_ready(false);
        assert!(!clone.is_ready());
    }
}
