//! A real `redis-server` on a free loopback port for the idempotency store
//! tests: found on PATH, ready once it prints so, killed on drop, and killed
//! with the test binary however that ends ([`spawn`]). Without persistence
//! (`--save "" --appendonly no`) and in a directory of its own, so a restart
//! starts empty and no server reads what another wrote (a replica's full
//! sync writes `dump.rdb`). [`RedisServer::commandstats`] tells what it
//! executed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use super::redis_command::{Node, empty, info_field};

const READY: &str = "Ready to accept connections";
/// Generous: a loaded 2-core VM starts redis-server in milliseconds.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    config: Vec<String>,
    /// Its working directory (`--dir`, unless `config` names another):
    /// where a replica's full sync writes `dump.rdb`. Removed on drop.
    dir: PathBuf,
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
        // A port picked free may be taken before the server binds it: try a
        // few.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::start_on(free_port(), config) {
                Ok(server) => return server,
                Err(output) => last = output,
            }
        }
        panic!("redis-server did not start on a free port; its output:\n{last}");
    }

    /// A server on `port` (a cluster node's, which must leave room for its
    /// bus port); the error is what it printed if it did not start.
    pub fn start_on(port: u16, config: &[&str]) -> Result<Self, String> {
        let config: Vec<String> = config.iter().map(|s| (*s).to_owned()).collect();
        let dir = new_dir(&format!("server-{port}"));
        match launch(port, &dir, &config) {
            Ok((child, output)) => Ok(Self {
                child: Some(child),
                port,
                config,
                dir,
                output,
            }),
            Err(output) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(output)
            }
        }
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

    /// `127.0.0.1:<port>`, for a proxy in front of it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A connection of the test's own, beside any store's.
    pub async fn raw_connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection")
    }

    /// Stops the server now (SIGKILL): connections break mid-flight.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty: nothing is persisted, and
    /// what a full sync wrote (if it was a replica) is removed first.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        match launch(self.port, &self.dir, &self.config) {
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

    /// Whether it is as [`Self::start`] left it, for another case of a
    /// pool: running, a primary, with no replica.
    pub fn ready(&self) -> Result<(), String> {
        if self.child.is_none() {
            return Err(format!("redis-server {} was killed", self.port));
        }
        let role = info_field(self.port, "replication", "role");
        let replicas = info_field(self.port, "replication", "connected_slaves");
        if role.as_deref() != Some("master") || replicas.as_deref() != Some("0") {
            return Err(format!(
                "redis-server {} is a {role:?} with {replicas:?} replicas",
                self.port
            ));
        }
        Ok(())
    }

    /// Empties it as a new server is (see [`empty`]), for the next case of
    /// a pool.
    pub fn empty(&self) -> Result<(), String> {
        empty(self.port, Node::Primary { replicas: 0 })
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
        let _ = std::fs::remove_dir_all(&self.dir);
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

/// A new directory for the files of a Redis process or deployment, named
/// after `name`, in this test process's own directory under cargo's
/// `target/tmp`. Its owner removes it on drop; what a pool or a killed
/// test process left is removed by the next test process.
pub fn new_dir(name: &str) -> PathBuf {
    static OWN: OnceLock<PathBuf> = OnceLock::new();
    let own = OWN.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_dead_processes_dirs(base);
        base.join(format!("redis-{}", std::process::id()))
    });
    let dir = own.join(format!("{name}-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create the directory {}: {e}", dir.display()));
    dir
}

/// Removes the directories of the test processes that are gone (their
/// pooled deployments are never dropped).
#[cfg(target_os = "linux")]
fn remove_dead_processes_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix("redis-"));
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Elsewhere, without `/proc` to tell, they stay.
#[cfg(not(target_os = "linux"))]
fn remove_dead_processes_dirs(_: &Path) {}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Starts the server in `dir` and waits for its readiness line; on
/// failure, returns what it printed.
fn launch(port: u16, dir: &Path, config: &[String]) -> Result<(Child, Arc<Mutex<String>>), String> {
    let dir = dir.display().to_string();
    let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .into_iter()
        .chain(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .chain(["--dir", &dir])
        // A replica's full sync through a snapshot file (in `dir`): the
        // primary streams it its writes as soon as the file is sent. Through
        // a socket (the default), the primary first waits 5 s for more
        // replicas to share the snapshot; and then, until the replica's next
        // acknowledgement (once a second), streams it nothing, so a `WAIT`
        // right after the sync times out.
        .chain(["--repl-diskless-sync", "no"])
        .map(str::to_owned)
        .collect();
    // Last, so that the caller's `--dir` (or any other) wins.
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
    let mut command = Command::new(redis_server());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(command).expect("spawn redis-server");
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

/// Spawns `command` from the spawner thread, so that the process dies
/// with the test binary, whatever ends it: a panic, an abort, a SIGKILL.
/// Pooled deployments (`stores`) are never dropped, and a killed test
/// never runs its drops.
///
/// On Linux the child's parent-death signal is SIGKILL. The kernel sends
/// it when the *thread* that forked the child exits, and libtest runs each
/// test on a thread of its own, which ends with the test while a pooled
/// deployment outlives it: so every Redis process is forked by one thread
/// that lives as long as the process (it waits for requests on a channel
/// whose sender is never dropped).
fn spawn(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("redis-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    die_with_this_process(&mut command);
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the redis-spawner thread");
        requests
    });
    let (reply, spawned) = mpsc::channel();
    spawner
        .send((command, reply))
        .expect("the redis-spawner thread runs until the process exits");
    spawned
        .recv()
        .expect("the redis-spawner thread answers each request")
}

/// Makes the child die when its parent dies (Linux `PR_SET_PDEATHSIG`).
#[cfg(target_os = "linux")]
fn die_with_this_process(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two async-signal-safe system calls (no allocation, no lock).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between the fork and the prctl: no
            // signal will come then, so do not run at all.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Elsewhere the processes are only killed by their owners' drops.
#[cfg(not(target_os = "linux"))]
fn die_with_this_process(_: &mut Command) {}

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
