//! Credential injection (`--credentials FILE`): maps the identity of an mTLS
//! caller ([`CallerIdentity`]) to the `api-key`, and optionally the
//! `organization-id`, the gateway sends upstream on its behalf, so services
//! need not hold the Gormic key.
//!
//! Decided behaviour, applied in the call path when `--credentials` is set:
//! - A mapped caller's own `api-key` metadata is ignored, never forwarded:
//!   the mapped key is sent. (Ignored rather than refused, so that a service
//!   can move behind the gateway's mapping before it drops its own key.)
//! - When the mapping has an `organization_id`, it is the one sent; a caller
//!   sending a different `organization-id` is refused with
//!   `PERMISSION_DENIED` (it asked to act for an organization its identity
//!   is not mapped to). Without one, the caller's `organization-id` is sent
//!   ([`MappedCredentials::organization_id_for`] decides both).
//! - A caller whose identity is not in the file (or whose certificate names
//!   nobody) is refused with `PERMISSION_DENIED`, reason `CALLER_NOT_ALLOWED`;
//!   nothing is sent upstream.
//!
//! The file is TOML, one `[[caller]]` table per identity:
//!
//! ```toml
//! [[caller]]
//! identity = "spiffe://prod.example/ns/billing/sa/invoicer"
//! api_key = "gk_live_..."
//! organization_id = "org-42"   # optional
//! ```
//!
//! A bad file is refused as `FILE: line N: problem` (at start-up, and on
//! reload while the previous map stays in use). Keys never appear in an
//! error, a log line or `Debug` output. An empty file is refused too: a
//! deliberate "nobody" is rare, a file caught mid-write is not.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use toml::Spanned;
use toml::de::DeValue;

use tonic::metadata::MetadataMap;

use crate::reload::change::{self, ChangeGate, FileError, Reloaded, Snapshot, TomlFile};
use crate::tls::CallerIdentity;

/// What one call sends upstream as `api-key` and `organization-id`: the
/// caller's own metadata, or with `--credentials` what its identity maps to
/// ([`for_call`] decides).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Marked sensitive so that no `Debug` output shows it.
    pub api_key: HeaderValue,
    pub organization_id: HeaderValue,
}

/// Why a call has no credentials to send upstream; nothing is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing api-key metadata")]
    MissingApiKey,
    #[error("missing organization-id metadata")]
    MissingOrganizationId,
    /// With `--credentials`: no mapped identity (`None`: the certificate
    /// names nobody).
    #[error("caller not allowed")]
    CallerNotAllowed { identity: Option<String> },
    /// With `--credentials`: another organization than the mapping names.
    #[error("organization not allowed")]
    OrganizationNotAllowed { identity: String },
}

/// The credentials step of the call path: the caller's own metadata, or
/// with `--credentials` those mapped to its mTLS identity (its own api-key
/// is then ignored, never forwarded). Authentication is checked before the
/// organization: a caller without a key learns nothing else.
pub fn for_call(
    map: Option<&CredentialMap>,
    metadata: &MetadataMap,
    identity: Option<&CallerIdentity>,
) -> Result<Credentials, Refusal> {
    let Some(map) = map else {
        let mut api_key = header(metadata, "api-key").ok_or(Refusal::MissingApiKey)?;
        api_key.set_sensitive(true);
        let organization_id =
            header(metadata, "organization-id").ok_or(Refusal::MissingOrganizationId)?;
        return Ok(Credentials {
            api_key,
            organization_id,
        });
    };
    let identity = identity.ok_or(Refusal::CallerNotAllowed { identity: None })?;
    let mapped = map
        .lookup(identity)
        .ok_or_else(|| Refusal::CallerNotAllowed {
            identity: Some(identity.to_string()),
        })?;
    let organization_id = mapped
        .organization_id_for(header(metadata, "organization-id").as_ref())
        .map_err(|_| Refusal::OrganizationNotAllowed {
            identity: identity.to_string(),
        })?
        .ok_or(Refusal::MissingOrganizationId)?;
    Ok(Credentials {
        api_key: mapped.api_key.clone(),
        organization_id,
    })
}

/// A non-empty ASCII metadata value, as an HTTP header value.
fn header(metadata: &MetadataMap, key: &str) -> Option<HeaderValue> {
    let value = metadata.get(key)?;
    let bytes = value.as_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    HeaderValue::from_bytes(bytes).ok()
}

