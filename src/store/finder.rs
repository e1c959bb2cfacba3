//! Where the primary is, for each kind of deployment, and how to tell that
//! a server still is one:
//! - one server or a managed endpoint: the URL's host, looked up again on
//!   every connection (a failover that moves the DNS name is followed);
//! - Sentinel: the primary the Sentinels name (redis-rs's Sentinel client,
//!   which checks it with `ROLE`); a task subscribed to `+switch-master` on
//!   a Sentinel has the supervisor ask again at once, since the client does
//!   not follow a failover on a connection already open
//!   (redis-rs/redis-rs#1438);
//! - Cluster: redis-rs's async cluster client, which routes each command to
//!   its key's primary and follows MOVED and ASK; `CLUSTER NODES` tells the
//!   primaries and their replicas.
//!
//! Each new connection to a node, the supervisor's and each thread's
//! (`local`, through [`open`]), is checked with `ROLE` (a managed name may
//! still point at the demoted server for a moment), which also counts the
//! replicas a write may wait for; a thread's must also reach the very
//! server the supervisor checked (its `run_id`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo,
    Role, TlsMode, Value,
};
use tokio::sync::Notify;

use super::link::{Cause, Conn, Dial, Live, Server, Shared, cause_of};
use super::url::{Node, StoreUrl, Topology};
use super::{Failure, FailureKind};
use crate::runtime::AbortOnDrop;

/// How often the `+switch-master` subscription checks its Sentinel answers.
const SENTINEL_PING: Duration = Duration::from_secs(1);
/// Pause before the subscription tries the next Sentinel.
const SENTINEL_RETRY: Duration = Duration::from_millis(200);

/// A new connection and what was learnt making it.
pub(super) struct Found {
    pub main: Conn,
    pub dial: Dial,
    pub clients: Vec<redis::Client>,
    /// `host:port` of the primary (every primary, sorted, in a cluster).
    pub primaries: Vec<String>,
    pub replicas: u32,
}

/// What a look at a live connection's primary found.
pub(super) struct Inspection {
    /// A cluster's primaries, sorted (empty for one server or Sentinel:
    /// the connection's own address is known already).
    pub primaries: Vec<String>,
    pub replicas: u32,
}

pub(super) enum Finder {
    Single {
        client: Box<redis::Client>,
    },
    Sentinel {
        client: Box<SentinelClient>,
        switched: Arc<Switched>,
        /// The `+switch-master` subscription; ends with the finder.
        _listener: AbortOnDrop,
    },
    Cluster {
        client: Box<ClusterClient>,
        seeds: Vec<redis::Client>,
    },
}

/// The last `+switch-master` announcement of our service, for the
/// supervisor.
#[derive(Default)]
pub(super) struct Switched {
    notify: Notify,
    /// The new primary, `ip:port`.
    to: std::sync::Mutex<Option<String>>,
}

