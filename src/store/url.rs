//! The shared store's URL (`--idempotency-store`): which Redis deployment,
//! how it is reached and with which credentials. Checked once at start-up;
//! the password never appears in `Display`, `Debug` or an error.
//!
//! - `redis://[user:password@]host:port[/db]` (`rediss://` for TLS): one
//!   server, or a managed endpoint whose DNS name moves to the new primary on
//!   failover (the name is looked up again on every reconnection);
//! - `redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT…]/SERVICE[?db=N]`
//!   (`rediss+sentinel://`): the primary of SERVICE, as the Sentinels name
//!   it. The credentials authenticate to the Redis servers; with
//!   `sentinel_auth=same` in the query they authenticate to the Sentinels
//!   too (Sentinels are contacted without credentials otherwise, their
//!   default). The Sentinels' port defaults to 26379;
//! - `redis+cluster://[user:password@]HOST:PORT[,HOST:PORT…]`
//!   (`rediss+cluster://`): a Redis Cluster, found from any of these nodes.
//!
//! Hosts in the lists are names or IP addresses (`[::1]:7000` for IPv6);
//! reserved characters of a password are percent-encoded.

use std::fmt;

use percent_encoding::percent_decode_str;

const DEFAULT_PORT: u16 = 6379;
const DEFAULT_SENTINEL_PORT: u16 = 26379;
/// Enough for any deployment; a bound keeps a typo from opening thousands
/// of connections.
const MAX_NODES: usize = 32;

const EXPECTED: &str = "expected `memory`, `redis://[user:password@]host:port[/db]`, \
     `redis+sentinel://[user:password@]host:port[,host:port…]/service[?db=N]`, \
     `redis+cluster://[user:password@]host:port[,host:port…]` \
     (`rediss…` for TLS)";

/// A checked store URL. `Debug` and `Display` show it with the password
/// replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// As written: holds the password. Given only to the Redis client.
    url: String,
    redacted: String,
    tls: bool,
    topology: Topology,
    username: Option<String>,
    /// Percent-decoded.
    password: Option<String>,
    db: i64,
}

/// Which kind of deployment the URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One server or a managed endpoint (a DNS name).
    Single,
    /// The primary the Sentinels name for `service`.
    Sentinel {
        sentinels: Vec<Node>,
        service: String,
        /// The URL's credentials authenticate to the Sentinels too.
        sentinel_auth: bool,
    },
    /// A Redis Cluster, discovered from these nodes.
    Cluster { nodes: Vec<Node> },
}

/// One `host:port` of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// A name, an IPv4 address, or an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl StoreUrl {
    /// Parses a store URL; the error never contains the password.
    pub fn parse(value: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = value.split_once("://") else {
            return Err(EXPECTED.to_owned());
        };
        match scheme {
            "redis" | "rediss" => single(value, scheme),
            "redis+sentinel" | "rediss+sentinel" => listed(value, scheme, rest, true),
            "redis+cluster" | "rediss+cluster" => listed(value, scheme, rest, false),
            other
                if other
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                Err(format!("{EXPECTED}, not a {other}: URL"))
            }
            _ => Err(EXPECTED.to_owned()),
        }
    }

    /// The URL without its password, for logs, errors and metrics.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The URL with its password, for the Redis client only.
    pub(crate) fn expose(&self) -> &str {
        &self.url
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub(crate) fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    pub(crate) fn db(&self) -> i64 {
        self.db
    }

    /// What error texts must never show: the password as written and
    /// decoded.
    pub(crate) fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let Some(decoded) = &self.password {
            secrets.push(decoded.clone());
            if let Some(written) = written_password(&self.url)
                && written != decoded
            {
                secrets.push(written.to_owned());
            }
        }
        secrets.retain(|s| !s.is_empty());
        secrets
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// `redis://` or `rediss://`: parsed by the `url` crate, as the Redis
/// client reads it.
fn single(value: &str, scheme: &str) -> Result<StoreUrl, String> {
    let url = url::Url::parse(value).map_err(|e| match e {
        url::ParseError::RelativeUrlWithoutBase => EXPECTED.to_owned(),
        // url's messages describe the defect without quoting the input.
        e => format!("not a URL: {e}; {EXPECTED}"),
    })?;
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(format!("the URL has no host; {EXPECTED}"));
    };
    let db = url.path().trim_start_matches('/');
    let db_number = if db.is_empty() {
        0
    } else {
        db.parse::<u16>()
            .map_err(|_| "the path must be a database number such as /0".to_owned())?
    };
    if url.query().is_some() || url.fragment().is_some() {
        // The redis crate reads options there (`#insecure` turns certificate
        // checks off); none is needed, so none is accepted.
        return Err("the URL must not have a query or a fragment".into());
    }
    let username = (!url.username().is_empty()).then(|| decode(url.username()));
    let password = url.password().map(decode);
    let mut redacted = format!("{scheme}://");
    push_userinfo(&mut redacted, url.username(), url.password().is_some());
    redacted.push_str(host);
    if let Some(port) = url.port() {
        redacted.push_str(&format!(":{port}"));
    }
    if !db.is_empty() {
        redacted.push_str(&format!("/{db}"));
    }
    Ok(StoreUrl {
        url: value.to_owned(),
        redacted,
        tls: scheme == "rediss",
        topology: Topology::Single,
        username,
        password,
        db: i64::from(db_number),
    })
}

