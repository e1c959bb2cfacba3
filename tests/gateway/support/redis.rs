//! A real `redis-server` on a free loopback port for the idempotency store
//! tests: found on PATH, ready once it prints so, killed on drop. Without
//! persistence (`--save "" --appendonly no`), so a restart starts empty.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
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

    pub fn port(&self) -> u16 {
        self.port
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

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Starts the server and waits for its readiness line; on failure, returns
/// what it printed.
fn launch(port: u16, config: &[String]) -> Result<(Child, Arc<Mutex<String>>), String> {
    let mut child = Command::new(redis_server())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(config)
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
            Ok(line) if line.contains(READY) => return Ok((child, output)),
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
