//! Turning the bytes of PEM files into checked rustls material: certificate
//! chains, private keys that match them, CA bundles. Every refusal names the
//! flag and the file and says what is wrong, never what the file holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TlsError;
use crate::reload::change::Snapshot;

/// A file named on the command line, with the flag that named it.
#[derive(Debug, Clone)]
pub(crate) struct FileArg {
    pub flag: &'static str,
    pub path: PathBuf,
}

impl FileArg {
    pub fn new(flag: &'static str, path: &std::path::Path) -> Self {
        FileArg {
            flag,
            path: path.to_path_buf(),
        }
    }

    pub fn error(&self, problem: impl Into<String>) -> TlsError {
        TlsError {
            flag: self.flag,
            path: self.path.clone(),
            problem: problem.into(),
        }
    }

    /// `--tls-cert /etc/gw/tls.crt`, for messages that name a second file.
    fn named(&self) -> String {
        format!("{} {}", self.flag, self.path.display())
    }
}

/// The ring provider, explicitly: no process-wide default is installed.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The `index`-th file of `snapshot`, or why it could not be read.
pub(crate) fn content<'a>(
    arg: &FileArg,
    snapshot: &'a Snapshot,
    index: usize,
) -> Result<&'a [u8], TlsError> {
    let bytes = snapshot
        .file(index)
        .map_err(|failure| arg.error(failure.to_string()))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(arg.error("the file is empty"));
    }
    Ok(bytes)
}

/// A certificate and its private key, checked to belong together, with the
/// leaf's expiry.
pub(crate) struct CheckedPair {
    pub key: CertifiedKey,
    pub not_after: SystemTime,
}

/// Loads a certificate chain (leaf first) and its key, refusing a leaf
/// outside its validity period and a key that is not the leaf's.
pub(crate) fn certified_key(
    cert: &FileArg,
    cert_bytes: &[u8],
    key: &FileArg,
    key_bytes: &[u8],
    provider: &CryptoProvider,
) -> Result<CheckedPair, TlsError> {
    let chain = certificates(cert, cert_bytes)?;
    let not_after = check_validity(cert, &chain[0], SystemTime::now())?;
    let private_key = private_key(key, key_bytes)?;
    let signing_key = provider
        .key_provider
        .load_private_key(private_key)
        .map_err(|e| key.error(format!("the private key cannot be used: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // The ring provider derives the public key of every key type it
        // loads, so `Unknown` does not happen with it; were it to, the
        // handshake would still fail for a mismatched key.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(key.error(format!(
                "the private key does not match the certificate in {}",
                cert.named()
            )));
        }
        Err(e) => {
            return Err(cert.error(format!("the certificate cannot be used: {e}")));
        }
    }
    Ok(CheckedPair {
        key: certified,
        not_after,
    })
}

/// Adds every certificate of a CA bundle to `roots`; refuses a bundle none
/// of whose certificates is currently valid (it could verify nobody).
pub(crate) fn add_ca_bundle(
    arg: &FileArg,
    bytes: &[u8],
    roots: &mut RootCertStore,
) -> Result<(), TlsError> {
    let certificates = certificates(arg, bytes)?;
    let now = SystemTime::now();
    let mut first_problem = None;
    let mut usable = 0;
    for (index, certificate) in certificates.into_iter().enumerate() {
        match check_validity(arg, &certificate, now) {
            Ok(_) => usable += 1,
            Err(e) => {
                first_problem.get_or_insert(e.problem);
            }
        }
        roots.add(certificate).map_err(|e| {
            arg.error(format!(
                "certificate #{} is not usable as a CA certificate: {e}",
                index + 1
            ))
        })?;
    }
    if usable == 0 {
        let problem = first_problem.unwrap_or_default();
        return Err(arg.error(format!(
            "no CA certificate in the file is valid now: {problem}"
        )));
    }
    Ok(())
}

