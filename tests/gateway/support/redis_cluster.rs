//! A Redis Cluster on loopback: three primaries, each with a replica, made
//! as `redis-cli --cluster create` makes one (slots, config epochs, `MEET`,
//! `REPLICATE`) but without its one-second pauses, with a short node
//! timeout (1 s) so that a replica takes over a failed primary in a few
//! seconds. [`RedisCluster::url`] is the `--idempotency-store` value. Nodes
//! are killed on drop; their cluster files live in a directory removed on
//! drop.

use std::path::PathBuf;
use std::time::Duration;

use super::redis::{RedisServer, new_dir};
use super::redis_command::{Node, command, empty, info_field, poll, replicas_of, try_command};

/// Bound of every wait for the cluster to form or to settle.
const PATIENCE: Duration = Duration::from_secs(45);
/// A node's bus port is its port + 10000, which must be a valid port too.
const HIGHEST_PORT: u16 = 55_535;
/// The slots of each primary, as `redis-cli --cluster create` splits them.
const SLOTS: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

pub struct RedisCluster {
    /// The three primaries, then their replicas in the same order (until a
    /// failover: [`Self::primary_ports`] tells which are primaries now).
    pub nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Six nodes: three primaries with one replica each, every slot served,
    /// every node knowing every other's role, every replica in sync: ready
    /// for a failover.
    ///
    /// A primary reports the cluster ok no sooner than 2 s after it started
    /// (Redis's `CLUSTER_WRITABLE_DELAY`): that, not the steps below, is
    /// most of the time this takes.
    pub fn start() -> Self {
        let dir = new_dir("cluster");
        let nodes: Vec<RedisServer> = std::thread::scope(|scope| {
            let starting: Vec<_> = (0..6).map(|_| scope.spawn(|| start_node(&dir))).collect();
            starting
                .into_iter()
                .map(|node| node.join().expect("a cluster node starts"))
                .collect()
        });
        let cluster = Self { nodes, dir };
        cluster.form();
        cluster.wait_until_settled();
        cluster
    }

