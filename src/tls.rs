//! Transport security: TLS (and mutual TLS) on the gRPC listener, the TLS
//! client configuration for the upstream, and the flags of both
//! ([`TlsArgs`]).
//!
//! [`ServerTls`] owns the server certificate, key and optional client CA:
//! it checks them at start-up (every problem is an error naming the flag and
//! the file), runs each handshake under a time limit and tells who the caller
//! is ([`CallerIdentity`]), and swaps in rotated files without a restart
//! ([`ServerTls::reload`], driven by [`crate::reload::Reloads`]). Only new
//! handshakes see a reload; established connections keep their session.
//! [`UpstreamTls`] does the same for the upstream side (`--upstream-ca`,
//! client certificate), and [`check_upstream_url`] keeps api-keys off
//! plain-text networks.

mod files;
mod identity;
mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use clap::ArgAction;
use clap::builder::BoolishValueParser;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

pub use identity::{CallerIdentity, identity_of};
pub use upstream::{UpstreamTls, check_upstream_url, upstream_client_config};

use crate::reload::change::{ChangeGate, Reloaded, Snapshot};
use crate::units::parse_duration;
use files::FileArg;

/// ALPN protocols offered on both sides: gRPC needs HTTP/2; gRPC-Web works
/// over either.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Transport-security flags.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "TLS and credentials")]
pub struct TlsArgs {
    /// Serve gRPC and gRPC-Web over TLS with this certificate chain (PEM,
    /// leaf first). Default: plaintext. Re-read when it changes.
    #[arg(
        long,
        env = "GORMIC_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM, unencrypted: PKCS#8, PKCS#1 or SEC1).
    /// Re-read when it changes.
    #[arg(
        long,
        env = "GORMIC_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: every client must present a certificate signed by a CA in
    /// this PEM file, or the handshake fails. The caller's identity is the
    /// certificate's first URI SAN, else DNS SAN, else subject CN. Default:
    /// no client certificate asked for. Re-read when it changes.
    #[arg(
        long,
        env = "GORMIC_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Time a client has to complete the TLS handshake after connecting, so
    /// a silent client cannot hold a connection. 10s covers a handshake over
    /// a slow, lossy link (a few TCP retransmissions at 1s, 2s, 4s) while
    /// freeing the connection of a client that sends nothing quickly.
    #[arg(long, env = "GORMIC_TLS_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How often the TLS files (server and upstream), the --credentials
    /// file and the --quotas file are checked for changes (by content). 10s
    /// is small next to the delay before Kubernetes shows an updated Secret
    /// in a pod (up to a minute or more) and to how early cert-manager
    /// renews, and reading a few small files every 10s costs nothing
    /// measurable.
    #[arg(long, env = "GORMIC_RELOAD_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// CA certificates (PEM) trusted for the upstream's HTTPS certificate,
    /// in addition to the public roots compiled into the gateway. For an
    /// upstream behind a private CA. Default: the public roots only. Re-read
    /// when it changes.
    #[arg(long, env = "GORMIC_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,

    /// Client certificate (PEM) the gateway presents to the upstream, for an
    /// upstream that requires mutual TLS. Default: none. Re-read when it
    /// changes.
    #[arg(
        long,
        env = "GORMIC_UPSTREAM_CLIENT_CERT",
        value_name = "FILE",
        requires = "upstream_client_key"
    )]
    pub upstream_client_cert: Option<PathBuf>,

    /// Private key of --upstream-client-cert (PEM, unencrypted).
    #[arg(
        long,
        env = "GORMIC_UPSTREAM_CLIENT_KEY",
        value_name = "FILE",
        requires = "upstream_client_cert"
    )]
    pub upstream_client_key: Option<PathBuf>,

    /// Allow a plain http:// --upstream that is not a loopback address. Off by
    /// default: every call's api-key would cross the network in clear.
    #[arg(long, env = "GORMIC_ALLOW_INSECURE_UPSTREAM", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub allow_insecure_upstream: bool,
}

impl Default for TlsArgs {
    /// The command line's defaults: plaintext, public upstream roots.
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_handshake_timeout: Duration::from_secs(10),
            reload_interval: Duration::from_secs(10),
            upstream_ca: None,
            upstream_client_cert: None,
            upstream_client_key: None,
            allow_insecure_upstream: false,
        }
    }
}

/// A TLS file that cannot be used: `FLAG PATH: problem`, for example
/// `--tls-key /etc/gw/tls.key: the private key does not match the
/// certificate in --tls-cert /etc/gw/tls.crt`. Never holds file content.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{flag} {}: {problem}", path.display())]
pub struct TlsError {
    pub flag: &'static str,
    pub path: PathBuf,
    pub problem: String,
}

/// A TLS handshake that did not complete; the connection is to be dropped.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake not completed within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Not TLS (a plaintext client), no or an untrusted client certificate,
    /// no common protocol version or ALPN, or the peer went away.
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
}

/// A connection whose handshake completed.
pub struct Accepted<IO> {
    pub stream: tokio_rustls::server::TlsStream<IO>,
    /// With mTLS, who the client certificate names ([`identity_of`]); `None`
    /// without mTLS or when the certificate names nobody usable.
    pub identity: Option<CallerIdentity>,
}

/// The server side of TLS: the current certificate, key and client CA.
/// Cheap to clone; clones share the configuration and see reloads.
#[derive(Clone)]
pub struct ServerTls(Arc<Inner>);

struct Inner {
    cert: FileArg,
    key: FileArg,
    client_ca: Option<FileArg>,
    current: ArcSwap<Active>,
    gate: ChangeGate,
    generation: watch::Sender<u64>,
}