/// The Sentinel and Cluster forms: a list of hosts, which the `url` crate
/// does not read.
fn listed(value: &str, scheme: &str, rest: &str, sentinel: bool) -> Result<StoreUrl, String> {
    let what = if sentinel {
        "redis+sentinel://[user:password@]host:port[,host:port…]/service[?db=N]"
    } else {
        "redis+cluster://[user:password@]host:port[,host:port…]"
    };
    if rest.contains('#') {
        return Err("the URL must not have a fragment".into());
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (user_written, password_written) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (info, None),
        },
        None => ("", None),
    };
    let default_port = if sentinel {
        DEFAULT_SENTINEL_PORT
    } else {
        DEFAULT_PORT
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        nodes.push(node(host, default_port).map_err(|reason| format!("{reason}; {what}"))?);
    }
    if nodes.len() > MAX_NODES {
        return Err(format!("at most {MAX_NODES} hosts; {what}"));
    }
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let path = path.strip_prefix('/').unwrap_or(path);
    let mut db = 0;
    let mut sentinel_auth = false;
    let mut db_written = None;
    let mut auth_written = false;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("db", n)) if sentinel => {
                db = n
                    .parse::<u16>()
                    .map_err(|_| "db must be a database number such as db=0".to_owned())?;
                db_written = Some(n);
            }
            Some(("sentinel_auth", "same")) if sentinel => {
                sentinel_auth = true;
                auth_written = true;
            }
            Some(("sentinel_auth", "none")) if sentinel => {}
            _ if sentinel => {
                return Err("the query may only hold db=N and sentinel_auth=same|none".to_owned());
            }
            _ => return Err("a cluster URL must not have a query (Cluster has only db 0)".into()),
        }
    }
    let topology = if sentinel {
        if path.is_empty() {
            return Err(format!(
                "the URL names no service (the Sentinels' master name); {what}"
            ));
        }
        if !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("the service name may hold letters, digits, `.`, `_` and `-`".into());
        }
        Topology::Sentinel {
            sentinels: nodes,
            service: path.to_owned(),
            sentinel_auth,
        }
    } else {
        if !path.is_empty() {
            return Err(format!(
                "a cluster URL has no path (Cluster has only db 0); {what}"
            ));
        }
        Topology::Cluster { nodes }
    };
    let mut redacted = format!("{scheme}://");
    push_userinfo(&mut redacted, user_written, password_written.is_some());
    redacted.push_str(hosts);
    if let Topology::Sentinel { service, .. } = &topology {
        redacted.push('/');
        redacted.push_str(service);
        let mut separator = '?';
        if let Some(n) = db_written {
            redacted.push_str(&format!("{separator}db={n}"));
            separator = '&';
        }
        if auth_written {
            redacted.push_str(&format!("{separator}sentinel_auth=same"));
        }
    }
    Ok(StoreUrl {
        url: value.to_owned(),
        redacted,
        tls: scheme.starts_with("rediss"),
        topology,
        username: (!user_written.is_empty()).then(|| decode(user_written)),
        password: password_written.map(decode),
        db: i64::from(db),
    })
}

/// One `host[:port]` of a list, checked by the `url` crate.
fn node(text: &str, default_port: u16) -> Result<Node, String> {
    if text.is_empty() {
        return Err("an empty host in the list".into());
    }
    if text.contains(['@', '/', '?', '#']) {
        return Err("a host in the list is not `host:port`".into());
    }
    let url =
        url::Url::parse(&format!("redis://{text}")).map_err(|e| format!("not a host:port: {e}"))?;
    let host = match url.host() {
        Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err("a host in the list is empty".into()),
    };
    Ok(Node {
        host,
        port: url.port().unwrap_or(default_port),
    })
}

