//! A Sentinel deployment on loopback: a primary, a replica and three
//! Sentinels (quorum 2) watching service `gormic`, with short timeouts
//! (down after 500 ms) so that a failover takes a couple of seconds.
//! [`RedisSentinel::url`] is the `--idempotency-store` value. Everything is
//! killed on drop; the Sentinels' configuration files (which they rewrite)
//! live in a directory removed on drop. The Sentinels are told of the
//! replica and of each other as they start: found through the primary
//! instead, they take 2 s (the period of their hellos).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::redis::{RedisServer, free_port, new_dir, spawn_until};
use super::redis_command::{Node, command, empty, info_field, poll, replicas_of, try_command};

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
    /// Its run id (`SENTINEL MYID`), which the others know it by.
    id: String,
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
        let dir = new_dir("sentinels");
        let sentinels = start_sentinels(&dir, primary.port(), replica.port());
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

    /// Waits until the deployment is [`Self::settled`]: before that, a
    /// failover could not be agreed.
    fn wait_until_settled(&self) {
        poll(
            "the Sentinels to know the replica and each other, all linked",
            PATIENCE,
            || self.settled().ok(),
        );
    }

    /// Whether each Sentinel watches the primary as up, and is linked to
    /// the replica (in sync with it) and to the two other Sentinels; the
    /// error says what is not so.
    fn settled(&self) -> Result<(), String> {
        for sentinel in &self.sentinels {
            let port = sentinel.port;
            let primary = fields(try_command(port, &["SENTINEL", "MASTER", SERVICE])?);
            if primary.get("flags").map(String::as_str) != Some("master")
                || primary.get("num-slaves").map(String::as_str) != Some("1")
                || primary.get("num-other-sentinels").map(String::as_str) != Some("2")
            {
                return Err(format!("Sentinel {port} sees the primary as {primary:?}"));
            }
            let replicas: Vec<Vec<String>> = try_command(port, &["SENTINEL", "REPLICAS", SERVICE])?;
            let others: Vec<Vec<String>> = try_command(port, &["SENTINEL", "SENTINELS", SERVICE])?;
            for (what, entry, flags) in replicas
                .into_iter()
                .map(|r| ("replica", r, "slave"))
                .chain(others.into_iter().map(|s| ("Sentinel", s, "sentinel")))
            {
                let entry = fields(entry);
                let linked = entry.get("flags").map(String::as_str) == Some(flags)
                    && entry
                        .get("master-link-status")
                        .is_none_or(|status| status == "ok");
                if !linked {
                    return Err(format!("Sentinel {port} sees a {what} as {entry:?}"));
                }
            }
        }
        Ok(())
    }

    /// Whether the deployment is as [`Self::start`] left it, for another
    /// case of a pool: settled, with its first server still the primary
    /// every Sentinel names (no failover happened).
    pub fn ready(&self) -> Result<(), String> {
        let first = self.servers[0].port();
        for sentinel in &self.sentinels {
            let address: Vec<String> = try_command(
                sentinel.port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE],
            )?;
            if address.get(1) != Some(&first.to_string()) {
                return Err(format!(
                    "Sentinel {} names {address:?} as the primary, not port {first}",
                    sentinel.port
                ));
            }
        }
        if info_field(first, "replication", "role").as_deref() != Some("master") {
            return Err(format!("port {first} is no longer a primary"));
        }
        self.settled()
    }

    /// Empties the primary, and its replica with it (see [`empty`]), for
    /// the next case of a pool.
    pub fn empty(&self) -> Result<(), String> {
        empty(self.servers[0].port(), Node::Primary { replicas: 1 })?;
        // Its own script cache, which the primary's flush does not reach.
        empty(self.servers[1].port(), Node::Replica)
    }
}

