//! The gateway serving over TLS (optionally mutual TLS) in-process, with the
//! `ServerTls` the test keeps a handle on, and the clients that reach it: a
//! tonic client over a rustls connector that counts the connections it
//! opens, gRPC-Web over HTTPS/1.1 driven with hyper, and the TLS files.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::server::ServerOptions;
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::tls::{ServerTls, TlsArgs};

use super::certs::{Ca, Leaf, TestDir, tls_connect};
use super::gateway::{CALL_PATIENCE, endpoint};
use super::{PATIENCE, within};

/// Writes `leaf` as `tls.crt`/`tls.key` (and `client_ca` as `client-ca.crt`)
/// in `dir`, and returns the flags naming them.
pub fn server_files(dir: &TestDir, leaf: &Leaf, client_ca: Option<&Ca>) -> TlsArgs {
    TlsArgs {
        tls_cert: Some(dir.write("tls.crt", &leaf.cert_pem)),
        tls_key: Some(dir.write("tls.key", &leaf.key_pem)),
        tls_client_ca: client_ca.map(|ca| dir.write("client-ca.crt", &ca.pem)),
        ..TlsArgs::default()
    }
}

/// The server side of TLS loaded from [`server_files`].
pub fn server_tls(dir: &TestDir, leaf: &Leaf, client_ca: Option<&Ca>) -> ServerTls {
    ServerTls::load(&server_files(dir, leaf, client_ca))
        .expect("the test's TLS files are valid")
        .expect("--tls-cert is set")
}

/// A gateway serving TLS on `127.0.0.1:<ephemeral>`.
pub struct SecureGateway {
    pub addr: SocketAddr,
    /// The very `ServerTls` the server holds (clones share reloads).
    pub tls: ServerTls,
    /// Dropping it (with the gateway) starts the server's shutdown.
    _shutdown: oneshot::Sender<()>,
}

impl SecureGateway {
    /// Serves `gateway` over `tls`, with the other options at their defaults.
    pub async fn start(gateway: InvoiceGateway, tls: ServerTls) -> Self {
        Self::start_with(gateway, tls, ServerOptions::default()).await
    }

    /// Serves `gateway` over `tls` with `options` (whose `tls` is replaced).
    pub async fn start_with(
        gateway: InvoiceGateway,
        tls: ServerTls,
        options: ServerOptions,
    ) -> Self {
        let listener =
            gormic_gateway::server::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let options = ServerOptions {
            tls: Some(tls.clone()),
            ..options
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            gormic_gateway::server::run(listener, gateway, shutdown, options)
                .await
                .expect("server run");
        });
        Self {
            addr,
            tls,
            _shutdown: tx,
        }
    }

    /// A gRPC client over TLS with `config` (see [`tls_channel`]).
    pub fn client(&self, config: Arc<ClientConfig>) -> InvoiceServiceClient<Channel> {
        InvoiceServiceClient::new(tls_channel(self.addr, config).0)
    }
}

/// The connections a [`tls_channel`] has opened, by their local address
/// (the `peer` the gateway logs).
#[derive(Clone, Default)]
pub struct Dialed(Arc<Mutex<Vec<SocketAddr>>>);

impl Dialed {
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.0.lock().unwrap().clone()
    }
}

/// A tonic channel to `addr` whose connections are TLS handshakes with
/// `config` (server name `localhost`), made lazily at the first call; a
/// failed handshake fails that call. Records the connections it opens.
pub fn tls_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> (Channel, Dialed) {
    let dialed = Dialed::default();
    let record = dialed.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (config, record) = (config.clone(), record.clone());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            record.0.lock().unwrap().push(tcp.local_addr()?);
            let name = ServerName::try_from("localhost").expect("server name");
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The connector does the TLS; with tonic's own TLS compiled in (the OTLP
    // exporter needs it) an https:// URI would ask tonic to do it again.
    let channel = Endpoint::from_shared(format!("http://localhost:{}", addr.port()))
        .expect("endpoint")
        .timeout(CALL_PATIENCE)
        .connect_with_connector_lazy(connector);
    (channel, dialed)
}

/// A plaintext gRPC channel (`http://`, HTTP/2 with prior knowledge) to
/// `addr`, recording the connections it opens.
pub fn plaintext_channel(addr: SocketAddr) -> (Channel, Dialed) {
    let dialed = Dialed::default();
    let record = dialed.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let record = record.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            record.0.lock().unwrap().push(tcp.local_addr()?);
            Ok::<_, std::io::Error>(TokioIo::new(tcp))
        }
    });
    let channel = endpoint(addr).connect_with_connector_lazy(connector);
    (channel, dialed)
}

/// A gRPC-Web answer received over HTTPS, split into its frames.
#[derive(Debug)]
pub struct GrpcWebAnswer {
    /// The ALPN protocol the TLS handshake settled on.
    pub alpn: Option<Vec<u8>>,
    pub version: Version,
    pub http_status: u16,
    pub headers: HeaderMap,
    /// Data frames (flag 0x00), in order.
    pub messages: Vec<Bytes>,
    /// The trailer frame (flag 0x80) as `name: value` lines, parsed.
    pub trailers: Vec<(String, String)>,
}

impl GrpcWebAnswer {
    /// A status field from the trailer frame, or from the headers of a
    /// trailers-only answer.
    pub fn field(&self, name: &str) -> Option<String> {
        self.trailers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                self.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
    }
}

/// One gRPC-Web call (`application/grpc-web+proto`) to `path` over a TLS
/// connection to `addr` that offers ALPN `http/1.1` only, as a browser
/// talking HTTP/1.1 would, with `metadata` as headers.
pub async fn grpc_web_over_https(
    addr: SocketAddr,
    config: &ClientConfig,
    path: &str,
    metadata: &[(&str, &str)],
    message: &impl prost::Message,
) -> GrpcWebAnswer {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tls_connect(addr, Arc::new(config))
        .await
        .expect("TLS handshake with the gateway");
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);

    let payload = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&payload);
    let mut request = http::Request::post(path)
        .header(http::header::HOST, format!("localhost:{}", addr.port()))
        .header(http::header::CONTENT_TYPE, "application/grpc-web+proto")
        .header(http::header::ACCEPT, "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    for (name, value) in metadata {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(frame)))
        .expect("request");
    let (parts, mut body) = within("a gRPC-Web answer over HTTPS", PATIENCE, async {
        let response = sender.send_request(request).await.expect("an answer");
        let (parts, body) = response.into_parts();
        (
            parts,
            body.collect().await.expect("the whole body").to_bytes(),
        )
    })
    .await;

    let mut messages = Vec::new();
    let mut trailers = Vec::new();
    while body.remaining() >= 5 {
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        let payload = body.split_to(len);
        if flag & 0x80 == 0 {
            messages.push(payload);
            continue;
        }
        for line in String::from_utf8_lossy(&payload).split("\r\n") {
            if let Some((name, value)) = line.split_once(':') {
                trailers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
    }
    assert!(body.is_empty(), "the body ends on a frame boundary");
    GrpcWebAnswer {
        alpn,
        version: parts.version,
        http_status: parts.status.as_u16(),
        headers: parts.headers,
        messages,
        trailers,
    }
}
