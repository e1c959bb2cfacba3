//! Whether the files behind a reloadable thing changed since they were last
//! judged: [`Snapshot`] (their content at one moment) and [`ChangeGate`]
//! (the last snapshot accepted or refused), which `ServerTls::reload`,
//! `UpstreamTls::reload` and `CredentialMap::reload` use, and what a reload
//! did ([`Reloaded`]). A leaf: it knows files, not what they hold.
//!
//! Polling compares file *content*, not modification times: Kubernetes
//! Secret volumes publish an update by swapping a `..data` symlink (the file's
//! own mtime does not move), and cert-manager or Vault agent rewrite files in
//! place. Reading a few KiB every `--reload-interval` costs nothing
//! measurable, and comparing the bytes themselves can neither miss a change
//! nor see one that is not there.

use std::fmt::Display;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
