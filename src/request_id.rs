//! The call's `x-request-id`: the caller's when it sent a usable one, else a
//! random version-4 UUID, so that every call can be found in the gateway's
//! and in Gormic's logs.

use http::HeaderValue;
use tonic::metadata::{MetadataMap, MetadataValue};

/// Longest `x-request-id` kept; a longer one is replaced by a generated id
/// (it travels to the upstream, the logs and every error).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The call's `x-request-id`, returned to the caller in the response
/// metadata and sent upstream.
#[derive(Debug, Clone)]
pub struct RequestId {
    value: HeaderValue,
}

impl RequestId {
    /// The caller's `x-request-id` when it is 1 to [`MAX_REQUEST_ID_BYTES`]
    /// bytes of visible ASCII, else a generated one.
    pub fn read(metadata: &MetadataMap) -> Self {
        let given = metadata
            .get("x-request-id")
            .map(|v| v.as_bytes())
            .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_BYTES)
            .filter(|v| v.iter().all(|b| b.is_ascii_graphic()))
            .and_then(|v| HeaderValue::from_bytes(v).ok());
        Self {
            value: given.unwrap_or_else(generated),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only visible ASCII gets in (above), so this never falls back.
        self.value.to_str().unwrap_or_default()
    }

    /// The header sent upstream.
    pub fn header(&self) -> HeaderValue {
        self.value.clone()
    }

    /// Sets `x-request-id` in the response metadata.
    pub fn set_on(&self, metadata: &mut MetadataMap) {
        // A valid HeaderValue of visible ASCII is valid ASCII metadata.
        if let Ok(value) = MetadataValue::try_from(self.value.as_bytes()) {
            metadata.insert("x-request-id", value);
        }
    }
}

/// A random version-4 UUID, the usual shape of a request id: the uuid
/// crate sets the version and variant and writes the hyphenated text (on
/// the stack, without `format!`); the random bits come from fastrand, as
/// the trace ids' do (request ids need to be unique, not secret, and
/// `Uuid::new_v4` would ask the kernel for them on every call).
fn generated() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_be_bytes()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(key: &'static str, value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(key, value.parse().expect("ASCII metadata"));
        metadata
    }

    #[test]
    fn the_callers_request_id_is_kept_else_one_is_generated() {
        assert_eq!(
            RequestId::read(&with("x-request-id", "abc-1")).as_str(),
            "abc-1"
        );
        let generated = RequestId::read(&MetadataMap::new());
        let id = generated.as_str();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
        let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
        assert_eq!(parsed.get_version(), Some(uuid::Version::Random));
        assert_eq!(parsed.hyphenated().to_string(), id, "lowercase, hyphenated");
        let too_long = "x".repeat(MAX_REQUEST_ID_BYTES + 1);
        assert_eq!(
            RequestId::read(&with("x-request-id", &too_long))
                .as_str()
                .len(),
            36
        );
        let longest = "x".repeat(MAX_REQUEST_ID_BYTES);
        assert_eq!(
            RequestId::read(&with("x-request-id", &longest)).as_str(),
            longest
        );
        assert_eq!(
            RequestId::read(&with("x-request-id", "a b")).as_str().len(),
            36,
            "a space is not visible ASCII"
        );
        assert_ne!(
            RequestId::read(&MetadataMap::new()).as_str(),
            RequestId::read(&MetadataMap::new()).as_str()
        );
    }

    #[test]
    fn set_on_returns_the_id_to_the_caller() {
        let id = RequestId::read(&with("x-request-id", "abc-1"));
        let mut response = MetadataMap::new();
        id.set_on(&mut response);
        assert_eq!(
            response.get("x-request-id").and_then(|v| v.to_str().ok()),
            Some("abc-1")
        );
        assert_eq!(id.header(), "abc-1");
    }
}
