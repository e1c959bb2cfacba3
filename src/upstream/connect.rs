//! Opening one upstream connection: name resolution, TCP (no Nagle), TLS for
//! an `https://` upstream (the roots and client certificate of
//! `crate::tls::UpstreamTls`, ALPN `h2` then `http/1.1`), then the HTTP/1.1
//! or HTTP/2 handshake as ALPN decided. The connection's driver is returned
//! to the pool, which runs it as a task on the current worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
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
pub(crate) struct Connector {
    host: String,
    port: u16,
    /// For `https://`: the client configuration and the name to verify.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Connector {
    /// The host and port of `base`; `tls` is required for `https://`.
    pub(crate) fn new(base: &Url, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self, String> {
        let host = match base.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err("has no host".into()),
        };
        let port = base.port_or_known_default().ok_or("has no port")?;
        let tls = match (base.scheme(), tls) {
            ("https", Some(config)) => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| format!("host {host} is not a TLS server name: {e}"))?;
                Some((TlsConnector::from(config), name))
            }
            ("https", None) => {
                return Err("is https but no TLS client configuration was given".into());
            }
            _ => None,
        };
        Ok(Self { host, port, tls })
    }

    /// Whether a connection may speak HTTP/2: only over TLS, if ALPN picks
    /// `h2`.
    pub(crate) fn may_negotiate_h2(&self) -> bool {
        self.tls.is_some()
    }

    /// Resolves the host, connects to the first address that answers, runs
    /// the TLS handshake if any, and performs the HTTP handshake.
    pub(crate) async fn connect(&self) -> Result<Connection, ConnectError> {
        let stream = self.tcp().await?;
        let _ = stream.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return http1_handshake(TokioIo::new(stream)).await;
        };
        let stream = connector
            .connect(name.clone(), stream)
            .await
            .map_err(|e| ConnectError(format!("TLS handshake with {} failed: {e}", self.host)))?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            http2_handshake(TokioIo::new(stream)).await
        } else {
            http1_handshake(TokioIo::new(stream)).await
        }
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