/// The fields of a Sentinel's reply about one instance (name, value, name,
/// value…).
fn fields(reply: Vec<String>) -> HashMap<String, String> {
    let mut pairs = reply.into_iter();
    std::iter::from_fn(|| Some((pairs.next()?, pairs.next()?))).collect()
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

/// Waits until `replica` has synced with `primary` and the primary lists
/// it online (see [`replicas_of`]): a `WAIT` is acknowledged at once.
pub fn wait_in_sync(primary: u16, replica: u16) {
    poll("the replica to sync with its primary", PATIENCE, || {
        let link = info_field(replica, "replication", "master_link_status")?;
        let online = replicas_of(primary)?.contains(&(replica, true));
        (link == "up" && online).then_some(())
    });
}

/// Three Sentinels watching `primary`, each configured with the replica
/// (`known-replica`, as a Sentinel writes in its own file once it found
/// one), then introduced to the two others once all three listen ([`introduce`]).
fn start_sentinels(dir: &Path, primary: u16, replica: u16) -> Vec<Sentinel> {
    let mut last = String::new();
    for _ in 0..5 {
        let started: Vec<Result<Sentinel, String>> = std::thread::scope(|scope| {
            let starting: Vec<_> = (0..3)
                .map(|index| scope.spawn(move || start_sentinel(dir, index, primary, replica)))
                .collect();
            starting
                .into_iter()
                .map(|s| s.join().expect("a Sentinel starts"))
                .collect()
        });
        let mut sentinels = Vec::new();
        let mut failed = None;
        for sentinel in started {
            match sentinel {
                Ok(sentinel) => sentinels.push(sentinel),
                // A port picked free was taken before its Sentinel bound it.
                Err(output) => failed = Some(output),
            }
        }
        let Some(output) = failed else {
            introduce(&sentinels, primary);
            return sentinels;
        };
        last = output;
        for mut sentinel in sentinels {
            let _ = sentinel.child.kill();
            let _ = sentinel.child.wait();
        }
    }
    panic!("redis-server --sentinel did not start; its output:\n{last}");
}

fn start_sentinel(
    dir: &Path,
    index: usize,
    primary: u16,
    replica: u16,
) -> Result<Sentinel, String> {
    let port = free_port();
    let file = dir.join(format!("sentinel-{index}-{port}.conf"));
    let config = format!(
        "port {port}\n\
         bind 127.0.0.1\n\
         dir {dir}\n\
         sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
         sentinel down-after-milliseconds {SERVICE} 500\n\
         sentinel failover-timeout {SERVICE} 2000\n\
         sentinel parallel-syncs {SERVICE} 1\n\
         sentinel known-replica {SERVICE} 127.0.0.1 {replica}\n",
        dir = dir.display()
    );
    std::fs::write(&file, config).expect("write a Sentinel's configuration");
    let args = vec![file.display().to_string(), "--sentinel".to_owned()];
    let (mut child, output) = spawn_until(&args, MONITORING)?;
    match try_command(port, &["SENTINEL", "MYID"]) {
        Ok(id) => Ok(Sentinel {
            child,
            port,
            id,
            _output: output,
        }),
        Err(error) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(error)
        }
    }
}

/// Tells each Sentinel about the two others with the hello message each
/// would publish on the primary's `__sentinel__:hello` channel (a Sentinel
/// takes one by `PUBLISH` too). Left to themselves, they hear the first
/// hellos 2 s after they start (the hello period); and configured with
/// each other (`known-sentinel`), the first to start fails to reach the
/// others, and retries only a second later.
fn introduce(sentinels: &[Sentinel], primary: u16) {
    for sentinel in sentinels {
        for other in sentinels.iter().filter(|o| o.port != sentinel.port) {
            // ip,port,runid,current epoch,service,primary ip,primary port,
            // its config epoch.
            let hello = format!(
                "127.0.0.1,{},{},0,{SERVICE},127.0.0.1,{primary},0",
                other.port, other.id
            );
            let heard: i64 = command(sentinel.port, &["PUBLISH", "__sentinel__:hello", &hello]);
            assert_eq!(heard, 1, "Sentinel {} took the hello", sentinel.port);
        }
    }
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
