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
//!
//! It also holds what the TOML files read this way (credentials, quotas)
//! share: their error, [`FileError`], and opening one ([`TomlFile`]).

use std::fmt::Display;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use toml::Spanned;
use toml::de::DeTable;

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

/// A file that cannot be used: `FILE: line N: problem`. `F` tells which
/// kind of file (each kind is a type of its own, e.g.
/// `crate::credentials::CredentialsError`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {}{problem}", path.display(), line.map(|n| format!("line {n}: ")).unwrap_or_default())]
pub struct FileError<F> {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub problem: String,
    file: PhantomData<fn() -> F>,
}

impl<F> FileError<F> {
    pub(crate) fn new(path: &Path, line: Option<usize>, problem: String) -> Self {
        FileError {
            path: path.to_path_buf(),
            line,
            problem,
            file: PhantomData,
        }
    }
}

/// Parses the first file of `snapshot` with `parse`; a file that could not
/// be read is an error without a line.
pub(crate) fn parse_snapshot<T, F>(
    path: &Path,
    snapshot: &Snapshot,
    parse: impl FnOnce(&Path, &[u8]) -> Result<T, FileError<F>>,
) -> Result<T, FileError<F>> {
    let bytes = snapshot
        .file(0)
        .map_err(|failure| FileError::new(path, None, failure.to_string()))?;
    parse(path, bytes)
}

/// A TOML file being parsed: its name and text, to report a problem at an
/// offset with its line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TomlFile<'a> {
    path: &'a Path,
    text: &'a str,
}

impl<'a> TomlFile<'a> {
    /// The file's text (UTF-8) and its TOML document. The TOML library's
    /// messages are used only for syntax errors, which quote no content.
    pub(crate) fn open<F>(
        path: &'a Path,
        bytes: &'a [u8],
    ) -> Result<(Self, Spanned<DeTable<'a>>), FileError<F>> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            FileError::new(
                path,
                Some(line_of(bytes, e.valid_up_to())),
                "not UTF-8 text".into(),
            )
        })?;
        let file = TomlFile { path, text };
        let document = DeTable::parse(text).map_err(|e| {
            file.error(
                e.span().map(|s| s.start),
                format!("not valid TOML: {}", e.message()),
            )
        })?;
        Ok((file, document))
    }

    /// A problem at byte `offset` (on its line), or with the whole file.
    pub(crate) fn error<F>(&self, offset: Option<usize>, problem: String) -> FileError<F> {
        FileError::new(self.path, offset.map(|o| self.line_of(o)), problem)
    }

    /// The line (from 1) of byte `offset`.
    pub(crate) fn line_of(&self, offset: usize) -> usize {
        line_of(self.text.as_bytes(), offset)
    }
}

fn line_of(bytes: &[u8], offset: usize) -> usize {
    let end = offset.min(bytes.len());
    1 + bytes[..end].iter().filter(|b| **b == b'\n').count()
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
