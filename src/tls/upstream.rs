//! The client side of TLS towards the Gormic REST API: which roots it trusts,
//! which certificate it presents, and when plain `http://` is allowed.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use super::files::{self, FileArg};
use super::{ALPN, TlsArgs, TlsError};
use crate::reload::Snapshot;

/// The rustls client configuration for upstream HTTPS connections.
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
/// Read once at start-up: a rotated upstream client certificate needs a
/// restart (the connection pool would have to be rebuilt anyway).
pub fn upstream_client_config(args: &TlsArgs) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = files::provider();
    let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &args.upstream_ca {
        let ca = FileArg::new("--upstream-ca", path);
        let snapshot = Snapshot::read(&[path]);
        files::add_ca_bundle(&ca, files::content(&ca, &snapshot, 0)?, &mut roots)?;
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| internal(args, e))?
        .with_root_certificates(roots);
    let mut config = match (&args.upstream_client_cert, &args.upstream_client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_path), Some(key_path)) => {
            let cert = FileArg::new("--upstream-client-cert", cert_path);
            let key = FileArg::new("--upstream-client-key", key_path);
            let snapshot = Snapshot::read(&[cert_path, key_path]);
            let pair = files::certified_key(
                &cert,
                files::content(&cert, &snapshot, 0)?,
                &key,
                files::content(&key, &snapshot, 1)?,
                &provider,
            )?;
            builder
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(pair.key)))
        }
        (Some(cert_path), None) => {
            return Err(FileArg::new("--upstream-client-cert", cert_path)
                .error("needs --upstream-client-key (the certificate's private key)"));
        }
        (None, Some(key_path)) => {
            return Err(FileArg::new("--upstream-client-key", key_path)
                .error("needs --upstream-client-cert (the certificate of this key)"));
        }
    };
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn internal(args: &TlsArgs, error: rustls::Error) -> TlsError {
    let path = args.upstream_ca.clone().unwrap_or_default();
    TlsError {
        flag: "--upstream-ca",
        path,
        problem: format!("cannot build the TLS client configuration: {error}"),
    }
}

/// Whether the gateway may send calls (and their `api-key`) to `url`:
/// `https://` always; `http://` only to a loopback host (`127.0.0.0/8`,
/// `::1`, `localhost`: the sandbox, a sidecar on the same host) or with
/// `--allow-insecure-upstream`. The error is a sentence for the operator.
pub fn check_upstream_url(url: &http::Uri, allow_insecure: bool) -> Result<(), String> {
    match url.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let host = url.host().unwrap_or_default();
            if allow_insecure || is_loopback(host) {
                return Ok(());
            }
            Err(format!(
                "the upstream {host} is reached over plain http:// and is not a loopback \
                 address: every call's api-key would cross the network in clear. Use https://, \
                 or pass --allow-insecure-upstream (GORMIC_ALLOW_INSECURE_UPSTREAM=true) if the \
                 path is otherwise protected (for example by a service-mesh sidecar)"
            ))
        }
        Some(other) => Err(format!(
            "the upstream URL scheme must be https (or http for loopback), not {other}"
        )),
        None => Err("the upstream URL has no scheme (expected https://...)".into()),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
    }
    // Only the name itself: resolvers need not send `*.localhost` to loopback.
    let name = bare.strip_suffix('.').unwrap_or(bare);
    name.eq_ignore_ascii_case("localhost")
}
