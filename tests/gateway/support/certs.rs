//! Certificates made in the test with rcgen (none committed): CAs, server
//! and client leaves, files in a directory of the test's own, and TLS
//! clients and servers built on them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};

use super::PATIENCE;

/// A certificate authority that signs leaves.
pub struct Ca {
    pub pem: String,
    pub der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

/// A calendar day: (year, month, day).
pub type Day = (i32, u8, u8);

/// What a leaf certificate names, and when it is valid.
#[derive(Default)]
pub struct Names {
    pub uris: Vec<&'static str>,
    pub dns: Vec<&'static str>,
    pub cn: Option<&'static str>,
    /// `(not_before, not_after)` as (year, month, day); default: 1975..4096.
    pub validity: Option<(Day, Day)>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let certificate = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: certificate.pem(),
            der: certificate.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for a server reachable as `localhost` / `127.0.0.1`.
    pub fn server(&self) -> Leaf {
        self.leaf(
            &Names {
                dns: vec!["localhost"],
                cn: Some("gateway test server"),
                ..Names::default()
            },
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A leaf for a client naming `names`.
    pub fn client(&self, names: &Names) -> Leaf {
        self.leaf(names, ExtendedKeyUsagePurpose::ClientAuth)
    }

    pub fn leaf(&self, names: &Names, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = names.cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        for uri in &names.uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("IA5 URI")));
        }
        for dns in &names.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*dns).try_into().expect("IA5 name")));
        }
        if names.dns.contains(&"localhost") {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        if let Some(((y0, m0, d0), (y1, m1, d1))) = names.validity {
            params.not_before = rcgen::date_time_ymd(y0, m0, d0);
            params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let certificate = params.signed_by(&key, &self.issuer).expect("leaf");
        Leaf {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            der: certificate.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA as a root");
        roots
    }
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client trusting `ca`, offering ALPN `h2` then `http/1.1`, and
/// presenting `identity` when given.
pub fn client_config(ca: &Ca, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(ca.roots());
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.der.clone()], leaf.key())
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Connects to `addr` and completes a TLS handshake for `localhost`; a
/// server that neither completes nor refuses it within [`PATIENCE`] is a
/// `TimedOut` error.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let handshake = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(PATIENCE, handshake)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("waited {PATIENCE:?} for a TLS handshake with {addr}, in vain"),
            ))
        })
}

/// A test TLS server on `127.0.0.1:<ephemeral>` presenting `leaf`, requiring
/// a client certificate from `client_ca` when given. Each accepted
/// connection answers `ok\n` and closes.
pub async fn tls_server(leaf: &Leaf, client_ca: Option<&Ca>) -> std::net::SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(leaf, client_ca, &[b"h2"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls.write_all(b"ok\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A TLS server configuration presenting `leaf`, requiring a client
/// certificate from `client_ca` when given, and offering `alpn`.
pub fn server_config(leaf: &Leaf, client_ca: Option<&Ca>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                provider(),
            )
            .build()
            .expect("client verifier"),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(vec![leaf.der.clone()], leaf.key())
        .expect("server certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A fresh directory of this test's own under the target tmp dir.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{name}"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the test directory");
        TestDir(path)
    }

    /// Writes `content` to `name` in this directory (replacing it whole, as
    /// a rename would) and returns its path.
    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        let staging = self.0.join(format!(".{name}.new"));
        std::fs::write(&staging, content).expect("write a test file");
        std::fs::rename(&staging, &path).expect("move a test file into place");
        path
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }
}
