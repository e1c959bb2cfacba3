//! The forward proxy, all in one place: the `--upstream-proxy` setting and
//! its URL ([`ProxySetting`], [`ProxyUrl`]), the proxy the environment names
//! (read once at start-up, to log it and learn its password), the
//! credentials cut out of every text that leaves the gateway, and the
//! proxy's own refusals: a `407` to a plain-HTTP request, a refused CONNECT
//! tunnel.
//!
//! A proxy URL may carry a password: it is shown only as
//! `scheme://user:***@host:port`, and error texts go through
//! [`Proxy::scrub`] before they reach a status, a log line or a metric.

use url::Url;

use super::BuildError;
use super::error::{Fault, UpstreamError};

/// `--upstream-proxy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProxySetting {
    /// The proxy variables of the environment (the default).
    #[default]
    Environment,
    /// `none`: never a proxy, whatever the environment says.
    Off,
    /// This proxy for every request.
    Url(ProxyUrl),
}

impl ProxySetting {
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.eq_ignore_ascii_case("none") {
            return Ok(Self::Off);
        }
        ProxyUrl::parse(value).map(Self::Url)
    }
}

/// A forward proxy's URL, which may carry credentials: shown only without
/// its password (`Display`, `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl(Url);

impl ProxyUrl {
    pub fn parse(value: &str) -> Result<Self, String> {
        // The error text never repeats the value: it may hold a password.
        let url = Url::parse(value)
            .map_err(|e| format!("not a URL ({e}); expected http://host:port or none"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "the proxy scheme must be http (CONNECT tunnels carry TLS end to end), not {}",
                url.scheme()
            ));
        }
        if url.host().is_none() {
            return Err("the proxy URL has no host".into());
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err("the proxy URL must be scheme://host:port, without a path".into());
        }
        Ok(Self(url))
    }

    /// The URL with its credentials, for the client only.
    fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The password as written and percent-decoded, to cut out of texts.
    pub(super) fn secrets(&self) -> Vec<String> {
        secrets_of(&self.0)
    }
}

impl std::fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redacted(&self.0))
    }
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

/// How the client's requests find a proxy.
#[derive(Debug, Clone)]
pub(super) enum Proxying {
    /// `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` (either case),
    /// as reqwest reads them.
    Environment,
    Off,
    Through(Box<reqwest::Proxy>),
}

/// The proxy of one upstream, as the exchange needs it once the client is
/// built.
#[derive(Debug)]
pub(super) struct Proxy {
    /// Its credentials, cut out of every error text.
    secrets: Vec<String>,
    /// The proxy requests go through, without its password (start-up log).
    shown: Option<String>,
    /// Plain-HTTP requests go through it, which answers them itself when it
    /// refuses them (`407`); over TLS it can only refuse the tunnel.
    in_clear: bool,
}

impl Proxy {
    /// The proxy set-up for `base`: what the client is told, and the
    /// proxy's secrets and name.
    pub(super) fn set_up(
        setting: &ProxySetting,
        base: &Url,
    ) -> Result<(Proxying, Self), BuildError> {
        let https = base.scheme() == "https";
        let proxy = |secrets, shown: Option<String>| Self {
            secrets,
            in_clear: shown.is_some() && !https,
            shown,
        };
        match setting {
            ProxySetting::Off => Ok((Proxying::Off, proxy(Vec::new(), None))),
            ProxySetting::Url(url) => {
                let through = reqwest::Proxy::all(url.expose()).map_err(|_| {
                    BuildError::Client("--upstream-proxy is not a usable proxy URL".into())
                })?;
                Ok((
                    Proxying::Through(Box::new(through)),
                    proxy(url.secrets(), Some(url.to_string())),
                ))
            }
            ProxySetting::Environment => {
                // reqwest reads the same variables with the same matcher
                // (hyper-util's); read here only to log it and learn its secret.
                let uri: http::Uri = base
                    .as_str()
                    .parse()
                    .map_err(|e| BuildError::Url(format!("is not a URI: {e}")))?;
                let matcher = hyper_util::client::proxy::matcher::Matcher::from_env();
                let Some(intercept) = matcher.intercept(&uri) else {
                    return Ok((Proxying::Environment, proxy(Vec::new(), None)));
                };
                let shown = Url::parse(&intercept.uri().to_string())
                    .map(|u| redacted(&u))
                    .unwrap_or_else(|_| "(unreadable proxy URL)".into());
                Ok((
                    Proxying::Environment,
                    proxy(environment_secrets(), Some(shown)),
                ))
            }
        }
    }

