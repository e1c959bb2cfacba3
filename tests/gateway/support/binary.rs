//! The built binary run as an operator runs it, with a clean `GORMIC_*`
//! environment (no proxy variables either, unless the test passes some): to
//! a refusal at start-up ([`run_to_exit`], with a deadline), or to its
//! "serving" log line and then SIGTERM ([`Serving`]).

use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Longest the binary may take to refuse, to start or to stop; only reached
/// when a test fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// What the gateway logs once its listener is bound.
pub const SERVING: &str = "serving gormic.om.v1.InvoiceService";

/// What the gateway logs once its admin listener is bound.
pub const ADMIN_SERVING: &str = "serving /metrics, /livez, /readyz";

/// The binary with `args`, a clean `GORMIC_*` environment without proxy
/// variables, then `env` (a test's own variables), and its admin listener
/// on an ephemeral port (tests run binaries in parallel; a test that passes
/// `--admin-listen` wins over the variable).
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gormic-gateway"));
    command.args(args).kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        let proxy = matches!(
            name_text.to_ascii_lowercase().as_str(),
            "http_proxy" | "https_proxy" | "all_proxy" | "no_proxy"
        );
        if name_text.starts_with("GORMIC_") || proxy {
            command.env_remove(name);
        }
    }
    command.env("GORMIC_ADMIN_LISTEN", "127.0.0.1:0");
    command.envs(env.iter().copied());
    command
}

/// Runs the binary with `args`; it must exit on its own within the deadline.
pub async fn run_to_exit(args: &[&str]) -> Output {
    run_to_exit_with_env(args, &[]).await
}

/// [`run_to_exit`] with these environment variables set.
pub async fn run_to_exit_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::time::timeout(DEADLINE, command(args, env).output())
        .await
        .unwrap_or_else(|_| panic!("the binary exits instead of serving: {args:?}"))
        .expect("the binary runs")
}

/// A running binary that has logged [`SERVING`].
pub struct Serving {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Its stderr up to now.
    pub stderr: Vec<String>,
}

impl Serving {
    /// Starts the binary and waits for its [`SERVING`] line; fails the test
    /// with everything it printed if it exits first.
    pub async fn start(args: &[&str]) -> Serving {
        Self::start_with_env(args, &[]).await
    }

    /// [`Serving::start`] with these environment variables set (after the
    /// clean-up: a test's `HTTP_PROXY` is kept).
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Serving {
        let mut child = command(args, env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut serving = Serving {
            child,
            lines,
            stderr: Vec::new(),
        };
        let started = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = serving.lines.recv().await {
                let found = line.contains(SERVING);
                serving.stderr.push(line);
                if found {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the binary starts or exits within the deadline");
        if !started {
            let status = tokio::time::timeout(DEADLINE, serving.child.wait())
                .await
                .expect("the binary exits once its stderr is closed")
                .expect("exit status");
            panic!(
                "the binary exited ({status}) before serving:\n{}",
                serving.stderr.join("\n")
            );
        }
        serving
    }

    /// The address of the gRPC listener, from the [`SERVING`] line (needs
    /// `--log-format json`).
    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        let line = self
            .stderr
            .iter()
            .find(|line| line.contains(SERVING))
            .expect("the serving line");
        let json: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        json["grpc"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no grpc address in {line}"))
    }

    /// Waits for the next stderr line matching `matches` and returns it;
    /// fails the test after [`DEADLINE`], naming `what` (the line waited
    /// for) and showing stderr so far.
    pub async fn wait_for_line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let found = async {
            while let Some(line) = self.lines.recv().await {
                self.stderr.push(line.clone());
                if matches(&line) {
                    return Some(line);
                }
            }
            None
        };
        match tokio::time::timeout(DEADLINE, found).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "stderr closed before the line {what}:\n{}",
                self.stderr.join("\n")
            ),
            Err(_) => panic!(
                "waited {DEADLINE:?} for the line {what}, in vain; stderr so far:\n{}",
                self.stderr.join("\n")
            ),
        }
    }

    /// The address of the admin listener, from its start-up line (needs
    /// `--log-format json`).
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        let line = self
            .stderr
            .iter()
            .find(|line| line.contains(ADMIN_SERVING))
            .unwrap_or_else(|| panic!("no admin listener line in {:#?}", self.stderr));
        let json: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        json["admin"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in {line}"))
    }

    /// Sends SIGTERM and returns at once: the binary drains meanwhile.
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("still running");
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill (procps)");
        assert!(killed.success(), "kill -TERM {pid}");
    }

    /// Sends SIGTERM and waits for the exit; returns its status and the
    /// whole stderr.
    pub async fn terminate(self) -> (ExitStatus, Vec<String>) {
        self.sigterm();
        self.wait_for_exit().await
    }

    /// Waits for the exit (after [`Serving::sigterm`]); returns its status
    /// and the whole stderr.
    pub async fn wait_for_exit(mut self) -> (ExitStatus, Vec<String>) {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the binary exits after SIGTERM")
            .expect("exit status");
        while let Some(line) = tokio::time::timeout(DEADLINE, self.lines.recv())
            .await
            .expect("stderr closes")
        {
            self.stderr.push(line);
        }
        (status, self.stderr)
    }
}