    /// What `redis-cli --cluster create --cluster-replicas 1` does: slots
    /// to the first three nodes, a distinct config epoch each, every node
    /// met, then each of the last three made the replica of one primary
    /// once it knows that primary.
    fn form(&self) {
        let ports: Vec<u16> = self.nodes.iter().map(RedisServer::port).collect();
        for (epoch, port) in (1..).zip(&ports) {
            let ok: String = command(*port, &["CLUSTER", "SET-CONFIG-EPOCH", &epoch.to_string()]);
            assert_eq!(ok, "OK");
        }
        for (port, (first, last)) in ports.iter().zip(SLOTS) {
            let ok: String = command(
                *port,
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ],
            );
            assert_eq!(ok, "OK");
        }
        let meeting = ports[0].to_string();
        for port in &ports[1..] {
            let ok: String = command(*port, &["CLUSTER", "MEET", "127.0.0.1", &meeting]);
            assert_eq!(ok, "OK");
        }
        for (primary, replica) in ports[..3].iter().zip(&ports[3..]) {
            let id: String = command(*primary, &["CLUSTER", "MYID"]);
            poll(
                "a replica to learn its primary through the cluster bus",
                PATIENCE,
                || {
                    // "ERR Unknown node" until then.
                    try_command::<String>(*replica, &["CLUSTER", "REPLICATE", &id]).ok()
                },
            );
        }
    }

    /// `redis+cluster://` listing the first three nodes (any would do).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .take(3)
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// A node that answers (any, but the killed ones).
    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .map(RedisServer::port)
            .find(|port| try_command::<String>(*port, &["PING"]).is_ok())
            .expect("a live cluster node")
    }

    /// The slot of `key`.
    pub fn slot(&self, key: &[u8]) -> u16 {
        let key = String::from_utf8_lossy(key).into_owned();
        let slot: i64 = try_command(self.live_port(), &["CLUSTER", "KEYSLOT", &key])
            .unwrap_or_else(|e| panic!("{e}"));
        u16::try_from(slot).expect("a slot")
    }

    /// The port of the primary serving `slot`, as a live node sees it.
    pub fn primary_of(&self, slot: u16) -> u16 {
        let nodes: String =
            try_command(self.live_port(), &["CLUSTER", "NODES"]).unwrap_or_else(|e| panic!("{e}"));
        primaries(&nodes)
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|(port, _)| port)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}:\n{nodes}"))
    }

    /// The ports of the primaries, as a live node sees them.
    pub fn primary_ports(&self) -> Vec<u16> {
        let nodes: String =
            try_command(self.live_port(), &["CLUSTER", "NODES"]).unwrap_or_else(|e| panic!("{e}"));
        let mut ports: Vec<u16> = primaries(&nodes).into_iter().map(|(p, _)| p).collect();
        ports.sort_unstable();
        ports
    }

    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .expect("a node of this cluster")
    }

    /// Waits until the cluster is [`Self::settled`].
    pub fn wait_until_settled(&self) {
        poll("the cluster to be ok on every node", PATIENCE, || {
            self.settled().ok()
        });
    }

    /// Whether every live node says the cluster is ok with all slots
    /// served by a primary that is not failed, sees every live node's role
    /// as the others do (each replica's primary included), and each live
    /// primary has its replica in sync and online (when it has one alive);
    /// the error says what is not so.
    fn settled(&self) -> Result<(), String> {
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .map(RedisServer::port)
            .collect();
        let mut views = Vec::new();
        for port in &live {
            let state = info_of(*port, "cluster_state");
            let slots = info_of(*port, "cluster_slots_ok");
            if state.as_deref() != Some("ok") || slots.as_deref() != Some("16384") {
                return Err(format!(
                    "node {port}: cluster {state:?}, {slots:?} slots ok"
                ));
            }
            match info_field(*port, "replication", "role").as_deref() {
                Some("master") => {
                    let replicas = replicas_of(*port);
                    if !replicas
                        .as_ref()
                        .is_some_and(|r| r.iter().all(|(_, online)| *online))
                    {
                        return Err(format!("primary {port}: replicas {replicas:?}"));
                    }
                }
                Some("slave") => {
                    let link = info_field(*port, "replication", "master_link_status");
                    if link.as_deref() != Some("up") {
                        return Err(format!("replica {port}: link to its primary {link:?}"));
                    }
                }
                role => return Err(format!("node {port}: role {role:?}")),
            }
            let nodes: String = try_command(*port, &["CLUSTER", "NODES"])?;
            views.push((*port, roles(&nodes, &live)));
        }
        for (port, view) in &views {
            let known = view.len() == live.len()
                && view
                    .iter()
                    .all(|(_, primary, flags)| primary != &Some(0) && flags.is_empty());
            if !known {
                return Err(format!("node {port} sees {view:?}"));
            }
        }
        if let Some((first, view)) = views.first()
            && let Some((other, different)) = views.iter().find(|(_, v)| v != view)
        {
            return Err(format!(
                "node {first} sees {view:?}, node {other} sees {different:?}"
            ));
        }
        Ok(())
    }

    /// Whether the cluster is as [`Self::start`] left it, for another case
    /// of a pool: every node alive, settled, the first three still the
    /// primaries (no failover happened).
    pub fn ready(&self) -> Result<(), String> {
        if let Some(dead) = self.nodes.iter().find(|n| n.pid().is_none()) {
            return Err(format!("node {} was killed", dead.port()));
        }
        let mut primaries = self.primary_ports();
        let mut first: Vec<u16> = self.nodes[..3].iter().map(RedisServer::port).collect();
        primaries.sort_unstable();
        first.sort_unstable();
        if primaries != first {
            return Err(format!("primaries {primaries:?}, not {first:?}"));
        }
        self.settled()
    }

    /// Empties every primary, and its replica with it, and the replicas'
    /// script caches (see [`empty`]), for the next case of a pool.
    pub fn empty(&self) -> Result<(), String> {
        let (primaries, replicas) = self.nodes.split_at(3);
        for node in primaries {
            empty(node.port(), Node::Primary { replicas: 1 })?;
        }
        for node in replicas {
            empty(node.port(), Node::Replica)?;
        }
        Ok(())
    }

    /// Waits until a live node names a primary for `slot` other than
    /// `old`; returns the new primary's port.
    pub fn wait_for_new_primary(&self, slot: u16, old: u16) -> u16 {
        poll(
            "a replica to take over the failed primary",
            PATIENCE,
            || {
                let nodes: String = try_command(self.live_port(), &["CLUSTER", "NODES"]).ok()?;
                primaries(&nodes)
                    .into_iter()
                    .find(|(port, ranges)| {
                        *port != old && ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot))
                    })
                    .map(|(port, _)| port)
            },
        )
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each live node's role in `CLUSTER NODES`, sorted by port: `None` for a
/// primary, its primary's port for a replica (`Some(0)` if that one is
/// unknown), with the flags that say it is failing or not yet known.
fn roles(nodes: &str, live: &[u16]) -> Vec<(u16, Option<u16>, Vec<String>)> {
    let port_of = |address: &str| -> Option<u16> {
        address
            .split(['@', ','])
            .next()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()
    };
    let ports: Vec<(&str, u16)> = nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?, port_of(fields.next()?)?))
        })
        .collect();
    let mut roles: Vec<_> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = port_of(fields.get(1)?)?;
            let flags: Vec<String> = fields
                .get(2)?
                .split(',')
                .filter(|f| !matches!(*f, "myself" | "master" | "slave"))
                .map(str::to_owned)
                .collect();
            let primary = match *fields.get(3)? {
                "-" => None,
                id => Some(ports.iter().find(|(i, _)| *i == id).map_or(0, |(_, p)| *p)),
            };
            live.contains(&port).then_some((port, primary, flags))
        })
        .collect();
    roles.sort();
    roles
}

