//! Opening one upstream connection: name resolution, TCP (no Nagle), then
//! the HTTP/1.1 handshake. The connection's driver is returned to the pool,
//! which runs it as a task on the current worker.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use url::Url;

/// The body of every upstream request: the JSON, in one piece.
pub(crate) type RequestBody = Full<Bytes>;

/// A way to send requests on one connection.
pub(crate) enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

/// A new connection: its sender, and the future that drives it (reads and
/// writes the socket) until it closes.
pub(crate) struct Connection {
    pub sender: Sender,
    pub driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Why no connection could be opened; nothing was sent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConnectError(pub String);

/// HTTP/2 PINGs keep a multiplexed upstream connection honest.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// Opens connections to the upstream's host and port.
#[derive(Debug)]
pub(crate) struct Connector {
    host: String,
    port: u16,
}

impl Connector {
    /// The host and port of `base` (`http://`; TLS comes with `https://`).
    pub(crate) fn new(base: &Url) -> Result<Self, String> {
        let host = match base.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err("the upstream URL has no host".into()),
        };
        let port = base
            .port_or_known_default()
            .ok_or("the upstream URL has no port")?;
        Ok(Self { host, port })
    }

    /// Resolves the host, connects to the first address that answers, and
    /// performs the HTTP handshake.
    pub(crate) async fn connect(&self) -> Result<Connection, ConnectError> {
        let stream = self.tcp().await?;
        let _ = stream.set_nodelay(true);
        http1_handshake(TokioIo::new(stream)).await
    }

    async fn tcp(&self) -> Result<TcpStream, ConnectError> {
        let addresses = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| ConnectError(format!("cannot resolve {}: {e}", self.host)))?;
        let mut last = None;
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last = Some(error),
            }
        }
        Err(ConnectError(match last {
            Some(error) => format!("cannot connect: {error}"),
            None => format!("{} resolves to no address", self.host),
        }))
    }
}

async fn http1_handshake<IO>(io: IO) -> Result<Connection, ConnectError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| ConnectError(format!("HTTP/1.1 handshake failed: {e}")))?;
    Ok(Connection {
        sender: Sender::Http1(sender),
        driver: Box::pin(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        }),
    })
}

/// Used once TLS negotiates `h2` with the upstream.
#[allow(dead_code)]
async fn http2_handshake<IO>(io: IO) -> Result<Connection, ConnectError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE)
        .handshake(io)
        .await
        .map_err(|e| ConnectError(format!("HTTP/2 handshake failed: {e}")))?;
    Ok(Connection {
        sender: Sender::Http2(sender),
        driver: Box::pin(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        }),
    })
}
