//! The CORS policy for gRPC-Web calls made by browsers
//! (`--cors-allowed-origins`).
//!
//! By default no origin is allowed and no CORS header is ever sent, so a
//! browser page refuses the gateway's answers; gRPC-Web from non-browser
//! clients (which send no `Origin`) works either way.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};
use url::Url;

/// Request headers a gRPC-Web client may send: the gRPC-Web protocol's own
/// and the call metadata the gateway reads.
pub const ALLOWED_HEADERS: [&str; 10] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "api-key",
    "organization-id",
    "x-request-id",
    "idempotency-key",
    "traceparent",
    "tracestate",
];

/// Response headers a browser script may read: the status and its details
/// (sent as headers when a call fails before any message), the call's
/// request id and the replay mark.
pub const EXPOSED_HEADERS: [&str; 5] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-request-id",
    "idempotent-replayed",
];

/// How long a browser may cache a preflight answer.
const MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Which browser origins may call the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No CORS headers at all: browsers are refused.
    #[default]
    None,
    /// `*`: any origin.
    Any,
    /// Exactly these origins (`scheme://host[:port]`).
    List(Vec<HeaderValue>),
}

impl CorsOrigins {
    /// Parses the flag's value: empty (none), `*`, or a comma-separated list
    /// of origins such as `https://app.example.com,http://localhost:3000`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(Self::None);
        }
        if value == "*" {
            return Ok(Self::Any);
        }
        let mut origins = Vec::new();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                return Err("`*` allows every origin and cannot be combined with a list".into());
            }
            origins.push(origin(item)?);
        }
        if origins.is_empty() {
            return Ok(Self::None);
        }
        Ok(Self::List(origins))
    }

    /// The layer that applies the policy; `None` when no origin is allowed,
    /// so that not even a `Vary` header is added.
    pub fn layer(&self) -> Option<CorsLayer> {
        let allow_origin = match self {
            Self::None => return None,
            Self::Any => AllowOrigin::any(),
            Self::List(origins) => AllowOrigin::list(origins.iter().cloned()),
        };
        Some(
            CorsLayer::new()
                .allow_origin(allow_origin)
                .allow_methods([Method::POST])
                .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
                .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
                .max_age(MAX_AGE),
        )
    }
}

impl std::fmt::Display for CorsOrigins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Any => f.write_str("*"),
            Self::List(origins) => {
                let list: Vec<&str> = origins.iter().filter_map(|o| o.to_str().ok()).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

/// An origin exactly as browsers send it in the `Origin` header.
fn origin(item: &str) -> Result<HeaderValue, String> {
    let url = Url::parse(item).map_err(|e| format!("`{item}` is not an origin: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "`{item}` is not an origin: expected http(s)://host[:port]"
        ));
    }
    let canonical = url.origin().ascii_serialization();
    if canonical != item {
        return Err(format!(
            "`{item}` is not an origin as browsers send it: write `{canonical}` \
             (no path, no trailing slash, no default port, lower-case host)"
        ));
    }
    HeaderValue::from_str(&canonical).map_err(|e| format!("`{item}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_none_and_star_is_any() {
        assert_eq!(CorsOrigins::parse(""), Ok(CorsOrigins::None));
        assert_eq!(CorsOrigins::parse(" , "), Ok(CorsOrigins::None));
        assert_eq!(CorsOrigins::parse("*"), Ok(CorsOrigins::Any));
        assert!(CorsOrigins::None.layer().is_none());
        assert!(CorsOrigins::Any.layer().is_some());
    }

    #[test]
    fn lists_keep_each_origin() {
        let parsed = CorsOrigins::parse("https://app.example.com, http://localhost:3000");
        assert_eq!(
            parsed,
            Ok(CorsOrigins::List(vec![
                HeaderValue::from_static("https://app.example.com"),
                HeaderValue::from_static("http://localhost:3000"),
            ]))
        );
        assert_eq!(
            parsed.map(|p| p.to_string()),
            Ok("https://app.example.com,http://localhost:3000".to_owned())
        );
    }

    #[test]
    fn non_origins_are_refused_with_the_fix() {
        let error = CorsOrigins::parse("https://app.example.com/").unwrap_err();
        assert!(error.contains("write `https://app.example.com`"), "{error}");
        let error = CorsOrigins::parse("https://app.example.com:443").unwrap_err();
        assert!(error.contains("write `https://app.example.com`"), "{error}");
        let error = CorsOrigins::parse("app.example.com").unwrap_err();
        assert!(error.contains("not an origin"), "{error}");
        let error = CorsOrigins::parse("ftp://app.example.com").unwrap_err();
        assert!(error.contains("http(s)://host"), "{error}");
        let error = CorsOrigins::parse("*,https://a.example").unwrap_err();
        assert!(error.contains("cannot be combined"), "{error}");
    }
}
