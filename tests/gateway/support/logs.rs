//! Captures every log line of this test binary, at the most verbose level
//! the gateway can be configured with, using the gateway's own filter.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use gormic_gateway::config::LogLevel;

#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
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
