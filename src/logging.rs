//! Log set-up and the log writer.
//!
//! **Secrets.** The level applies to the gateway's own lines; libraries that
//! see raw headers (h2, hyper, tonic) are capped at `info`, so that no level,
//! however verbose, prints request headers such as `api-key`.
//!
//! **Cost.** Every call writes one line, so writing must not block the call
//! nor cost a system call per line. A worker thread appends its formatted
//! lines to a buffer of its own (no lock) and hands the buffer to a
//! dedicated writer thread when it holds [`BATCH_BYTES`] or every
//! [`FLUSH_EVERY`]: one hand-off per batch, not per line. If the writer falls
//! behind (stderr is a pipe nobody reads), whole batches are dropped rather
//! than stalling calls; the dropped lines are counted
//! ([`dropped_lines`], the `gormic_gateway_log_lines_dropped_total` metric)
//! and reported on stderr once the writer catches up. Other threads (start-up,
//! shutdown) write their rare lines directly.
//!
//! **Why not tracing-appender.** Its `non_blocking` writer (lossy, a
//! bounded queue of 4,096 lines, its `ErrorCounter` for [`dropped_lines`],
//! stderr behind a `BufWriter`) was measured in place of this one. User-
//! space instructions per call were the same, but it hands over every line
//! (a `Vec` each) through a crossbeam channel that wakes the writer thread,
//! and wake-ups are what costs on a small VM: its log thread took several
//! times the CPU and the context switches per call of this one, most of all
//! one call at a time (BENCHMARKS.md, "Design choices measured").

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

mod format;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

pub use format::LineFormat;

/// Log flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log level of the gateway's own log lines.
    #[arg(long, env = "GORMIC_LOG_LEVEL", value_name = "LEVEL", value_enum, default_value_t = LogLevel::Info, help_heading = "Logs")]
    pub log_level: LogLevel,

    /// Log line format.
    #[arg(long, env = "GORMIC_LOG_FORMAT", value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = "Logs")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A worker's buffer is handed to the writer once it holds this much.
pub const BATCH_BYTES: usize = 16 * 1024;
/// ... or at the latest this long after its first line.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Batches waiting for the writer thread (64 × 16 KiB = 1 MiB at most).
const QUEUE_BATCHES: usize = 64;
/// How long [`LogGuard`] waits for the writer to empty its queue at exit.
const EXIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The filter for a level: our level for everything, at most `info` for the
/// HTTP stacks.
pub fn filter(level: LogLevel) -> EnvFilter {
    let ours = match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    let libraries = match level {
        LogLevel::Error | LogLevel::Warn => ours,
        _ => "info",
    };
    let mut filter = EnvFilter::new(ours);
    for target in [
        "h2",
        "hyper",
        "hyper_util",
        "reqwest",
        "tonic",
        "tonic_web",
        "tower",
        "tower_http",
        "axum",
        "rustls",
        "redis",
        "opentelemetry",
        "opentelemetry_sdk",
        "opentelemetry_otlp",
    ] {
        if let Ok(directive) = format!("{target}={libraries}").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Installs the global subscriber, writing to stderr through the batching
/// writer. Keep the guard until exit: dropping it flushes what is queued.
pub fn init(level: LogLevel, format: LogFormat) -> LogGuard {
    let writer = Sink::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(BatchingWriter);
    let _ = match format {
        LogFormat::Text => builder.event_format(LineFormat::text()).try_init(),
        LogFormat::Json => builder.event_format(LineFormat::json()).try_init(),
    };
    LogGuard { started: writer }
}

/// Flushes the log queue when dropped (at exit).
#[must_use = "dropping the guard flushes and stops the log writer"]
pub struct LogGuard {
    started: bool,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush_thread();
        if self.started
            && let Some(sink) = SINK.get()
        {
            sink.drain(EXIT_FLUSH_TIMEOUT);
        }
    }
}

/// Log lines dropped because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED_LINES.load(Ordering::Relaxed)
}

/// Makes this thread buffer its log lines (see the module comment); the
/// thread must then call [`flush_thread`] regularly, as the workers do with
/// [`flush_periodically`].
pub fn batch_this_thread() {
    BATCH.with(|batch| *batch.borrow_mut() = Some(Vec::with_capacity(BATCH_BYTES)));
}