/// Credential-injection flag.
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialsArgs {
    /// TOML file mapping mTLS caller identities to the api-key (and
    /// optionally organization-id) sent upstream for them, one `[[caller]]`
    /// table each with `identity`, `api_key`, `organization_id`; callers not
    /// in the file are refused. Needs --tls-client-ca. Re-read when it
    /// changes (--reload-interval). Default: none (callers send their own
    /// api-key).
    #[arg(
        long,
        env = "GORMIC_CREDENTIALS",
        value_name = "FILE",
        requires = "tls_client_ca"
    )]
    pub credentials: Option<PathBuf>,
}

/// What is sent upstream for a mapped caller.
#[derive(Clone)]
pub struct MappedCredentials {
    /// Marked sensitive: hyper and `http` keep it out of their `Debug`.
    pub api_key: HeaderValue,
    pub organization_id: Option<HeaderValue>,
}

/// A mapped caller asked to act for an organization its mapping does not
/// name: the call is refused with `PERMISSION_DENIED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this caller is mapped to another organization than the organization-id it sent")]
pub struct OrganizationMismatch;

impl MappedCredentials {
    /// The `organization-id` to send upstream for a call that carried
    /// `sent`: the mapped one when the mapping names one (`sent` absent or
    /// equal; a different one is an [`OrganizationMismatch`]), else the
    /// caller's own (`None` when it sent none: the usual missing-metadata
    /// error applies).
    pub fn organization_id_for(
        &self,
        sent: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, OrganizationMismatch> {
        match (&self.organization_id, sent) {
            (Some(mapped), Some(sent)) if mapped != sent => Err(OrganizationMismatch),
            (Some(mapped), _) => Ok(Some(mapped.clone())),
            (None, sent) => Ok(sent.cloned()),
        }
    }
}

impl fmt::Debug for MappedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedCredentials")
            .field("api_key", &"<redacted>")
            .field("organization_id", &self.organization_id)
            .finish()
    }
}

/// The kind of [`CredentialsError`]: a credentials file.
#[derive(Debug, Clone)]
pub enum CredentialsFile {}

/// A credentials file that cannot be used: `FILE: line N: problem`.
pub type CredentialsError = FileError<CredentialsFile>;

type Map = HashMap<CallerIdentity, Arc<MappedCredentials>>;

/// The identity → credentials map in use. Cheap to clone; clones share the
/// map and see reloads.
#[derive(Clone)]
pub struct CredentialMap(Arc<Inner>);

struct Inner {
    path: PathBuf,
    map: ArcSwap<Map>,
    gate: ChangeGate,
}

impl fmt::Debug for CredentialMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialMap")
            .field("path", &self.0.path)
            .field("callers", &self.len())
            .finish()
    }
}

