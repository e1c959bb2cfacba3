//! The caller's `idempotency-key`, the scope it is recorded under and the
//! digest of the request it was first used with. Both are SHA-256 values so
//! that a store holds fixed-length opaque keys: no organization id, api-key
//! or idempotency key ever reaches it.

use std::fmt;

use ring::digest::{Context, SHA256};

/// Longest accepted `idempotency-key`, in bytes (issue 9: "up to 255").
pub const MAX_KEY_BYTES: usize = 255;

/// A valid `idempotency-key` value: 1 to 255 printable ASCII bytes.
/// Held inline (no allocation on the call path).
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    len: u8,
    bytes: [u8; MAX_KEY_BYTES],
}

impl IdempotencyKey {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn as_str(&self) -> &str {
        // `parse_key` admitted printable ASCII only, which is UTF-8.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The caller chose it to name a call, not to authenticate: not a secret.
        f.debug_tuple("IdempotencyKey")
            .field(&self.as_str())
            .finish()
    }
}

/// Checks an `idempotency-key` metadata value. The error is the description
/// of the `BadRequest` field violation the gateway answers with.
pub fn parse_key(value: &[u8]) -> Result<IdempotencyKey, String> {
    if value.is_empty() {
        return Err("idempotency-key must not be empty".into());
    }
    if value.len() > MAX_KEY_BYTES {
        return Err(format!(
            "idempotency-key must be at most {MAX_KEY_BYTES} bytes, not {}",
            value.len()
        ));
    }
    if let Some(at) = value.iter().position(|b| !(0x20..=0x7e).contains(b)) {
        return Err(format!(
            "idempotency-key must be printable ASCII (0x20 to 0x7E); byte {at} is 0x{:02X}",
            value[at]
        ));
    }
    let mut bytes = [0; MAX_KEY_BYTES];
    bytes[..value.len()].copy_from_slice(value);
    Ok(IdempotencyKey {
        // At most MAX_KEY_BYTES (255), checked above.
        len: value.len() as u8,
        bytes,
    })
}

/// Where one key's record lives: a SHA-256 of the organization, the RPC,
/// the caller's api-key and the idempotency key. A caller holding another
/// api-key lands on another record, so it can never replay someone else's
/// answer; and neither the api-key nor the organization is stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope(pub(crate) [u8; 32]);

impl Scope {
    pub fn new(organization_id: &[u8], rpc: &str, api_key: &[u8], key: &IdempotencyKey) -> Self {
        let mut hash = Context::new(&SHA256);
        // Versioned domain separation: a future scope layout hashes apart.
        hash.update(b"gormic-idempotency-scope-v1\0");
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        for field in [organization_id, rpc.as_bytes(), api_key, key.as_bytes()] {
            hash.update(&(field.len() as u64).to_be_bytes());
            hash.update(field);
        }
        Self(finish(hash))
    }

    /// Lower-case hex of the hash, 64 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.to_hex())
    }
}

/// SHA-256 of the RPC name and the request message: a key reused with
/// another request is refused by comparing these.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub(crate) [u8; 32]);

impl Digest {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", hex(&self.0))
    }
}

/// The digest of a request: `encoded_request` is the prost encoding of the
/// request message. prost writes the fields of a message in field-number
/// order and our request types hold no maps, so equal requests encode to
/// equal bytes. prost drops fields this gateway does not know: requests that
/// differ only there count as equal, which is right, as they are not
/// forwarded either.
pub fn request_digest(rpc: &str, encoded_request: &[u8]) -> Digest {
    let mut hash = Context::new(&SHA256);
    hash.update(b"gormic-idempotency-request-v1\0");
    hash.update(&(rpc.len() as u64).to_be_bytes());
    hash.update(rpc.as_bytes());
    hash.update(encoded_request);
    Digest(finish(hash))
}

fn finish(hash: Context) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IdempotencyKey {
        parse_key(s.as_bytes()).unwrap()
    }

    #[test]
    fn scope_separates_every_field() {
        let base = Scope::new(b"org", "CreateInvoice", b"k1", &key("a"));
        assert_eq!(base, Scope::new(b"org", "CreateInvoice", b"k1", &key("a")));
        assert_ne!(base, Scope::new(b"org2", "CreateInvoice", b"k1", &key("a")));
        assert_ne!(base, Scope::new(b"org", "SendInvoice", b"k1", &key("a")));
        assert_ne!(base, Scope::new(b"org", "CreateInvoice", b"k2", &key("a")));
        assert_ne!(base, Scope::new(b"org", "CreateInvoice", b"k1", &key("b")));
        // Length prefixes: moving a byte across a field boundary changes it.
        assert_ne!(
            Scope::new(b"ab", "CreateInvoice", b"c", &key("a")),
            Scope::new(b"a", "CreateInvoice", b"bc", &key("a"))
        );
        assert_eq!(base.to_hex().len(), 64);
    }

    #[test]
    fn digest_covers_rpc_and_request() {
        let d = request_digest("CreateInvoice", b"\x0a\x01x");
        assert_eq!(d, request_digest("CreateInvoice", b"\x0a\x01x"));
        assert_ne!(d, request_digest("CreateInvoice", b"\x0a\x01y"));
        assert_ne!(d, request_digest("UpdateInvoice", b"\x0a\x01x"));
    }
}
