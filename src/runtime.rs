//! The runtime model: thread-per-core.
//!
//! The gateway runs `--worker-threads` worker threads, each driving its own
//! current-thread tokio runtime. An accepted connection is handed to one
//! worker (the one serving the fewest connections) and is served wholly
//! there: TLS handshake, HTTP/2 streams, the call, the upstream request on
//! that worker's own HTTP client (`upstream::client`), the log line. No call ever hops
//! between threads, so none pays for a cross-thread wake-up; on this
//! project's 2-core VM a work-stealing runtime spent more CPU waking threads
//! than serving calls (BENCHMARKS.md).
//!
//! The price: one client connection is served by one core. gRPC clients
//! usually hold one HTTP/2 connection per channel, so a single busy client
//! gets one core's worth of gateway (tens of thousands of calls per second,
//! BENCHMARKS.md); `--max-connection-age` makes long-lived clients reconnect
//! and spread out.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::logging;

/// How long a stopping worker waits for its blocking tasks (DNS look-ups).
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// The worker threads. Dropping it without [`Workers::stop`] leaves them
/// running until the process exits.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Connections this worker is serving, for the least-loaded choice.
    load: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` worker threads (at least one).
    pub fn start(count: usize) -> io::Result<Self> {
        let count = count.max(1);
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = thread::Builder::new()
                .name(format!("gormic-worker-{index}"))
                .spawn(move || {
                    logging::batch_this_thread();
                    runtime.block_on(async {
                        let flusher = tokio::spawn(logging::flush_periodically());
                        let _ = stopped.await;
                        flusher.abort();
                    });
                    // Cancels what is left (connections past the grace period).
                    runtime.shutdown_timeout(STOP_TIMEOUT);
                    logging::flush_thread();
                })?;
            workers.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Self { workers })
    }

    /// Runs `task` on the worker serving the fewest connections; it counts
    /// as one of that worker's connections until it finishes.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
        else {
            return;
        };
        let load = LoadGuard::new(worker.load.clone());
        worker.handle.spawn(async move {
            let _load = load;
            task.await;
        });
    }

    /// Stops every worker (cancelling what they still run) and waits for
    /// their threads to end.
    pub fn stop(mut self) {
        for worker in &mut self.workers {
            if let Some(stop) = worker.stop.take() {
                let _ = stop.send(());
            }
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take()
                && thread.join().is_err()
            {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// One unit of a worker's load, given back when the task ends.
struct LoadGuard(Arc<AtomicUsize>);

impl LoadGuard {
    fn new(load: Arc<AtomicUsize>) -> Self {
        load.fetch_add(1, Ordering::Relaxed);
        Self(load)
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Aborts a task when dropped: for a task that must end with its owner.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The default of `--worker-threads`: one per CPU the process may use.
pub fn default_worker_threads() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_workers_and_spread_by_load() {
        let workers = Workers::start(2).expect("workers start");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = tokio::sync::watch::channel(false);
        for _ in 0..4 {
            let tx = tx.clone();
            let mut released = released.clone();
            workers.spawn(async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
                let _ = released.wait_for(|r| *r).await;
            });
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            let ran = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("waited 10s for a task to run on a worker, in vain");
            seen.push(ran.expect("task ran"));
        }
        seen.sort();
        // Each task stays counted while it waits, so the four alternate.
        let worker = |i: usize| Some(format!("gormic-worker-{i}"));
        assert_eq!(seen, vec![worker(0), worker(0), worker(1), worker(1)]);
        let _ = release.send(true);
        tokio::task::spawn_blocking(move || workers.stop())
            .await
            .expect("workers stop");
    }
}
