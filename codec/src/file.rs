//! Crash-safe files: the one place where Convoy replaces a file on disk.
//!
//! [`durable_write`] writes a temporary file next to the target, fsyncs it, renames it over
//! the target and fsyncs the directory, so after a crash the path holds either the complete
//! old content or the complete new content, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::CodecError;

/// Errors from reading or writing an encoded record file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The file exists but its content does not decode.
    #[error("{path}: {source}")]
    Codec {
        /// The file.
        path: String,
        /// What is wrong with the content.
        source: CodecError,
    },
}

/// Suffix of the temporary files [`durable_write_mode`] creates next to their target.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Removes temporary files a crash left in `dir` next to `name` (`.<name>.*.tmp`). Call
/// only while nothing else writes `name` in `dir` (when its owner opens the directory).
pub fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        if file.starts_with(&prefix) && file.ends_with(TEMP_SUFFIX) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Atomically and durably replaces `path` with `bytes`. `mode` sets Unix permissions of the
/// new file (e.g. 0o600 for private keys).
pub fn durable_write_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // A temp name of its own per call: two writers replacing the same file at once (a
    // snapshot being built while another is installed) must not write into one temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}-{n}{TEMP_SUFFIX}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A stale temp file of the same name (a pid reused after a crash) may carry other
    // permissions; start afresh.
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// [`durable_write_mode`] with mode 0o644.
pub fn durable_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    durable_write_mode(path, bytes, 0o644)
}

/// Encodes `value` with the codec and durably writes it to `path`.
pub fn write_record<T: Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let bytes = crate::encode(value).map_err(|source| FileError::Codec {
        path: path.display().to_string(),
        source,
    })?;
    durable_write(path, &bytes).map_err(|source| FileError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Encodes `value` at its own schema `version` (see [`crate::encode_versioned`]) and
/// durably writes it to `path`. Read it back with [`read_bytes`] and dispatch on the
/// version byte, upgrading older versions.
pub fn write_record_versioned<T: Serialize>(
    path: &Path,
    version: u8,
    value: &T,
) -> Result<(), FileError> {
    let bytes = crate::encode_versioned(version, value).map_err(|source| FileError::Codec {
        path: path.display().to_string(),
        source,
    })?;
    durable_write(path, &bytes).map_err(|source| FileError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The raw bytes of a record file; `Ok(None)` when the file does not exist.
pub fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Reads a record written by [`write_record`]; `Ok(None)` when the file does not exist.
pub fn read_record<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    crate::decode(&bytes)
        .map(Some)
        .map_err(|source| FileError::Codec {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_replacements_of_one_file_never_collide() {
        // Two writers replacing one file at once (a Raft snapshot built while another is
        // installed) each use their own temp file: both succeed, and the file holds one of
        // the two complete records.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("current.snap");
        std::thread::scope(|scope| {
            for writer in 0..2u32 {
                let p = &p;
                scope.spawn(move || {
                    for i in 0..200u32 {
                        write_record(p, &vec![writer; 1000 + i as usize]).unwrap();
                    }
                });
            }
        });
        let got: Vec<u32> = read_record(&p).unwrap().unwrap();
        assert!(got.iter().all(|w| *w == got[0]) && got.len() == 1199);
        remove_stale_temps(dir.path(), "current.snap");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn replace_keeps_latest_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec");
        assert_eq!(read_record::<Vec<u32>>(&p).unwrap(), None);
        write_record(&p, &vec![1u32, 2]).unwrap();
        write_record(&p, &vec![3u32]).unwrap();
        assert_eq!(read_record::<Vec<u32>>(&p).unwrap(), Some(vec![3]));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
    }

    #[test]
    fn corrupt_record_is_an_error_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec");
        fs::write(&p, b"\x01\xff\xff").unwrap();
        assert!(matches!(
            read_record::<Vec<u32>>(&p),
            Err(FileError::Codec { .. })
        ));
    }

    #[test]
    fn private_mode_is_applied() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        durable_write_mode(&p, b"secret", 0o600).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