/// Hands this thread's buffered lines to the writer.
pub fn flush_thread() {
    let full = BATCH.with(|batch| match batch.borrow_mut().as_mut() {
        Some(lines) if !lines.is_empty() => Some(std::mem::take(lines)),
        _ => None,
    });
    if let Some(lines) = full {
        send(lines);
    }
}

/// Flushes the current thread's buffer every [`FLUSH_EVERY`]; runs as a
/// task on each worker for as long as the worker lives.
pub async fn flush_periodically() {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush_thread();
    }
}

static SINK: OnceLock<Sink> = OnceLock::new();
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// `Some` on threads that batch (the workers).
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

enum Message {
    Lines(Vec<u8>),
    /// Acknowledged once everything sent before it is written.
    Drain(mpsc::Sender<()>),
}

/// The writer thread's queue.
struct Sink {
    queue: SyncSender<Message>,
    /// The `Drain` acknowledgement channel is created per drain; the lock
    /// keeps two drains from interleaving.
    draining: Mutex<()>,
}

impl Sink {
    /// Starts the writer thread once per process; `false` if it could not
    /// start (lines are then written directly).
    fn start() -> bool {
        if SINK.get().is_some() {
            return true;
        }
        let (queue, lines) = mpsc::sync_channel(QUEUE_BATCHES);
        let started = thread::Builder::new()
            .name("gormic-log".into())
            .spawn(move || write_lines(lines))
            .is_ok();
        if started {
            let _ = SINK.set(Sink {
                queue,
                draining: Mutex::new(()),
            });
        }
        started
    }

    fn drain(&self, timeout: Duration) {
        let Ok(_one_at_a_time) = self.draining.lock() else {
            return;
        };
        let (ack, acked) = mpsc::channel();
        if self.queue.send(Message::Drain(ack)).is_ok() {
            let _ = acked.recv_timeout(timeout);
        }
    }
}

/// The writer thread: writes batches in order; reports drops when it
/// catches up.
fn write_lines(queue: Receiver<Message>) {
    let mut reported = 0;
    for message in queue {
        match message {
            Message::Lines(lines) => {
                let _ = io::stderr().write_all(&lines);
            }
            Message::Drain(ack) => {
                let _ = ack.send(());
            }
        }
        let dropped = DROPPED_LINES.load(Ordering::Relaxed);
        if dropped != reported {
            let _ = writeln!(
                io::stderr(),
                "gormic-gateway: {} log lines dropped: stderr is not keeping up",
                dropped - reported
            );
            reported = dropped;
        }
    }
}

fn send(lines: Vec<u8>) {
    let Some(sink) = SINK.get() else {
        let _ = io::stderr().write_all(&lines);
        return;
    };
    match sink.queue.try_send(Message::Lines(lines)) {
        Ok(()) => {}
        Err(TrySendError::Full(Message::Lines(lines)))
        | Err(TrySendError::Disconnected(Message::Lines(lines))) => {
            let count = lines.iter().filter(|&&b| b == b'\n').count() as u64;
            DROPPED_LINES.fetch_add(count, Ordering::Relaxed);
        }
        Err(_) => {}
    }
}

/// The `MakeWriter` of the subscriber: batches on worker threads, writes
/// directly elsewhere.
#[derive(Debug, Clone, Copy)]
struct BatchingWriter;

impl<'a> MakeWriter<'a> for BatchingWriter {
    type Writer = BatchingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

impl Write for BatchingWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        enum Route {
            Buffered,
            Full(Vec<u8>),
            Direct,
        }
        let route = BATCH.with(|batch| match batch.borrow_mut().as_mut() {
            Some(lines) => {
                lines.extend_from_slice(line);
                if lines.len() >= BATCH_BYTES {
                    Route::Full(std::mem::replace(lines, Vec::with_capacity(BATCH_BYTES)))
                } else {
                    Route::Buffered
                }
            }
            None => Route::Direct,
        });
        match route {
            Route::Buffered => {}
            Route::Full(lines) => send(lines),
            Route::Direct => io::stderr().write_all(line)?,
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