impl CredentialMap {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let snapshot = Snapshot::read(&[path]);
        let map = parse_snapshot(path, &snapshot)?;
        Ok(CredentialMap(Arc::new(Inner {
            path: path.to_path_buf(),
            map: ArcSwap::from_pointee(map),
            gate: ChangeGate::new(vec![path.to_path_buf()], snapshot),
        })))
    }

    /// The credentials for `identity`, if it is mapped. A hash lookup on the
    /// current map: no lock, no allocation.
    pub fn lookup(&self, identity: &CallerIdentity) -> Option<Arc<MappedCredentials>> {
        self.0.map.load().get(identity).cloned()
    }

    /// Re-reads the file; as [`crate::tls::ServerTls::reload`]: a changed,
    /// valid file replaces the map, a bad one leaves the map in use and is
    /// reported once.
    pub fn reload(&self) -> Result<Reloaded, CredentialsError> {
        let Some(snapshot) = self.0.gate.next_change() else {
            return Ok(Reloaded::Unchanged);
        };
        let map = parse_snapshot(&self.0.path, &snapshot)?;
        self.0.map.store(Arc::new(map));
        Ok(Reloaded::Replaced)
    }

    /// Number of mapped identities.
    pub fn len(&self) -> usize {
        self.0.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_snapshot(path: &Path, snapshot: &Snapshot) -> Result<Map, CredentialsError> {
    change::parse_snapshot(path, snapshot, parse)
}

/// Parses a credentials file. Problems are reported in our words with the
/// line: the TOML library's messages are used only for syntax errors, which
/// quote no content.
fn parse(path: &Path, bytes: &[u8]) -> Result<Map, CredentialsError> {
    let (file, document) = TomlFile::open(path, bytes)?;
    let error = |offset: Option<usize>, problem: String| -> CredentialsError {
        file.error(offset, problem)
    };

    let mut map = Map::new();
    // Where each identity was first mapped, to name both lines of a duplicate.
    let mut first_seen: HashMap<CallerIdentity, usize> = HashMap::new();
    for (key, value) in document.get_ref() {
        if key.get_ref().as_ref() != "caller" {
            // The key's text is not echoed: whatever was typed there could
            // be a pasted api-key.
            return Err(error(
                Some(key.span().start),
                "unknown key at the top level (expected only [[caller]] tables)".into(),
            ));
        }
        let callers = match value.get_ref() {
            DeValue::Array(callers) => callers,
            _ => {
                return Err(error(
                    Some(value.span().start),
                    "`caller` must be an array of tables, written [[caller]]".into(),
                ));
            }
        };
        for caller in callers.iter() {
            let entry = caller_entry(caller, &error)?;
            let line = file.line_of(entry.identity_at);
            match first_seen.entry(entry.identity.clone()) {
                Entry::Occupied(first) => {
                    return Err(error(
                        Some(entry.identity_at),
                        format!(
                            "identity {:?} is already mapped on line {}",
                            entry.identity.as_str(),
                            first.get()
                        ),
                    ));
                }
                Entry::Vacant(slot) => {
                    slot.insert(line);
                }
            }
            map.insert(entry.identity, Arc::new(entry.credentials));
        }
    }
    if map.is_empty() {
        return Err(error(
            None,
            "no [[caller]] entries: every call would be refused (a file read mid-write?)".into(),
        ));
    }
    Ok(map)
}

struct CallerEntry {
    identity: CallerIdentity,
    identity_at: usize,
    credentials: MappedCredentials,
}

const FIELDS: &str = "identity, api_key, organization_id";

fn caller_entry(
    caller: &Spanned<DeValue<'_>>,
    error: &impl Fn(Option<usize>, String) -> CredentialsError,
) -> Result<CallerEntry, CredentialsError> {
    let at = caller.span().start;
    let DeValue::Table(table) = caller.get_ref() else {
        return Err(error(
            Some(at),
            "each `caller` entry must be a table, written [[caller]]".into(),
        ));
    };
    let mut identity = None;
    let mut api_key = None;
    let mut organization_id = None;
    for (key, value) in table {
        let slot = match key.get_ref().as_ref() {
            "identity" => &mut identity,
            "api_key" => &mut api_key,
            "organization_id" => &mut organization_id,
            _ => {
                return Err(error(
                    Some(key.span().start),
                    format!("unknown field in [[caller]] (allowed: {FIELDS})"),
                ));
            }
        };
        let field = key.get_ref().as_ref();
        let DeValue::String(string) = value.get_ref() else {
            return Err(error(
                Some(value.span().start),
                format!("{field} must be a string"),
            ));
        };
        *slot = Some((string.as_ref(), value.span().start));
    }

    let Some((identity, identity_at)) = identity else {
        return Err(error(Some(at), "[[caller]] has no identity".into()));
    };
    if identity.trim().is_empty() {
        return Err(error(Some(identity_at), "identity is empty".into()));
    }
    if identity.trim() != identity || identity.chars().any(char::is_control) {
        return Err(error(
            Some(identity_at),
            "identity has leading or trailing spaces or control characters \
             (it must equal the certificate's name exactly)"
                .into(),
        ));
    }
    let Some((key, key_at)) = api_key else {
        return Err(error(Some(at), "[[caller]] has no api_key".into()));
    };
    let mut api_key =
        header_value(key).map_err(|problem| error(Some(key_at), format!("api_key {problem}")))?;
    api_key.set_sensitive(true);
    let organization_id = match organization_id {
        None => None,
        Some((id, id_at)) => Some(
            header_value(id)
                .map_err(|problem| error(Some(id_at), format!("organization_id {problem}")))?,
        ),
    };
    Ok(CallerEntry {
        identity: CallerIdentity::new(identity),
        identity_at,
        credentials: MappedCredentials {
            api_key,
            organization_id,
        },
    })
}

/// A value sendable as gRPC metadata and an HTTP header: printable ASCII,
/// not empty, no surrounding spaces. The problem never quotes the value.
fn header_value(value: &str) -> Result<HeaderValue, &'static str> {
    if value.trim().is_empty() {
        return Err("is empty");
    }
    if value.trim() != value {
        return Err("has leading or trailing spaces");
    }
    if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err("is not a valid header value (printable ASCII only)");
    }
    HeaderValue::from_str(value).map_err(|_| "is not a valid header value (printable ASCII only)")
}
