//! The client side of TLS towards the Gormic REST API: which roots it trusts,
//! which certificate it presents, and when plain `http://` is allowed.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::files::{self, FileArg};
use super::{ALPN, TlsArgs, TlsError};
use crate::reload::change::{ChangeGate, Reloaded, Snapshot};

/// The rustls client configuration for upstream HTTPS connections, read
/// once (see [`UpstreamTls`] for one that follows file changes).
pub fn upstream_client_config(args: &TlsArgs) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(UpstreamTls::load(args)?.client_config())
}

/// The client side of TLS towards the upstream, re-readable.
///
/// Trusted roots: the Mozilla root program's CAs compiled into the binary
/// (`webpki-roots`), not the platform store, so a `FROM scratch` image with
/// no `/etc/ssl` works and the trust set does not depend on the base image;
/// plus the certificates of `--upstream-ca`. A private CA is *added to* the
/// public roots rather than replacing them: the flag exists to reach an
/// upstream behind a private CA without giving up the ability to reach one
/// with a public certificate (a move between the two is then a change of
/// `--upstream` alone), and the trust set only grows by what the operator
/// named.
///
/// With `--upstream-client-cert`/`--upstream-client-key`, the gateway
/// presents that certificate (checked like the server pair: PEM, matching
/// key, within validity). ALPN offers `h2` then `http/1.1`: the connector
/// must read the negotiated protocol (`ClientConnection::alpn_protocol`) and
/// speak HTTP/2 on `h2`, HTTP/1.1 otherwise.
///
/// [`UpstreamTls::reload`] re-reads `--upstream-ca` and the client pair
/// (Vault and cert-manager issue short-lived client certificates): the same
/// [`ClientConfig`] then uses the new material for new connections; open
/// connections keep their session.
#[derive(Clone)]
pub struct UpstreamTls(Arc<UpstreamInner>);

struct UpstreamInner {
    config: Arc<ClientConfig>,
    files: UpstreamFiles,
    verifier: Arc<CurrentVerifier>,
    client_cert: Option<Arc<CurrentClientCert>>,
    gate: ChangeGate,
}

/// The files named by the upstream flags, in snapshot order: CA, cert, key.
struct UpstreamFiles {
    ca: Option<FileArg>,
    pair: Option<(FileArg, FileArg)>,
}

/// What one snapshot of the upstream files gives.
struct Material {
    verifier: Arc<WebPkiServerVerifier>,
    client_cert: Option<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files = &self.0.files;
        f.debug_struct("UpstreamTls")
            .field("ca", &files.ca.as_ref().map(|ca| &ca.path))
            .field(
                "client_cert",
                &files.pair.as_ref().map(|(cert, _)| &cert.path),
            )
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Loads and checks `--upstream-ca` and the client pair, if given.
    pub fn load(args: &TlsArgs) -> Result<UpstreamTls, TlsError> {
        let files = UpstreamFiles::from_args(args)?;
        let paths = files.paths();
        let snapshot = Snapshot::read(&paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let provider = files::provider();
        let material = files.build(&snapshot, &provider)?;

        let verifier = Arc::new(CurrentVerifier(ArcSwap::new(material.verifier)));
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| TlsError {
                flag: "--upstream",
                path: PathBuf::new(),
                problem: format!("cannot build the TLS client configuration: {e}"),
            })?
            .dangerous()
            // Our verifier is WebPkiServerVerifier itself, behind a swap.
            .with_custom_certificate_verifier(verifier.clone());
        let client_cert = material
            .client_cert
            .map(|key| Arc::new(CurrentClientCert(ArcSwap::new(key))));
        let mut config = match &client_cert {
            Some(resolver) => builder.with_client_cert_resolver(resolver.clone()),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(UpstreamTls(Arc::new(UpstreamInner {
            config: Arc::new(config),
            files,
            verifier,
            client_cert,
            gate: ChangeGate::new(paths, snapshot),
        })))
    }

    /// The configuration for upstream connections; it follows reloads.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.0.config.clone()
    }

    /// Whether any file can change (`--upstream-ca` or a client pair): only
    /// then is a reload task worth running.
    pub fn has_files(&self) -> bool {
        self.0.files.ca.is_some() || self.0.files.pair.is_some()
    }

