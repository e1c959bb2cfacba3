//! One command to a redis-server or Sentinel on loopback, from test code:
//! a fresh connection each time, every wait bounded, an error reply or a
//! connection failure as `Err` (a test waiting for a node to come or go
//! decides what that means). And [`empty`], which makes a server of a
//! pooled deployment as empty as a new one for the next case.

use std::time::{Duration, Instant};

use redis::FromRedisValue;

/// Bound of connecting and of the reply.
const TIMEOUT: Duration = Duration::from_secs(5);

fn connect(port: u16) -> Result<redis::Connection, String> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(|e| e.to_string())?;
    let connection = client
        .get_connection_with_timeout(TIMEOUT)
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    connection
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(connection)
}

/// Sends `args` to `127.0.0.1:port` and converts the reply.
pub fn try_command<T: FromRedisValue>(port: u16, args: &[&str]) -> Result<T, String> {
    let mut connection = connect(port)?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut connection)
        .map_err(|e| format!("{args:?} on port {port}: {e}"))
}

/// [`try_command`], failing the test on an error.
pub fn command<T: FromRedisValue>(port: u16, args: &[&str]) -> T {
    try_command(port, args).unwrap_or_else(|e| panic!("{e}"))
}

/// A field of `INFO <section>`, e.g. `role` of `replication`.
pub fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let info: String = try_command(port, &["INFO", section]).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
}

/// The replicas the primary at `port` lists in `INFO replication`: their
/// ports, and whether each is online (its full sync done on the primary's
/// side too: a replica says its link is up as soon as it loaded the
/// snapshot, before its primary noticed the snapshot's child process
/// ended and started streaming it writes).
pub fn replicas_of(port: u16) -> Option<Vec<(u16, bool)>> {
    let info: String = try_command(port, &["INFO", "replication"]).ok()?;
    info.lines()
        .filter(|line| line.starts_with("slave") && line.contains(":ip="))
        .map(|line| {
            let (_, fields) = line.split_once(':')?;
            let field = |name: &str| fields.split(',').find_map(|f| f.strip_prefix(name));
            Some((
                field("port=")?.parse().ok()?,
                field("state=") == Some("online"),
            ))
        })
        .collect()
}

/// Sends a signal to a process (`STOP`, `CONT`) with kill(1).
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// A server of a deployment, for [`empty`].
#[derive(Debug, Clone, Copy)]
pub enum Node {
    /// A primary, with how many replicas must apply its flush.
    Primary { replicas: usize },
    /// A replica: its keys are its primary's, its scripts are its own.
    Replica,
}

/// Empties the server at `port` for the next case, as a new server is:
/// - first waits until the only clients left are the deployment's own (its
///   replicas, its primary, its Sentinels): the previous case's are gone,
///   so nothing it sent can land after the flush;
/// - then `SCRIPT FLUSH`: no cached script, so that a case's first script
///   call still goes through `NOSCRIPT` and `EVAL` as on a new server (the
///   store's fallback stays exercised);
/// - on a primary, `FLUSHALL` first, then `WAIT` until its replicas applied
///   it, so that a replica holds nothing of the previous case either.
pub fn empty(port: u16, node: Node) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let clients: String = try_command(port, &["CLIENT", "LIST"])?;
        let others: Vec<&str> = clients.lines().filter(|c| !own_client(c)).collect();
        if others.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "clients of a finished case still connected to port {port} after {TIMEOUT:?}: {others:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut connection = connect(port)?;
    let failed = |e: redis::RedisError| format!("emptying port {port}: {e}");
    let Node::Primary { replicas } = node else {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut connection)
            .map_err(failed)?;
        return Ok(());
    };
    let mut flush = redis::pipe();
    flush.cmd("FLUSHALL").ignore();
    flush.cmd("SCRIPT").arg("FLUSH").ignore();
    flush
        .cmd("WAIT")
        .arg(replicas)
        .arg(u64::try_from(TIMEOUT.as_millis()).expect("a timeout in ms"));
    let (acknowledged,): (usize,) = flush.query(&mut connection).map_err(failed)?;
    if acknowledged < replicas {
        return Err(format!(
            "{acknowledged} of {replicas} replicas of port {port} applied FLUSHALL"
        ));
    }
    Ok(())
}

/// Whether a line of `CLIENT LIST` is a connection a deployment keeps, or
/// the one asking: a replica (`S`), the link to the primary (`M`), a
/// Sentinel's (named `sentinel-…`).
fn own_client(line: &str) -> bool {
    let field = |name: &str| line.split(' ').find_map(|f| f.strip_prefix(name));
    field("cmd=") == Some("client|list")
        || field("flags=").is_some_and(|flags| flags.contains(['S', 'M']))
        || field("name=").is_some_and(|name| name.starts_with("sentinel-"))
}

/// Calls `check` until it returns `Some`, for at most `patience`; fails
/// the test naming `what` it waited for. The first checks come 5 ms apart,
/// then twice as far apart each time up to 50 ms: a deployment is often
/// ready within milliseconds, and a long wait does not flood it with
/// connections.
pub fn poll<T>(what: &str, patience: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {patience:?} for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