fn push_userinfo(out: &mut String, user: &str, has_password: bool) {
    out.push_str(user);
    if has_password {
        out.push_str(":***");
    }
    if !user.is_empty() || has_password {
        out.push('@');
    }
}

fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// The password as written in the URL (still percent-encoded).
fn written_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = authority.rsplit_once('@')?.0;
    userinfo.split_once(':').map(|(_, password)| password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_servers_keep_their_form() {
        let url = StoreUrl::parse("redis://app:s3cret@cache.internal:6380/2").unwrap();
        assert_eq!(url.redacted(), "redis://app:***@cache.internal:6380/2");
        assert_eq!(url.topology(), &Topology::Single);
        assert_eq!(
            (url.username(), url.password(), url.db()),
            (Some("app"), Some("s3cret"), 2)
        );
        assert!(!url.is_tls());
        let tls = StoreUrl::parse("rediss://:p%40ss@h").unwrap();
        assert_eq!(tls.redacted(), "rediss://:***@h");
        assert!(tls.is_tls());
        assert_eq!(tls.password(), Some("p@ss"));
        assert_eq!(tls.secrets(), vec!["p@ss".to_owned(), "p%40ss".to_owned()]);
    }

    #[test]
    fn sentinel_urls_list_the_sentinels_and_name_the_service() {
        let url = StoreUrl::parse(
            "redis+sentinel://gw:s3cret@10.0.0.1:26379,sentinel-b,[::1]:5000/mymaster?db=3&sentinel_auth=same",
        )
        .unwrap();
        assert_eq!(
            url.redacted(),
            "redis+sentinel://gw:***@10.0.0.1:26379,sentinel-b,[::1]:5000/mymaster?db=3&sentinel_auth=same"
        );
        let Topology::Sentinel {
            sentinels,
            service,
            sentinel_auth,
        } = url.topology()
        else {
            panic!("{url:?}");
        };
        assert_eq!(service, "mymaster");
        assert!(*sentinel_auth);
        assert_eq!(
            sentinels
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.1:26379", "sentinel-b:26379", "[::1]:5000"]
        );
        assert_eq!(url.db(), 3);
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        let tls = StoreUrl::parse("rediss+sentinel://s1:1/m").unwrap();
        assert!(tls.is_tls());
        assert_eq!(tls.password(), None);
        assert_eq!(tls.redacted(), "rediss+sentinel://s1:1/m");
    }

    #[test]
    fn cluster_urls_list_their_seed_nodes() {
        let url = StoreUrl::parse("rediss+cluster://:pw@n1:7000,n2").unwrap();
        assert_eq!(url.redacted(), "rediss+cluster://:***@n1:7000,n2");
        let Topology::Cluster { nodes } = url.topology() else {
            panic!("{url:?}");
        };
        assert_eq!(
            nodes,
            &[
                Node {
                    host: "n1".into(),
                    port: 7000
                },
                Node {
                    host: "n2".into(),
                    port: 6379
                }
            ]
        );
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        for (bad, why) in [
            ("redis+sentinel://:s3cret@h:1", "no service"),
            ("redis+sentinel://:s3cret@h:1,/m", "empty host"),
            ("redis+sentinel://:s3cret@h:notaport/m", "host:port"),
            ("redis+sentinel://:s3cret@h:1/m?db=x", "database number"),
            (
                "redis+sentinel://:s3cret@h:1/m?protocol=3",
                "query may only",
            ),
            ("redis+sentinel://:s3cret@h:1/m m", "service name"),
            ("redis+cluster://:s3cret@h:1/0", "no path"),
            ("redis+cluster://:s3cret@h:1?db=1", "query"),
            ("redis+cluster://:s3cret@h:1#insecure", "fragment"),
            ("unix+sentinel://:s3cret@h:1", "not a unix+sentinel: URL"),
            ("redis://:s3cret@h:notaport", "port"),
        ] {
            let error = StoreUrl::parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
            assert!(!error.contains("s3cret"), "{bad}: {error}");
        }
        let many = format!("redis+cluster://{}", vec!["h:1"; 33].join(","));
        assert!(StoreUrl::parse(&many).unwrap_err().contains("at most 32"));
    }
}