    /// As [`super::ServerTls::reload`], for the upstream files.
    pub fn reload(&self) -> Result<Reloaded, TlsError> {
        let Some(snapshot) = self.0.gate.next_change() else {
            return Ok(Reloaded::Unchanged);
        };
        let material = self.0.files.build(&snapshot, &files::provider())?;
        self.0.verifier.0.store(material.verifier);
        if let (Some(current), Some(new)) = (&self.0.client_cert, material.client_cert) {
            current.0.store(new);
        }
        Ok(Reloaded::Replaced)
    }
}

impl UpstreamFiles {
    fn from_args(args: &TlsArgs) -> Result<Self, TlsError> {
        let ca = args
            .upstream_ca
            .as_deref()
            .map(|path| FileArg::new("--upstream-ca", path));
        let pair = match (&args.upstream_client_cert, &args.upstream_client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                FileArg::new("--upstream-client-cert", cert),
                FileArg::new("--upstream-client-key", key),
            )),
            (Some(cert), None) => {
                return Err(FileArg::new("--upstream-client-cert", cert)
                    .error("needs --upstream-client-key (the certificate's private key)"));
            }
            (None, Some(key)) => {
                return Err(FileArg::new("--upstream-client-key", key)
                    .error("needs --upstream-client-cert (the certificate of this key)"));
            }
        };
        Ok(UpstreamFiles { ca, pair })
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.ca.iter().map(|ca| ca.path.clone()).collect();
        if let Some((cert, key)) = &self.pair {
            paths.extend([cert.path.clone(), key.path.clone()]);
        }
        paths
    }

    fn build(
        &self,
        snapshot: &Snapshot,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Material, TlsError> {
        let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let mut index = 0;
        if let Some(ca) = &self.ca {
            files::add_ca_bundle(ca, files::content(ca, snapshot, index)?, &mut roots)?;
            index += 1;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| {
                    let (flag, path) = match &self.ca {
                        Some(ca) => (ca.flag, ca.path.clone()),
                        None => ("--upstream", PathBuf::new()),
                    };
                    TlsError {
                        flag,
                        path,
                        problem: format!("cannot verify the upstream with these roots: {e}"),
                    }
                })?;
        let client_cert = match &self.pair {
            None => None,
            Some((cert, key)) => {
                let pair = files::certified_key(
                    cert,
                    files::content(cert, snapshot, index)?,
                    key,
                    files::content(key, snapshot, index + 1)?,
                    provider,
                )?;
                Some(Arc::new(pair.key))
            }
        };
        Ok(Material {
            verifier,
            client_cert,
        })
    }
}

/// The current upstream verifier: webpki's, swapped whole on reload.
#[derive(Debug)]
struct CurrentVerifier(ArcSwap<WebPkiServerVerifier>);

impl ServerCertVerifier for CurrentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .load()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().supported_verify_schemes()
    }
}

/// The current upstream client certificate, swapped whole on reload.
#[derive(Debug)]
struct CurrentClientCert(ArcSwap<CertifiedKey>);

impl ResolvesClientCert for CurrentClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Whether the gateway may send calls (and their `api-key`) to `url`:
/// `https://` always; `http://` only to a loopback host (`127.0.0.0/8`,
/// `::1`, `localhost`: the sandbox, a sidecar on the same host) or with
/// `--allow-insecure-upstream`. The error is a sentence for the operator.
pub fn check_upstream_url(url: &url::Url, allow_insecure: bool) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure || url.host().is_some_and(|host| is_loopback(&host)) => Ok(()),
        "http" => Err(format!(
            "the upstream {} is reached over plain http:// and is not a loopback address: \
             every call's api-key would cross the network in clear. Use https://, or pass \
             --allow-insecure-upstream (GORMIC_ALLOW_INSECURE_UPSTREAM=true) if the path is \
             otherwise protected (for example by a service-mesh sidecar)",
            url.host_str().unwrap_or_default()
        )),
        other => Err(format!(
            "the upstream URL scheme must be https (or http for loopback), not {other}"
        )),
    }
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        // Only the name itself: resolvers need not send `*.localhost` to
        // loopback.
        url::Host::Domain(name) => {
            let name = name.strip_suffix('.').unwrap_or(name);
            name.eq_ignore_ascii_case("localhost")
        }
    }
}