/// One accepted set of files.
struct Active {
    config: Arc<ServerConfig>,
    not_after: SystemTime,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.0.cert.path)
            .field("key", &self.0.key.path)
            .field("client_ca", &self.0.client_ca.as_ref().map(|ca| &ca.path))
            .field("generation", &*self.0.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads and checks the server files; `None` without `--tls-cert`
    /// (plaintext). Any problem is an error to print before binding anything.
    pub fn load(args: &TlsArgs) -> Result<Option<ServerTls>, TlsError> {
        let Some(cert_path) = &args.tls_cert else {
            return Ok(None);
        };
        let cert = FileArg::new("--tls-cert", cert_path);
        let Some(key_path) = &args.tls_key else {
            return Err(cert.error("needs --tls-key (the certificate's private key)"));
        };
        let key = FileArg::new("--tls-key", key_path);
        let client_ca = args
            .tls_client_ca
            .as_deref()
            .map(|path| FileArg::new("--tls-client-ca", path));

        let mut paths = vec![cert.path.clone(), key.path.clone()];
        paths.extend(client_ca.iter().map(|ca| ca.path.clone()));
        let snapshot = Snapshot::read(&paths.iter().map(PathBuf::as_path).collect::<Vec<&Path>>());
        let active = build(&cert, &key, client_ca.as_ref(), &snapshot)?;
        Ok(Some(ServerTls(Arc::new(Inner {
            cert,
            key,
            client_ca,
            current: ArcSwap::from_pointee(active),
            gate: ChangeGate::new(paths, snapshot),
            generation: watch::Sender::new(0),
        }))))
    }

    /// Runs the server side of the handshake on `io`, all of it within
    /// `timeout`, with the configuration current at the call. Under mTLS the
    /// client certificate is verified before this returns: a caller without
    /// one, or with one from another CA, gets an error here and nothing of
    /// its request is read.
    pub async fn accept<IO>(
        &self,
        io: IO,
        timeout: Duration,
    ) -> Result<Accepted<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = Arc::clone(&self.0.current.load().config);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stream = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
            Err(_) => return Err(HandshakeError::Timeout(timeout)),
            Ok(Err(e)) => return Err(HandshakeError::Failed(e)),
            Ok(Ok(stream)) => stream,
        };
        let identity = match &self.0.client_ca {
            Some(_) => stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| identity_of(leaf)),
            None => None,
        };
        Ok(Accepted { stream, identity })
    }

    /// Re-reads the files. When their content changed since it was last
    /// judged and the new set passes every start-up check, new handshakes
    /// use it (`Replaced`). When it fails, the current configuration stays
    /// and the error says why; the same failing content is not judged (nor
    /// reported) again (`Unchanged` until the files change once more).
    pub fn reload(&self) -> Result<Reloaded, TlsError> {
        let Some(snapshot) = self.0.gate.next_change() else {
            return Ok(Reloaded::Unchanged);
        };
        let inner = &self.0;
        let active = build(&inner.cert, &inner.key, inner.client_ca.as_ref(), &snapshot)?;
        inner.current.store(Arc::new(active));
        inner.generation.send_modify(|generation| *generation += 1);
        Ok(Reloaded::Replaced)
    }

    /// When the certificate in use expires (for
    /// `gormic_gateway_tls_certificate_expiry_timestamp_seconds`).
    pub fn not_after(&self) -> SystemTime {
        self.0.current.load().not_after
    }

    /// Whether a client certificate is required (`--tls-client-ca`).
    pub fn mutual(&self) -> bool {
        self.0.client_ca.is_some()
    }

    /// A counter that moves each time a reload puts new files in use.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.generation.subscribe()
    }
}

/// Builds a server configuration from one snapshot of (cert, key, client CA),
/// refusing anything a start-up would refuse.
fn build(
    cert: &FileArg,
    key: &FileArg,
    client_ca: Option<&FileArg>,
    snapshot: &Snapshot,
) -> Result<Active, TlsError> {
    let provider = files::provider();
    let cert_bytes = files::content(cert, snapshot, 0)?;
    let key_bytes = files::content(key, snapshot, 1)?;
    let pair = files::certified_key(cert, cert_bytes, key, key_bytes, &provider)?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| cert.error(format!("cannot build the TLS configuration: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            files::add_ca_bundle(ca, files::content(ca, snapshot, 2)?, &mut roots)?;
            // No `allow_unauthenticated`: a client without a certificate is
            // refused at the handshake.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ca.error(format!("cannot verify clients with this CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(pair.key)));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Active {
        config: Arc::new(config),
        not_after: pair.not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
    }

    fn parse(args: &[&str]) -> Result<TlsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("gw").chain(args.iter().copied())).map(|c| c.tls)
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(args.reload_interval, Duration::from_secs(10));
        assert!(args.tls_cert.is_none() && !args.allow_insecure_upstream);
        assert!(ServerTls::load(&args).unwrap().is_none(), "plaintext");
    }

    #[test]
    fn pairs_require_each_other() {
        for (given, missing) in [
            ("--tls-cert", "--tls-key"),
            ("--tls-key", "--tls-cert"),
            ("--tls-client-ca", "--tls-cert"),
            ("--upstream-client-cert", "--upstream-client-key"),
            ("--upstream-client-key", "--upstream-client-cert"),
        ] {
            let error = parse(&[given, "f.pem"]).unwrap_err().to_string();
            assert!(error.contains(missing), "{given}: {error}");
        }
        let error = parse(&["--tls-handshake-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("greater than zero"), "{error}");
        let args = parse(&["--allow-insecure-upstream"]).unwrap();
        assert!(args.allow_insecure_upstream);
    }
}
