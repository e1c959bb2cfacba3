//! A real `redis-server` on a free loopback port for the idempotency store
//! tests: found on PATH, ready once it prints so, killed on drop. Without
//! persistence (`--save "" --appendonly no`), so a restart starts empty.
//! [`RedisServer::commandstats`] tells what it executed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const READY: &str = "Ready to accept connections";
/// Generous: a loaded 2-core VM starts redis-server in milliseconds.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    config: Vec<String>,
    /// Everything the server printed, for failure messages.
    output: Arc<Mutex<String>>,
}

impl RedisServer {
    /// A server with the default configuration.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra `--name value` arguments, e.g.
    /// `["--maxmemory", "4mb"]`.
    pub fn start_with(config: &[&str]) -> Self {
        let config: Vec<String> = config.iter().map(|s| (*s).to_owned()).collect();
        // A port picked free may be taken before the server binds it: try a
        // few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match launch(port, &config) {
                Ok((child, output)) => {
                    return Self {
                        child: Some(child),
                        port,
                        config,
                        output,
                    };
                }
                Err(output) => last = output,
            }
        }
        panic!("redis-server did not start on a free port; its output:\n{last}");
    }

    /// A server on `port` (a cluster node's, which must leave room for its
    /// bus port); the error is what it printed if it did not start.
    pub fn start_on(port: u16, config: &[&str]) -> Result<Self, String> {
        let config: Vec<String> = config.iter().map(|s| (*s).to_owned()).collect();
        let (child, output) = launch(port, &config)?;
        Ok(Self {
            child: Some(child),
            port,
            config,
            output,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, to pause it (SIGSTOP) or resume it (SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server now (SIGKILL): connections break mid-flight.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        match launch(self.port, &self.config) {
            Ok((child, output)) => {
                self.child = Some(child);
                self.output = output;
            }
            Err(output) => panic!(
                "redis-server did not restart on port {}; its output:\n{output}",
                self.port
            ),
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// How many times the server executed each command since it started or
    /// since [`Self::reset_stats`], from `INFO commandstats`: its `calls`,
    /// which count commands that ran and failed (`failed_calls`, e.g. an
    /// EVALSHA answered NOSCRIPT) but not commands refused before running
    /// (`rejected_calls`: wrong arity, OOM…). Keys are lower case,
    /// subcommands joined by `|` (`evalsha`, `script|load`,
    /// `client|setinfo`); a command never seen is absent, one only
    /// rejected maps to 0. The helpers' own `INFO` and `CONFIG RESETSTAT`
    /// count too, each once its call has run (an `INFO` does not count
    /// itself).
    pub fn commandstats(&self) -> HashMap<String, u64> {
        let info = self.command(&["INFO", "commandstats"]);
        info.lines()
            .filter_map(|line| {
                let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = fields
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().expect("a number of calls")))
            })
            .collect()
    }

    /// Zeroes the server's statistics (`CONFIG RESETSTAT`), commandstats
    /// included.
    pub fn reset_stats(&self) {
        assert_eq!(self.command(&["CONFIG", "RESETSTAT"]), "OK");
    }

    /// Sends one command over a connection of its own and returns the
    /// reply's text (a simple or bulk string); fails the test on an error
    /// reply.
    fn command(&self, args: &[&str]) -> String {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis-server");
        stream
            .set_read_timeout(Some(START_TIMEOUT))
            .expect("set a read timeout");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream
            .write_all(request.as_bytes())
            .expect("send a command to redis-server");
        let mut reply = BufReader::new(stream);
        let mut head = String::new();
        reply
            .read_line(&mut head)
            .expect("read redis-server's reply");
        let head = head.trim_end();
        match head.split_at_checked(1) {
            Some(("+", text)) => text.to_owned(),
            Some(("$", len)) => {
                let len: usize = len.parse().expect("a bulk string length");
                let mut body = vec![0; len + 2];
                reply
                    .read_exact(&mut body)
                    .expect("read redis-server's bulk reply");
                body.truncate(len);
                String::from_utf8(body).expect("a UTF-8 reply")
            }
            _ => panic!("redis-server answered {args:?} with {head:?}"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_server() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH; the idempotency store tests need it: \
                 install it with `apt-get install redis-server` (Debian/Ubuntu), \
                 or run .ci/run, which installs it"
            )
        })
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Starts the server and waits for its readiness line; on failure, returns
/// what it printed.
fn launch(port: u16, config: &[String]) -> Result<(Child, Arc<Mutex<String>>), String> {
    let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .into_iter()
        .chain(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .map(str::to_owned)
        .collect();
    args.extend_from_slice(config);
    spawn_until(&args, READY)
}

/// Runs `redis-server ARGS` and waits for a line containing `ready` (a
/// Sentinel prints another than a server); on failure, returns what it
/// printed.
pub fn spawn_until(
    args: &[String],
    ready_line: &str,
) -> Result<(Child, Arc<Mutex<String>>), String> {
    let mut child = Command::new(redis_server())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn redis-server");
    let output = Arc::new(Mutex::new(String::new()));
    let (lines, ready) = mpsc::channel();
    // Both pipes are drained until the server exits, so it never blocks on
    // a full pipe; stdout's lines also go to the readiness check.
    drain(child.stdout.take().expect("stdout"), &output, Some(lines));
    drain(child.stderr.take().expect("stderr"), &output, None);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ready.recv_timeout(left) {
            Ok(line) if line.contains(ready_line) => return Ok((child, output)),
            Ok(_) => {}
            Err(_) => {
                // Exited (pipe closed) or never got ready.
                let _ = child.kill();
                let _ = child.wait();
                let text = output.lock().expect("output lock").clone();
                return Err(text);
            }
        }
    }
}

fn drain(
    pipe: impl Read + Send + 'static,
    output: &Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) {
    let output = output.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut all) = output.lock() {
                all.push_str(&line);
                all.push('\n');
            }
            if let Some(lines) = &lines {
                // The reader is gone once the server is ready: keep draining.
                let _ = lines.send(line);
            }
        }
    });
}

mod tests {
    use super::RedisServer;

    #[tokio::test]
    async fn commandstats_count_the_commands_redis_executed_failed_ones_included() {
        let redis = RedisServer::start();
        let client = redis::Client::open(redis.url()).expect("redis URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis-server");
        redis.reset_stats();

        // The first invocation's EVALSHA fails (NOSCRIPT), then the script
        // is loaded and run again: 3 EVALSHA and 1 SCRIPT LOAD in all.
        let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
        for expected in 1..=2 {
            let counter: i64 = script
                .key("counter")
                .invoke_async(&mut connection)
                .await
                .expect("run the script");
            assert_eq!(counter, expected);
        }

        let stats = redis.commandstats();
        assert_eq!(stats.get("evalsha"), Some(&3), "{stats:?}");
        assert_eq!(stats.get("script|load"), Some(&1), "{stats:?}");
        assert_eq!(stats.get("incr"), Some(&2), "{stats:?}");
        assert_eq!(stats.get("config|resetstat"), Some(&1), "{stats:?}");
        assert_eq!(stats.get("get"), None, "{stats:?}");

        redis.reset_stats();
        assert_eq!(redis.commandstats().get("evalsha"), None);
    }
}
