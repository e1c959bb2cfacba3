//! The embedded sandbox: a stateful, in-memory imitation of the Gormic
//! invoices REST API, for laptops, CI and demos. Never for production.
//!
//! It is a real HTTP server (`gormic-gateway --sandbox` runs it on a
//! loopback port and points the gateway's ordinary REST client at it;
//! `gormic-gateway sandbox --listen ADDR` serves it alone). Every
//! `organization-id` gets its own copy of the [`Fixture`] on first use, so
//! organizations never see each other's invoices. docs/sandbox.md describes
//! the default fixture and which scenario yields each error code of the spec.
//!
//! - [`fixture`]: the seed data format, the built-in fixture, its checks;
//! - `state`: one organization's invoices and the life-cycle rules;
//! - `api`: the REST routes, headers and JSON envelopes.

mod api;
pub mod fixture;
mod state;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use fixture::{DEFAULT_FIXTURE_JSON, Fixture, FixtureError};

/// Serves the sandbox REST API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    fixture: Fixture,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, api::router(fixture))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `127.0.0.1:<ephemeral>` and serves the sandbox there in a task
/// until the task is aborted or the runtime stops. Returns the bound address.
pub async fn spawn(fixture: Fixture) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(error) = serve(listener, fixture, std::future::pending()).await {
            tracing::error!(%error, "the sandbox stopped");
        }
    });
    Ok((addr, task))
}