fn info_of(port: u16, field: &str) -> Option<String> {
    let info: String = try_command(port, &["CLUSTER", "INFO"]).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
}

/// `(port, slot ranges)` of each primary of `CLUSTER NODES` that is not
/// failed and serves slots.
fn primaries(nodes: &str) -> Vec<(u16, Vec<(u16, u16)>)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.split(',').any(|f| f == "fail") {
                return None;
            }
            let port = fields[1]
                .split(['@', ','])
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let ranges: Vec<(u16, u16)> = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|range| match range.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => range.parse().ok().map(|s| (s, s)),
                })
                .collect();
            (!ranges.is_empty()).then_some((port, ranges))
        })
        .collect()
}

/// A cluster node on a free port low enough for its bus port.
fn start_node(dir: &std::path::Path) -> RedisServer {
    let mut last = String::new();
    for _ in 0..20 {
        let port = fastrand::u16(20_000..HIGHEST_PORT - 10_000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !(free(port) && free(port + 10_000)) {
            continue;
        }
        // In the cluster's directory; the node's own (where a replica's
        // full sync writes its snapshot) is its server's.
        let file = dir.join(format!("nodes-{port}.conf"));
        let file = file.display().to_string();
        match RedisServer::start_on(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &file,
                "--cluster-node-timeout",
                "1000",
            ],
        ) {
            Ok(node) => return node,
            Err(output) => last = output,
        }
    }
    panic!("no cluster node started on a free port; the last output:\n{last}");
}

mod tests {
    use super::*;

    #[test]
    fn a_cluster_spreads_slots_over_three_primaries_and_promotes_a_replica() {
        let mut cluster = RedisCluster::start();
        let primaries = cluster.primary_ports();
        assert_eq!(primaries.len(), 3, "{primaries:?}");
        let slot = cluster.slot(b"some-key");
        let old = cluster.primary_of(slot);
        assert!(primaries.contains(&old));
        cluster.node(old).kill();
        let new = cluster.wait_for_new_primary(slot, old);
        assert_ne!(new, old);
        assert_eq!(cluster.primary_ports().len(), 3);
    }
}
