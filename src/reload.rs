//! Picking up files that change under a running gateway: the TLS certificate,
//! key and client CA, and the credentials file. One polling task per
//! reloadable thing ([`watch`]), the "has anything changed since it was
//! last judged" bookkeeping ([`Snapshot`], [`ChangeGate`]) its `reload()`
//! uses, and the count of reloads ([`ReloadMetrics`]).
//!
//! Polling compares file *content*, not modification times: Kubernetes
//! Secret volumes publish an update by swapping a `..data` symlink (the file's
//! own mtime does not move), and cert-manager or Vault agent rewrite files in
//! place. Reading a few KiB every `--reload-interval` costs nothing
//! measurable, and comparing the bytes themselves can neither miss a change
//! nor see one that is not there.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::{Instant, MissedTickBehavior};

use crate::metrics::{MetricsArgs, Series};

/// What a `reload()` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold what was last judged (in use, or already refused and
    /// reported): nothing was done.
    Unchanged,
    /// The files changed and passed every start-up check: new connections
    /// (TLS) or calls (credentials) use them from now on.
    Replaced,
}

/// A reload that did something, as [`watch`] reports it to its caller (for
/// `gormic_gateway_reloads_total{file,result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New content is in use.
    Success,
    /// New content was refused; the previous content stays in use.
    Failure,
}

impl Outcome {
    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    result: &'static str,
}

/// `gormic_gateway_reloads_total{file,result}`; registered with
/// [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct ReloadMetrics {
    reloads: Family<ReloadLabels, Counter>,
}

impl Series for ReloadMetrics {
    fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "gormic_gateway_reloads",
            "Reloads of the certificates and credentials files, by file and result",
            reloads.clone(),
        );
        Self { reloads }
    }
}

impl ReloadMetrics {
    /// A reload of `file` (a short constant naming the file set: `tls`,
    /// `upstream_tls`, `credentials`) came to `outcome`.
    pub fn reload(&self, file: &'static str, outcome: Outcome) {
        self.reloads
            .get_or_create(&ReloadLabels {
                file,
                result: outcome.as_str(),
            })
            .inc();
    }
}

/// Calls `reload` every `interval` until `shutdown` resolves. `what` names
/// the thing in log lines and is handed to `on_outcome` with every reload
/// that replaced something or failed (not for `Unchanged`), so the caller
/// can count them.
///
/// Logs `info` on success and `warn` with the error on failure; the error
/// types of this crate never carry file content. The first check happens
/// one `interval` after the call: the caller has just loaded the files.
/// `reload` runs on this task's thread: it reads and parses a few small
/// local files, well under a millisecond of work each interval.
pub async fn watch<E: Display>(
    interval: Duration,
    shutdown: impl Future<Output = ()>,
    what: &'static str,
    mut reload: impl FnMut() -> Result<Reloaded, E>,
    mut on_outcome: impl FnMut(&'static str, Outcome),
) {
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    // After a stall (a suspended VM), one check is enough, not a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        match reload() {
            Ok(Reloaded::Unchanged) => {}
            Ok(Reloaded::Replaced) => {
                tracing::info!(file = what, "reloaded {what}: new content in use");
                on_outcome(what, Outcome::Success);
            }
            Err(error) => {
                tracing::warn!(
                    file = what,
                    error = %error,
                    "reload of {what} refused; the previous content stays in use"
                );
                on_outcome(what, Outcome::Failure);
            }
        }
    }
}

/// The content of a list of files as read at one moment, each either its
/// bytes or why it could not be read. Two snapshots are equal when every file
/// held the same bytes (or failed the same way).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Snapshot(Vec<Result<Arc<[u8]>, ReadFailure>>);

/// Why a file could not be read; compared by kind and text so that a file
/// that stays missing is one state, not a new one at every poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadFailure(String);

impl Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Snapshot {
    /// Reads every file whole (they are small: certificates, keys, a
    /// credentials table).
    pub(crate) fn read(paths: &[&Path]) -> Self {
        Snapshot(
            paths
                .iter()
                .map(|path| {
                    std::fs::read(path)
                        .map(Arc::from)
                        .map_err(|e| ReadFailure(describe_io_error(&e)))
                })
                .collect(),
        )
    }

    /// The `index`-th file's bytes, in the order given to [`Snapshot::read`].
    pub(crate) fn file(&self, index: usize) -> Result<&[u8], &ReadFailure> {
        match self.0.get(index) {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(failure)) => Err(failure),
            None => Ok(&[]),
        }
    }
}

fn describe_io_error(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => "cannot read the file: it does not exist".into(),
        io::ErrorKind::PermissionDenied => {
            "cannot read the file: permission denied (the gateway's user must be able to read it)"
                .into()
        }
        io::ErrorKind::IsADirectory => "cannot read the file: it is a directory".into(),
        _ => format!("cannot read the file: {error}"),
    }
}

/// Remembers the last snapshot judged (accepted or refused), so that a
/// reload acts once per new content: a refused rotation is reported once,
/// not at every poll, and the next different content is judged again.
pub(crate) struct ChangeGate {
    paths: Vec<PathBuf>,
    last: Mutex<Snapshot>,
}

impl ChangeGate {
    /// `initial` is the snapshot the current content was built from.
    pub(crate) fn new(paths: Vec<PathBuf>, initial: Snapshot) -> Self {
        ChangeGate {
            paths,
            last: Mutex::new(initial),
        }
    }

    /// Reads the files; `Some(snapshot)` when they differ from the last
    /// snapshot judged, which this snapshot now becomes.
    pub(crate) fn next_change(&self) -> Option<Snapshot> {
        let paths: Vec<&Path> = self.paths.iter().map(PathBuf::as_path).collect();
        let snapshot = Snapshot::read(&paths);
        // A poisoned lock only means a reload panicked midway; the snapshot
        // inside is still a complete value.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == snapshot {
            return None;
        }
        *last = snapshot.clone();
        Some(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_are_counted_by_file_and_result() {
        let metrics = crate::metrics::Metrics::default();
        let reloads = metrics.series::<ReloadMetrics>();
        reloads.reload("credentials", Outcome::Success);
        reloads.reload("tls", Outcome::Failure);
        reloads.reload("tls", Outcome::Failure);
        let text = metrics.encode();
        let series = |file: &str, result: &str| {
            crate::metrics::tests::sample(
                &text,
                &format!(r#"gormic_gateway_reloads_total{{file="{file}",result="{result}"}}"#),
            )
        };
        assert_eq!(series("credentials", "success").as_deref(), Some("1"));
        assert_eq!(series("tls", "failure").as_deref(), Some("2"));
        assert_eq!(series("tls", "success"), None);
    }

    #[test]
    fn snapshots_compare_content_not_metadata() {
        let dir = std::env::temp_dir().join(format!("gormic-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.pem");
        std::fs::write(&file, b"one").unwrap();
        let gate = ChangeGate::new(vec![file.clone()], Snapshot::read(&[&file]));
        assert!(gate.next_change().is_none(), "same content is no change");

        std::fs::write(&file, b"two").unwrap();
        let changed = gate.next_change().expect("new content is a change");
        assert_eq!(changed.file(0).unwrap(), b"two");
        assert!(gate.next_change().is_none(), "judged once");

        std::fs::remove_file(&file).unwrap();
        let missing = gate.next_change().expect("a vanished file is a change");
        let failure = missing.file(0).unwrap_err().to_string();
        assert!(failure.contains("does not exist"), "{failure}");
        assert!(gate.next_change().is_none(), "still missing: same state");

        std::fs::write(&file, b"two").unwrap();
        assert!(gate.next_change().is_some(), "back after a failure");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
