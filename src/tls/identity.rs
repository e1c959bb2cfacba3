//! Who a caller is, from the client certificate it presented during an mTLS
//! handshake that the client CA verified.

use std::fmt;
use std::sync::Arc;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A caller's identity: the first URI SAN of its certificate (such as a
/// SPIFFE id `spiffe://prod.example/ns/billing/sa/invoicer`), else its first
/// DNS SAN, else its subject common name. Cheap to clone; usable as a map key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallerIdentity(Arc<str>);

impl CallerIdentity {
    /// An identity spelled out (the credentials file, tests).
    pub fn new(identity: &str) -> Self {
        CallerIdentity(Arc::from(identity))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for CallerIdentity {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The identity of a DER-encoded end-entity certificate: first URI SAN, else
/// first DNS SAN, else subject CN. Names that are empty or hold control
/// characters are passed over (the identity goes into every call's log
/// line). `None` when the certificate does not parse or names nobody.
pub fn identity_of(end_entity_der: &[u8]) -> Option<CallerIdentity> {
    let (_, certificate) = X509Certificate::from_der(end_entity_der).ok()?;
    // A malformed SAN extension is treated as absent: the CA vouched for the
    // certificate, and the subject CN may still name the caller.
    let names = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.as_slice())
        .unwrap_or_default();
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => usable(uri),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => usable(dns),
            _ => None,
        })
    };
    let common_name = || {
        certificate
            .subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok().and_then(usable))
    };
    uri.or_else(dns)
        .or_else(common_name)
        .map(CallerIdentity::new)
}

fn usable(name: &str) -> Option<&str> {
    (!name.trim().is_empty() && !name.chars().any(char::is_control)).then_some(name)
}