    /// The proxy requests go through (`scheme://host:port`, no password),
    /// or `None`.
    pub(super) fn shown(&self) -> Option<&str> {
        self.shown.as_deref()
    }

    /// `text` with the proxy's credentials replaced by `***`.
    pub(super) fn scrub(&self, text: String) -> String {
        scrub(text, &self.secrets)
    }

    /// The proxy of a plain-HTTP request answered it `407 Proxy
    /// Authentication Required`: the proxy's refusal (RFC 9110 §15.5.8), so
    /// the request went no further and the upstream never saw it. `None`
    /// for any other answer, or one that came through a tunnel (then the
    /// upstream itself said 407).
    pub(super) fn refused(&self, status: http::StatusCode) -> Option<UpstreamError> {
        if status != http::StatusCode::PROXY_AUTHENTICATION_REQUIRED || !self.in_clear {
            return None;
        }
        Some(UpstreamError::Unreachable {
            detail: format!(
                "the proxy {} refused the request: HTTP 407 Proxy Authentication Required \
                 (check the credentials of --upstream-proxy or of the proxy variables)",
                self.shown().unwrap_or("(unknown)")
            ),
            fault: Fault::Connect,
            request_sent: false,
        })
    }

    /// The detail of a transport error, naming the proxy when it refused
    /// the CONNECT tunnel (hyper-util says only "unsuccessful").
    pub(super) fn name_tunnel_refusal(&self, detail: String) -> String {
        match self.shown() {
            Some(proxy) if detail.starts_with("tunnel error") => {
                format!("the proxy {proxy} refused the CONNECT tunnel ({detail})")
            }
            _ => detail,
        }
    }
}

/// The passwords of every proxy variable set (the matcher keeps an HTTP
/// proxy's credentials as a ready-made header, not as text to scrub).
fn environment_secrets() -> Vec<String> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .filter_map(|value| Url::parse(&value).ok())
    .flat_map(|url| secrets_of(&url))
    .collect()
}

/// A password of a URL, as written and percent-decoded.
fn secrets_of(url: &Url) -> Vec<String> {
    let Some(password) = url.password() else {
        return Vec::new();
    };
    let decoded = percent_encoding::percent_decode_str(password)
        .decode_utf8_lossy()
        .into_owned();
    vec![password.to_owned(), decoded]
}

/// `scheme://[user@]host:port`, never the password.
fn redacted(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    let port = url
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let user = match url.username() {
        "" => String::new(),
        user => format!("{user}:***@"),
    };
    format!("{}://{user}{host}{port}", url.scheme())
}

/// `text` with every secret replaced by `***`.
fn scrub(mut text: String, secrets: &[String]) -> String {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), "***");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_proxy_is_shown_without_its_password() {
        let url = Url::parse("https://api.example.com").unwrap();
        let setting = ProxySetting::parse("http://me:hunter2@proxy:3128").unwrap();
        let (proxying, proxy) = Proxy::set_up(&setting, &url).unwrap();
        assert!(matches!(proxying, Proxying::Through(_)));
        assert!(proxy.secrets.contains(&"hunter2".to_owned()));
        assert_eq!(proxy.shown(), Some("http://me:***@proxy:3128"));
    }

    #[test]
    fn secrets_are_cut_out() {
        let secrets = vec!["s3cr3t".to_owned(), String::new()];
        assert_eq!(
            scrub("proxy http://u:s3cr3t@p refused".into(), &secrets),
            "proxy http://u:***@p refused"
        );
        assert_eq!(scrub("nothing here".into(), &secrets), "nothing here");
    }
}
