//! One command to a redis-server or Sentinel on loopback, from test code:
//! a fresh connection each time, every wait bounded, an error reply or a
//! connection failure as `Err` (a test waiting for a node to come or go
//! decides what that means).

use std::time::Duration;

use redis::FromRedisValue;

/// Bound of connecting and of the reply.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `args` to `127.0.0.1:port` and converts the reply.
pub fn try_command<T: FromRedisValue>(port: u16, args: &[&str]) -> Result<T, String> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(|e| e.to_string())?;
    let mut connection = client
        .get_connection_with_timeout(TIMEOUT)
        .map_err(|e| e.to_string())?;
    connection
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
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

/// Sends a signal to a process (`STOP`, `CONT`) with kill(1).
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// Calls `check` every 50 ms until it returns `Some`, for at most
/// `patience`; fails the test naming `what` it waited for.
pub fn poll<T>(what: &str, patience: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited {patience:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
