//! A Sentinel deployment on loopback: a primary, a replica and three
//! Sentinels (quorum 2) watching service `gormic`, with short timeouts
//! (down after 500 ms) so that a failover takes a couple of seconds.
//! [`RedisSentinel::url`] is the `--idempotency-store` value. Everything is
//! killed on drop; the Sentinels' configuration files (which they rewrite)
//! live in a directory removed on drop.

use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::redis::{RedisServer, free_port, spawn_until};
use super::redis_command::{command, info_field, poll, try_command};

pub const SERVICE: &str = "gormic";
/// Bound of every wait for the deployment to settle.
const PATIENCE: Duration = Duration::from_secs(30);
/// A Sentinel's readiness: it watches the primary.
const MONITORING: &str = "+monitor master";

pub struct RedisSentinel {
    /// The servers, the primary first; after a failover, [`Self::primary`]
    /// tells which one is.
    pub servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
    dir: PathBuf,
}

struct Sentinel {
    child: Child,
    port: u16,
    _output: Arc<Mutex<String>>,
}

impl RedisSentinel {
    /// Starts the primary, its replica (in sync), and three Sentinels that
    /// know both and each other: ready for a failover.
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
        wait_in_sync(primary.port(), replica.port());
        let dir = std::env::temp_dir().join(format!(
            "gormic-sentinel-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("create the Sentinels' directory");
        let sentinels = (0..3)
            .map(|i| start_sentinel(&dir, i, primary.port()))
            .collect();
        let deployment = Self {
            servers: vec![primary, replica],
            sentinels,
            dir,
        };
        deployment.wait_until_settled();
        deployment
    }

    /// `redis+sentinel://127.0.0.1:<s1>,127.0.0.1:<s2>,127.0.0.1:<s3>/gormic`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{SERVICE}", hosts.join(","))
    }

    /// The primary's port as the first Sentinel that answers names it.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let address: Vec<String> =
                try_command(s.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE]).ok()?;
            address.get(1)?.parse().ok()
        })
    }

    /// The server that is the primary now.
    pub fn primary(&mut self) -> &mut RedisServer {
        let port = self.primary_port().expect("a Sentinel names the primary");
        self.servers
            .iter_mut()
            .find(|s| s.port() == port)
            .expect("the primary is one of the servers")
    }

    /// Waits until every Sentinel names a primary other than `old`, and
    /// that server says it is the primary; returns its port.
    pub fn wait_for_new_primary(&self, old: u16) -> u16 {
        poll("the Sentinels to promote a new primary", PATIENCE, || {
            let ports: Vec<u16> = self
                .sentinels
                .iter()
                .filter_map(|s| {
                    let address: Vec<String> =
                        try_command(s.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE])
                            .ok()?;
                    address.get(1)?.parse().ok()
                })
                .collect();
            let first = *ports.first()?;
            let agreed = ports.len() == self.sentinels.len() && ports.iter().all(|p| *p == first);
            (agreed
                && first != old
                && info_field(first, "replication", "role").as_deref() == Some("master"))
            .then_some(first)
        })
    }

    /// Waits until each Sentinel sees the replica and the two other
    /// Sentinels (they find each other through the primary in a few
    /// seconds): before that, a failover could not be agreed.
    fn wait_until_settled(&self) {
        for sentinel in &self.sentinels {
            poll(
                "the Sentinels to know the replica and each other",
                PATIENCE,
                || {
                    let fields: Vec<String> =
                        try_command(sentinel.port, &["SENTINEL", "MASTER", SERVICE]).ok()?;
                    let field = |name: &str| {
                        fields
                            .iter()
                            .position(|f| f == name)
                            .and_then(|i| fields.get(i + 1))
                            .and_then(|v| v.parse::<u32>().ok())
                    };
                    (field("num-slaves") == Some(1) && field("num-other-sentinels") == Some(2))
                        .then_some(())
                },
            );
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            let _ = sentinel.child.kill();
            let _ = sentinel.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `replica` has synced with `primary` and the primary lists it.
pub fn wait_in_sync(primary: u16, replica: u16) {
    poll("the replica to sync with its primary", PATIENCE, || {
        let link = info_field(replica, "replication", "master_link_status")?;
        let connected = info_field(primary, "replication", "connected_slaves")?;
        (link == "up" && connected != "0").then_some(())
    });
}

fn start_sentinel(dir: &std::path::Path, index: usize, primary: u16) -> Sentinel {
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        let file = dir.join(format!("sentinel-{index}-{port}.conf"));
        let config = format!(
            "port {port}\n\
             bind 127.0.0.1\n\
             dir {dir}\n\
             sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {SERVICE} 500\n\
             sentinel failover-timeout {SERVICE} 2000\n\
             sentinel parallel-syncs {SERVICE} 1\n",
            dir = dir.display()
        );
        std::fs::write(&file, config).expect("write a Sentinel's configuration");
        let args = vec![file.display().to_string(), "--sentinel".to_owned()];
        match spawn_until(&args, MONITORING) {
            Ok((child, output)) => {
                return Sentinel {
                    child,
                    port,
                    _output: output,
                };
            }
            Err(output) => last = output,
        }
    }
    panic!("redis-server --sentinel did not start; its output:\n{last}");
}

mod tests {
    use super::*;

    #[test]
    fn a_sentinel_deployment_names_its_primary_and_promotes_the_replica_when_it_dies() {
        let mut deployment = RedisSentinel::start();
        let old = deployment.primary_port().expect("a primary");
        assert_eq!(old, deployment.servers[0].port());
        assert!(deployment.url().starts_with("redis+sentinel://127.0.0.1:"));
        deployment.primary().kill();
        let new = deployment.wait_for_new_primary(old);
        assert_eq!(new, deployment.servers[1].port());
        let ping: String = command(new, &["PING"]);
        assert_eq!(ping, "PONG");
        assert_eq!(
            info_field(new, "replication", "role").as_deref(),
            Some("master")
        );
    }
}
