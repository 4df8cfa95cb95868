//! The store's error type.

use std::io;

/// Errors from the block store. Every variant names the thing that failed and, where
/// there is one, the next step for the caller or operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call on the image, its metadata or its activity log failed, and the image
    /// is still usable: a failed data write (it may have taken partial effect, as any
    /// failed `pwrite`, but its chunks are marked dirty in every tracker and their hashes
    /// unknown), a read, or a checkpoint that could not write its files. The OS error is
    /// kept: [`StoreError::is_no_space`] tells a full file system (`ENOSPC`, `EDQUOT`;
    /// free space and retry) from other causes. Failures that may have lost acknowledged
    /// data are [`StoreError::Failed`] instead.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path or offset.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `create` found an image (or one of its files) already there.
    #[error("disk image {path} already exists; open it, or destroy it first")]
    AlreadyExists {
        /// The image path.
        path: String,
    },
    /// `open` found no image file.
    #[error("disk image {path} does not exist; create it first")]
    NotFound {
        /// The image path.
        path: String,
    },
    /// The metadata is missing, undecodable or does not match the image. The store refuses
    /// to guess: the image data may be fine, but nothing about its chunks can be trusted.
    #[error(
        "metadata of disk image {what} is unusable ({reason}); restore the disk from a replica or recreate it"
    )]
    Corrupt {
        /// The image (or metadata file) concerned.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A byte range or chunk index lies outside the disk.
    #[error("range {offset}+{len} is outside the disk ({size} bytes)")]
    OutOfRange {
        /// Start of the requested range (byte offset, or chunk index for chunk calls).
        offset: u64,
        /// Length of the requested range.
        len: u64,
        /// Size of the disk in the same unit.
        size: u64,
    },
    /// An argument is not acceptable (disk id, size, geometry, tree level, tracker name).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// No dirty tracker of that name exists on this image.
    #[error("no dirty tracker named {0:?} on this disk; start it with start_tracking")]
    UnknownTracker(String),
    /// A dirty tracker of that name already exists.
    #[error("a dirty tracker named {0:?} already exists; drop it first or reuse it")]
    TrackerExists(String),
    /// The image was closed with `close()`; open it again to use it.
    #[error("disk image is closed; open it again to use it")]
    Closed,
    /// Concurrent writes kept invalidating chunk hashes while a hash tree was being
    /// completed. Retry when the write load is lower (compare-delta runs on a quiet copy).
    #[error("chunk hashes kept changing under concurrent writes; retry when writes pause")]
    Busy,
    /// The image is failed: an earlier fsync/fdatasync of its data, chunk hashes or
    /// metadata, or an append to its activity log, failed, so data acknowledged as written
    /// may not be on disk, and the activity log may end in a torn frame. The image refuses
    /// writes, flushes and checkpoints from then on (reads still work, and see what the
    /// kernel holds, which may not be on disk). Reopening it recovers it as after a crash:
    /// every chunk that may have been lost is distrusted and marked dirty. Check the
    /// device, then reopen the image, or resync it from a replica.
    #[error(
        "disk image {image} is failed since {first_error}; its data may not be on disk: check the device, then reopen the image or resync it from a replica"
    )]
    Failed {
        /// The image.
        image: String,
        /// The first error, which failed the image.
        first_error: String,
    },
    /// A blocking task run by an async wrapper panicked or was cancelled.
    #[error("blocking store task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source,
        }
    }

    /// Whether this is an I/O error because the file system is full (`ENOSPC`) or a quota
    /// is exhausted (`EDQUOT`): nothing sticky, the call may succeed once space is freed.
    /// An NBD server answers such a write with `ENOSPC`.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => is_no_space(source),
            _ => false,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// Whether `e` says the file system is full or a quota exhausted.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    let nospc = rustix::io::Errno::NOSPC.raw_os_error();
    let dquot = rustix::io::Errno::DQUOT.raw_os_error();
    e.kind() == io::ErrorKind::StorageFull
        || e.raw_os_error().is_some_and(|c| c == nospc || c == dquot)
}

/// Result alias for the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