/// Every CERTIFICATE section of a PEM file, at least one.
pub(crate) fn certificates(
    arg: &FileArg,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = sections(arg, bytes)?;
    let certificates: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if certificates.is_empty() {
        let holds_key = sections.iter().any(|(kind, _)| is_key(*kind));
        let swappable = arg.flag.ends_with("-cert");
        return Err(arg.error(if holds_key && swappable {
            "no certificate in the file, only a private key (are the certificate and key files swapped?)"
                .to_string()
        } else if holds_key {
            "no certificate in the file, only a private key".to_string()
        } else {
            format!("no certificate in the file {}", expected("CERTIFICATE"))
        }));
    }
    Ok(certificates)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn private_key(arg: &FileArg, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    if contains(bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(arg.error(
            "the private key is encrypted; the gateway needs it unencrypted \
             (protect the file with its permissions instead)",
        ));
    }
    let sections = sections(arg, bytes)?;
    let key = sections.into_iter().find_map(|(kind, der)| match kind {
        SectionKind::PrivateKey => Some(PrivateKeyDer::Pkcs8(der.into())),
        SectionKind::RsaPrivateKey => Some(PrivateKeyDer::Pkcs1(der.into())),
        SectionKind::EcPrivateKey => Some(PrivateKeyDer::Sec1(der.into())),
        _ => None,
    });
    match key {
        Some(key) => Ok(key),
        None if contains(bytes, b"-----BEGIN CERTIFICATE-----") => Err(arg.error(
            "no private key in the file, only a certificate (are the certificate and key files swapped?)",
        )),
        None => Err(arg.error(format!(
            "no private key in the file {}",
            expected("PRIVATE KEY")
        ))),
    }
}

/// The validity period of a certificate, checked against `now`; its end.
pub(crate) fn check_validity(
    arg: &FileArg,
    der: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<SystemTime, TlsError> {
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|e| arg.error(format!("a certificate in the file is not valid X.509: {e}")))?;
    let validity = certificate.validity();
    let not_before = to_system_time(validity.not_before.timestamp());
    let not_after = to_system_time(validity.not_after.timestamp());
    if now < not_before {
        return Err(arg.error(format!(
            "the certificate is not valid before {} (is the clock right?)",
            humantime::format_rfc3339_seconds(not_before)
        )));
    }
    if now > not_after {
        return Err(arg.error(format!(
            "the certificate expired at {}",
            humantime::format_rfc3339_seconds(not_after)
        )));
    }
    Ok(not_after)
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix_seconds.unsigned_abs());
    let time = if unix_seconds >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    // X.509 times end in year 9999, well inside SystemTime's range on the
    // platforms we build for; the fallback is never taken there.
    time.unwrap_or(UNIX_EPOCH)
}

/// Every PEM section of the file, with its kind; refuses a file with none.
/// PEM errors are described in our words: theirs may quote the file.
fn sections(arg: &FileArg, bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| arg.error(describe_pem_error(&e)))?;
    if sections.is_empty() {
        return Err(arg.error(if bytes.first() == Some(&0x30) {
            "not PEM: the file looks like binary DER; convert it with \
             `openssl x509 -inform der` (certificates) or `openssl pkey -inform der` (keys)"
        } else if contains(bytes, b"-----BEGIN OPENSSH PRIVATE KEY-----") {
            "an OpenSSH private key is not a TLS key; expected a PEM \
             PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section"
        } else {
            "not a PEM file: no -----BEGIN ...----- section that the gateway can use"
        }));
    }
    Ok(sections)
}

fn describe_pem_error(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { .. } => {
            "not valid PEM: a section has no -----END ...----- line (is the file truncated?)".into()
        }
        pem::Error::IllegalSectionStart { .. } => {
            "not valid PEM: a -----BEGIN ...----- line is malformed".into()
        }
        pem::Error::Base64Decode(_) => "not valid PEM: a section is not valid base64".into(),
        pem::Error::SectionTooLarge => "not valid PEM: a section is too large".into(),
        _ => "not valid PEM".into(),
    }
}

fn is_key(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
    )
}

fn expected(label: &str) -> String {
    format!("(expected a -----BEGIN {label}----- section)")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
