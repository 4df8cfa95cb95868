//! Crash-safe file replacement.
//!
//! A file replaced with [`durable_write`] is, after any crash, either the complete old
//! contents or the complete new contents — never empty, never a mix — once the call has
//! returned `Ok` the new contents survive power loss.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A step of [`durable_write`] failed. The target file is untouched (it still has its old
/// contents, or still does not exist); a leftover temporary file is removed when possible.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot write {path} durably ({step}): {source}; check that the directory exists and is writable"
)]
pub struct DurableWriteError {
    /// The file that was to be replaced.
    pub path: PathBuf,
    /// Which step failed (create temp file, write, fsync, rename, fsync directory).
    pub step: &'static str,
    /// The underlying I/O error.
    #[source]
    pub source: io::Error,
}

/// Replaces `path` with `bytes` crash-safely, with permissions `0644`.
///
/// Writes a temporary file in the same directory, fsyncs it, renames it over `path`, and
/// fsyncs the directory so the rename itself is durable. See the module docs for what
/// callers may rely on.
pub fn durable_write(path: &Path, bytes: &[u8]) -> Result<(), DurableWriteError> {
    durable_write_with_mode(path, bytes, 0o644)
}

/// Like [`durable_write`] but the file gets Unix permissions `mode` (for example `0o600`
/// for private keys). The mode is set before any byte is written, so secret contents are
/// never readable with wider permissions, whatever the process umask.
pub fn durable_write_with_mode(
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), DurableWriteError> {
    let Some(file_name) = path.file_name() else {
        return Err(failed(path, "check path")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no file name",
        )));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:016x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));

    if let Err(e) = write_then_rename(&tmp, path, bytes, mode) {
        // Best effort: the temp file is garbage either way, and the error to report is the
        // one that stopped us.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(failed(path, "fsync directory"))
}

fn failed(path: &Path, step: &'static str) -> impl FnOnce(io::Error) -> DurableWriteError {
    let path = path.to_path_buf();
    move |source| DurableWriteError { path, step, source }
}

fn write_then_rename(
    tmp: &Path,
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), DurableWriteError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(failed(path, "create temporary file"))?;
    // The umask may have narrowed `mode` at creation; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(failed(path, "set permissions"))?;
    file.write_all(bytes)
        .map_err(failed(path, "write temporary file"))?;
    file.sync_all()
        .map_err(failed(path, "fsync temporary file"))?;
    drop(file);
    fs::rename(tmp, path).map_err(failed(path, "rename over target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_contents_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        durable_write_with_mode(&path, b"one", 0o600).unwrap();
        durable_write_with_mode(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn missing_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("a.crt");
        let err = durable_write(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("a.crt"), "{err}");
        assert_eq!(err.step, "create temporary file");
    }
}
