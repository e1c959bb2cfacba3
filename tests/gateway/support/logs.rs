//! Captures every log line of this test binary, at the most verbose level
//! the gateway can be configured with, using the gateway's own filter; a
//! test can wait for a line ([`Logs::wait_for_line`]).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use gormic_gateway::logging::LogLevel;

use super::{PATIENCE, within};

#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>, Arc<Notify>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The first line matching `matches`, once it has been written (lines
    /// come from other threads: the gateway's workers). Fails the test
    /// after [`PATIENCE`], naming `what` (the line waited for).
    pub async fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let found = async {
            loop {
                let written = self.1.notified();
                if let Some(line) = self.text().lines().find(|line| matches(line)) {
                    return line.to_owned();
                }
                written.await;
            }
        };
        within(&format!("the log line {what}"), PATIENCE, found).await
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        self.1.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once) a global JSON subscriber at `--log-level trace`.
pub fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(gormic_gateway::logging::filter(LogLevel::Trace))
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}
