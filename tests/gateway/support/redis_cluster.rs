//! A Redis Cluster on loopback: three primaries, each with a replica, made
//! with `redis-cli --cluster create`, with a short node timeout (1 s) so
//! that a replica takes over a failed primary in a few seconds.
//! [`RedisCluster::url`] is the `--idempotency-store` value. Nodes are
//! killed on drop; their cluster files live in a directory removed on drop.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::RedisServer;
use super::redis_command::{info_field, poll, try_command};

/// Bound of every wait for the cluster to form or to settle.
const PATIENCE: Duration = Duration::from_secs(45);
/// A node's bus port is its port + 10000, which must be a valid port too.
const HIGHEST_PORT: u16 = 55_535;

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Six nodes: three primaries with one replica each, every slot served.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "gormic-cluster-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let nodes: Vec<RedisServer> = (0..6).map(|_| start_node(&dir)).collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = create.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run redis-cli ({e}); the cluster tests need it: install it with \
                 `apt-get install redis-tools`, or run scripts/test, which does"
            )
        });
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("redis-cli --cluster create did not finish within {PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = child.wait_with_output().expect("redis-cli's output");
        assert!(
            status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes, dir };
        cluster.wait_until_settled();
        cluster
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

    /// Waits until every live node says the cluster is ok with all slots
    /// served by a primary that is not failed, and each live primary has
    /// its replica in sync (when it has one alive).
    pub fn wait_until_settled(&self) {
        poll("the cluster to be ok on every node", PATIENCE, || {
            let live: Vec<u16> = self
                .nodes
                .iter()
                .filter(|n| n.pid().is_some())
                .map(RedisServer::port)
                .collect();
            let ok = live.iter().all(|port| {
                info_of(*port, "cluster_state").as_deref() == Some("ok")
                    && info_of(*port, "cluster_slots_ok").as_deref() == Some("16384")
            });
            let synced =
                live.iter().all(
                    |port| match info_field(*port, "replication", "role").as_deref() {
                        Some("slave") => {
                            info_field(*port, "replication", "master_link_status").as_deref()
                                == Some("up")
                        }
                        Some("master") => true,
                        _ => false,
                    },
                );
            (ok && synced).then_some(())
        });
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
        let file = dir.join(format!("nodes-{port}.conf"));
        let file = file.display().to_string();
        let dir = dir.display().to_string();
        match RedisServer::start_on(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &file,
                "--cluster-node-timeout",
                "1000",
                "--dir",
                &dir,
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