impl Finder {
    /// Builds the clients (no I/O); a Sentinel finder starts its
    /// subscription task on the current runtime.
    pub(super) fn new(url: &StoreUrl, timeout: Duration) -> Result<Self, String> {
        match url.topology() {
            Topology::Single => Ok(Self::Single {
                client: Box::new(redis::Client::open(url.expose()).map_err(|e| e.to_string())?),
            }),
            Topology::Sentinel {
                sentinels,
                service,
                sentinel_auth,
            } => {
                let addresses = sentinels.iter().map(|n| address(n, url.is_tls()));
                let mut builder =
                    SentinelClientBuilder::new(addresses, service, SentinelServerType::Master)
                        .map_err(|e| e.to_string())?
                        .set_client_to_redis_db(url.db());
                if let Some(user) = url.username() {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = url.password() {
                    builder = builder.set_client_to_redis_password(password);
                }
                if url.is_tls() {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                }
                if *sentinel_auth {
                    if let Some(user) = url.username() {
                        builder = builder.set_client_to_sentinel_username(user);
                    }
                    if let Some(password) = url.password() {
                        builder = builder.set_client_to_sentinel_password(password);
                    }
                }
                let client = builder.build().map_err(|e| e.to_string())?;
                let sentinel_infos = sentinels
                    .iter()
                    .map(|n| {
                        info(
                            n,
                            url.is_tls(),
                            if *sentinel_auth { url.username() } else { None },
                            if *sentinel_auth { url.password() } else { None },
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let switched = Arc::new(Switched::default());
                let listener = tokio::spawn(listen_for_switches(
                    sentinel_infos,
                    service.clone(),
                    switched.clone(),
                    timeout,
                ));
                Ok(Self::Sentinel {
                    client: Box::new(client),
                    switched,
                    _listener: AbortOnDrop(listener.abort_handle()),
                })
            }
            Topology::Cluster { nodes } => {
                let infos = nodes
                    .iter()
                    .map(|n| info(n, url.is_tls(), url.username(), url.password()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let client = ClusterClientBuilder::new(infos.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // MOVED and ASK are followed within the call's bound;
                    // short waits, since a failing shard's calls fail closed
                    // anyway and the store timeout bounds them.
                    .retries(4)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()
                    .map_err(|e| e.to_string())?;
                let seeds = infos
                    .into_iter()
                    .map(redis::Client::open)
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                Ok(Self::Cluster {
                    client: Box::new(client),
                    seeds,
                })
            }
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// Resolves once the Sentinels announce a new primary of our service
    /// (never, for the other kinds), with its `ip:port`.
    pub(super) async fn switched(&self) -> String {
        match self {
            Self::Sentinel { switched, .. } => loop {
                switched.notify.notified().await;
                let to = switched
                    .to
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(to) = to {
                    return to;
                }
            },
            _ => std::future::pending().await,
        }
    }

    /// Finds the primary and connects to it.
    pub(super) async fn connect(&mut self, shared: &Shared) -> Result<Found, Failure> {
        match self {
            Self::Single { client } => connect_node(shared, (**client).clone()).await,
            Self::Sentinel { client, .. } => {
                let found = client.async_get_client().await.map_err(|e| Failure {
                    kind: FailureKind::Unavailable,
                    detail: format!(
                        "{}: no primary from the Sentinels: {}",
                        shared.target,
                        shared.scrub(e.to_string())
                    ),
                    may_have_applied: false,
                })?;
                connect_node(shared, found).await
            }
            Self::Cluster { client, seeds } => {
                let connection = client
                    .get_async_connection()
                    .await
                    .map_err(|e| shared.failure(&e))?;
                let mut main = Conn::Cluster(connection);
                let inspection = cluster_nodes(&mut main)
                    .await
                    .map_err(|e| shared.failure(&e))?;
                Ok(Found {
                    main,
                    dial: Dial::Cluster(client.clone()),
                    clients: seeds.clone(),
                    primaries: inspection.primaries,
                    replicas: inspection.replicas,
                })
            }
        }
    }

    /// Looks at the primary of a live connection: its replicas (and a
    /// cluster's primaries), or (as the error) why the connection must be
    /// replaced.
    pub(super) async fn inspect(&self, live: &Live) -> Result<Inspection, Option<Cause>> {
        let mut main = live.main.clone();
        if self.is_cluster() {
            // The cluster client repairs its own connections: one node
            // failing to answer is no reason to drop the others'.
            return cluster_nodes(&mut main).await.map_err(|_| None);
        }
        match role(&mut main).await {
            Ok(Some(Role::Primary { replicas, .. })) => Ok(Inspection {
                primaries: Vec::new(),
                replicas: count(replicas.len()),
            }),
            Ok(Some(_)) => Err(Some(Cause::Demoted)),
            Ok(None) => Ok(Inspection {
                primaries: Vec::new(),
                replicas: 0,
            }),
            Err(e) => Err(cause_of(&e)),
        }
    }
}

fn connection_config(timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

/// The supervisor's connection to a server that must be the primary.
async fn connect_node(shared: &Shared, client: redis::Client) -> Result<Found, Failure> {
    let (main, replicas, run_id) = connect_primary(shared, &client, None)
        .await
        .map_err(|refused| refused.failure)?;
    Ok(Found {
        main,
        primaries: vec![client.get_connection_info().addr().to_string()],
        dial: Dial::Node(Box::new(Server {
            client: client.clone(),
            run_id,
        })),
        clients: vec![client],
        replicas,
    })
}

/// A server or cluster that would not do, and what that says about the
/// primary in use (`None`: nothing, as with a cluster, which repairs its
/// own connections).
pub(super) struct Refused {
    pub failure: Failure,
    pub cause: Option<Cause>,
}

/// A connection of the calling thread's (made on its runtime, which drives
/// it) to the primary `dial` names, checked like the supervisor's and to be
/// the same server.
pub(super) async fn open(shared: &Shared, dial: &Dial) -> Result<Conn, Refused> {
    match dial {
        Dial::Node(server) => {
            let expected = server.run_id.as_deref();
            Ok(connect_primary(shared, &server.client, expected).await?.0)
        }
        Dial::Cluster(client) => match client.get_async_connection().await {
            Ok(connection) => Ok(Conn::Cluster(connection)),
            Err(e) => Err(Refused {
                failure: Failure {
                    may_have_applied: false,
                    ..shared.failure(&e)
                },
                cause: None,
            }),
        },
    }
}

/// Connects to `client`'s server and checks that it is a primary (and the
/// server whose `run_id` is `expected`, if given): the replicas it reports
/// and its `run_id`.
async fn connect_primary(
    shared: &Shared,
    client: &redis::Client,
    expected: Option<&str>,
) -> Result<(Conn, u32, Option<String>), Refused> {
    let error = |e: redis::RedisError| Refused {
        failure: Failure {
            // Nothing but the checks was sent.
            may_have_applied: false,
            ..shared.failure(&e)
        },
        cause: cause_of(&e),
    };
    let address = client.get_connection_info().addr();
    let connection = client
        .get_multiplexed_async_connection_with_config(&connection_config(shared.timeout))
        .await
        .map_err(error)?;
    let mut conn = Conn::Node(connection);
    let not_the_primary = |detail: String| Refused {
        failure: Failure {
            kind: FailureKind::Unavailable,
            detail,
            may_have_applied: false,
        },
        cause: Some(Cause::Demoted),
    };
    let (role, run_id) = identify(&mut conn).await.map_err(error)?;
    let replicas = match role {
        Some(Role::Primary { replicas, .. }) => count(replicas.len()),
        Some(Role::Replica {
            primary_ip,
            primary_port,
            ..
        }) => {
            return Err(not_the_primary(format!(
                "{}: {address} is a replica (of {primary_ip}:{primary_port}), not the primary",
                shared.target
            )));
        }
        Some(_) => {
            return Err(not_the_primary(format!(
                "{}: {address} is not a primary (a Sentinel? name Sentinels with \
                 redis+sentinel://)",
                shared.target
            )));
        }
        // Not allowed to ask (an ACL without ROLE): taken as the primary,
        // with no replicas to wait for unless the flag names a number.
        None => 0,
    };
    if let (Some(expected), Some(found)) = (expected, run_id.as_deref())
        && expected != found
    {
        return Err(not_the_primary(format!(
            "{}: {address} is now another server than the primary in use; finding the \
             primary again",
            shared.target
        )));
    }
    Ok((conn, replicas, run_id))
}

/// The server's `ROLE` and `run_id` (`INFO server`), in one round trip;
/// `None` for what it may not be asked.
async fn identify(conn: &mut Conn) -> redis::RedisResult<(Option<Role>, Option<String>)> {
    let mut pipe = redis::pipe();
    pipe.cmd("ROLE").cmd("INFO").arg("server");
    let mut values = conn.pipeline(&pipe).await?.into_iter();
    let mut next = || match values.next() {
        Some(Value::ServerError(e)) => {
            let e = redis::RedisError::from(e);
            if not_permitted(&e) { Ok(None) } else { Err(e) }
        }
        other => Ok(other),
    };
    let role = next()?.and_then(|value| redis::from_redis_value::<Role>(value).ok());
    let run_id = next()?
        .and_then(|value| redis::from_redis_value::<String>(value).ok())
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("run_id:"))
                .map(|id| id.trim().to_owned())
        });
    Ok((role, run_id))
}

fn not_permitted(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
        || e.to_string().contains("unknown command")
}

/// The server's `ROLE`; `None` if it may not be asked.
async fn role(main: &mut Conn) -> redis::RedisResult<Option<Role>> {
    match main.command(&redis::cmd("ROLE")).await {
        Ok(value) => Ok(redis::from_redis_value::<Role>(value).ok()),
        Err(e) if not_permitted(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A cluster's primaries (those serving slots, not failed) and the fewest
/// connected replicas any of them has, from `CLUSTER NODES`.
async fn cluster_nodes(main: &mut Conn) -> redis::RedisResult<Inspection> {
    let Conn::Cluster(cluster) = main else {
        return Ok(Inspection {
            primaries: Vec::new(),
            replicas: 0,
        });
    };
    let value = cluster
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let text = match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Value::VerbatimString { text, .. } => text,
        Value::SimpleString(text) => text,
        Value::ServerError(e) => return Err(e.into()),
        _ => String::new(),
    };
    Ok(parse_cluster_nodes(&text))
}

pub(super) fn parse_cluster_nodes(text: &str) -> Inspection {
    struct Line<'a> {
        id: &'a str,
        address: &'a str,
        flags: &'a str,
        primary: &'a str,
        connected: bool,
        slots: bool,
    }
    let lines: Vec<Line<'_>> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let address = fields[1].split(['@', ',']).next().unwrap_or_default();
            Some(Line {
                id: fields[0],
                address,
                flags: fields[2],
                primary: fields[3],
                connected: fields[7] == "connected",
                slots: fields.len() > 8,
            })
        })
        .collect();
    let failed = |flags: &str| flags.split(',').any(|f| f == "fail" || f == "noaddr");
    let mut primaries = Vec::new();
    let mut fewest = None::<u32>;
    for line in &lines {
        let is_primary = line.flags.split(',').any(|f| f == "master");
        if !is_primary || failed(line.flags) || !line.slots {
            continue;
        }
        primaries.push(line.address.to_owned());
        let replicas = lines
            .iter()
            .filter(|r| r.primary == line.id && r.connected && !failed(r.flags))
            .count();
        fewest = Some(fewest.map_or(count(replicas), |f| f.min(count(replicas))));
    }
    primaries.sort();
    Inspection {
        primaries,
        replicas: fewest.unwrap_or(0),
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn address(node: &Node, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(node.host.clone(), node.port)
    }
}

fn info(
    node: &Node,
    tls: bool,
    username: Option<&str>,
    password: Option<&str>,
) -> redis::RedisResult<ConnectionInfo> {
    let mut redis = RedisConnectionInfo::default();
    if let Some(user) = username {
        redis = redis.set_username(user);
    }
    if let Some(password) = password {
        redis = redis.set_password(password);
    }
    Ok(address(node, tls)
        .into_connection_info()?
        .set_redis_settings(redis))
}

/// Subscribes to `+switch-master` on one Sentinel after another, for as
/// long as the store lives, and wakes the supervisor when our service's
/// primary changes.
async fn listen_for_switches(
    sentinels: Vec<ConnectionInfo>,
    service: String,
    switched: Arc<Switched>,
    timeout: Duration,
) {
    let mut next = 0;
    loop {
        let info = sentinels[next % sentinels.len()].clone();
        next += 1;
        let subscribed = async {
            let client = redis::Client::open(info).ok()?;
            let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                .await
                .ok()?
                .ok()?;
            let (mut sink, stream) = pubsub.split();
            tokio::time::timeout(timeout, sink.subscribe("+switch-master"))
                .await
                .ok()?
                .ok()?;
            Some((sink, stream))
        };
        if let Some((mut sink, mut stream)) = subscribed.await {
            loop {
                tokio::select! {
                    message = stream.next() => {
                        let Some(message) = message else { break };
                        if let Some(to) = new_primary(message.get_payload_bytes(), &service) {
                            *switched
                                .to
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(to);
                            switched.notify.notify_one();
                        }
                    }
                    () = tokio::time::sleep(SENTINEL_PING) => {
                        let pong = tokio::time::timeout(timeout, sink.ping::<Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(SENTINEL_RETRY).await;
    }
}

/// The new primary (`ip:port`) a `+switch-master` message announces for
/// `service`: "<service> <old ip> <old port> <new ip> <new port>".
fn new_primary(payload: &[u8], service: &str) -> Option<String> {
    let payload = std::str::from_utf8(payload).ok()?;
    match payload.split(' ').collect::<Vec<_>>()[..] {
        [name, _, _, ip, port] if name == service && port.parse::<u16>().is_ok() => {
            Some(format!("{ip}:{port}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_master_message_names_the_new_primary_of_its_service() {
        assert_eq!(
            new_primary(b"gormic 10.0.0.1 6379 10.0.0.2 6380", "gormic").as_deref(),
            Some("10.0.0.2:6380")
        );
        assert_eq!(
            new_primary(b"other 10.0.0.1 6379 10.0.0.2 6380", "gormic"),
            None
        );
        assert_eq!(new_primary(b"gormic 10.0.0.1 6379", "gormic"), None);
        assert_eq!(new_primary(b"gormic a 1 b port", "gormic"), None);
    }

    #[test]
    fn cluster_nodes_tell_the_primaries_and_their_fewest_replicas() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7002@17002,host2 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected 10923-16383
a6 127.0.0.1:7006@17006 master - 0 0 7 connected 10923-16383
r4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
r5 127.0.0.1:7005@17005 slave a2 0 0 2 connected
r7 127.0.0.1:7007@17007 slave a2 0 0 2 connected
r8 127.0.0.1:7008@17008 slave a6 0 0 7 disconnected
e9 127.0.0.1:7009@17009 master - 0 0 0 connected
";
        let inspection = parse_cluster_nodes(text);
        assert_eq!(
            inspection.primaries,
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7006"]
        );
        // a6's only replica is disconnected.
        assert_eq!(inspection.replicas, 0);
        let healthy = text.replace("a6 0 0 7 disconnected", "a6 0 0 7 connected");
        assert_eq!(parse_cluster_nodes(&healthy).replicas, 1);
        assert_eq!(parse_cluster_nodes("").replicas, 0);
    }
}
